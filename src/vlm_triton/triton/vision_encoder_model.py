"""Triton `vision_encoder`: raw uint8 pixel tiles [N, 3, S, S] -> image embeddings [N, T, H].

Triton's dynamic batcher hands us tiles of several requests at once; they go through the encoder together, in
batches of at most `triton.vision_max_batch_size` tiles. The bytes are normalised on the encoder's device with the
family's lookup table (`ModelFamily.normalize_pixels`). A request with `image_grids` sends decoded images instead,
which the family cuts into its tiles here, on the device (`ModelFamily.tiles_from_images`, the same bytes as its
preprocess would have sent); its response then has one item per tile.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from vlm_triton.engine.observe import StepTiming
from vlm_triton.step_stats import step_stats_period
from vlm_triton.triton.common import (
    TRITON_TO_TORCH,
    error_response,
    get_torch,
    load_deployment,
    load_family,
    set_torch_threads,
    stage_ready,
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
        self.max_tiles = cfg.triton.vision_max_batch_size  # per encoder forward
        # VLM_TRITON_STEP_STATS: time each execute's phases (synchronising the device between them) and log them
        self.timing = StepTiming() if step_stats_period() is not None else None
        stage_ready(cfg, args["model_name"], None if self.timing is None else {"": self.timing})

    def _mark(self, part: str, since: float) -> float:
        """With timing on: the device's work so far is done; add the time since `since` to `part`."""
        if self.timing is None:
            return since
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timing.add(part, now - since)
        return now

    def _tiles(self, request: Any) -> torch.Tensor:
        """The request's uint8 tiles: as sent (host memory), or cut on the device from its decoded images."""
        pixels = get_torch(request, "pixel_values")
        grids = get_torch(request, "image_grids")
        if grids is None:
            return pixels
        return self.family.tiles_from_images(pixels.to(self.device, non_blocking=True), grids)

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request; a request whose tiles cannot be made fails alone, an encoder error fails all."""
        responses: list[Any] = [None] * len(requests)
        batches, kept, sizes = [], [], []
        start = t = time.perf_counter()
        with torch.inference_mode():
            for i, request in enumerate(requests):
                try:
                    batches.append(self._tiles(request))
                    kept.append(i)
                except Exception as exc:  # noqa: BLE001 - this request's error
                    responses[i] = error_response(exc)
            t = self._mark("tiles", t)
            try:
                if kept:
                    embeds, sizes = self._encode(batches, [requests[i] for i in kept])
                    t = self._mark("encode", t)
                    for i, part in zip(kept, torch.split(embeds, sizes)):
                        responses[i] = pb_utils.InferenceResponse(output_tensors=[torch_output("image_embeds", part)])
            except Exception as exc:  # noqa: BLE001
                for i in kept:
                    responses[i] = error_response(exc)
        if self.timing is not None:
            self.timing.add(f"batch_of_{len(requests)}_requests_{sum(sizes)}_tiles", t - start)
        return responses

    def _encode(self, batches: list[torch.Tensor], requests: list[Any]) -> tuple[torch.Tensor, list[int]]:
        """The requests' tiles through the encoder, in forwards of at most max_tiles -> (embeddings, tiles each)."""
        sizes = [int(b.shape[0]) for b in batches]
        if all(b.device.type == "cpu" for b in batches):  # one copy to the device
            raw = torch.cat(batches).to(self.device, non_blocking=True)
        else:
            raw = torch.cat([b.to(self.device, non_blocking=True) for b in batches])
        grids = [get_torch(r, "tgt_sizes") for r in requests]  # variable-size tiles only (MiniCPM-V)
        extra = [] if all(g is None for g in grids) else [torch.cat([g.reshape(-1, 2) for g in grids])]
        embeds = torch.cat([
            self.encoder(self.family.normalize_pixels(part, self.lut, *part_extra), *part_extra)
            for part, *part_extra in zip(torch.split(raw, self.max_tiles),
                                         *(torch.split(e, self.max_tiles) for e in extra))
        ]).to(self.out_dtype)
        return embeds, sizes
