"""Fresh stacks one after another, each given the direct BLS checks (W2, then W1, then W3), to measure how often a
stack stalls and to catch every stall's threads, Python and native (docs/benchmarks.md, item 7).

    python3 -m benchmarks.stall_hunt --preset internvl3-2b --out OUT --budget-s 520 \\
        [--variant base] [--variant gate:triton.bls_gpu_exchange_alone=true] ...

Variants (NAME or NAME:SETTING[,SETTING...]) take turns; a SETTING is SECTION.KEY=VALUE (deployment config) or a
tritonserver flag starting with -- (e.g. --cuda-memory-pool-byte-size=0:0). Writes OUT/hunt.json (one row per stack)
and OUT/stalls.txt (the thread dumps of each stalled stack, with py-spy --native where installed).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition(":")
    return name, [s for s in sets.split(",") if s]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="internvl3-2b")
    ap.add_argument("--out", type=Path, default=Path("hunt-out"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/hunt-work"))
    ap.add_argument("--budget-s", type=float, default=520.0)
    ap.add_argument("--check-timeout-s", type=float, default=25.0)
    ap.add_argument("--workloads", default="W2,W1,W3")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--burst", type=int, default=0, help="then N concurrent requests of each workload")
    ap.add_argument("--burst-tokens", type=int, default=4, help="max_tokens of each burst request")
    ap.add_argument("--bursts", type=int, default=1, help="bursts per workload and stack")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)

    from benchmarks.models import make_model
    from benchmarks.run import overrides
    from benchmarks.stack import Stack, deployment
    from benchmarks.workloads import make_workloads, prepare_workloads

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    ckpt = make_model(args.preset, args.work / f"ckpt-{args.preset}")
    media = args.work / "media"
    ws = make_workloads(media, None)
    prepare_workloads(ckpt, ws, media, w2_prompt_tokens=512)
    variants = [parse_variant(v) for v in args.variant or ["base"]]
    rows: list[dict[str, Any]] = []
    stalls = args.out / "stalls.txt"
    stalls.write_text("")

    def record(stack: Stack, title: str) -> None:
        with stalls.open("a") as f:
            f.write(f"\n\n######## {title}\n")
            f.write(stack.dump_stacks())
            f.write(f"\n===== tritonserver.log tail\n{stack.logs(150)['tritonserver']}\n")
            log_text = stack.logs(10**7)["tritonserver"].splitlines()
            for i, line in enumerate(log_text):  # a stub that crashed: faulthandler wrote its threads to the log
                if "Fatal Python error" in line:
                    f.write("\n===== crash in tritonserver.log\n" + "\n".join(log_text[max(0, i - 5):i + 150]) + "\n")

    def stalled(row: dict[str, Any]) -> bool:
        checks = [str(v) for k, v in row.items() if k in ws]  # "W1": "ok: ..." or what went wrong
        bursts = [str(v) for k, v in row.items() if k.startswith("W") and k not in ws]  # "W1x16": "15 ok, 1 not: .."
        return any(not c.startswith("ok") for c in checks) or any(" not: " in b for b in bursts)

    n = 0
    while time.time() < deadline - 100:
        name, sets = variants[n % len(variants)]
        server_args = tuple(s for s in sets if s.startswith("--"))
        cfg = deployment(ckpt, media, max_slots=64, max_seq_len=4096, device=args.device).replace(
            **overrides([s for s in sets if not s.startswith("--")]))
        row: dict[str, Any] = {"stack": n, "variant": name, "set": sets}
        t0 = time.perf_counter()
        stack = Stack.start(cfg, args.work / f"stack-{n}", args.device.startswith("cuda"), server_args=server_args)
        try:
            stack.server.wait_ready(max(30.0, deadline - time.time() - 30))
            row["ready_s"] = round(time.perf_counter() - t0, 1)
            for w in args.workloads.split(","):
                row[w] = stack.bls_check(ws[w].messages, args.check_timeout_s)
                log(f"stack {n} ({name}) {w}: {row[w]}")
                if not row[w].startswith("ok"):
                    record(stack, f"stack {n} variant {name} {sets}: {w}: {row[w]}")
                    break
            bursts = [w for w in args.workloads.split(",") for _ in range(args.bursts)]
            for w in bursts if args.burst and not stalled(row) else ():
                with ThreadPoolExecutor(args.burst) as pool:
                    futures = [pool.submit(stack.bls_check, ws[w].messages, args.check_timeout_s, args.burst_tokens)
                               for _ in range(args.burst)]
                    results = [f.result() for f in futures]
                bad = [r for r in results if not r.startswith("ok")]
                row[f"{w}x{args.burst}"] = f"{len(results) - len(bad)} ok" + (f", {len(bad)} not: {bad[0]}" if bad else "")
                log(f"stack {n} ({name}) {w} x{args.burst}: {row[f'{w}x{args.burst}']}")
                if bad:
                    record(stack, f"stack {n} variant {name} {sets}: {w} x{args.burst}: {bad[0]}")
                    break
        except Exception as exc:  # noqa: BLE001 - a stack that fails to start is a row too
            row["error"] = f"{type(exc).__name__}: {exc}"
            log(f"stack {n} ({name}): {row['error']}")
        finally:
            stack.stop()
        row["stalled"] = stalled(row)
        rows.append(row)
        (args.out / "hunt.json").write_text(json.dumps(rows, indent=1))
        n += 1
    for name, _ in variants:
        mine = [r for r in rows if r["variant"] == name and "error" not in r]
        log(f"variant {name}: {sum(r['stalled'] for r in mine)} of {len(mine)} stacks stalled")


if __name__ == "__main__":
    main()
