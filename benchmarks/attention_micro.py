"""Decode attention kernels at the shapes the engine captures (one query token per row, a slot KV cache).

    python -m benchmarks.attention_micro [--heads 14 --kv-heads 2 --dim 64]

For each batch bucket and KV bucket it times (CUDA graph of 24 calls, like 24 layers) and checks against the
fp32 reference:
  sdpa      what the engine runs now: query heads grouped per KV head, a bool mask [B, 1, 1, L], torch's kernel
            choice (cuDNN on an H100)
  flash     FlashAttention-2 through `torch.ops.aten._flash_attention_forward` in its varlen form: the cache as
            [slots * L, kv_heads, D] rows, each row's used length in `seqused_k`, no mask; for one query token
            with grouped heads FA2 splits the KV length across thread blocks (split-KV)
  split     the same maths with matmuls: scores, masked fp32 softmax, then P @ V in S chunks of the KV length summed
Rows whose lengths are random in [1, L]. Prints a table (microseconds per call).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

Fn = Callable[[], torch.Tensor]


def flash_decode(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, lengths: torch.Tensor,
                 cu_k: torch.Tensor, cu_q: torch.Tensor, kv_len: int, scale: float) -> torch.Tensor:
    """q [B, H, D]; k_rows/v_rows [slots * L, KVH, D]; lengths int32 [B] -> [B, H, D]."""
    out = torch.ops.aten._flash_attention_forward(
        q, k_rows, v_rows, cu_q, cu_k, 1, kv_len, 0.0, False, False, scale=scale, seqused_k=lengths)
    return out[0]


def split_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
                 splits: int) -> torch.Tensor:
    """q [B, KVH, G, D]; k/v [B, KVH, L, D]; allowed bool [B, 1, 1, L] -> [B, KVH, G, D]."""
    b, kvh, g, d = q.shape
    length = k.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(q.dtype)
    probs = probs.view(b, kvh, g, splits, length // splits).transpose(2, 3)
    parts = torch.matmul(probs, v.view(b, kvh, splits, length // splits, d))
    return parts.sum(2, dtype=torch.float32).to(q.dtype)


def time_graph(fn: Fn, layers: int = 24, reps: int = 20) -> float:
    """Microseconds per call, from a CUDA graph of `layers` calls replayed `reps` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (reps * layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--kv", default="256,1024,4096")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    h, kvh, d, slots, max_len = args.heads, args.kv_heads, args.dim, args.slots, args.max_seq_len
    g, scale = h // kvh, d ** -0.5
    gen = torch.Generator(device=dev).manual_seed(0)
    # one cache in the row layout [slots, L, KVH, D]; the engine's layout [slots, KVH, L, D] is its transposed view
    k_cache = torch.randn(slots, max_len, kvh, d, device=dev, dtype=dt, generator=gen)
    v_cache = torch.randn(slots, max_len, kvh, d, device=dev, dtype=dt, generator=gen)
    k_rows, v_rows = k_cache.view(slots * max_len, kvh, d), v_cache.view(slots * max_len, kvh, d)
    k_heads, v_heads = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    print(f"H={h} KVH={kvh} D={d}, {torch.cuda.get_device_name()}, torch {torch.__version__}; us per call")
    print("| batch | kv | sdpa (now) | flash varlen | split 8 | split 32 | max err flash / split vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for b in [int(x) for x in args.batches.split(",")]:
        for kv in [int(x) for x in args.kv.split(",")]:
            lengths = torch.randint(1, kv + 1, (b,), device=dev, generator=gen)
            q = torch.randn(b, h, d, device=dev, dtype=dt, generator=gen)
            allowed = (torch.arange(kv, device=dev).view(1, 1, 1, -1) < lengths.view(-1, 1, 1, 1))
            grouped = q.view(b, kvh, g, d)
            kh, vh = k_heads[:b, :, :kv], v_heads[:b, :, :kv]
            lengths32 = lengths.to(torch.int32)
            cu_k = (torch.arange(b + 1, device=dev, dtype=torch.int32) * max_len)
            cu_q = torch.arange(b + 1, device=dev, dtype=torch.int32)

            def sdpa() -> torch.Tensor:
                return F.scaled_dot_product_attention(grouped, kh, vh, attn_mask=allowed, scale=scale)

            def flash() -> torch.Tensor:
                return flash_decode(q, k_rows, v_rows, lengths32, cu_k, cu_q, kv, scale)

            ref = F.scaled_dot_product_attention(grouped.float(), kh.float(), vh.float(), attn_mask=allowed,
                                                 scale=scale).reshape(b, h, d)
            row = [f"{b}", f"{kv}", f"{time_graph(sdpa):.1f}"]
            errs = []
            try:
                errs.append(f"{(flash().float() - ref).abs().max().item():.3g}")
                row.append(f"{time_graph(flash):.1f}")
            except Exception as exc:  # noqa: BLE001 - report, go on
                row.append(f"error {type(exc).__name__}: {str(exc)[:80]}")
            for splits in (8, 32):
                def split(s: int = splits) -> torch.Tensor:
                    return split_decode(grouped, kh, vh, allowed, scale, s)
                if splits == 8:
                    errs.append(f"{(split().float().reshape(b, h, d) - ref).abs().max().item():.3g}")
                row.append(f"{time_graph(split):.1f}")
            row.append(" / ".join(errs))
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
