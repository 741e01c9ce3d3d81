"""TritonGrpcEngine without tritonserver: request building against the BLS contract, and the streaming path
against a small in-process gRPC server that speaks Triton's GRPCInferenceService protocol."""

from __future__ import annotations

import asyncio
import json
from dataclasses import fields
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import InferResult
from tritonclient.utils import deserialize_bytes_tensor

from openai_frontend import Settings, create_app
from openai_frontend.engine.base import (
    EngineError,
    EngineUnavailable,
    GenerationChunk,
    GenerationRequest,
    InvalidInput,
    SamplingOptions,
)
from openai_frontend.engine.triton_grpc import TritonGrpcEngine, build_inputs, map_error, parse_result
from tests.unit.fake_triton_grpc import FakeTriton, bls_response, final_only, with_fake_triton
from vlm_triton.contracts import BLS

MESSAGES = (
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "é?"}, {"type": "image_url", "image_url": {"url": "x"}}]},
)
FULL = SamplingOptions(
    max_tokens=16,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    seed=2**63 + 5,
    repetition_penalty=1.1,
    presence_penalty=0.2,
    frequency_penalty=-0.3,
    stop=("\n\n", "###"),
    ignore_eos=True,
)


def decoded(tensor: Any) -> np.ndarray[Any, Any]:
    """The values an InferInput will carry, decoded from its raw content."""
    raw = tensor._get_content()
    if tensor.datatype() == "BYTES":
        values: np.ndarray[Any, Any] = deserialize_bytes_tensor(raw)
        return values
    return np.frombuffer(raw, dtype=BLS.input(tensor.name()).numpy_dtype)


# --- request building -------------------------------------------------------------------------------------------
def test_every_sampling_option_is_a_bls_input() -> None:
    names = {spec.name for spec in BLS.inputs}
    assert {f.name for f in fields(SamplingOptions)} <= names


def test_build_inputs_match_the_bls_contract() -> None:
    tensors = build_inputs(GenerationRequest("req-1", MESSAGES, FULL, stream=True))
    by_name = {t.name(): t for t in tensors}
    assert set(by_name) == {spec.name for spec in BLS.inputs}  # every input, as every option is set
    for spec in BLS.inputs:
        tensor = by_name[spec.name]
        assert tensor.datatype() == spec.dtype, spec.name
        expected_shape = [2 if d == -1 else d for d in spec.dims] if spec.name == "stop" else list(spec.dims)
        assert tensor.shape() == ([1] if BLS.batched else []) + expected_shape, spec.name
    assert json.loads(decoded(by_name["messages"])[0].decode("utf-8")) == list(MESSAGES)
    assert decoded(by_name["stream"]).tolist() == [True]
    assert decoded(by_name["max_tokens"]).tolist() == [16]
    assert decoded(by_name["seed"]).tolist() == [2**63 + 5]
    assert decoded(by_name["top_k"]).tolist() == [40]
    assert decoded(by_name["temperature"]).tolist() == pytest.approx([0.7])
    assert decoded(by_name["stop"]).tolist() == [b"\n\n", b"###"]
    assert decoded(by_name["ignore_eos"]).tolist() == [True]


def test_build_inputs_leave_unset_options_to_the_model() -> None:
    tensors = build_inputs(GenerationRequest("req-2", MESSAGES, SamplingOptions(temperature=0.0), stream=False))
    assert [t.name() for t in tensors] == ["messages", "stream", "temperature"]
    assert decoded(tensors[1]).tolist() == [False]


@pytest.mark.parametrize(
    ("status", "kind", "http"),
    [
        ("StatusCode.INVALID_ARGUMENT", InvalidInput, 400),
        ("INVALID_ARGUMENT", InvalidInput, 400),
        ("StatusCode.UNAVAILABLE", EngineUnavailable, 503),
        ("StatusCode.INTERNAL", EngineError, 500),
        (None, EngineError, 500),
    ],
)
def test_map_error(status: str | None, kind: type, http: int) -> None:
    error = map_error(status, "image 0: cannot fetch http://x")
    assert type(error) is kind and error.status_code == http
    assert "image 0: cannot fetch http://x" in error.message
    if kind is InvalidInput:
        assert error.message == "image 0: cannot fetch http://x"  # passed through unchanged


# --- responses --------------------------------------------------------------------------------------------------
def test_parse_result() -> None:
    chunk, final = parse_result(InferResult(bls_response("Hé", "", 9, 1)))
    assert chunk == GenerationChunk("Hé", None, 9, 1) and final is False
    chunk, final = parse_result(InferResult(bls_response("", "length", 9, 4, final=True)))
    assert chunk == GenerationChunk("", "length", 9, 4) and final is True
    assert parse_result(InferResult(final_only())) == (None, True)


# --- the streaming path against an in-process gRPC server ---------------------------------------------------------
async def generate(engine: TritonGrpcEngine, request_id: str = "chatcmpl-1") -> list[GenerationChunk]:
    request = GenerationRequest(request_id, MESSAGES, SamplingOptions(max_tokens=4))
    return [chunk async for chunk in engine.chat(request)]


def test_streams_chunks_until_the_final_flag() -> None:
    async def scenario(fake: FakeTriton, url: str) -> None:
        engine = TritonGrpcEngine(url, "served-name", bls_model="ok")
        assert await generate(engine) == [GenerationChunk("Hel", None, 5, 1), GenerationChunk("lo", "stop", 5, 2)]
        request = fake.requests[0]
        assert request.model_name == "ok" and request.id == "chatcmpl-1"
        assert request.parameters["triton_enable_empty_final_response"].bool_param is True
        assert fake.metadata[0]["triton_grpc_error"] == "true"
        engine.bls_model = "ok_final_with_last"
        assert await generate(engine, "chatcmpl-2") == [GenerationChunk("Hello", "length", 5, 3)]
        assert [m.id for m in engine.models()] == ["served-name"]
        await engine.close()

    with_fake_triton(scenario)


def test_invalid_argument_becomes_invalid_input_with_the_server_message() -> None:
    async def scenario(fake: FakeTriton, url: str) -> None:
        engine = TritonGrpcEngine(url, "m", bls_model="invalid")
        with pytest.raises(InvalidInput) as caught:
            await generate(engine)
        assert caught.value.message == "image 0: unsupported URL scheme 'ftp'" and caught.value.status_code == 400
        engine.bls_model = "in_band_error"
        with pytest.raises(EngineError, match="model crashed") as crashed:
            await generate(engine)
        assert crashed.value.status_code == 500
        engine.bls_model = "no_finish"
        with pytest.raises(EngineError, match="without a finish_reason"):
            await generate(engine)
        await engine.close()

    with_fake_triton(scenario)


def test_closing_the_generator_cancels_the_grpc_request() -> None:
    async def scenario(fake: FakeTriton, url: str) -> None:
        engine = TritonGrpcEngine(url, "m", bls_model="slow")
        chunks = engine.chat(GenerationRequest("r", MESSAGES))
        assert (await chunks.__anext__()).text == "first"
        await chunks.aclose()  # type: ignore[attr-defined]
        await asyncio.wait_for(fake.cancelled.wait(), 5)
        await engine.close()

    with_fake_triton(scenario)


def test_readiness() -> None:
    async def scenario(fake: FakeTriton, url: str) -> None:
        for engine, ready in [
            (TritonGrpcEngine(url, "m", bls_model="ok"), True),
            (TritonGrpcEngine(url, "m", bls_model="not_loaded"), False),
            (TritonGrpcEngine("127.0.0.1:1", "m", ready_timeout_s=0.5), False),
        ]:
            assert await engine.ready() is ready
            await engine.close()

    with_fake_triton(scenario)


def test_unreachable_triton_is_503() -> None:
    async def scenario(_: FakeTriton, __: str) -> None:
        engine = TritonGrpcEngine("127.0.0.1:1", "m")
        with pytest.raises(EngineUnavailable):
            await generate(engine)
        await engine.close()

    with_fake_triton(scenario)


def test_the_app_over_the_grpc_engine() -> None:
    """HTTP -> FastAPI -> TritonGrpcEngine -> gRPC: text, usage and a passed-through INVALID_ARGUMENT."""

    async def scenario(fake: FakeTriton, url: str) -> None:
        engine = TritonGrpcEngine(url, "served", bls_model="ok")
        transport = httpx.ASGITransport(app=create_app(engine, Settings(model_name="served")))
        async with httpx.AsyncClient(transport=transport, base_url="http://frontend") as client:
            body = {"model": "served", "messages": list(MESSAGES), "max_tokens": 4}
            done = (await client.post("/v1/chat/completions", json=body)).json()
            assert done["choices"][0]["message"]["content"] == "Hello"
            assert done["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            assert [t.name for t in fake.requests[-1].inputs] == ["messages", "stream", "max_tokens"]
            streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
            assert streamed.text.endswith("data: [DONE]\n\n") and '"content":"lo"' in streamed.text
            engine.bls_model = "invalid"
            bad = await client.post("/v1/chat/completions", json=body)
            assert bad.status_code == 400
            assert bad.json()["error"]["message"] == "image 0: unsupported URL scheme 'ftp'"
        await engine.close()

    with_fake_triton(scenario)
