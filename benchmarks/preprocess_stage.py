"""W1's preprocess inside Triton against the same work in this process: where the preprocess stage's time goes
beyond `family.prepare` (docs/benchmarks.md, "Where the time goes now"). One fresh stack per thread count (tiny
model: the preprocess work does not depend on the model's size, and W1's tiles are 448 px in every preset).

    python -m benchmarks.preprocess_stage [--threads 1,2] [--reps 12] [--device cpu|cuda]

Per thread count: `prepare` in this process (median ms), the client's wall time of a direct gRPC call to the
`preprocess` model, and Triton's own split of it (queue, compute input / infer / output, averages over the calls
after the first two). Then, per call, what the kernel counted for the process doing the work (this process around
its `prepare` calls; the preprocess stub, from /proc, around the gRPC calls): CPU ms (user + system), minor page
faults and involuntary context switches. More faults or system time in the stub point at memory being handed back
to the OS and faulted in again; more involuntary switches at CPU contention; neither at slower execution.

`--first-calls N` instead times each of a fresh stub's first N W1 calls (gRPC wall ms), with the stage's start-up
warm-up (`triton.stage_warm_up`, multimodal/warmup.py) on and off, one fresh stack per setting and round:

    python -m benchmarks.preprocess_stage --first-calls 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any


def proc_counters(pid: int | None = None) -> dict[str, float]:
    """CPU ms (user, system), minor faults and involuntary context switches of a process so far (all threads)."""
    if pid is None:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return {"user": r.ru_utime * 1e3, "sys": r.ru_stime * 1e3, "minflt": r.ru_minflt, "nivcsw": r.ru_nivcsw}
    import os

    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) is fields[0]
    tick = 1e3 / os.sysconf("SC_CLK_TCK")
    nivcsw = sum(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                 if line.startswith("nonvoluntary_ctxt_switches"))
    return {"user": int(fields[11]) * tick, "sys": int(fields[12]) * tick, "minflt": int(fields[7]),
            "nivcsw": nivcsw}


def per_call(fn: Any, reps: int, pid: int | None = None) -> dict[str, float]:
    """`fn` run `reps` times; the counters' growth per call."""
    before = proc_counters(pid)
    for _ in range(reps):
        fn()
    after = proc_counters(pid)
    return {k: (after[k] - before[k]) / reps for k in after}


def triton_totals(client: Any) -> dict[str, float]:
    """Triton's cumulative time (ms) per phase of the `preprocess` model and its request count."""
    stats = client.get_inference_statistics("preprocess", as_json=True)["model_stats"][0]["inference_stats"]
    phases = {k: int(stats[k]["ns"]) / 1e6 for k in ("queue", "compute_input", "compute_infer", "compute_output")}
    return {**phases, "count": int(stats["success"]["count"])}


def preprocess_call(stack: Any, messages: str) -> tuple[Any, Any]:
    """(a gRPC client of the stack, a no-argument call of its `preprocess` model with `messages`)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(stack.server.grpc_url)
    text = grpcclient.InferInput("messages", [1], "BYTES")
    text.set_data_from_numpy(np.array([messages.encode()], dtype=np.object_))
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("input_ids", "pixel_values")]
    return client, partial(client.infer, "preprocess", [text], outputs=outputs)


def first_calls(args: argparse.Namespace) -> None:
    """Per fresh stack (warm-up on / off, `args.rounds` times): the wall ms of each of its first calls."""
    import time

    from benchmarks.preprocess_micro import make_family
    from benchmarks.stack import Stack, deployment
    from benchmarks.workloads import make_workloads

    make_family(args.work)  # the tiny checkpoint in WORK/ckpt
    media = args.work / "media"
    messages = json.dumps(make_workloads(media, None)["W1"].messages)
    print(f"| stage_warm_up | round | {' | '.join(f'call {k + 1} ms' for k in range(args.first_calls))} |")
    print(f"|---|---|{'---|' * args.first_calls}")
    for r in range(args.rounds):
        for warm in (True, False):
            cfg = deployment(args.work / "ckpt", media, max_slots=4, max_seq_len=4096, device=args.device,
                             instances=1).replace(triton={"stage_warm_up": warm})
            stack = Stack.start(cfg, args.work / f"first-{warm}-{r}", args.device.startswith("cuda"))
            try:
                stack.server.wait_ready(300)
                _, call = preprocess_call(stack, messages)
                times = []
                for _ in range(args.first_calls):
                    t = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - t) * 1e3)
            finally:
                stack.stop()
            print(f"| {str(warm).lower()} | {r + 1} | {' | '.join(f'{t:.1f}' for t in times)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/preprocess-stage"))
    ap.add_argument("--first-calls", type=int, default=0, help="time a fresh stub's first N calls, warm-up on/off")
    ap.add_argument("--rounds", type=int, default=1, help="with --first-calls: fresh stacks per setting")
    args = ap.parse_args()
    if args.first_calls:
        first_calls(args)
        return

    from benchmarks.preprocess_micro import make_family, median_ms
    from benchmarks.stack import Stack, deployment
    from benchmarks.workloads import make_workloads
    from vlm_triton.families.base import PreprocessLimits
    from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
    from vlm_triton.prompt.messages import parse_messages

    family = make_family(args.work)  # the tiny checkpoint in WORK/ckpt
    media = args.work / "media"
    messages = json.dumps(make_workloads(media, None)["W1"].messages)
    fetcher = MediaFetcher(MediaPolicy(allowed_local_dirs=(media.resolve(),)))
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        limits = PreprocessLimits(image_threads=threads)
        prepare = partial(family.prepare, parse_messages(messages), fetcher, limits)
        local = median_ms(prepare, args.reps)
        local_counts = per_call(prepare, args.reps)
        cfg = deployment(args.work / "ckpt", media, max_slots=4, max_seq_len=4096, device=args.device, instances=1).replace(
            preprocess={"image_threads": threads})
        stack = Stack.start(cfg, args.work / f"stack-{threads}", args.device.startswith("cuda"))
        try:
            stack.server.wait_ready(300)
            client, call = preprocess_call(stack, messages)
            for _ in range(2):  # warm-up: the stub's first request pays imports and the thread pool
                call()
            before = triton_totals(client)
            wall = median_ms(call, args.reps, warmup=0)
            after = triton_totals(client)
            stub = stack.stub_pids("preprocess")
            stub_counts = per_call(call, args.reps,
                                   stub[0]) if len(stub) == 1 else {}
        finally:
            stack.stop()
        calls = after["count"] - before["count"]
        rows.append({"threads": threads, "prepare_ms": local, "wall_ms": wall,
                     **{f"{k}_ms": (after[k] - before[k]) / calls for k in after if k != "count"},
                     "process": local_counts, "stub": stub_counts})
        print(json.dumps(rows[-1]), flush=True)
    print("| threads | prepare (this process) | gRPC wall | queue | compute input | compute infer | compute output |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['prepare_ms']:.1f} | {r['wall_ms']:.1f} | {r['queue_ms']:.2f} | "
              f"{r['compute_input_ms']:.2f} | {r['compute_infer_ms']:.1f} | {r['compute_output_ms']:.1f} |")
    print("\nper call, as the kernel counts the process that does the work")
    print("| threads | where | CPU user ms | CPU sys ms | minor faults | involuntary switches |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for where in ("process", "stub"):
            c = r[where]
            if c:
                print(f"| {r['threads']} | {where} | {c['user']:.1f} | {c['sys']:.1f} | {c['minflt']:,.0f} | "
                      f"{c['nivcsw']:.1f} |")


if __name__ == "__main__":
    main()
