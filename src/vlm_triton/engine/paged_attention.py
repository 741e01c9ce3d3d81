"""Decode attention over a paged KV cache: one query token per request, its K/V rows found through a page table.

The cache's K/V are [rows, KVH, D] (kv_cache.py); with pages of `page` rows, position p of request b sits at row
`table[b, p // page] * page + p % page`. torch's bundled FlashAttention-2 (torch 2.11, the GPU hosts' image) takes
no block table, so on CUDA this is a Triton (the language) kernel in two passes, FlashDecoding's split-KV:

1. grid (B, KVH, splits): each program takes the query heads of one KV head (grouped-query attention: they share
   the K/V it loads, so each K/V row is read once per step) and one slice of positions, loops over it in blocks of
   BLOCK_N rows with an online softmax in fp32, and writes its partial output and log-sum-exp;
2. grid (B, H): the partials of a head are merged by their log-sum-exp weights into the output.

The number of splits depends on the batch and the KV-length bucket only (both fixed per captured CUDA graph), so
that a step at batch 1 still spreads its positions over the GPU's SMs. `reference_decode` is the same maths in
plain torch (a gather of each request's rows and one masked softmax), used on other devices and by the tests.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import torch

BLOCK_N = 64  # positions per inner-loop block
_PROGRAMS_PER_SM = 2  # split-KV target: programs in flight per SM

# Triton's CPU interpreter (the unit tests): Triton reads this when it is imported, so it is read here once too
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

try:  # the CUDA torch wheels bring Triton; the CPU ones do not, and the engine then never calls the kernel
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU hosts without triton
    triton = None


def kernel_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `paged_decode` runs the Triton kernel for these queries (else the engine gathers K/V for SDPA): on
    CUDA in fp16/bf16, or in the interpreter on the CPU in fp32/fp16 (its bf16 `tl.dot` is wrong); head_dim a power
    of two in [16, 256]."""
    on_cuda = device.type == "cuda" and not INTERPRETED and dtype in (torch.float16, torch.bfloat16)
    on_cpu = device.type == "cpu" and INTERPRETED and dtype in (torch.float16, torch.float32)
    pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0 and head_dim <= 256
    return triton is not None and (on_cuda or on_cpu) and pow2


if triton is not None:

    @triton.jit
    def _split_kernel(Q, K, V, Table, Lens, Part, Lse, scale, split_len,
                      stride_qb, stride_qh, stride_kr, stride_kh, stride_tb,
                      PAGE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                      SPLITS: tl.constexpr, BLOCK: tl.constexpr):  # pragma: no cover - runs on a GPU / interpreter
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(Lens + b)
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        g = tl.arange(0, GROUP_PAD)
        heads = kvh * GROUP + g
        hmask = g < GROUP
        d = tl.arange(0, D)
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=hmask[:, None], other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        for n0 in range(start, end, BLOCK):
            pos = n0 + tl.arange(0, BLOCK)
            pmask = pos < end
            page = tl.load(Table + b * stride_tb + pos // PAGE, mask=pmask, other=0)
            rows = page.to(tl.int64) * PAGE + pos % PAGE
            offs = rows[:, None] * stride_kr + kvh * stride_kh + d[None, :]
            k = tl.load(K + offs, mask=pmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            s = tl.where(pmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + offs, mask=pmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        safe = tl.where(l_i > 0, l_i, 1.0)
        out_heads = b * (GROUP * tl.num_programs(1)) + heads  # flat (b, h) index, [B * H]
        tl.store(Part + (out_heads[:, None] * SPLITS + split) * D + d[None, :], acc / safe[:, None],
                 mask=hmask[:, None])
        tl.store(Lse + out_heads * SPLITS + split, tl.where(l_i > 0, m_i + tl.log(safe), float("-inf")), mask=hmask)

    @triton.jit
    def _merge_kernel(Part, Lse, Out, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                      D: tl.constexpr):  # pragma: no cover - runs on a GPU / interpreter
        bh = tl.program_id(0)
        s = tl.arange(0, SPLITS_PAD)
        smask = s < SPLITS
        lse = tl.load(Lse + bh * SPLITS + s, mask=smask, other=float("-inf"))
        w = tl.exp(lse - tl.max(lse, 0))
        w = w / tl.sum(w, 0)
        d = tl.arange(0, D)
        part = tl.load(Part + (bh * SPLITS + s[:, None]) * D + d[None, :], mask=smask[:, None], other=0.0)
        tl.store(Out + bh * D + d, tl.sum(part * w[:, None], 0).to(Out.dtype.element_ty))


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    if not torch.cuda.is_available():
        return 8
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def num_splits(batch: int, kv_heads: int, max_len: int, sms: int) -> tuple[int, int]:
    """(splits, positions per split, a multiple of BLOCK_N) for a step of `batch` rows over a `max_len` bucket:
    enough programs for `_PROGRAMS_PER_SM` per SM, no split shorter than one block."""
    blocks = max(1, -(-max_len // BLOCK_N))
    want = max(1, -(-(_PROGRAMS_PER_SM * sms) // (batch * kv_heads)))
    per_split = -(-blocks // min(want, blocks))
    splits = -(-blocks // per_split)
    return splits, per_split * BLOCK_N


def paged_decode(query: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, table: torch.Tensor,
                 lengths: torch.Tensor, *, page: int, max_len: int, scale: float) -> torch.Tensor:
    """query [B, H, D], the cache's rows [R, KVH, D], table [B, pages] (int32), lengths [B] (int32, each <= max_len)
    -> [B, H, D]: each query attends over its request's positions [0, length)."""
    if not kernel_available(query.device, query.dtype, query.shape[-1]):
        return reference_decode(query, k_rows, v_rows, table, lengths, page=page, max_len=max_len, scale=scale)
    b, h, d = query.shape
    kvh = k_rows.shape[1]
    group = h // kvh
    if k_rows.stride(-1) != 1 or v_rows.stride() != k_rows.stride() or table.stride(-1) != 1:
        raise ValueError("paged_decode needs K/V rows with a unit last stride and the same layout, and a dense table")
    index = query.device.index if query.device.type == "cuda" else 0
    splits, split_len = num_splits(b, kvh, max_len, _sm_count(index or 0))
    q = query.contiguous()
    part = torch.empty(b * h * splits * d, dtype=torch.float32, device=query.device)
    lse = torch.empty(b * h * splits, dtype=torch.float32, device=query.device)
    _split_kernel[(b, kvh, splits)](
        q, k_rows, v_rows, table, lengths, part, lse, scale, split_len,
        q.stride(0), q.stride(1), k_rows.stride(0), k_rows.stride(1), table.stride(0),
        PAGE=page, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d, SPLITS=splits, BLOCK=BLOCK_N,
    )
    out = torch.empty_like(q)
    _merge_kernel[(b * h,)](part, lse, out, SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)), D=d)
    return out


def page_rows(table: torch.Tensor, positions: torch.Tensor, page: int) -> torch.Tensor:
    """Cache rows of `positions` ([B, ...] int64) of each request through its page table row ([B, pages])."""
    flat = positions.reshape(positions.shape[0], -1)
    rows = table.long().gather(1, flat // page) * page + flat % page
    return rows.view(positions.shape)


def page_span_rows(table: torch.Tensor, length: int, last: torch.Tensor, page: int) -> torch.Tensor:
    """[B, length] cache rows of positions 0..length-1 of each request, positions past its `last` ([B]) repeating
    that one (the caller masks them): `kv_cache.span_rows` through page tables."""
    span = torch.arange(length, device=table.device).view(1, -1)
    return page_rows(table, torch.minimum(span, last.view(-1, 1).long()), page)


def reference_decode(query: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, table: torch.Tensor,
                     lengths: torch.Tensor, *, page: int, max_len: int, scale: float) -> torch.Tensor:
    """`paged_decode` in plain torch: gather [B, max_len] rows (positions past a request's length masked)."""
    b, h, d = query.shape
    kvh = k_rows.shape[1]
    valid = torch.arange(max_len, device=query.device).view(1, -1) < lengths.view(-1, 1).long()
    rows = page_span_rows(table, max_len, (lengths.long() - 1).clamp(min=0), page)
    k = k_rows[rows].permute(0, 2, 1, 3)  # [B, KVH, L, D]
    v = v_rows[rows].permute(0, 2, 1, 3)
    q = query.view(b, kvh, h // kvh, d)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, KVH, G, L]
    scores = scores.masked_fill(~valid.view(b, 1, 1, -1), float("-inf"))
    out: Any = scores.softmax(-1) @ v.float()
    return out.view(b, h, d).to(query.dtype)  # type: ignore[no-any-return]
