"""Stack variants side by side: fresh stacks one after another, each swept over the same load points, with the bare
engine first as the reference. Tells which setting moves the stack's overhead over the engine, and where the time
goes in each (cores per process, Triton's per-model times, the llm stub's engine-loop timing).

    python3 -m benchmarks.stack_variants --preset internvl3-1b --out OUT --budget-s 540 --engine \\
        --variant base --variant send4:triton.llm_send_threads=4 --variant si:VLM_TRITON_SWITCH_INTERVAL=0.0005

A variant is NAME or NAME:SETTING[,SETTING...]; a SETTING is SECTION.KEY=VALUE (deployment config), a tritonserver
flag starting with -- , or NAME=VALUE with an upper-case NAME (an environment variable of tritonserver and its
stubs), or frontend.FLAG=VALUE (a flag of `python -m openai_frontend`, e.g. frontend.loop=asyncio; frontend.FLAG
alone for a switch, e.g. frontend.no_freeze_heap). `--rounds 2` runs the variant list twice (A B A B), so that
drift between stacks shows. Writes
OUT/variants.json and prints a table last. `--timeline` marks every request's first-token path in the frontend, bls
and llm (VLM_TRITON_TIMELINE_DIR) and prints its hops after each point (benchmarks/timeline.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

STEP_STATS_S = 2.0  # the llm stub logs its loop timing this often (VLM_TRITON_STEP_STATS)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def split_settings(sets: list[str]) -> tuple[list[str], tuple[str, ...], dict[str, str], tuple[str, ...]]:
    """-> (config assignments, tritonserver flags, environment, frontend flags)."""
    config, flags, env, frontend = [], [], {}, []
    for s in sets:
        key, eq, value = s.partition("=")
        if s.startswith("--"):
            flags.append(s)
        elif key.startswith("frontend."):  # frontend.FLAG=VALUE, or frontend.FLAG alone (a switch)
            frontend += [f"--{key.removeprefix('frontend.').replace('_', '-')}", *([value] if eq else [])]
        elif "." not in key and key.isupper():
            env[key] = value
        else:
            config.append(s)
    return config, tuple(flags), env, tuple(frontend)


def engine_reference(ckpt: Path, ws: dict[str, Any], points: dict[str, list[int]], cap_s: float,
                     prefill_tokens: int, prefill_graphs: bool = True, run_ahead: bool = True) -> list[dict[str, Any]]:
    """The bare engine over the same points, with its loop timing per point."""
    import torch

    from benchmarks import baselines
    from benchmarks.run import requests_for
    from vlm_triton.gc_heap import freeze_heap

    device, dtype = torch.device("cuda"), torch.bfloat16
    _, engine, encoder = baselines.build_engine(ckpt, device, dtype, 64, 4096, prefill_tokens=prefill_tokens,
                                                prefill_graphs=prefill_graphs, run_ahead=run_ahead)
    freeze_heap()  # as the stack's processes do (item 37)
    variant = "engine" + ("" if prefill_graphs else "-eager-prefill") + ("" if run_ahead else "-stepwise")

    def probe() -> Any:  # the engine loop's timing over each point
        engine.timing.take()
        return lambda: {"variant": variant, "timing": engine.timing.take()}

    plan = [(name, c, requests_for(c, name)) for name, cs in points.items() for c in cs]
    rows = baselines.sweep_engine(engine, encoder, ws, plan, cap_s, device, dtype, label=variant, probe=probe, log=log)
    for r in rows:
        log(f"{variant} {r['workload']} c={r['concurrency']}: {timing_line(r['timing'])}")
    del engine, encoder
    torch.cuda.empty_cache()
    return rows


def first_token_path(directory: Path, start_ns: int, end_ns: int) -> dict[str, Any]:
    """The hops of the requests the frontend received in [start_ns, end_ns] (benchmarks.timeline)."""
    from benchmarks import timeline

    time.sleep(0.5)  # the last requests' marks are written by then
    return timeline.table(timeline.join(timeline.read_marks(directory)), start_ns, end_ns)


def format_timeline(result: dict[str, Any] | None) -> list[str]:
    from benchmarks import timeline

    return timeline.format_table(result) if result else []


def timing_line(parts: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{k} {v['count']}x {v['mean_ms']:.3f}/{v['max_ms']:.1f}" for k, v in sorted(parts.items()))


def llm_timing_lines(log_file: Path, offset: int) -> tuple[list[str], int]:
    """The timing lines ('[llm timing]', '[vision_encoder timing]', '[frontend timing]', ...) written to `log_file`
    since `offset`, and the new offset."""
    try:
        with log_file.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    lines = [ln for ln in data.decode(errors="replace").splitlines() if " timing] " in ln]
    return lines, offset + len(data)


_FRAME = re.compile(r"^(.*) \((?:.*/)?([^/:]+)(?::\d+)?\)$")  # "func (path/file.py:12)" -> "func (file.py)"


def summarize_profile(path: Path, top: int = 30) -> list[str]:
    """py-spy's raw output (one `frame;frame;... count` line per stack, root first): the functions with the most
    samples anywhere on the stack (inclusive) and at the top of it (self), as % of all samples."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_FRAME.sub(r"\1 (\2)", f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n
    if not total:
        return [f"{path.name}: no samples"]
    out = [f"{path.name}: {total} samples; inclusive % | self % | function (file)"]
    for f, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * n / total:5.1f} | {100 * own.get(f, 0) / total:5.1f} | {f}")
    return out


def start_profiles(stack: Any, models: list[str], out: Path, seconds: float) -> list[tuple[Any, Path]]:
    """py-spy (where installed) on each stub of `models`, sampling only the thread that holds the GIL (--gil):
    where each process's Python time goes while the load runs."""
    tool = shutil.which("py-spy")
    if tool is None:
        log("py-spy not installed: no profiles")
        return []
    running = []
    for model in models:
        for pid in stack.stub_pids(model):
            path = out / f"{model}-{pid}.txt"
            cmd = [tool, "record", "--pid", str(pid), "--rate", "200", "--duration", str(max(1, int(seconds))),
                   "--format", "raw", "--gil", "--nonblocking", "--output", str(path)]
            running.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT), path))
    return running


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="internvl3-1b")
    ap.add_argument("--out", type=Path, default=Path("variants-out"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/variants-work"))
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--points", action="append", default=[], metavar="W=C[,C...]",
                    help="a workload and its concurrencies (repeatable; default W2=16,64)")
    ap.add_argument("--time-cap-s", type=float, default=20.0, help="per load point")
    ap.add_argument("--engine", action="store_true", help="the bare engine over the same points first")
    ap.add_argument("--engine-eager-prefill", action="store_true",
                    help="with --engine: the bare engine once more without prefill CUDA graphs")
    ap.add_argument("--engine-stepwise", action="store_true",
                    help="with --engine: the bare engine again without engine.run_ahead, then with it (A B A)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="append", default=[], metavar="MODEL",
                    help="py-spy --gil on this model's stubs during each load point (e.g. llm, bls)")
    ap.add_argument("--profile-s", type=float, default=8.0)
    ap.add_argument("--client-procs", type=lambda v: [None if x == "auto" else int(x) for x in v.split(",")],
                    default=[None], help="load generator processes per point (auto: one per 4 streams, as "
                    "benchmarks.run); a list (1,4) runs each point once per value")
    ap.add_argument("--timeline", action="store_true",
                    help="mark each request's first-token path (VLM_TRITON_TIMELINE_DIR) and print its hops per point")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["VLM_TRITON_STEP_STATS"] = str(STEP_STATS_S)

    from benchmarks.loadgen import run_load
    from benchmarks.models import make_model
    from benchmarks.observe import Snapshot, summary_line
    from benchmarks.run import overrides, requests_for
    from benchmarks.stall_hunt import parse_variant
    from benchmarks.stack import SERVED_NAME, Stack, deployment
    from benchmarks.workloads import chat_body, make_workloads, prepare_workloads

    ckpt = make_model(args.preset, args.work / f"ckpt-{args.preset}")
    media = args.work / "media"
    ws = make_workloads(media, None)
    prepare_workloads(ckpt, ws, media, w2_prompt_tokens=512)
    points: dict[str, list[int]] = {}  # a workload named twice keeps the concurrencies of both, in order
    for w, _, cs in (p.partition("=") for p in args.points or ["W2=16,64"]):
        for c in (int(c) for c in cs.split(",")):
            if c not in points.setdefault(w, []):
                points[w].append(c)
    base_cfg = deployment(ckpt, media, max_slots=64, max_seq_len=4096, device=args.device)
    rows: list[dict[str, Any]] = []

    def save() -> None:
        (args.out / "variants.json").write_text(json.dumps(rows, indent=1))

    if args.engine:
        rows += engine_reference(ckpt, ws, points, args.time_cap_s, base_cfg.max_step_tokens)
        save()
        if args.engine_eager_prefill:
            rows += engine_reference(ckpt, ws, points, args.time_cap_s, base_cfg.max_step_tokens, prefill_graphs=False)
            save()
        if args.engine_stepwise:  # and once more without run-ahead (item 47), then with it again: A B A
            for run_ahead in (False, True):
                rows += engine_reference(ckpt, ws, points, args.time_cap_s, base_cfg.max_step_tokens,
                                         run_ahead=run_ahead)
                save()
    variants = [parse_variant(v) for v in args.variant or ["base"]] * args.rounds
    base_env = dict(os.environ)
    for n, (name, sets) in enumerate(variants):
        if time.time() > deadline - 60:
            log(f"variant {name}: skipped (deadline)")
            continue
        config, flags, env, frontend_flags = split_settings(sets)
        timeline_dir = (args.out / f"timeline-{n}-{name}").resolve()
        if args.timeline:
            env = {"VLM_TRITON_TIMELINE_DIR": str(timeline_dir), **env}
        os.environ.clear()
        os.environ.update({**base_env, **env})
        cfg = base_cfg.replace(**overrides(config))
        work = args.work / f"stack-{n}"
        t0 = time.perf_counter()
        stack = Stack.start(cfg, work, args.device.startswith("cuda"), server_args=flags, frontend_args=frontend_flags)
        try:
            stack.wait(max(30.0, deadline - time.time() - 30))  # tritonserver ready, then the frontend
            log(f"stack {n} ({name} {sets}) ready after {time.perf_counter() - t0:.0f} s")
            server_pid = stack.server._process.pid
            frontend_pid = stack.frontend.pid if stack.frontend is not None else None
            log_file = stack.log_dir / "tritonserver.log"
            frontend_log = stack.log_dir / "frontend.log"
            for wname, concurrency in points.items():
                body = chat_body(ws[wname], SERVED_NAME, True)
                asyncio.run(run_load(stack.base_url, body, 2, 4, args.time_cap_s, stream=True, request_timeout_s=60))
                for c, procs in ((c, p) for c in concurrency for p in args.client_procs):
                    if time.time() > deadline - 15:
                        break
                    time.sleep(STEP_STATS_S + 0.2)  # the next timing line covers this point only
                    _, offset = llm_timing_lines(log_file, 0)
                    _, frontend_offset = llm_timing_lines(frontend_log, 0)
                    before = Snapshot.take(server_pid, frontend_pid, stack.server.grpc_url)
                    prof_dir = args.out / f"profile-{n}-{name}-{wname}-c{c}"
                    if args.profile:
                        prof_dir.mkdir(parents=True, exist_ok=True)
                    profiles = start_profiles(stack, args.profile, prof_dir, args.profile_s)
                    window = time.monotonic_ns()
                    r = asyncio.run(run_load(stack.base_url, body, c, requests_for(c, wname),
                                             min(args.time_cap_s, deadline - time.time()), stream=True,
                                             request_timeout_s=90,
                                             timeline_dir=timeline_dir if args.timeline else None, procs=procs))
                    r["observed"] = before.delta(Snapshot.take(server_pid, frontend_pid, stack.server.grpc_url))
                    for proc, path in profiles:
                        try:
                            proc.wait(timeout=args.profile_s + 30)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                        if path.exists():
                            summary = summarize_profile(path)
                            (path.parent / (path.stem + "-summary.txt")).write_text("\n".join(summary) + "\n")
                            for line in summary[:25]:
                                log("  " + line)
                    time.sleep(STEP_STATS_S + 0.2)
                    r["llm_timing"] = (llm_timing_lines(log_file, offset)[0]
                                       + llm_timing_lines(frontend_log, frontend_offset)[0])
                    if args.timeline:
                        r["timeline"] = first_token_path(timeline_dir, window, time.monotonic_ns())
                    r.update(variant=name, settings=sets, stack=n, workload=wname,
                             client_procs=r.get("client_procs") or procs)
                    rows.append(r)
                    save()
                    log(f"stack {n} ({name}) {wname} c={c} client procs {r['client_procs']}: "
                        f"{r['output_tok_s']:.0f} tok/s, TTFT p50 "
                        f"{r['ttft_ms']['p50']:.1f}, TPOT p50 {r['tpot_ms']['p50']:.2f}, errors {r['errors']}, "
                        f"chunks/token {r.get('chunks_per_token') or 0:.2f}")
                    log("  " + summary_line(r["observed"]))
                    for line in r["llm_timing"]:
                        log("  " + line.strip()[-400:])
                    for line in format_timeline(r.get("timeline")):
                        log("  " + line)
        except Exception as exc:  # noqa: BLE001 - a stack that fails is a row too
            rows.append({"variant": name, "settings": sets, "stack": n, "error": f"{type(exc).__name__}: {exc}"})
            log(f"stack {n} ({name}): {rows[-1]['error']}")
            save()
        finally:
            stack.stop()
    os.environ.clear()
    os.environ.update(base_env)
    print("\n| variant | workload | c | client procs | out tok/s | TTFT p50 ms | TPOT p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | | | | failed: {r['error'][:80]} | | | |")
            continue
        print(f"| {r['variant']} | {r['workload']} | {r['concurrency']} | {r.get('client_procs', 1)} | "
              f"{r['output_tok_s']:,.0f} | "
              f"{r['ttft_ms']['p50']:.1f} | {r['tpot_ms']['p50']:.2f} / {r['tpot_ms']['p99']:.2f} | "
              f"{r.get('errors', 0)} |")


if __name__ == "__main__":
    main()
