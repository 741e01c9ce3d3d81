"""Which kernels an engine's forwards run, set up once at the end of building it: each layer's projections fused
(fused_linear.py), the pointwise ops compiled (pointwise.py), and the decode and prefill forwards captured as CUDA
graphs (cuda_graphs.py). In this order: each step patches the model that the next one compiles or captures. Before
that, `paged_or_runs` picks the KV layout whose decode kernel runs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from vlm_triton.engine.attention import decode_reads_rows, flash_supported
from vlm_triton.engine.cuda_graphs import DecodeGraphs, PrefillGraphs
from vlm_triton.engine.packed import PackedPrefill

if TYPE_CHECKING:
    from vlm_triton.engine.engine import LLMEngine
    from vlm_triton.engine.model_spec import ModelSpec

logger = logging.getLogger(__name__)


def paged_or_runs(page_tokens: int, device: torch.device, dtype: torch.dtype, spec: ModelSpec) -> int:
    """`page_tokens`, or 0 (contiguous runs) where FA2 would decode over runs but the paged kernel cannot run
    (e.g. a head_dim that is not a power of two): a paged pool would then decode by gathering K/V every step."""
    if page_tokens and spec.packed and decode_reads_rows(device, dtype, spec.head_dim) and not decode_reads_rows(
            device, dtype, spec.head_dim, paged=True):
        logger.warning("KV pool in contiguous runs, not pages of %d: the paged decode kernel does not take head_dim "
                       "%d in %s, FlashAttention-2 over runs does", page_tokens, spec.head_dim, dtype)
        return 0
    return page_tokens


def set_up_kernels(engine: LLMEngine, *, head_dim: int, use_cuda_graphs: bool, prefill_graphs: bool,
                   compile_pointwise: bool, prefill_pointwise: bool, fuse_projections: bool) -> None:
    """Sets `engine.fused`, `engine.pointwise`, `engine.prefill_pointwise` and the captured graphs (LLMEngine's
    arguments of the same names say what each does)."""
    cuda = engine.device.type == "cuda"
    engine.fused = {}
    if fuse_projections:
        from vlm_triton.engine.fused_linear import fuse_projections as fuse_linear

        engine.fused = fuse_linear(engine.backbone)
        if cuda:
            torch.cuda.empty_cache()  # the replaced weights' memory, for the other processes on this GPU
        if not any(engine.fused.values()):
            logger.warning("fuse_projections: this model has no q/k/v or gate/up Linear layers to fuse")
        logger.info("fused projections: %s", engine.fused)
    prefill = engine.prefill
    graph_prefill = (cuda and use_cuda_graphs and prefill_graphs and isinstance(prefill, PackedPrefill)
                     and flash_supported(engine.device, engine.dtype, head_dim))
    engine.pointwise, engine.prefill_pointwise = {}, False
    if compile_pointwise and cuda:
        from vlm_triton.engine.pointwise import compile_pointwise as compile_ops

        # in prefill only under its graphs: called eagerly, the compiled functions' own overhead per call made a W1
        # prefill slower (docs/benchmarks.md, items 10 and 38)
        in_prefill = prefill_pointwise and graph_prefill
        engine.pointwise = compile_ops(engine.backbone, engine.device, prefill=in_prefill)
        engine.prefill_pointwise = in_prefill and any(engine.pointwise.values())
        logger.info("compiled pointwise ops: %s%s", engine.pointwise,
                    " (prefill too)" if engine.prefill_pointwise else "")
    engine._graphs = None
    if use_cuda_graphs and cuda:
        engine._graphs = DecodeGraphs.capture(engine)
        if graph_prefill:
            assert isinstance(prefill, PackedPrefill)
            prefill.graphs = PrefillGraphs.capture(prefill)
