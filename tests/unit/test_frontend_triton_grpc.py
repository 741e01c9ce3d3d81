"""TritonGrpcEngine without tritonserver: request building against the BLS contract, and the streaming path
against a small in-process gRPC server that speaks Triton's GRPCInferenceService protocol."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import fields
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

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
def bls_response(text: str, finish: str, prompt: int, completion: int, *, final: bool = False) -> Any:
    response = service_pb2.ModelInferResponse(model_name="bls")
    values = {
        "text": ("BYTES", np.array([text.encode()], dtype=np.object_)),
        "finish_reason": ("BYTES", np.array([finish.encode()], dtype=np.object_)),
        "prompt_tokens": ("INT32", np.array([prompt], dtype=np.int32)),
        "completion_tokens": ("INT32", np.array([completion], dtype=np.int32)),
    }
    for name, (dtype, array) in values.items():
        assert BLS.output(name).dtype == dtype
        out = response.outputs.add()
        out.name, out.datatype = name, dtype
        out.shape.extend([1])
        response.raw_output_contents.append(
            serialize_byte_tensor(array).item() if dtype == "BYTES" else array.tobytes()
        )
    if final:
        response.parameters["triton_final_response"].bool_param = True
    return response


def final_only() -> Any:
    response = service_pb2.ModelInferResponse(model_name="bls")
    response.parameters["triton_final_response"].bool_param = True
    return response


def test_parse_result() -> None:
    chunk, final = parse_result(InferResult(bls_response("Hé", "", 9, 1)))
    assert chunk == GenerationChunk("Hé", None, 9, 1) and final is False
    chunk, final = parse_result(InferResult(bls_response("", "length", 9, 4, final=True)))
    assert chunk == GenerationChunk("", "length", 9, 4) and final is True
    assert parse_result(InferResult(final_only())) == (None, True)


# --- the streaming path against an in-process gRPC server ---------------------------------------------------------
class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Behaves according to the model name the engine asks for (the engine's `bls_model`)."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.metadata: list[dict[str, str]] = []
        self.cancelled = asyncio.Event()

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ModelReadyResponse(ready=request.name == "ok")

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        async for request in request_iterator:
            self.requests.append(request)
            stream = service_pb2.ModelStreamInferResponse
            if request.model_name == "ok":
                yield stream(infer_response=bls_response("Hel", "", 5, 1))
                yield stream(infer_response=bls_response("lo", "stop", 5, 2))
                yield stream(infer_response=final_only())
            elif request.model_name == "ok_final_with_last":
                yield stream(infer_response=bls_response("Hello", "length", 5, 3, final=True))
            elif request.model_name == "invalid":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image 0: unsupported URL scheme 'ftp'")
            elif request.model_name == "in_band_error":
                yield stream(error_message="model crashed")
            elif request.model_name == "no_finish":
                yield stream(infer_response=bls_response("x", "", 5, 1))
                yield stream(infer_response=final_only())
            elif request.model_name == "slow":
                yield stream(infer_response=bls_response("first", "", 5, 1))
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise


def with_fake_triton(scenario: Callable[[FakeTriton, str], Awaitable[None]], timeout_s: float = 20) -> None:
    async def main() -> None:
        fake = FakeTriton()
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await asyncio.wait_for(scenario(fake, f"127.0.0.1:{port}"), timeout_s)
        finally:
            await server.stop(0)

    asyncio.run(main())


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


# --- several frontend processes (`--workers`) over the gRPC engine -------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> set[int]:
    """The frontend workers of the supervisor `pid` (not multiprocessing's resource tracker, also its child)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                found.add(int(entry))
    return found


def _start_workers(url: str, port: int, *flags: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "openai_frontend", "--triton-url", url, "--model-name", "served", "--port",
               str(port), "--host", "127.0.0.1", "--workers", "2", "--log-level", "warning", *flags]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 60
    while True:  # both workers answer: each has its own pid, and /health is answered by either
        assert process.poll() is None, f"the frontend exited with {process.returncode}"
        if len(_children(process.pid)) >= 2:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return process
            except httpx.HTTPError:
                pass
        assert time.monotonic() < deadline, "the workers did not answer"
        time.sleep(0.2)


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_workers_share_the_inflight_limit_and_the_metrics_and_stop_together() -> None:
    """`--workers 2`: two processes serve the port; --max-inflight caps both together (a request held by one worker
    makes every other get 429, whichever worker takes it); /metrics on any worker counts every worker's requests;
    SIGTERM stops both, and a worker that dies stops the other with exit status 1; a supervisor killed outright takes
    its workers with it."""

    async def scenario(fake: FakeTriton, url: str) -> None:
        def run() -> None:
            port = _free_port()
            process = _start_workers(url, port, "--bls-model", "ok", "--max-inflight", "1")
            base = f"http://127.0.0.1:{port}"
            body = {"model": "served", "messages": list(MESSAGES), "max_tokens": 4}
            try:
                workers = _children(process.pid)
                assert len(workers) == 2
                for _ in range(16):  # fresh connections: the kernel spreads them over the workers
                    done = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10)
                    assert done.status_code == 200 and done.json()["choices"][0]["message"]["content"] == "Hello"
                for _ in range(4):  # every scrape, whichever worker answers it, sees all 16
                    scraped = httpx.get(f"{base}/metrics", timeout=10).text
                    assert _metric(scraped, 'vlm_frontend_requests_total{endpoint="chat",status="200"}') == 16
                    assert _metric(scraped, "vlm_frontend_inflight_requests") == 0
            finally:
                process.terminate()
                assert process.wait(20) == 0
            assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)

            port = _free_port()
            process = _start_workers(url, port, "--bls-model", "slow", "--max-inflight", "1")
            base = f"http://127.0.0.1:{port}"
            try:
                with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                                  timeout=30) as held:  # "slow" holds its stream open
                    lines = held.iter_lines()  # kept: a dropped iterator closes the stream
                    assert next(lines).startswith("data: ")
                    statuses = [httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10).status_code
                                for _ in range(8)]
                    assert statuses == [429] * 8
                    scraped = httpx.get(f"{base}/metrics", timeout=10).text
                    assert _metric(scraped, "vlm_frontend_inflight_requests") == 1
                victim = min(_children(process.pid))
                os.kill(victim, signal.SIGKILL)
                assert process.wait(30) == 1
            finally:
                if process.poll() is None:
                    process.kill()

            port = _free_port()  # a supervisor killed outright takes its workers with it
            process = _start_workers(url, port, "--bls-model", "ok")
            workers = _children(process.pid)
            process.kill()
            process.wait(10)
            deadline = time.monotonic() + 20
            while any(os.path.exists(f"/proc/{pid}") for pid in workers):
                assert time.monotonic() < deadline, "workers outlived their supervisor"
                time.sleep(0.1)

        await asyncio.to_thread(run)

    with_fake_triton(scenario, timeout_s=120)
