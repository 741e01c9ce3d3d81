"""The MiniCPM-V-2.5/2.6 perceiver resampler (model_specs.md 3.5): 64 learned queries, one cross-attention.

kv = LN_kv(x · W_kvᵀ); keys = kv + PE(h, w), values = kv; queries = LN_q(Q0) (no position term); standard
multi-head attention with a packed in-projection [q; k; v] and biases, padded patches masked out as keys; then
LN_post and a right-multiplication by the stored `proj` matrix. D // 128 heads (the reference's rule).

PE is the 2-D sin-cos table: entry (h, w) = [sin(w·ω), cos(w·ω), sin(h·ω), cos(h·ω)], ω_k = 10000^(-k/(D/4)),
computed in float32 numpy exactly as the reference does (the first half encodes the column).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(*, dim: int, positions: np.ndarray) -> np.ndarray:
    """[..., dim] = [sin(p·ω), cos(p·ω)] with ω_k = 10000^(-k/(dim/2)), float32 throughout."""
    if dim % 2:
        raise ValueError(f"the sin-cos dimension must be even, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    angles = positions[..., None].astype(np.float32) * omega
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


@lru_cache(maxsize=256)
def sincos_2d(*, dim: int, rows: int, cols: int) -> torch.Tensor:
    """float32 [rows*cols, dim]: the resampler's PE[:rows, :cols] flattened row-major (cached; do not mutate)."""
    if dim % 4:
        raise ValueError(f"the resampler width must be divisible by 4, got {dim}")
    w, h = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    table = np.concatenate([sincos_1d(dim=dim // 2, positions=w), sincos_1d(dim=dim // 2, positions=h)], axis=-1)
    return torch.from_numpy(np.ascontiguousarray(table.reshape(rows * cols, dim)))


class _PackedAttention(nn.Module):
    """Parameters named as torch.nn.MultiheadAttention's (`in_proj_weight`, `in_proj_bias`, `out_proj`)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """q [B, Q, D], k/v [B, L, D], keep [B, L] (True = a real patch) -> [B, Q, D]."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        b, n_q, d = q.shape
        heads = [
            F.linear(t, w, bias).reshape(b, t.shape[1], self.num_heads, d // self.num_heads).transpose(1, 2)
            for t, w, bias in ((q, wq, bq), (k, wk, bk), (v, wv, bv))
        ]
        mask = None if keep is None else keep[:, None, None, :]
        out = F.scaled_dot_product_attention(*heads, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n_q, d))


class Resampler(nn.Module):
    def __init__(self, *, num_queries: int, dim: int, kv_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim < 128 or dim % 128:
            raise ValueError(f"the resampler uses dim // 128 heads; its width {dim} must be a positive multiple of 128")
        self.dim = dim
        self.query = nn.Parameter(torch.zeros(num_queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False)  # the reference uses Identity when kv_dim == dim
        self.attn = _PackedAttention(dim, dim // 128)
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.ln_kv = nn.LayerNorm(dim, eps=eps)
        self.ln_post = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Parameter(torch.empty(dim, dim))

    def position_table(self, tgt_sizes: list[tuple[int, int]], length: int) -> torch.Tensor:
        """float32 [B, length, D]: each item's PE rows, zero beyond its patches."""
        out = torch.zeros(len(tgt_sizes), length, self.dim)
        for i, (rows, cols) in enumerate(tgt_sizes):
            out[i, : rows * cols] = sincos_2d(dim=self.dim, rows=rows, cols=cols)
        return out

    def forward(self, x: torch.Tensor, tgt_sizes: list[tuple[int, int]], keep: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, kv_dim] (patches beyond each item's rows*cols are padding) -> [B, num_queries, D]."""
        kv = self.ln_kv(self.kv_proj(x))
        pos = self.position_table(tgt_sizes, x.shape[1]).to(device=kv.device, dtype=kv.dtype)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        out = self.attn(q, kv + pos, kv, keep)
        return self.ln_post(out) @ self.proj
