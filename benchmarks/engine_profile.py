"""Where a decode step's time goes: the captured graph alone (CUDA events) per batch and KV-length bucket, the
whole `engine.step()` at steady state, and the top kernels of a profiled step. Prints tables.

    python -m benchmarks.engine_profile --preset internvl3-1b --out prof-out   # GPU, about a minute
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.baselines import build_engine, sync
from benchmarks.models import make_model
from vlm_triton.engine.types import GenerationRequest


def graph_ms(engine, bucket: int, kv_len: int, reps: int = 50) -> float:
    graphs = engine._graphs
    for _ in range(3):
        graphs.replay(bucket, kv_len)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graphs.replay(bucket, kv_len)
    end.record()
    torch.cuda.synchronize()
    engine.cache.set_idle()
    return start.elapsed_time(end) / reps


def fill(engine, n: int, prompt_len: int, max_new: int) -> None:
    for i in range(n):
        ids = torch.randint(0, 1000, (prompt_len,), dtype=torch.int32).numpy()
        engine.add_request(GenerationRequest(request_id=f"p{time.monotonic_ns()}-{i}", input_ids=ids,
                                             max_new_tokens=max_new, temperature=0.0, end_id=-1))
    while engine._waiting:
        engine.step()


def step_ms(engine, steps: int) -> float:
    engine.step()
    sync(engine.device)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.device)
    return (time.perf_counter() - t) * 1000 / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="internvl3-1b")
    ap.add_argument("--out", type=Path, default=Path("prof-out"))
    ap.add_argument("--max-slots", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the step timing only (tiny preset)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cuda = device.type == "cuda"
    ckpt = make_model(args.preset, Path("/tmp/prof-work") / args.preset)
    t = time.perf_counter()
    _, engine, _ = build_engine(ckpt, device, dtype, args.max_slots, args.max_seq_len)
    print(f"engine built (graphs: {0 if engine._graphs is None else len(engine._graphs.graphs)}) "
          f"in {time.perf_counter() - t:.1f} s; attention {engine.backbone.config._attn_implementation}", flush=True)
    result: dict = {"graph_ms": {}, "step_ms": {}}
    buckets = engine.buckets if cuda else []
    print("\n| batch bucket | " + " | ".join(f"kv {k}" for k in engine.kv_buckets) + " |")
    print("|---|" + "---|" * len(engine.kv_buckets))
    for b in buckets:
        row = [graph_ms(engine, b, k) for k in engine.kv_buckets]
        result["graph_ms"][b] = dict(zip(engine.kv_buckets, row))
        print(f"| {b} | " + " | ".join(f"{v:.3f}" for v in row) + " |", flush=True)
    print("\n| running requests | prompt | step ms (engine.step, graphs + sampling + bookkeeping) |\n|---|---|---|")
    for n in (1, 16, 64):
        if n > args.max_slots:
            continue
        fill(engine, n, 512, 10_000)
        ms = step_ms(engine, 40)
        result["step_ms"][n] = ms
        print(f"| {n} | 512 | {ms:.3f} |", flush=True)
        if n == 64 and cuda:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    engine.step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60)
            (args.out / "profile-b64.txt").write_text(table)
            print(table, flush=True)
            cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)
            (args.out / "profile-b64-cpu.txt").write_text(cpu)
            print(cpu, flush=True)
        for rid in list(engine.active_slots()):
            engine.cancel(rid)
        engine.step()
    (args.out / "engine_profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
