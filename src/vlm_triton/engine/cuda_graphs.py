"""CUDA-graph capture and replay of the engine's decode step, one graph per (batch bucket, KV-length bucket), and of its
packed prefill forward, one graph per packed-length bucket."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlm_triton.engine.engine import LLMEngine
    from vlm_triton.engine.packed import PackedPrefill

logger = logging.getLogger(__name__)


Key = tuple[int, int]  # (batch bucket, kv-length bucket)


class DecodeGraphs:
    """CUDA-graph capture and replay of `DecodeStep.forward` (engine/decode.py), one graph per batch bucket and KV-length
    bucket (`engine.kv_buckets`: a step attends over the smallest bucket that covers its longest row, so short
    requests do not pay for the whole cache).

    Captured once at engine construction, before any request: every row of the warm-up and capture steps is
    padding (position 0 of the KV pool's trash row). What each row has not written is hidden by its used length
    (`seqused_k`, FA2 path) or by the 4D mask built inside the graph from the static position buffer.
    """

    def __init__(self, engine: LLMEngine, graphs: dict[Key, tuple[torch.cuda.CUDAGraph, torch.Tensor]]) -> None:
        self.engine = engine
        self.graphs = graphs

    @classmethod
    def capture(cls, engine: LLMEngine, warmup: int = 2) -> DecodeGraphs | None:
        keys = [(b, kv) for b in engine.buckets for kv in engine.kv_buckets]
        try:
            with torch.no_grad():
                engine.decode.ids.zero_()
                engine.decode.pos.zero_()
                engine.decode.cu_k.fill_(engine.cache.trash_row)
                side = torch.cuda.Stream(engine.device)  # type: ignore[no-untyped-call]
                side.wait_stream(torch.cuda.current_stream(engine.device))
                with torch.cuda.stream(side):
                    for bucket, kv_len in keys:
                        for _ in range(warmup):
                            engine.decode.forward(bucket, kv_len)
                torch.cuda.current_stream(engine.device).wait_stream(side)
                pool = torch.cuda.graph_pool_handle()
                graphs: dict[Key, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
                for bucket, kv_len in reversed(keys):  # largest first: smaller graphs reuse its pool memory
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        logits = engine.decode.forward(bucket, kv_len)
                    graphs[(bucket, kv_len)] = (graph, logits)
                torch.cuda.synchronize(engine.device)
        except Exception:  # e.g. a rope variant that syncs with the host: serve eagerly instead
            logger.exception("CUDA graph capture failed; decoding eagerly")
            return None
        finally:
            engine.cache.set_idle()
        return cls(engine, graphs)

    def replay(self, bucket: int, kv_len: int) -> torch.Tensor:
        """Run the captured step for (`bucket`, `kv_len`), both buckets; the returned logits buffer is overwritten
        by the next replay."""
        graph, logits = self.graphs[(bucket, kv_len)]
        graph.replay()
        return logits

    def time_replay(self, bucket: int, kv_len: int, reps: int = 20) -> float:
        """Milliseconds per replay of one captured step (CUDA events), for logs and benchmarks."""
        for _ in range(3):
            self.replay(bucket, kv_len)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            self.replay(bucket, kv_len)
        end.record()
        torch.cuda.synchronize(self.engine.device)
        self.engine.cache.set_idle()
        return float(start.elapsed_time(end)) / reps


class PrefillGraphs:
    """CUDA-graph capture and replay of `PackedPrefill.forward` (engine/packed.py), one graph per packed-length bucket
    (`prefill.buckets`). Captured at engine construction from an empty load: every token of the warm-up and capture
    forwards writes the KV pool's trash row and belongs to no sequence. A step loads its buffers eagerly
    (`PackedPrefill.load`: copies and the embedding lookup) and replays the smallest bucket that holds its tokens;
    the returned hidden states [max_rows, hidden] are overwritten by the next replay."""

    def __init__(self, prefill: PackedPrefill, graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]) -> None:
        self.prefill, self.graphs = prefill, graphs

    @classmethod
    def capture(cls, prefill: PackedPrefill, warmup: int = 2) -> PrefillGraphs | None:
        device = prefill.device
        try:
            with torch.no_grad():
                prefill.load([], start=0, end=0)
                side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):  # max_q >= 2: FA2 takes max_q 1 for its one-token-per-sequence layout
                    for bucket in prefill.buckets:
                        for _ in range(warmup):
                            prefill.forward(bucket, max(2, bucket), None)
                torch.cuda.current_stream(device).wait_stream(side)
                pool = torch.cuda.graph_pool_handle()  # not the decode graphs' pool: both outputs stay valid
                graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
                for bucket in reversed(prefill.buckets):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        hidden = prefill.forward(bucket, max(2, bucket), None)
                    graphs[bucket] = (graph, hidden)
                torch.cuda.synchronize(device)
        except Exception:
            logger.exception("CUDA graph capture of the prefill failed; prefilling eagerly")
            return None
        return cls(prefill, graphs)

    def replay(self, bucket: int) -> torch.Tensor:
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden
