"""What a serving log says about the engine: where its loop spends time, and which kernels it actually got."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlm_triton.engine.engine import LLMEngine


class StepTiming:
    """Seconds spent per part of the engine loop since the last `take()` (count, total, max), for a serving
    process to log: tells a slow device step from time lost around it (thread switches, sends)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[str, list[float]] = {}

    def add(self, part: str, seconds: float) -> None:
        with self._lock:
            entry = self._parts.setdefault(part, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += seconds
            entry[2] = max(entry[2], seconds)

    def take(self) -> dict[str, dict[str, float]]:
        """{part: {count, mean_ms, max_ms}} since the last take, and reset."""
        with self._lock:
            parts, self._parts = self._parts, {}
        return {k: {"count": c, "mean_ms": 1e3 * total / c, "max_ms": 1e3 * peak} for k, (c, total, peak) in parts.items()}


def describe(engine: LLMEngine) -> str:
    """One line for the serving log: the KV pool, attention, pointwise kernels and, on CUDA, cuDNN and the captured
    step's time at batch 1. A cuDNN that torch cannot use (another one earlier on the library path) is named, not raised:
    attention then silently runs slower kernels, which is what this line is for."""
    cache = engine.cache
    parts = [f"KV pool {cache.capacity} tokens ({cache.nbytes() / 2**30:.2f} GiB) for {engine.max_slots} slots of up "
             f"to {engine.max_seq_len}"
             + (f", pages of {engine.kv_page_tokens}" if engine.kv_page_tokens else ", contiguous runs"),
             f"attention {getattr(engine.backbone.config, '_attn_implementation', '?')}",
             f"pointwise {engine.pointwise or 'eager'}{' (prefill too)' if engine.prefill_pointwise else ''}",
             f"fused projections {engine.fused if any(engine.fused.values()) else 'no'}"]
    if engine.device.type == "cuda":
        try:
            cudnn = f"cudnn {torch.backends.cudnn.version()}"
        except RuntimeError as exc:
            cudnn = f"cudnn UNUSABLE ({exc})"
        sdp = torch.backends.cuda
        parts.append(f"{cudnn}; sdp cudnn/flash/efficient/math {sdp.cudnn_sdp_enabled()}/{sdp.flash_sdp_enabled()}/"
                     f"{sdp.mem_efficient_sdp_enabled()}/{sdp.math_sdp_enabled()}")
        graphs = engine._graphs
        if graphs is not None:
            ms = {k: graphs.time_replay(1, k) for k in (engine.kv_buckets[0], engine.kv_buckets[-1])}
            parts.append("graph b1 " + ", ".join(f"kv{k} {v:.2f} ms" for k, v in ms.items()))
    prefill_graphs = getattr(engine.prefill, "graphs", None)
    parts.append(f"prefill {type(engine.prefill).__name__}"
                 + (f", graphs {sorted(prefill_graphs.graphs)}" if prefill_graphs is not None else ", eager"))
    return "; ".join(parts)
