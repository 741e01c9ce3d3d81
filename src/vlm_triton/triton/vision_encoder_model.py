"""Triton `vision_encoder`: raw uint8 pixel tiles [N, 3, S, S] -> image embeddings [N, T, H].

Triton's dynamic batcher hands us tiles of several requests at once; they go through the encoder as one batch. The
bytes are normalised on the encoder's device with the family's lookup table (`ModelFamily.normalize_pixels`).
"""

from __future__ import annotations

from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from vlm_triton.triton.common import (
    TRITON_TO_TORCH,
    error_response,
    get_torch,
    load_deployment,
    load_family,
    set_torch_threads,
    torch_device_dtype,
    torch_output,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        cfg = load_deployment(args)
        self.device, self.dtype = torch_device_dtype(cfg)
        set_torch_threads(cfg)
        self.family = load_family(cfg)
        self.encoder = self.family.build_vision_encoder(self.dtype, self.device)
        # the table in the encoder dtype: casting each entry once equals casting every normalised float32 pixel
        self.lut = torch.from_numpy(self.family.pixel_lut()).to(self.device, self.dtype)
        self.out_dtype = TRITON_TO_TORCH[cfg.tensor_dtypes["EMBED"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            batches = [get_torch(r, "pixel_values") for r in requests]
            sizes = [int(b.shape[0]) for b in batches]
            raw = torch.cat(batches).to(self.device, non_blocking=True)
            grids = [get_torch(r, "tgt_sizes") for r in requests]  # variable-size tiles only (MiniCPM-V)
            extra = [] if all(g is None for g in grids) else [torch.cat([g.reshape(-1, 2) for g in grids])]
            with torch.inference_mode():
                pixels = self.family.normalize_pixels(raw, self.lut, *extra)
                embeds = self.encoder(pixels, *extra).to(self.out_dtype)
            return [
                pb_utils.InferenceResponse(output_tensors=[torch_output("image_embeds", part)])
                for part in torch.split(embeds, sizes)
            ]
        except Exception as exc:  # noqa: BLE001
            return [error_response(exc) for _ in requests]
