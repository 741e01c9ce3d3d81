"""The KV pool (engine/kv_pool.py) on the bare engine: its speed against the slot cache it replaced, and the
concurrency it buys at a fixed KV memory budget.

    python3 -m benchmarks.kv_pool_bench --preset internvl3-1b --out OUT --label pool [--capacity]
    PYTHONPATH=OLD/src:. python3 -m benchmarks.kv_pool_bench ... --label slots   # an engine before the pool

`same` rows: the engine as the benchmark runs it (64 slots x 4096 tokens, prefill steps of 4095 tokens, CUDA graphs),
W2 at c = 1, 16, 64 and W1 at c = 1, 16; run once with the code under test and once with an older checkout on the
path, in one device call, for a same-run A/B. `--capacity`: a long context (`--long-seq`, default 32768) under a
KV budget (`--budget-gib`, default 3): "slots" = as many requests as the budget holds at the full context
(max_slots = budget // long_seq, every one reserving long_seq), "pool" = 64 slots sharing the same budget
(each W2 request reserves its 767 rows); W2 at c = 64. `--page N`: the engine's KV pool in pages of N tokens
(`engine.kv_page_tokens`), for the "same" rows and the capacity section's "pool" row; each engine's captured decode
step is also timed at batch 1 / 16 / 64 and KV buckets 512 / 4096 (`replay_ms`). Appends rows to OUT/kv_pool.json
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def kv_bytes_per_token(ckpt: Path) -> int:
    cfg = json.loads((ckpt / "config.json").read_text())
    llm = cfg.get("llm_config", cfg)
    heads = int(llm["num_attention_heads"])
    kv_heads = int(llm.get("num_key_value_heads") or heads)
    head_dim = int(llm.get("head_dim") or int(llm["hidden_size"]) // heads)
    return 2 * int(llm["num_hidden_layers"]) * kv_heads * head_dim * 2  # K and V, bf16


def sweep(label: str, section: str, ckpt: Path, ws: dict[str, Any], points: list[tuple[str, int]], cap_s: float,
          max_slots: int, max_seq_len: int, kv_cache_tokens: int = 0, page: int = 0) -> list[dict[str, Any]]:
    from benchmarks import baselines
    from benchmarks.run import requests_for

    device, dtype = torch.device("cuda"), torch.bfloat16
    t = time.perf_counter()
    _, engine, encoder = baselines.build_engine(ckpt, device, dtype, max_slots, max_seq_len, prefill_tokens=4095,
                                                kv_cache_tokens=kv_cache_tokens, kv_page_tokens=page)
    build_s = time.perf_counter() - t
    kv_gib = engine.cache.nbytes() / 2**30
    replay = {}
    graphs = getattr(engine, "_graphs", None)
    for b, k in [(1, 512), (1, 4096), (16, 4096), (64, 512), (64, 4096)]:
        if graphs is not None and (b, k) in graphs.graphs:
            replay[f"b{b}_kv{k}"] = round(graphs.time_replay(b, k), 3)
    log(f"{label}/{section}: {max_slots} slots x {max_seq_len}, pool {kv_cache_tokens or 'default'}, page {page}, "
        f"KV {kv_gib:.2f} GiB, built in {build_s:.0f} s; decode replay ms {replay}")
    def kv_waits() -> int:  # (engines before the pool have no admission)
        return int(getattr(getattr(engine, "admission", None), "kv_waits", 0))

    def probe() -> Any:
        before = kv_waits()
        return lambda: {"label": label, "section": section, "max_slots": max_slots, "max_seq_len": max_seq_len,
                        "kv_cache_tokens": kv_cache_tokens, "kv_gib": kv_gib, "kv_waits": kv_waits() - before,
                        "page": page, "replay_ms": replay}

    plan = [(name, c, requests_for(c, name)) for name, c in points]
    rows = baselines.sweep_engine(engine, encoder, ws, plan, cap_s, device, dtype, label=f"{label}/{section}",
                                  probe=probe, log=log)
    del engine, encoder
    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| section | engine | page | workload | c | slots x max_seq_len | KV GiB | peak running | out tok/s | "
           "TTFT p50 ms | TPOT p50 ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['section']} | {r['label']} | {r.get('page', 0)} | {r['workload']} | {r['concurrency']} | "
                   f"{r['max_slots']} x {r['max_seq_len']} | {r['kv_gib']:.2f} | {r['peak_running']} | "
                   f"{r['output_tok_s']:,.0f} | {r['ttft_ms']['p50']:.1f} | {r['tpot_ms']['p50']:.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="internvl3-1b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vlm-kv-pool"))
    ap.add_argument("--label", required=True)
    ap.add_argument("--same", default="W2=1,16,64;W1=1,16")
    ap.add_argument("--capacity", action="store_true")
    ap.add_argument("--long-seq", type=int, default=32768)
    ap.add_argument("--budget-gib", type=float, default=3.0)
    ap.add_argument("--time-cap-s", type=float, default=20.0)
    ap.add_argument("--page", type=int, default=0, help="engine.kv_page_tokens (0: contiguous runs)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from benchmarks.models import make_model
    from benchmarks.workloads import make_workloads, prepare_workloads

    ckpt = make_model(args.preset, args.work / f"ckpt-{args.preset}")
    media = args.work / "media"
    ws = make_workloads(media, None)
    prepare_workloads(ckpt, ws, media, w2_prompt_tokens=512)
    rows: list[dict[str, Any]] = []
    same = [(w, int(c)) for part in args.same.split(";") if part for w, _, cs in [part.partition("=")]
            for c in cs.split(",")]
    if same:
        rows += sweep(args.label, "same", ckpt, ws, same, args.time_cap_s, 64, 4096, page=args.page)
    if args.capacity:
        budget = int(args.budget_gib * 2**30) // kv_bytes_per_token(ckpt)
        full = budget // args.long_seq
        log(f"capacity: budget {args.budget_gib} GiB = {budget} tokens = {full} requests of {args.long_seq}")
        rows += sweep("slots", "capacity", ckpt, ws, [("W2", 64)], args.time_cap_s, full, args.long_seq)
        rows += sweep(args.label, "capacity", ckpt, ws, [("W2", 64)], args.time_cap_s, 64, args.long_seq,
                      kv_cache_tokens=budget, page=args.page)
    path = args.out / "kv_pool.json"
    previous = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps(previous + rows, indent=1))
    print(table(previous + rows), flush=True)


if __name__ == "__main__":
    main()
