"""Triton `preprocess`: OpenAI messages JSON -> prompt ids (image slots as fake ids) + pixel tiles.

What the llm takes is shaped as the llm takes it ([1, ...], see contracts.PREPROCESS), for the ensemble."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_triton import timeline
from vlm_triton.families.base import PreprocessLimits
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
from vlm_triton.multimodal.plane_pool import PlanePool
from vlm_triton.multimodal.warmup import warm_up_prompt
from vlm_triton.prompt.messages import parse_messages
from vlm_triton.errors import InvalidRequest
from vlm_triton.contracts import NUMPY_DTYPES
from vlm_triton.triton.common import (
    error_response,
    get_text,
    load_deployment,
    load_family,
    rendered_parameter,
    stage_ready,
    warm_up,
)
from vlm_triton.trtllm.kv_reuse import prompt_table_extra_ids


def stop_words_list(sequences: list[list[int]]) -> np.ndarray:
    """tensorrt_llm format [2, K]: row 0 concatenated ids, row 1 cumulative end offsets padded with -1."""
    flat = [i for seq in sequences for i in seq]
    offsets = list(np.cumsum([len(s) for s in sequences]))
    width = max(len(flat), len(offsets), 1)
    out = np.zeros((2, width), dtype=np.int32)
    out[1, :] = -1
    out[0, : len(flat)] = flat
    out[1, : len(offsets)] = offsets
    return out


def _scalar(value: int) -> np.ndarray:
    """[1, 1]: a per-request scalar of the batched llm."""
    return np.array([[value]], dtype=np.int32)


def _per_unit(value: np.ndarray | None, width: int) -> np.ndarray:
    """An optional per-unit int32 [N, width] tensor; [0, width] when the family has none."""
    return np.zeros((0, width), dtype=np.int32) if value is None else np.ascontiguousarray(value, dtype=np.int32)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        cfg = load_deployment(args)
        self.family = load_family(cfg)
        self.tokenizer = self.family.load_tokenizer()
        lim = cfg.limits
        self.media = MediaFetcher(
            MediaPolicy(
                allowed_local_dirs=tuple(Path(d) for d in lim.allowed_local_media_dirs),
                allow_private_networks=lim.allow_private_networks,
                max_bytes=lim.max_media_bytes,
                max_image_pixels=lim.max_image_pixels,
                timeout_s=lim.media_timeout_s,
            )
        )
        # where tiles are cut, as the renderer decided for every stage (render.device_tile_budget)
        rendered = rendered_parameter(args, "device_tiles")
        self.limits = (PreprocessLimits.from_deployment(cfg, self.family) if rendered is None
                       else replace(PreprocessLimits.from_deployment(cfg), device_tiles=rendered == "1"))
        stop_ids = self.family.stop_token_ids(self.tokenizer)
        self.end_id = stop_ids[0]
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.end_id if pad is None else int(pad)
        self.stop_words = stop_words_list([[i] for i in stop_ids[1:]])
        # UINT8 (torch): the raw bytes, which the vision_encoder normalises on its device; FP16 (trtllm): the TensorRT
        # plan takes normalised pixels, made here
        self.pixel_dtype = NUMPY_DTYPES[cfg.tensor_dtypes["PIXEL"]]
        # content ids of image rows only matter to tensorrt_llm's KV-cache reuse; hashing 13 tiles costs ~15 ms per
        # request (their bytes), so without reuse every row is 0 (what the llm sees when no ids are given)
        self.content_ids = cfg.engine.enable_kv_cache_reuse
        # engine.vision_in_llm: uint8 planes go to the llm by reference when the caller asks for pixel_ref
        self.planes = PlanePool.create(cfg.preprocess.plane_pool_mib) if cfg.vision_in_llm else None
        self._metric_family = pb_utils.MetricFamily(  # must outlive its metrics
            name="vlm_preprocess_image_planes_total",
            description="Requests whose uint8 images preprocess sent, by how: sent=reference (its plane pool, "
                        "preprocess.plane_pool_mib) or sent=value (in the response)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._sent = {how: self._metric_family.Metric(labels={"model": args["model_name"], "sent": how})
                      for how in ("reference", "value")}
        if cfg.triton.stage_warm_up:
            warm_up(args["model_name"], "media requests",
                    lambda: warm_up_prompt(self.family, self.limits, self.media))
        stage_ready(cfg, args["model_name"])

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self.__scalar(r) for r in requests]

    def finalize(self) -> None:
        if self.planes is not None:
            self.planes.close()
        self._sent, self._metric_family = {}, None  # while the stub can still tell tritonserver (llm_model.py)

    def _by_reference(self, request: Any, pixels: np.ndarray) -> np.ndarray | None:
        """pixel_ref [1, REF_LEN] of the planes now in the pool, or None (sent by value: not asked for, not uint8
        images, or no room)."""
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or not pixels.shape[0]:
            return None
        ref = None
        if self.planes is not None and "pixel_ref" in request.requested_output_names():
            ref = self.planes.put(pixels)
        self._sent["value" if ref is None else "reference"].increment(1)
        return None if ref is None else ref.reshape(1, -1)

    def __scalar(self, request: Any) -> Any:
        rid = request.request_id() if timeline.enabled() else ""  # the bls names its call with the frontend's id
        timeline.mark("pre.execute", rid)
        try:
            raw = get_text(request, "messages")
            if raw is None:
                raise InvalidRequest("the 'messages' input is required")
            prepared = self.family.prepare(parse_messages(raw), self.media, self.limits)
            timeline.mark("pre.prepared", rid)
            ids = prepared.input_ids.astype(np.int32)
            raw = np.ascontiguousarray(prepared.pixel_values)
            if self.pixel_dtype == np.uint8:
                pixels = raw
            else:
                pixels = self.family.float_pixels(prepared, dtype=self.pixel_dtype)
            if self.content_ids:  # the bytes identify the content as well as the floats, at a quarter of the size
                extra_ids = prompt_table_extra_ids(ids, vocab_size=self.family.vocab_size, pixel_values=raw,
                                                   image_grids=prepared.image_grids)
            else:
                extra_ids = np.zeros(ids.shape[0], dtype=np.uint64)
            ref = self._by_reference(request, pixels)
            if ref is not None:
                pixels = pixels[:, :, :0, :0]  # [N, 3, 0, 0]: the planes are in the pool
            outputs = [
                pb_utils.Tensor("input_ids", ids.reshape(1, -1)),
                pb_utils.Tensor("input_lengths", _scalar(ids.shape[0])),
                pb_utils.Tensor("pixel_values", pixels),
                pb_utils.Tensor("pixel_ref", np.zeros((1, 0), np.int64) if ref is None else ref),
                pb_utils.Tensor("end_id", _scalar(self.end_id)),
                pb_utils.Tensor("pad_id", _scalar(self.pad_id)),
                pb_utils.Tensor("stop_words_list", self.stop_words[None]),
                pb_utils.Tensor("prompt_vocab_size", _scalar(prepared.num_image_tokens)),
                pb_utils.Tensor("prompt_table_extra_ids", extra_ids.reshape(1, -1)),
                pb_utils.Tensor("tgt_sizes", _per_unit(prepared.tgt_sizes, 2)),
                pb_utils.Tensor("image_grids", _per_unit(prepared.image_grids, 5)),
                pb_utils.Tensor("return_num_input_tokens", np.ones((1, 1), dtype=np.bool_)),
            ]
            timeline.mark("pre.done", rid)
            return pb_utils.InferenceResponse(output_tensors=outputs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error
            return error_response(exc)
