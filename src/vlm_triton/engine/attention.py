"""The engine's attention function, registered with transformers' AttentionInterface as "vlm_slot".

Same maths as transformers' `sdpa` attention (bool masks, True = attend), arranged for the two shapes the engine
runs, so that grouped-query attention never materialises repeated K/V:

- decode (one query token per row): the query heads that share a KV head become the query-length dimension,
  [B, H, 1, D] -> [B, KVH, H/KVH, D], so one SDPA call reads each row's K/V once. transformers' sdpa repeats K/V
  per query head whenever a mask is given, which at batch 64 and a 4k cache moved ~20 GB per step.
- prefill from position 0 (the query covers the whole key range): a plain causal SDPA with `enable_gqa`, which
  needs no mask and so can use the flash kernel.
Anything else (a prefill that continues a cached prefix) goes to transformers' sdpa with the given mask.

`set_decode_backend` pins the SDPA kernel of the decode branch (for `benchmarks/engine_profile.py --variants`; on an
H100 torch's own choice, cuDNN, was the fastest at every batch and KV bucket measured).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "vlm_slot"
DECODE_BACKENDS = {"auto": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "math": SDPBackend.MATH}
_decode_backend: SDPBackend | None = None


def set_decode_backend(name: str) -> None:
    """The SDPA kernel for decode steps: 'auto' (torch's choice), 'cudnn', 'efficient' or 'math'. Applies to
    steps traced or captured afterwards (CUDA graphs keep the kernel they were captured with)."""
    global _decode_backend
    if name not in DECODE_BACKENDS:
        raise ValueError(f"decode attention backend must be one of {sorted(DECODE_BACKENDS)}, got {name!r}")
    _decode_backend = DECODE_BACKENDS[name]


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
    """query [B, H, Q, D], key/value [B, KVH, L, D], attention_mask bool [B, 1, Q, L] -> ([B, Q, H, D], None)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise ValueError("vlm_slot attention takes bool masks (True = attend)")
    if q_len == 1 and heads % kv_heads == 0:
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h uses KV head h // groups
        if _decode_backend is None:
            out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
        else:
            with sdpa_kernel(_decode_backend):
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


def use_slot_attention(config: Any) -> bool:
    """Switch a model whose attention is `sdpa` to `vlm_slot` (same masks); False when it uses something else."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    config._attn_implementation = NAME
    return True
