"""The engine's attention function, registered with transformers' AttentionInterface as "vlm_slot".

Same maths as transformers' `sdpa` attention (bool masks, True = attend), arranged for the two shapes the engine
runs, so that grouped-query attention never materialises repeated K/V:

- decode (one query token per row), on CUDA in fp16/bf16 when the engine passes `slot_decode` (a `DecodeRows`) and
  the cache returns its row pool ([rows, KVH, D], kv_cache.py): FlashAttention-2's varlen kernel
  (`torch.ops.aten._flash_attention_forward`) over each row's span of cache rows, its offset in `cu_k` and its used
  length in `seqused_k`, no mask. With one query token and grouped heads FA2 splits the KV length across thread
  blocks, which the masked SDPA kernels do not: on an H100 at batch 1 and a 4k cache 13 us per layer instead of
  cuDNN's 68 (benchmarks/attention_micro.py, docs/benchmarks-data/h100-attention-micro.txt).
- decode over a paged pool (the engine passes `slot_decode` as a `PagedRows`: lengths and page tables): the
  engine's Triton kernel (engine/paged_attention.py; on an H200 faster than the FA2 call above, item 60), or the
  same maths in torch where the kernel does not run.
- decode elsewhere (the cache returns padded [B, KVH, L, D] K/V): the query heads that share a KV head become the
  query-length dimension, [B, H, 1, D] -> [B, KVH, H/KVH, D], so one SDPA call reads each row's K/V once.
  transformers' sdpa repeats K/V per query head whenever a mask is given, which at batch 64 and a 4k cache moved
  ~20 GB per step.
- packed prefill (engine/packed.py; the engine passes `packed_prefill`, a `PackedRows`): the prompts of several
  requests concatenated into one row of tokens, their K/V already written into the pool; each sequence attends
  causally (bottom-right aligned) over its rows from its offset to its end. On CUDA in fp16/bf16 one FA2 varlen
  call whose inputs are all device tensors, so the whole prefill forward can be captured in a CUDA graph;
  elsewhere one masked SDPA per sequence from the host copy of the spans.
- a padded prefill from position 0 (the query covers the whole key range): a plain causal SDPA with `enable_gqa`,
  which needs no mask and so can use the flash kernel.
Anything else (a padded prefill that continues a cached prefix) goes to transformers' sdpa with the given mask.

`set_decode_backend` pins the decode kernel (for `benchmarks/engine_profile.py --variants`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlm_triton.engine.paged_attention import kernel_available, paged_decode

NAME = "vlm_slot"
DECODE_BACKENDS = {"auto": None, "sdpa": None, "cudnn": SDPBackend.CUDNN_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
_decode_backend = "auto"


def set_decode_backend(name: str) -> None:
    """The kernel of decode steps: 'auto' (FA2 varlen where it applies, else torch's SDPA choice), 'sdpa' (torch's
    SDPA choice), or an SDPA kernel: 'cudnn', 'efficient', 'math'. Applies to steps traced or captured afterwards
    (CUDA graphs keep the kernel they were captured with)."""
    global _decode_backend
    if name not in DECODE_BACKENDS:
        raise ValueError(f"decode attention backend must be one of {sorted(DECODE_BACKENDS)}, got {name!r}")
    _decode_backend = name


@dataclass(frozen=True)
class DecodeRows:
    """What the varlen decode kernel needs besides q/k/v, built once per decode step by the engine (int32, on the
    device): each row's used KV length, and the offset of each row's span in the cache's row pool."""

    lengths: torch.Tensor  # [B]: position + 1
    cu_k: torch.Tensor  # [B + 1]: the request's first cache row (the last entry is not read)
    cu_q: torch.Tensor  # [B + 1]: b
    max_k: int  # the step's KV-length bucket (>= every length)


@dataclass(frozen=True)
class PagedRows:
    """The paged decode kernel's inputs besides q/k/v (engine/paged_attention.py), device tensors of a decode step:
    each row's used KV length and its request's page table."""

    lengths: torch.Tensor  # [B] int32: position + 1
    table: torch.Tensor  # [B, pages] int32
    page: int  # rows per page
    max_k: int  # the step's KV-length bucket (>= every length)


@dataclass(frozen=True)
class PackedRows:
    """A packed prefill's sequences: query rows [cu_q[b], cu_q[b + 1]) of the packed tokens attend to the cache rows
    [cu_k[b], cu_k[b] + used_k[b]) (the request's rows from position 0 to the sequence's end). Device tensors
    (int32) of a fixed size (unused sequences are empty); `max_q` bounds every sequence's query length. `spans` is
    the same on the host, (q0, q1, k_row0, k_len) per sequence, for the per-sequence path (None inside a CUDA graph).
    `k_index` (a paged cache): the attention first gathers these cache rows, and cu_k and the spans' k_row0 are
    offsets into what it gathered."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    used_k: torch.Tensor
    max_q: int
    max_k: int
    spans: tuple[tuple[int, int, int, int], ...] | None
    k_index: torch.Tensor | None = None


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: PackedRows,
                     scale: float) -> torch.Tensor:
    """query [1, H, T, D] (packed tokens), key/value the cache's row pool [rows, KVH, D] -> [1, T, H, D]."""
    if key.dim() != 3 or value.dim() != 3:
        raise RuntimeError("packed prefill needs the cache's row pool as key/value")
    k_rows, v_rows = key, value
    if packed.k_index is not None:
        k_rows, v_rows = key.index_select(0, packed.k_index), value.index_select(0, packed.k_index)
    heads, kv_heads = query.shape[1], key.shape[1]
    if flash_supported(query.device, query.dtype, query.shape[-1]):
        q = query[0].transpose(0, 1).contiguous()  # [T, H, D]
        out = torch.ops.aten._flash_attention_forward(
            q, k_rows, v_rows, packed.cu_q, packed.cu_k, packed.max_q, packed.max_k, 0.0, True, False, scale=scale,
            seqused_k=packed.used_k,
        )[0]
        return out.unsqueeze(0)
    if packed.spans is None:
        raise RuntimeError("packed prefill without FlashAttention needs the host spans")
    out = query.new_zeros(1, query.shape[2], heads, query.shape[3])
    for q0, q1, r0, k_len in packed.spans:
        n = q1 - q0
        k = k_rows[r0 : r0 + k_len].transpose(0, 1).unsqueeze(0)  # [1, KVH, k_len, D]
        v = v_rows[r0 : r0 + k_len].transpose(0, 1).unsqueeze(0)
        allowed = torch.ones(n, k_len, dtype=torch.bool, device=query.device).tril(k_len - n)
        o = F.scaled_dot_product_attention(query[:, :, q0:q1], k, v, attn_mask=allowed, scale=scale,
                                           enable_gqa=heads != kv_heads)
        out[0, q0:q1] = o[0].transpose(0, 1)
    return out


def flash_decode(query: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, rows: DecodeRows,
                 scale: float) -> torch.Tensor:
    """query [B, H, 1, D] and the cache's row pool [rows, KVH, D] -> [B, 1, H, D] (FA2 varlen, split-KV for one
    query token)."""
    b, h, _, d = query.shape
    q = query.transpose(1, 2).reshape(b, h, d)
    out = torch.ops.aten._flash_attention_forward(
        q, k_rows, v_rows, rows.cu_q, rows.cu_k, 1, rows.max_k, 0.0, False, False, scale=scale,
        seqused_k=rows.lengths,
    )[0]
    return out.view(b, 1, h, d)


def flash_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether FlashAttention-2 (torch's bundled kernel) takes these queries."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def decode_reads_rows(device: torch.device, dtype: torch.dtype, head_dim: int, *, paged: bool = False) -> bool:
    """Whether a decode step of a `vlm_slot` model attends over the cache's row pool (so the cache returns the pool,
    not padded K/V): the 'auto' backend on a device and dtype FlashAttention-2 takes, or for a paged cache the
    paged decode kernel (engine/paged_attention.py)."""
    if paged:
        return _decode_backend == "auto" and kernel_available(device, dtype, head_dim)
    return _decode_backend == "auto" and flash_supported(device, dtype, head_dim)


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [B, H, Q, D], key/value [B, KVH, L, D] (or the cache's row pool [rows, KVH, D] for the packed prefill
    and FA2 decode), attention_mask bool [B, 1, Q, L] -> ([B, Q, H, D], None)."""
    batch, heads, q_len, dim = query.shape
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise ValueError("vlm_slot attention takes bool masks (True = attend)")
    packed = kwargs.get("packed_prefill")
    if isinstance(packed, PackedRows):
        return packed_attention(query, key, value, packed, scaling or dim**-0.5), None
    rows = kwargs.get("slot_decode")
    if key.dim() == 3:
        if q_len == 1 and isinstance(rows, PagedRows):
            out = paged_decode(query.view(batch, heads, dim), key, value, rows.table, rows.lengths, page=rows.page,
                               max_len=rows.max_k, scale=scaling or dim**-0.5)
            return out.view(batch, 1, heads, dim), None
        if q_len != 1 or not isinstance(rows, DecodeRows):
            raise RuntimeError("the cache's row pool reaches attention only for packed prefill and pool decode")
        return flash_decode(query, key, value, rows, scaling or dim**-0.5), None
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if q_len == 1 and heads % kv_heads == 0:
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h uses KV head h // groups
        backend = DECODE_BACKENDS[_decode_backend]
        if backend is None:
            out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
        else:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(batch, 1, heads, dim), None
    if q_len == kv_len:
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=heads != kv_heads
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, slot_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def model_mask(allowed: torch.Tensor, bool_mask: bool, dtype: torch.dtype) -> torch.Tensor:
    """The engine's bool mask (True = attend) as the model's attention takes it: as is for sdpa / vlm_slot, an
    additive float mask for eager attention."""
    if bool_mask:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def use_slot_attention(config: Any) -> bool:
    """Switch a model whose attention is `sdpa` to `vlm_slot` (same masks); False when it uses something else."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    config._attn_implementation = NAME
    return True
