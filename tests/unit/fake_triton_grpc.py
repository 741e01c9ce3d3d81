"""A fake Triton gRPC server for the frontend's tests: the BLS's streamed responses, by model name."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from vlm_triton.contracts import BLS


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
