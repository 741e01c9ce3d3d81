"""Triton `postprocess`: stateless incremental detokenization + stop strings; the caller threads the state."""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_triton.pipeline.orchestrator import detokenize_step
from vlm_triton.triton.common import (
    error_response,
    get_array,
    get_scalar,
    get_text,
    get_texts,
    load_deployment,
    load_family,
    stage_ready,
    text_output,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        cfg = load_deployment(args)
        self.tokenizer = load_family(cfg).load_tokenizer()
        stage_ready(cfg, args["model_name"])

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        try:
            ids = get_array(request, "token_ids")
            window = [] if ids is None else ids.reshape(-1).tolist()
            # No offsets and no `final` (the ensemble): decode the whole sequence at once.
            final = bool(get_scalar(request, "final", True))
            prefix = int(get_scalar(request, "prefix_offset", 0))
            read = int(get_scalar(request, "read_offset", 0))
            out = detokenize_step(
                self.tokenizer, window, prefix, read, get_text(request, "held_text") or "", get_texts(request, "stop"),
                final,
            )
            return pb_utils.InferenceResponse(
                output_tensors=[
                    text_output("text", out.text),
                    pb_utils.Tensor("prefix_offset", np.array([out.prefix_offset], dtype=np.int32)),
                    pb_utils.Tensor("read_offset", np.array([out.read_offset], dtype=np.int32)),
                    text_output("held_text", out.held),
                    pb_utils.Tensor("stopped", np.array([out.stopped], dtype=np.bool_)),
                ]
            )
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)
