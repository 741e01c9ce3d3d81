"""FlashAttention-2 over a paged KV cache (torch's bundled kernel, `block_table`), against the slot ("rows") cache.

    python -m benchmarks.paged_micro [--heads 14 --kv-heads 2 --dim 64]

1. Which page sizes the kernel takes (it rejects some with an error), for decode (one query token per sequence)
   and for a packed prefill (several sequences' query tokens one after another, each attending causally over its
   pages), each checked against an fp32 reference over the gathered K/V.
2. Time per call of decode at the engine's shapes (CUDA graph of 24 calls, like 24 layers): the slot cache as the
   engine runs it now (rows of [slots * L, KVH, D], `seqused_k`), and the paged pool at each accepted page size with
   the sequences' pages scattered over the pool; and the engine's own paged decode kernel
   (engine/paged_attention.py, Triton) at each of `--triton-pages`, with its error against the fp32 reference.
Prints a table (microseconds per call).
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from benchmarks.attention_micro import time_graph


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, H, D] (the last n positions), k/v [L, KVH, D] -> [n, H, D], causal bottom-right, fp32."""
    n, heads, _ = q.shape
    length, kvh, _ = k.shape
    qf = q.float().transpose(0, 1)
    kf = k.float().transpose(0, 1).repeat_interleave(heads // kvh, 0)
    vf = v.float().transpose(0, 1).repeat_interleave(heads // kvh, 0)
    allowed = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=allowed, scale=scale)
    return out.transpose(0, 1)


class Pool:
    """A pool of `blocks` pages of `page` tokens, sequences given scattered pages."""

    def __init__(self, blocks: int, page: int, kvh: int, dim: int, dtype: torch.dtype) -> None:
        self.k = torch.randn(blocks, page, kvh, dim, device="cuda", dtype=dtype)
        self.v = torch.randn(blocks, page, kvh, dim, device="cuda", dtype=dtype)
        self.page = page
        self.free = list(range(blocks))
        random.shuffle(self.free)

    def table(self, lengths: list[int], width: int) -> torch.Tensor:
        rows = []
        for length in lengths:
            need = -(-length // self.page)
            pages = [self.free.pop() for _ in range(need)]
            rows.append(pages + [0] * (width - need))
        return torch.tensor(rows, dtype=torch.int32, device="cuda")

    def gather(self, table_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        pages = table_row[: -(-length // self.page)].long()
        k = self.k[pages].reshape(-1, *self.k.shape[2:])[:length]
        v = self.v[pages].reshape(-1, *self.v.shape[2:])[:length]
        return k, v


def paged_call(q: torch.Tensor, pool: Pool, cu_q: torch.Tensor, cu_k: torch.Tensor, used: torch.Tensor,
               table: torch.Tensor, max_q: int, max_k: int, causal: bool, scale: float) -> torch.Tensor:
    return torch.ops.aten._flash_attention_forward(
        q, pool.k, pool.v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale, seqused_k=used,
        block_table=table)[0]


def check(page: int, heads: int, kvh: int, dim: int, decode: bool) -> str:
    random.seed(page)
    scale = dim ** -0.5
    lengths = [random.randint(1, 1500) for _ in range(7)] + [page, 2 * page + 1]
    q_lens = [1] * len(lengths) if decode else [max(1, x // random.randint(1, 3)) for x in lengths]
    width = -(-max(lengths) // page) + 1
    blocks = sum(-(-x // page) for x in lengths) + 8
    pool = Pool(blocks, page, kvh, dim, torch.bfloat16)
    table = pool.table(lengths, width)
    q = torch.randn(sum(q_lens), heads, dim, device="cuda", dtype=torch.bfloat16)
    cu_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    used = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    try:
        out = paged_call(q, pool, cu_q, cu_k, used, table, max(q_lens), max(lengths), not decode, scale)
    except Exception as exc:  # the kernel's own checks (page size, layout)
        return f"rejected: {str(exc).splitlines()[0][:100]}"
    worst = 0.0
    for b, (n, length) in enumerate(zip(q_lens, lengths)):
        k, v = pool.gather(table[b], length)
        ref = reference(q[cu_q[b] : cu_q[b + 1]], k, v, scale)
        worst = max(worst, (out[cu_q[b] : cu_q[b + 1]].float() - ref).abs().max().item())
    return f"ok, max |err| {worst:.4f}" if worst < 0.02 else f"WRONG, max |err| {worst:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--pages", default="16,32,64,128,256")
    p.add_argument("--triton-pages", default="16,64")
    p.add_argument("--points", default="1x4096,1x768,16x768,64x768,64x4096,64x2048",
                   help="decode timings: BATCHxCONTEXT, comma separated")
    a = p.parse_args()
    print(torch.__version__, torch.cuda.get_device_name())
    print(torch.ops.aten._flash_attention_forward.default._schema)
    accepted = []
    for page in [int(x) for x in a.pages.split(",")]:
        d = check(page, a.heads, a.kv_heads, a.dim, decode=True)
        pf = check(page, a.heads, a.kv_heads, a.dim, decode=False)
        print(f"page {page:4d}: decode {d}; packed prefill {pf}")
        if d.startswith("ok") and pf.startswith("ok"):
            accepted.append(page)
    scale = a.dim ** -0.5
    tpages = [int(x) for x in a.triton_pages.split(",") if x]
    columns = ["batch", "context", "slot rows us", *(f"paged {p} us" for p in accepted),
               *(f"triton paged {p} us (max err)" for p in tpages)]
    print("\n| " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * (len(accepted) + len(tpages)))
    for batch, ctx in [tuple(int(v) for v in point.split("x")) for point in a.points.split(",")]:
        q = torch.randn(batch, a.heads, a.dim, device="cuda", dtype=torch.bfloat16)
        lengths = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        span = max(4096, ctx)  # each request's run of rows
        k_rows = torch.randn(max(batch, 64) * span, a.kv_heads, a.dim, device="cuda", dtype=torch.bfloat16)
        v_rows = torch.randn_like(k_rows)
        cu_rows = (torch.arange(batch + 1, dtype=torch.int32, device="cuda") * span)
        row_us = time_graph(lambda: torch.ops.aten._flash_attention_forward(
            q, k_rows, v_rows, cu_q, cu_rows, 1, ctx, 0.0, False, False, scale=scale, seqused_k=lengths)[0])
        cells = [f"{row_us:.1f}"]
        del k_rows, v_rows
        for page in accepted:
            width = -(-max(4096, ctx) // page)
            pool = Pool(batch * width + 4, page, a.kv_heads, a.dim, torch.bfloat16)
            table = pool.table([ctx] * batch, width)
            cu_k = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * ctx
            us = time_graph(lambda: paged_call(q, pool, cu_q, cu_k, lengths, table, 1, ctx, False, scale))
            cells.append(f"{us:.1f}")
            del pool
        for page in tpages:
            cells.append(triton_cell(q, lengths, batch, ctx, page, a.kv_heads, a.dim, scale))
        print(f"| {batch} | {ctx} | " + " | ".join(cells) + " |")


def triton_cell(q: torch.Tensor, lengths: torch.Tensor, batch: int, ctx: int, page: int, kvh: int, dim: int,
                scale: float) -> str:
    """The engine's paged decode kernel over scattered pages: microseconds per call and max |err| vs fp32."""
    from vlm_triton.engine.paged_attention import paged_decode, reference_decode

    width = -(-max(4096, ctx) // page)
    pool = Pool(batch * width + 4, page, kvh, dim, torch.bfloat16)
    table = pool.table([ctx] * batch, width)
    k, v = pool.k.view(-1, kvh, dim), pool.v.view(-1, kvh, dim)
    us = time_graph(lambda: paged_decode(q, k, v, table, lengths, page=page, max_len=ctx, scale=scale))
    got = paged_decode(q, k, v, table, lengths, page=page, max_len=ctx, scale=scale).float()
    ref = reference_decode(q.float(), k.float(), v.float(), table, lengths, page=page, max_len=ctx, scale=scale)
    return f"{us:.1f} ({(got - ref).abs().max().item():.4f})"


if __name__ == "__main__":
    main()
