"""The real engine: one gRPC bidirectional stream (tritonclient.grpc.aio `stream_infer`) per request to the BLS.

Inputs are built from `vlm_triton.contracts.BLS` (names, dtypes, dims) and only the options a request sets are
sent, so the BLS defaults apply to the rest. The stream is opened with the `triton_grpc_error` header, so a
failing request ends the stream with a real gRPC status: INVALID_ARGUMENT becomes `InvalidInput` carrying the
server's message (HTTP 400), UNAVAILABLE becomes `EngineUnavailable` (503) and anything else `EngineError` (500).
Closing the generator before the last response (client disconnect) cancels the gRPC call, which cancels the
request inside Triton.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import fields
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferResult
from tritonclient.utils import InferenceServerException

from openai_frontend.engine.base import (
    Engine,
    EngineError,
    EngineUnavailable,
    GenerationChunk,
    GenerationRequest,
    InvalidInput,
    ModelInfo,
    SamplingOptions,
)
from vlm_triton import timeline
from vlm_triton.contracts import BLS

logger = logging.getLogger("openai_frontend.triton")

STREAM_HEADERS: dict[str, str] = {"triton_grpc_error": "true"}  # errors end the stream with a gRPC status
FINAL_FLAG = "triton_final_response"


def build_inputs(request: GenerationRequest) -> list[InferInput]:
    """The BLS InferInputs for `request`: messages (JSON), stream, and every sampling option that is set."""
    messages = json.dumps(list(request.messages), ensure_ascii=False, separators=(",", ":"))
    values: dict[str, list[Any]] = {"messages": [messages.encode("utf-8")], "stream": [request.stream]}
    for option in fields(SamplingOptions):
        value = getattr(request.sampling, option.name)
        if value is None or value == ():
            continue
        values[option.name] = [s.encode("utf-8") for s in value] if option.name == "stop" else [value]
    return [_tensor(name, vals) for name, vals in values.items()]


def _tensor(name: str, values: Sequence[Any]) -> InferInput:
    spec = BLS.input(name)
    if len(spec.dims) != 1 or spec.dims[0] not in (-1, len(values)):
        raise ValueError(f"bls input {name}: {len(values)} values do not fit dims {spec.dims}")
    array: np.ndarray[Any, Any] = np.array(values, dtype=spec.numpy_dtype)
    if BLS.batched:
        array = array[np.newaxis]
    tensor = InferInput(spec.name, list(array.shape), spec.dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def parse_result(result: InferResult) -> tuple[GenerationChunk | None, bool]:
    """(chunk, is_final) for one streamed response; an empty final response has no chunk."""
    response = result.get_response()
    final = FINAL_FLAG in response.parameters and response.parameters[FINAL_FLAG].bool_param
    if not response.outputs:
        return None, final
    finish = _text(result, "finish_reason")
    chunk = GenerationChunk(
        text=_text(result, "text"),
        finish_reason=finish or None,
        prompt_tokens=_int(result, "prompt_tokens"),
        completion_tokens=_int(result, "completion_tokens"),
    )
    return chunk, final


def _text(result: InferResult, name: str) -> str:
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return ""
    value = array.reshape(-1)[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _int(result: InferResult, name: str) -> int:
    array = result.as_numpy(name)
    return int(array.reshape(-1)[0]) if array is not None and array.size else 0


def map_error(status: str | None, message: str) -> EngineError:
    """A gRPC status (`StatusCode.X` or `X`) and message -> the engine error the routers render."""
    name = (status or "").rsplit(".", 1)[-1]
    if name == "INVALID_ARGUMENT":
        return InvalidInput(message)
    if name == "UNAVAILABLE":
        return EngineUnavailable(f"Triton is unavailable: {message}")
    return EngineError(f"Triton error{f' ({name})' if name else ''}: {message}")


class TritonGrpcEngine(Engine):
    def __init__(
        self,
        url: str,
        model_name: str,
        bls_model: str = "bls",
        *,
        stream_timeout_s: float | None = None,
        ready_timeout_s: float = 2.0,
    ) -> None:
        self.url = url
        self.bls_model = bls_model
        self._models = [ModelInfo(model_name)]
        self._stream_timeout_s = stream_timeout_s
        self._ready_timeout_s = ready_timeout_s
        self._client: grpcclient.InferenceServerClient | None = None

    def _get_client(self) -> grpcclient.InferenceServerClient:
        if self._client is None:  # created lazily: the grpc.aio channel belongs to the running event loop
            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    def models(self) -> list[ModelInfo]:
        return list(self._models)

    async def ready(self) -> bool:
        client, timeout = self._get_client(), self._ready_timeout_s
        try:
            return bool(
                await client.is_server_ready(client_timeout=timeout)
                and await client.is_model_ready(self.bls_model, client_timeout=timeout)
            )
        except (InferenceServerException, grpc.RpcError) as exc:
            logger.debug("readiness check against %s failed: %s", self.url, exc)
            return False

    async def chat(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        inputs = build_inputs(request)

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": self.bls_model,
                "inputs": inputs,
                "request_id": request.request_id,
                "parameters": {"triton_enable_empty_final_response": True},
            }

        timeline.mark("frontend.send", request.request_id)
        responses = self._get_client().stream_infer(
            one_request(), stream_timeout=self._stream_timeout_s, headers=STREAM_HEADERS
        )
        finished = saw_finish = saw_first = False
        try:
            async for result, error in responses:
                if error is not None:
                    raise map_error(error.status(), error.message() or str(error))
                chunk, final = parse_result(result)
                if not saw_first:
                    saw_first = True
                    timeline.mark("frontend.first", request.request_id)
                if chunk is not None:
                    saw_finish = saw_finish or chunk.finish_reason is not None
                    yield chunk
                if final:
                    break
            finished = True
        except grpc.RpcError as exc:  # grpc.aio.AioRpcError: the stream ended with a status
            raise map_error(str(exc.code()), exc.details() or "") from None
        except InferenceServerException as exc:
            raise map_error(exc.status(), exc.message() or str(exc)) from None
        finally:
            if not finished:  # client went away or the stream failed: cancel the request inside Triton
                responses.cancel()
        if not saw_finish:
            raise EngineError(f"the {self.bls_model} model ended request {request.request_id} without a finish_reason")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
