"""Small synchronous tritonclient gRPC streaming clients for the `bls` and `ensemble` models (e2e tests only)."""

from __future__ import annotations

import json
import queue
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from vlm_triton.contracts import BLS, ENSEMBLE, ModelContract


@dataclass
class BLSResult:
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    deltas: list[str] = field(default_factory=list)
    error: InferenceServerException | None = None


def bls_inputs(messages: list[dict[str, Any]], contract: ModelContract = BLS, **options: Any) -> list[grpcclient.InferInput]:
    values: dict[str, Any] = {"messages": [json.dumps(messages)], **options}
    inputs = []
    for name, value in values.items():
        spec = contract.input(name)
        if spec.dtype == "BYTES":
            arr = np.array([v.encode() for v in value], dtype=np.object_)
        else:
            arr = np.full([1] * len(spec.dims), value, dtype=spec.numpy_dtype)  # [1] or [1, 1]
        tensor = grpcclient.InferInput(name, list(arr.shape), spec.dtype)
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    return inputs


def ensemble_generate(url: str, messages: list[dict[str, Any]], timeout_s: float = 300, **options: Any) -> BLSResult:
    """One request to the `ensemble` over a gRPC stream (its llm step is decoupled): one response, no finish_reason."""
    return bls_generate(url, messages, timeout_s, model=ENSEMBLE, **options)


def bls_generate(url: str, messages: list[dict[str, Any]], timeout_s: float = 300, model: ModelContract = BLS,
                 **options: Any) -> BLSResult:
    """Send one request over a gRPC stream and collect its responses until the final one."""
    if "stop" in options and isinstance(options["stop"], str):
        options["stop"] = [options["stop"]]
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    # With this header a failed request ends with its real gRPC status (INVALID_ARGUMENT, ...).
    client.start_stream(callback=lambda result, error: responses.put((result, error)),
                        headers={"triton_grpc_error": "true"})
    out = BLSResult()
    try:
        client.async_stream_infer(model.role, bls_inputs(messages, model, **options), enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                out.error = error
                return out
            response = result.get_response()
            if response.outputs:
                delta = result.as_numpy("text")[0].decode()
                out.deltas.append(delta)
                out.text += delta
                if model is BLS:
                    out.finish_reason = result.as_numpy("finish_reason")[0].decode()
                out.prompt_tokens = int(result.as_numpy("prompt_tokens").reshape(-1)[0])
                out.completion_tokens = int(result.as_numpy("completion_tokens").reshape(-1)[0])
            if response.parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()
