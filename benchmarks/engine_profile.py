"""Where a decode step's time goes: the captured graph alone (CUDA events) per batch and KV-length bucket, the
whole `engine.step()` at steady state, and the top kernels of a profiled step. Prints tables.

    python -m benchmarks.engine_profile --preset internvl3-1b --out prof-out   # GPU, about a minute
    python -m benchmarks.engine_profile --variants auto,efficient,math,efficient+pointwise   # decode-step variants

`--prefill 512,3400,8000` instead times prefill steps of one prompt of each length (engine.step() with the packed
prefill graphs, as served), prints their TFLOP/s against the measured bf16 matmul peak, and the top kernels of the
largest length's steps. `--prefill-pointwise` starts from the pointwise ops compiled in decode steps only (eager
everywhere with `--eager-pointwise`), then does it again with them compiled in prefill too (engine/pointwise.py,
`engine.prefill_pointwise`) and says whether greedy tokens stayed the same; `--prefill-fused` then once more with
each layer's projections fused (engine/fused_linear.py).

`--buckets 1x3400,2x3400,9x512` instead times prefill steps of k prompts of n tokens replayed from power-of-two
packed-length buckets and then from the buckets as served (item 46: octaves split in quarters from 512 tokens).

`--variants` instead compares ways of running the decode step (the SDPA kernel of decode attention, the pointwise
ops compiled, vlm_triton/engine/pointwise.py, and the projections fused, engine/fused_linear.py): graph time per
(batch, KV) bucket and whether greedy tokens of four requests stay equal to the first variant's.
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
    return engine._graphs.time_replay(bucket, kv_len, reps)


def fill(engine, n: int, prompt_len: int, max_new: int) -> None:
    for i in range(n):
        ids = torch.randint(0, 1000, (prompt_len,), dtype=torch.int32).numpy()
        engine.add_request(GenerationRequest(request_id=f"p{time.monotonic_ns()}-{i}", input_ids=ids,
                                             max_new_tokens=max_new, temperature=0.0, end_id=-1))
    while len(engine.admission):
        engine.step()


def step_ms(engine, steps: int) -> float:
    engine.step()
    sync(engine.device)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.device)
    return (time.perf_counter() - t) * 1000 / steps


def greedy_tokens(engine, lengths: tuple[int, ...] = (300, 700, 1500, 3000), new: int = 32) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    out: dict[str, list[int]] = {}
    for i, n in enumerate(lengths):
        ids = torch.randint(0, 1000, (n,), dtype=torch.int32, generator=gen).numpy()
        engine.add_request(GenerationRequest(request_id=f"g{i}", input_ids=ids, max_new_tokens=new, temperature=0.0,
                                             end_id=-1))
        out[f"g{i}"] = []
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None:
                out[ev.request_id].append(ev.token_id)
    return [out[f"g{i}"] for i in range(len(lengths))]


def prefill_flops(backbone: torch.nn.Module, tokens: int) -> float:
    """FLOPs of one prompt of `tokens` through the backbone: its linear layers, and causal attention (QK^T and PV over
    half of the square each)."""
    from vlm_triton.engine.fused_linear import FusedMember

    linear = sum(m.weight.numel() for m in backbone.modules() if isinstance(m, (torch.nn.Linear, FusedMember)))
    cfg = backbone.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2.0 * linear * tokens + 2.0 * cfg.num_hidden_layers * tokens * tokens * cfg.num_attention_heads * head_dim


def prefill_step_ms(engine, tokens: int, reps: int, prompts: int = 1) -> float:
    """Median ms of the engine steps that serve `prompts` prompts of `tokens` tokens and their one output token."""
    times = []
    for i in range(reps):
        for j in range(prompts):
            ids = torch.randint(0, 1000, (tokens,), dtype=torch.int32).numpy()
            engine.add_request(GenerationRequest(request_id=f"pf{tokens}-{i}-{j}", input_ids=ids, max_new_tokens=1,
                                                 temperature=0.0, end_id=-1))
        sync(engine.device)
        t = time.perf_counter()
        while engine.has_work():
            engine.step()
        sync(engine.device)
        times.append((time.perf_counter() - t) * 1000)
    return sorted(times)[len(times) // 2]


def prefill_sweep(engine, lengths: list[int], out: Path, label: str, reps: int = 7) -> list[dict]:
    from benchmarks.baselines import device_ceilings
    from torch.profiler import ProfilerActivity, profile

    peak = device_ceilings(engine.device).get("matmul_flops") or float("nan")
    graphs = getattr(engine.prefill, "graphs", None)
    print(f"\n{label}: prefill graphs {graphs is not None}; bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    print("| prompt tokens | step ms | TFLOP | TFLOP/s | of the matmul peak |\n|---|---|---|---|---|")
    rows = []
    for n in lengths:
        prefill_step_ms(engine, n, 2)
        ms = prefill_step_ms(engine, n, reps)
        flops = prefill_flops(engine.backbone, n)
        rows.append({"tokens": n, "step_ms": ms, "tflop": flops / 1e12, "tflops_s": flops / ms / 1e9})
        print(f"| {n} | {ms:.2f} | {flops / 1e12:.2f} | {flops / ms / 1e9:.0f} | {flops / ms * 1e3 / peak:.0%} |",
              flush=True)
    n = max(lengths)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill_step_ms(engine, n, 3)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
    slug = label.replace(" ", "-")
    (out / f"prefill-{n}-{slug}.txt").write_text(table)
    print(f"\nprefill of {n} tokens ({label}), 3 steps, kernels:\n{table}", flush=True)
    (out / f"prefill-{slug}.json").write_text(json.dumps({"peak_flops": peak, "rows": rows}, indent=1))
    return rows


def bucket_sweep(engine, shapes: list[str], out: Path, reps: int = 7) -> None:
    """Prefill steps of k prompts of n tokens ("kxn") replayed from power-of-two buckets (before item 46), then from
    the buckets as served (engine/packed.py `token_buckets`); greedy tokens of both."""
    from vlm_triton.engine.packed import token_buckets

    served = list(engine.prefill.buckets)
    layouts = {"powers of two": token_buckets(served[-1], per_octave=1), "as served": served}
    rows: dict[str, dict[str, float]] = {}
    tokens = {}
    for label, buckets in layouts.items():
        engine.prefill.buckets = buckets
        recapture_prefill(engine)
        rows[label] = {}
        for shape in shapes:
            k, n = (int(v) for v in shape.split("x"))
            prefill_step_ms(engine, n, 2, k)
            rows[label][shape] = prefill_step_ms(engine, n, reps, k)
        tokens[label] = greedy_tokens(engine)
    print("\n| prompts x tokens | bucket (powers of two) | ms | bucket (as served) | ms | change |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        k, n = (int(v) for v in shape.split("x"))
        old, new = (next(b for b in layouts[lb] if b >= k * n) for lb in layouts)
        a, b = rows["powers of two"][shape], rows["as served"][shape]
        print(f"| {shape} | {old} | {a:.2f} | {new} | {b:.2f} | {b / a - 1:+.0%} |", flush=True)
    same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
            for x, y in zip(*tokens.values())]
    print(f"greedy tokens equal before the first difference (of {len(tokens['as served'][0])} per prompt): {same}")
    (out / "prefill-buckets.json").write_text(json.dumps({"layouts": layouts, "step_ms": rows}, indent=1))


def recapture_prefill(engine) -> None:
    """The prefill graphs captured again (after the model was patched: the old ones read replaced weights)."""
    from vlm_triton.engine.cuda_graphs import PrefillGraphs

    if getattr(engine.prefill, "graphs", None) is not None:
        engine.prefill.graphs = None
        torch.cuda.empty_cache()
        engine.prefill.graphs = PrefillGraphs.capture(engine.prefill)


def prefill_change_sweep(engine, lengths: list[int], out: Path, label: str, change) -> None:
    """After a sweep: `change(engine)` (patches the model), the graphs captured again (decode's too: the change
    applies to decode steps as well), the sweep once more; how many greedy tokens stay equal."""
    from vlm_triton.engine.cuda_graphs import DecodeGraphs

    before = greedy_tokens(engine)
    change(engine)
    if engine._graphs is not None:
        engine._graphs = None
        torch.cuda.empty_cache()
        engine._graphs = DecodeGraphs.capture(engine)
    recapture_prefill(engine)
    prefill_sweep(engine, lengths, out, label)
    after = greedy_tokens(engine)
    same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(before, after)]
    print(f"{label}: greedy tokens equal before the first difference (of {len(before[0])} per prompt): {same}",
          flush=True)


def variant_sweep(engine, names: list[str], out: Path) -> None:
    from vlm_triton.engine.pointwise import compile_pointwise
    from vlm_triton.engine.attention import set_decode_backend
    from vlm_triton.engine.cuda_graphs import DecodeGraphs

    batches = [b for b in (1, 8, 64) if b in engine.buckets]
    kvs = [k for k in (256, 1024, 4096) if k in engine.kv_buckets]
    full = engine.buckets, engine.kv_buckets
    engine.buckets, engine.kv_buckets = batches, sorted({*kvs, engine.max_seq_len})
    rows, ref, pointwise, fused = [], None, False, False
    print("\n| variant | capture s | " + " | ".join(f"b{b} kv{k}" for b in batches for k in kvs)
          + " | greedy tokens equal to the first variant |")
    print("|---|---|" + "---|" * (len(batches) * len(kvs) + 1))
    for name in names:
        backend, *extras = name.split("+")
        try:
            if "pointwise" in extras and not pointwise:
                t = time.perf_counter()
                counts = compile_pointwise(engine.backbone, engine.device)
                pointwise = True
                print(f"(pointwise compiled: {counts}, {time.perf_counter() - t:.1f} s)", flush=True)
            if "fused" in extras and not fused:
                from vlm_triton.engine.fused_linear import fuse_projections

                print(f"(projections fused: {fuse_projections(engine.backbone)})", flush=True)
                fused = True
                recapture_prefill(engine)  # greedy_tokens prefills: not from graphs of the replaced weights
            set_decode_backend(backend)
            engine._graphs = None
            torch.cuda.empty_cache()
            t = time.perf_counter()
            engine._graphs = DecodeGraphs.capture(engine)
            capture_s = time.perf_counter() - t
            times = {f"b{b} kv{k}": graph_ms(engine, b, k) for b in batches for k in kvs}
            tokens = greedy_tokens(engine)
            ref = ref if ref is not None else tokens
            same = [sum(x == y for x, y in zip(a, b)) for a, b in zip(tokens, ref)]
            row = {"variant": name, "capture_s": capture_s, "graph_ms": times, "tokens_equal": same}
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
            row = {"variant": name, "error": f"{type(exc).__name__}: {exc}"}
            print(f"| {name} | error: {row['error'][:300]} |", flush=True)
            rows.append(row)
            continue
        rows.append(row)
        print(f"| {name} | {capture_s:.1f} | " + " | ".join(f"{v:.3f}" for v in times.values())
              + f" | {same} of 32 each |", flush=True)
    engine.buckets, engine.kv_buckets = full
    (out / "variants.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="internvl3-1b")
    ap.add_argument("--out", type=Path, default=Path("prof-out"))
    ap.add_argument("--max-slots", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the step timing only (tiny preset)")
    ap.add_argument("--eager-pointwise", action="store_true", help="engine.compile_pointwise off")
    ap.add_argument("--prefill", default="", help="comma list of prompt lengths: prefill steps instead")
    ap.add_argument("--prefill-pointwise", action="store_true",
                    help="with --prefill: again with the pointwise ops compiled in prefill too")
    ap.add_argument("--prefill-fused", action="store_true",
                    help="with --prefill: again (after --prefill-pointwise's) with the projections fused")
    ap.add_argument("--buckets", default="",
                    help='comma list of "kxn" (k prompts of n tokens): prefill steps from power-of-two buckets, then '
                         "from the buckets as served")
    ap.add_argument("--variants", default="",
                    help="comma list: auto|sdpa|cudnn|efficient|math[+pointwise][+fused] (pointwise and fused stay "
                         "on for the variants after the first that asks for them)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cuda = device.type == "cuda"
    ckpt = make_model(args.preset, Path("/tmp/prof-work") / args.preset)
    t = time.perf_counter()
    lengths = [int(n) for n in args.prefill.split(",")] if args.prefill else []
    max_seq_len = max([args.max_seq_len] + [n + 1 for n in lengths])  # room for the longest prompt asked for
    served = bool(args.buckets)  # the engine as served (pointwise compiled in prefill, projections fused)
    _, engine, _ = build_engine(ckpt, device, dtype, args.max_slots, max_seq_len,
                                compile_pointwise=not args.variants and not args.eager_pointwise,
                                prefill_pointwise=served, fuse_projections=served)
    print(f"engine built (graphs: {0 if engine._graphs is None else len(engine._graphs.graphs)}) "
          f"in {time.perf_counter() - t:.1f} s; attention {engine.backbone.config._attn_implementation}", flush=True)
    if lengths:
        prefill_sweep(engine, lengths, args.out, "as served")
        if args.prefill_pointwise and cuda:
            from vlm_triton.engine.pointwise import compile_pointwise

            prefill_change_sweep(engine, lengths, args.out, "compiled pointwise in prefill",
                                 lambda e: compile_pointwise(e.backbone, e.device, prefill=True))
        if args.prefill_fused:
            from vlm_triton.engine.fused_linear import fuse_projections

            prefill_change_sweep(engine, lengths, args.out, "fused projections",
                                 lambda e: fuse_projections(e.backbone))
        return
    if args.buckets:
        bucket_sweep(engine, args.buckets.split(","), args.out)
        return
    if args.variants:
        variant_sweep(engine, args.variants.split(","), args.out)
        return
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
