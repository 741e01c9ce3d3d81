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

from vlm_triton import timeline
from vlm_triton.engine.observe import StepTiming
from vlm_triton.families.base import PreprocessLimits
from vlm_triton.multimodal.vision_runner import VisionRunner
from vlm_triton.multimodal.warmup import warm_up_vision
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
    warm_up,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        cfg = load_deployment(args)
        self.device, self.dtype = torch_device_dtype(cfg)
        set_torch_threads(cfg)
        self.family = load_family(cfg)
        self.out_dtype = TRITON_TO_TORCH[cfg.tensor_dtypes["EMBED"]]
        self.max_tiles = cfg.triton.vision_max_batch_size  # per encoder forward
        self._runner: VisionRunner | None = None
        # with engine.vision_in_llm the llm encodes the bls's images itself: this stage then serves only the ensemble
        # and direct callers, and loads its copy of the encoder at their first request (not next to the llm's)
        if not cfg.vision_in_llm:
            runner = self.runner
            if self.device.type == "cuda" and cfg.triton.stage_warm_up:  # its first forward loads the CUDA kernels
                limits = PreprocessLimits.from_deployment(cfg, self.family)
                warm_up(args["model_name"], "the vision encoder", lambda: warm_up_vision(runner, self.family, limits))
        # VLM_TRITON_STEP_STATS: time each execute's phases (synchronising the device between them) and log them
        self.timing = StepTiming() if step_stats_period() is not None else None
        stage_ready(cfg, args["model_name"], None if self.timing is None else {"": self.timing})

    @property
    def runner(self) -> VisionRunner:
        if self._runner is None:
            self._runner = VisionRunner(self.family, self.dtype, self.device, out_dtype=self.out_dtype,
                                        max_tiles=self.max_tiles)
        return self._runner

    def _mark(self, part: str, since: float) -> float:
        """With timing on: the device's work so far is done; add the time since `since` to `part`."""
        if self.timing is None:
            return since
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timing.add(part, now - since)
        return now

    def _timeline(self, event: str, ids: list[str]) -> None:
        """With VLM_TRITON_TIMELINE_DIR: the device's work so far is done (one mark time for the batch); mark it."""
        if ids:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.monotonic_ns()
            for rid in ids:
                timeline.mark(event, rid, at_ns=now)

    def _tiles(self, request: Any) -> torch.Tensor:
        """The request's uint8 tiles: as sent (host memory), or cut on the device from its decoded images."""
        return self.runner.tiles(get_torch(request, "pixel_values"), get_torch(request, "image_grids"))

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request; a request whose tiles cannot be made fails alone, an encoder error fails all."""
        responses: list[Any] = [None] * len(requests)
        batches, kept, sizes = [], [], []
        ids = [r.request_id() for r in requests] if timeline.enabled() else []  # the bls's: the frontend's ids
        self._timeline("vis.execute", ids)
        start = t = time.perf_counter()
        with torch.inference_mode():
            for i, request in enumerate(requests):
                try:
                    batches.append(self._tiles(request))
                    kept.append(i)
                except Exception as exc:  # noqa: BLE001 - this request's error
                    responses[i] = error_response(exc)
            t = self._mark("tiles", t)
            self._timeline("vis.tiles", ids)
            try:
                if kept:
                    tgt_sizes = [get_torch(requests[i], "tgt_sizes") for i in kept]  # variable-size tiles only
                    embeds, sizes = self.runner.encode(batches, tgt_sizes)
                    t = self._mark("encode", t)
                    self._timeline("vis.encoded", ids)
                    for i, part in zip(kept, torch.split(embeds, sizes)):
                        responses[i] = pb_utils.InferenceResponse(output_tensors=[torch_output("image_embeds", part)])
            except Exception as exc:  # noqa: BLE001
                for i in kept:
                    responses[i] = error_response(exc)
        if self.timing is not None:
            self.timing.add(f"batch_of_{len(requests)}_requests_{sum(sizes)}_tiles", t - start)
        return responses
