"""One benchmark run: same-run baselines (HF transformers, the bare LLMEngine) and the full stack on one GPU.

    python -m benchmarks.run --preset internvl3-1b --out bench-out            # GPU, ~8 minutes
    python -m benchmarks.run --preset tiny --device cpu --smoke --out /tmp/b  # CPU smoke test, seconds

Phases (each in its own process, results merged into OUT/results.json as they finish; a global time budget
stops sweeps early and skips what no longer fits):
  ceilings  device-to-device copy bandwidth, bf16 matmul rate
  vision    the vision encoder on 13 / 4 / 52 tiles vs its FLOP floor
  engine    the bare LLMEngine (CUDA graphs, no Triton), closed loop at each concurrency
  hf        transformers `model.generate`: eager dynamic cache and static cache (torch.compile), batch 1 and 64
  stack     tritonserver + OpenAI frontend, the async load generator (streaming; plus non-streaming for W2)
The stack's server loads while `hf` runs. The table is printed last (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = [1, 4, 16, 64]


def requests_for(c: int, workload: str) -> int:
    """Requests per sweep point: 4 at c=1, else three waves of c, so that the closed loop refills and a steady state
    (arrivals while others decode) follows the first burst; the per-point time cap still bounds it."""
    return 4 if c == 1 else 3 * c


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- phases (child processes) --------------------------------------------------------------------------------------
def _load_state(state: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from benchmarks.workloads import Workload

    meta = json.loads((state / "state.json").read_text())
    arrays = np.load(state / "workloads.npz")
    ws = {}
    for name, w in meta["workloads"].items():
        wl = Workload(name, w["description"], w["messages"], w["max_tokens"])
        wl.input_ids = arrays[f"{name}_ids"]
        wl.pixel_values = arrays[f"{name}_pix"] if f"{name}_pix" in arrays else None
        ws[name] = wl
    return meta, ws


def phase_main(phase: str, state: Path, arg: str) -> None:
    import torch

    from benchmarks import baselines

    meta, ws = _load_state(state)
    device = torch.device(meta["device"])
    dtype = getattr(torch, meta["dtype"])
    ckpt = Path(meta["checkpoint"])
    deadline = float(meta["deadline"])
    smoke = meta["smoke"]
    out_file = state / f"{phase}{arg}.json"

    def save(obj: Any) -> None:
        out_file.write_text(json.dumps(obj, indent=1))

    if phase == "ceilings":
        ceil = baselines.device_ceilings(device)
        save({"ceilings": ceil})
        peak = ceil.get("matmul_flops")
        batches = [1, 4] if smoke else [4, 13, 52]
        vis = baselines.vision_bench(ckpt, device, dtype, batches, peak, repeats=2 if smoke else 10)
        vis["peak_flops_datasheet"] = ceil.get("bf16_dense_peak_flops")
        save({"ceilings": ceil, "vision": vis})
    elif phase == "engine":
        plan = {name: [(c, 2 if smoke else requests_for(c, name)) for c in meta["concurrency"]]
                for name in meta["engine_workloads"]}
        res = baselines.engine_bench(ckpt, ws, plan, device, dtype, meta["max_slots"], meta["max_seq_len"],
                                     meta["time_cap_s"], deadline, log, prefill_tokens=meta["prefill_tokens"])
        save({"engine": res})
    elif phase == "hf":
        rows: list[dict[str, Any]] = []
        modes = [("eager", 1), ("eager", 64), ("static", 1), ("static", 64)] if not smoke else [("eager", 1)]
        w = ws["W2"]
        for mode, batch in modes:
            if time.time() > deadline - (90 if mode == "static" else 20):
                log(f"hf {mode} b{batch}: skipped (deadline)")
                continue
            try:
                row = baselines.hf_bench(ckpt, w, device, dtype, mode, batch)
            except Exception as exc:  # noqa: BLE001
                row = {"mode": mode, "batch": batch, "error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            rows.append(row)
            log(f"hf {mode} b{batch}: {json.dumps(row)}")
            save({"hf": rows})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    else:
        raise SystemExit(f"unknown phase {phase}")


def run_phase(phase: str, state: Path, timeout_s: float, arg: str = "") -> dict[str, Any]:
    log(f"phase {phase}{arg}: start (timeout {timeout_s:.0f} s)")
    t = time.perf_counter()
    if timeout_s < 5:
        return {"skipped": "no time left"}
    cmd = [sys.executable, "-m", "benchmarks.run", "--phase", phase, "--state", str(state), "--phase-arg", arg]
    try:
        proc = subprocess.run(cmd, timeout=timeout_s, cwd=ROOT)
        rc: Any = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    out_file = state / f"{phase}{arg}.json"
    result = json.loads(out_file.read_text()) if out_file.is_file() else {}
    result[f"_{phase}{arg}_rc"] = rc
    log(f"phase {phase}{arg}: rc={rc} in {time.perf_counter() - t:.0f} s")
    return result


# --- orchestration -------------------------------------------------------------------------------------------------
def stack_sweeps(stack: Any, ws: dict[str, Any], meta: dict[str, Any], deadline: float) -> dict[str, Any]:
    from benchmarks.loadgen import run_load
    from benchmarks.observe import Snapshot, summary_line
    from benchmarks.stack import SERVED_NAME
    from benchmarks.workloads import chat_body

    server_pid = stack.server._process.pid
    frontend_pid = stack.frontend.pid if stack.frontend is not None else None

    def observed(*args: Any, **kwargs: Any) -> dict[str, Any]:
        """run_load, plus CPU cores per process and Triton's per-model times over the same interval."""
        before = Snapshot.take(server_pid, frontend_pid, stack.server.grpc_url)
        result = asyncio.run(run_load(*args, **kwargs))
        result["observed"] = before.delta(Snapshot.take(server_pid, frontend_pid, stack.server.grpc_url))
        log("  " + summary_line(result["observed"]))
        return result

    runs: dict[str, list[dict[str, Any]]] = {}
    non_stream: list[dict[str, Any]] = []
    cap = meta["time_cap_s"]
    for name in meta["stack_workloads"]:
        w = ws[name]
        body = chat_body(w, SERVED_NAME, True)
        warm = asyncio.run(run_load(stack.base_url, body, 1, 1, cap, stream=True, request_timeout_s=60))
        log(f"stack {name} warm-up: errors={warm['errors']} {warm['first_errors']}")
        if warm["errors"]:
            runs[name] = [{"error": warm["first_errors"]}]
            continue
        for c in meta["concurrency"]:
            if time.time() > deadline - 5:
                log(f"stack {name} c={c}: skipped (deadline)")
                continue
            n = 2 if meta["smoke"] else requests_for(c, name)
            r = observed(stack.base_url, body, c, n, min(cap, deadline - time.time()), stream=True,
                         request_timeout_s=90, procs=meta.get("client_procs"))
            runs.setdefault(name, []).append(r)
            log(f"stack {name} c={c} ({r['client_procs']} client procs): {r['output_tok_s']:.0f} tok/s, TTFT p50 {r['ttft_ms']['p50']}, TPOT p50 "
                f"{r['tpot_ms']['p50']}, errors {r['errors']} {r['first_errors']}, {r['requests']} req, "
                f"{r['wall_s']:.1f} s, chunks/token {r.get('chunks_per_token'):.2f}")
    for c in meta["non_stream_concurrency"]:
        if time.time() > deadline - 5:
            continue
        n = 2 if meta["smoke"] else requests_for(c, "W2")
        body = chat_body(ws["W2"], SERVED_NAME, False)
        r = observed(stack.base_url, body, c, n, min(cap, deadline - time.time()), stream=False,
                     request_timeout_s=90, procs=meta.get("client_procs"))
        non_stream.append(r)
        log(f"stack W2 non-streaming c={c}: {r['output_tok_s']:.0f} tok/s, errors {r['errors']}")
    return {"runs": runs, "non_stream_W2": non_stream, "perf_analyzer_W2": perf_analyzer_view(stack, ws, meta, deadline)}


def perf_analyzer_view(stack: Any, ws: dict[str, Any], meta: dict[str, Any], deadline: float) -> list[dict[str, Any]]:
    """perf_analyzer straight into the BLS (W2), when the binary is here (the GPU bundle leaves it out: 40 MB)."""
    from benchmarks import perf_bls

    if perf_bls.find_perf_analyzer() is None:
        log("perf_analyzer: not installed here, skipped")
        return []
    rows = []
    for c in meta["concurrency"]:
        if time.time() > deadline - 20:
            log(f"perf_analyzer c={c}: skipped (deadline)")
            continue
        requests = 2 if meta["smoke"] else max(8, c)
        try:
            rows += perf_bls.run(stack.server.grpc_url, ws["W2"].messages, ws["W2"].max_tokens, [c], requests,
                                 timeout_s=max(10.0, deadline - time.time()))
        except Exception as exc:  # noqa: BLE001 - one view failing must not lose the run
            rows.append({"concurrency": c, "error": f"{type(exc).__name__}: {exc}"})
        log(f"perf_analyzer W2 c={c}: {rows[-1]}")
    return rows


def deployment_of(args: argparse.Namespace, ckpt: Path, media: Path) -> Any:
    """The stack's deployment config (with --set), also the source of the bare engine's settings."""
    from benchmarks.stack import deployment

    cfg = deployment(ckpt, media, max_slots=args.max_slots, max_seq_len=args.max_seq_len,
                     device=args.device, instances=2 if args.smoke else 4)
    return cfg.replace(**overrides(args.set))


def overrides(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """['triton.bls_instances=2', ...] -> {'triton': {'bls_instances': 2}} (values parsed as JSON, else strings)."""
    sections: dict[str, dict[str, Any]] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and section and name):
            raise SystemExit(f"--set takes SECTION.KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        sections.setdefault(section, {})[name] = value
    return sections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="internvl3-1b")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--work", type=Path, default=None, help="checkpoint/media/state folder (default OUT/work)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=540.0, help="the whole run's wall-clock budget")
    ap.add_argument("--phases", default="ceilings,engine,hf,stack")
    ap.add_argument("--smoke", action="store_true", help="tiny counts and lengths (CPU smoke test)")
    ap.add_argument("--max-slots", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--time-cap-s", type=float, default=25.0, help="per sweep point")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override the stack's deployment config (repeatable), e.g. triton.bls_instances=2")
    ap.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    ap.add_argument("--stack-workloads", default="W2,W1,W3")
    ap.add_argument("--client-procs", default="auto",
                    help="load generator processes per stack point (auto: one per 4 streams, at most 8; item 33)")
    ap.add_argument("--no-pools", action="store_true", help="stack without the CUDA / pinned memory-pool flags")
    ap.add_argument("--no-fallback", action="store_true", help="no second stack (graphs and pools off) on a failure")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--phase-arg", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        phase_main(args.phase, args.state, args.phase_arg)
        return

    t_start = time.time()
    deadline = t_start + args.budget_s
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or out / "work").resolve()
    state = work / "state"
    state.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    results: dict[str, Any] = {"preset": args.preset, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "budget_s": args.budget_s, "host": os.uname().nodename}

    def dump() -> None:
        results["elapsed_s"] = time.time() - t_start
        (out / "results.json").write_text(json.dumps(results, indent=1))

    from benchmarks.models import PRESETS, make_model, weight_bytes
    from benchmarks.workloads import make_workloads, prepare_workloads

    t = time.perf_counter()
    ckpt = make_model(args.preset, work / f"ckpt-{args.preset}")
    results["checkpoint_s"] = time.perf_counter() - t
    results["shape"] = PRESETS[args.preset]
    results["weight_bytes"] = weight_bytes(ckpt)
    log(f"checkpoint {ckpt} in {results['checkpoint_s']:.0f} s: {results['weight_bytes']}")
    media = work / "media"
    out_tokens = {"W1": 4, "W2": 4, "W3": 4} if args.smoke else None
    ws = make_workloads(media, out_tokens)
    prepare_workloads(ckpt, ws, media, w2_prompt_tokens=32 if args.smoke else 512)
    results["workloads"] = {n: w.summary() for n, w in ws.items()}
    log(f"workloads: {results['workloads']}")
    arrays = {f"{n}_ids": w.input_ids for n, w in ws.items()}
    arrays.update({f"{n}_pix": w.pixel_values for n, w in ws.items() if w.pixel_values is not None})
    np.savez(state / "workloads.npz", **arrays)
    conc = [1, 2] if args.smoke else [int(c) for c in args.concurrency.split(",")]
    meta = {
        "checkpoint": str(ckpt), "device": args.device, "dtype": "bfloat16" if args.device != "cpu" else "float32",
        "deadline": deadline, "smoke": args.smoke, "concurrency": conc, "max_slots": args.max_slots,
        "max_seq_len": args.max_seq_len, "time_cap_s": args.time_cap_s,
        "client_procs": None if args.client_procs == "auto" else int(args.client_procs),
        "prefill_tokens": deployment_of(args, ckpt, media).max_step_tokens,  # the bare engine's = the stack's
        "engine_workloads": ["W2", "W1", "W3"], "stack_workloads": args.stack_workloads.split(","),
        "non_stream_concurrency": [1, 2] if args.smoke else [c for c in (16, 64) if c in conc],
        "workloads": {n: {"description": w.description, "messages": w.messages, "max_tokens": w.max_tokens}
                      for n, w in ws.items()},
    }
    results["config"] = {k: v for k, v in meta.items() if k != "workloads"}
    (state / "state.json").write_text(json.dumps(meta))
    dump()

    def remaining(reserve: float = 0.0) -> float:
        return deadline - time.time() - reserve

    stack_reserve = 150.0 if "stack" in phases and not args.smoke else 0.0
    stack = None
    gpu = args.device.startswith("cuda")
    if "stack" in phases:
        from benchmarks.stack import Stack

        cfg = deployment_of(args, ckpt, media)
        results["stack_overrides"] = args.set
        t_stack = time.perf_counter()
        stack = Stack.start(cfg, work / "stack-a", gpu, pools=not args.no_pools, verbose=True,
                            log_dir=out / "stack-a")
        log("tritonserver starting (loads while the next phases run)")
    try:
        if "ceilings" in phases:
            results.update(run_phase("ceilings", state, min(90, remaining(stack_reserve))))
            dump()
        if "engine" in phases:
            results.update(run_phase("engine", state, min(150, remaining(stack_reserve))))
            dump()
        if "hf" in phases:
            results.update(run_phase("hf", state, min(240, remaining(110.0 if stack else 0.0))))
            dump()
        if stack is not None:
            results["stack_attempts"] = []
            for attempt in ("a", "b"):
                if attempt == "b":
                    if remaining() < 120 or args.no_fallback:
                        break
                    # a fresh stack, same settings: the item 7 stall is intermittent and came with and without
                    # CUDA graphs and the memory pools (docs/benchmarks-data/h100-item7-2b-stalls.txt)
                    log("stack attempt b: a fresh stack with the same settings")
                    t_stack = time.perf_counter()
                    stack = Stack.start(cfg, work / "stack-b", gpu, pools=not args.no_pools, verbose=True,
                                        log_dir=out / "stack-b")
                info: dict[str, Any] = {"attempt": attempt, "cuda_graphs": cfg.engine.cuda_graphs}
                results["stack_attempts"].append(info)
                try:
                    stack.wait(max(30.0, remaining(30.0)))
                    info["ready_s"] = time.perf_counter() - t_stack
                    log(f"stack {attempt} ready after {info['ready_s']:.0f} s: {stack.base_url}")
                    ok = True
                    for name in meta["stack_workloads"]:
                        info[f"bls_{name}"] = stack.bls_check(ws[name].messages, 90.0)
                        log(f"stack {attempt} direct BLS check {name}: {info[f'bls_{name}']}")
                        ok = ok and info[f"bls_{name}"].startswith("ok")
                        if not ok:
                            break
                    if ok:
                        from benchmarks.loadgen import run_load
                        from benchmarks.stack import SERVED_NAME
                        from benchmarks.workloads import chat_body

                        warm = asyncio.run(run_load(stack.base_url, chat_body(ws["W2"], SERVED_NAME, True), 1, 1,
                                                    60, stream=True, request_timeout_s=60))
                        info["frontend_check"] = warm["first_errors"] or "ok"
                        log(f"stack {attempt} frontend check: {info['frontend_check']}")
                        ok = not warm["errors"]
                    if not ok:
                        (out / f"stack-{attempt}" / "stacks.txt").write_text(stack.dump_stacks())
                        log(f"stack {attempt}: checks failed; thread dumps in stack-{attempt}/stacks.txt")
                        continue
                    stack.set_verbose(0)
                    results["stack_ready_s"] = info["ready_s"]
                    results["stack"] = stack_sweeps(stack, ws, meta, deadline)
                    results["stack"]["attempt"] = attempt
                    results["stack"]["cuda_graphs"] = cfg.engine.cuda_graphs
                    results["stack"]["metrics_tail"] = [
                        line for line in stack.metrics().splitlines()
                        if line.startswith(("nv_inference_count", "nv_inference_exec", "nv_inference_request_d",
                                            "nv_inference_queue", "nv_inference_compute", "vlm_"))][:60]
                    break
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    info["error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    dump()
                    stack.stop()
                    results.setdefault("stack_logs", {})[attempt] = stack.logs(40)
                    dump()
    finally:
        if stack is not None:
            stack.stop()
        dump()
    from benchmarks.report import table

    print(table(results), flush=True)


if __name__ == "__main__":
    main()
