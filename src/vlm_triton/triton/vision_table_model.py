"""Triton `vision_table` (ensemble only): pixel tiles -> the llm's `prompt_embedding_table` [1, R, H].

It bridges what an ensemble cannot do: skip the batched vision_encoder for text-only requests (R = 0, which the
llm treats as no table) and reshape its [N, T, H] output per request. Same BLS call as the `bls` stage.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from vlm_triton.contracts import UNIT_EXTRAS
from vlm_triton.triton.common import (
    TRITON_TO_TORCH,
    error_response,
    load_deployment,
    load_family,
    stage_ready,
    torch_output,
    vision_chunk,
)
from vlm_triton.triton.vision_client import prompt_table


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        cfg = load_deployment(args)
        self.chunk = vision_chunk(args, cfg)
        self.dtype = TRITON_TO_TORCH[cfg.tensor_dtypes["EMBED"]]
        self.hidden = load_family(cfg).hidden_size  # the empty table keeps the llm's width
        stage_ready(cfg, args["model_name"])

    async def execute(self, requests: list[Any]) -> list[Any]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, request: Any) -> Any:
        try:
            pixels = pb_utils.get_input_tensor_by_name(request, "pixel_values")
            extras = [pb_utils.get_input_tensor_by_name(request, name) for name in UNIT_EXTRAS]
            extras = [t for t in extras if t is not None and t.shape()[0]]  # empty: none for this request
            if pixels.shape()[0]:
                table = await prompt_table(pixels, extras, self.chunk, self.dtype)
            else:
                table = torch.zeros((1, 0, self.hidden), dtype=self.dtype)
            return pb_utils.InferenceResponse(output_tensors=[torch_output("prompt_embedding_table", table)])
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)
