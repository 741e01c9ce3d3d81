"""The Triton-level view: perf_analyzer (tritonclient 2.51) streaming requests straight into the decoupled `bls`
model over gRPC, at several concurrencies, with one workload's messages as input data. Prints a table (requests/s,
responses/s, latency percentiles: perf_analyzer 2.51 times a streamed request to its final response, i.e. the whole
request; measured on the H100, W2 c=1 537.8 ms = TTFT 45 ms + 255 x TPOT 1.9 ms) and returns the rows. Needs the `perf_analyzer` binary (tritonclient[all], on
PATH or next to the Python interpreter) and a running stack.

    python -m benchmarks.perf_bls --grpc-url 127.0.0.1:8001 --messages '[{"role":"user","content":"Hi"}]' \\
        --max-tokens 128 --concurrency 1,4,16,64
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def find_tool(name: str) -> str | None:
    """A command installed beside this interpreter (where the GPU bundle puts its tools) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def find_perf_analyzer() -> str | None:
    return find_tool("perf_analyzer")


def _env(tmp: Path) -> dict[str, str]:
    """perf_analyzer 2.51 links libcudart.so.12 even on CPU hosts: point it at the copy nvidia-pytriton bundles
    (as a symlink with the plain soname) when the system has none."""
    env = dict(os.environ)
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return env
    libs = Path(next(iter(spec.submodule_search_locations))).parent / "nvidia_pytriton.libs"
    cudart = sorted(libs.glob("libcudart-*.so.12*"))
    if cudart:
        link = tmp / "libcudart.so.12"
        link.symlink_to(cudart[0])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(tmp), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def input_data(messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """perf_analyzer's --input-data: one request, the BLS inputs with fixed output length (ignore_eos)."""
    return {"data": [{
        "messages": [json.dumps(messages)],
        "stream": [True],
        "max_tokens": [max_tokens],
        "ignore_eos": [True],
        "temperature": [0.0],
    }]}


def run(grpc_url: str, messages: list[dict[str, Any]], max_tokens: int, concurrency: list[int],
        measurement_requests: int = 16, timeout_s: float = 300.0, binary: str | None = None) -> list[dict[str, Any]]:
    binary = binary or find_perf_analyzer()
    if binary is None:
        raise FileNotFoundError("perf_analyzer not found (pip install tritonclient[all]==2.51.0)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = _env(Path(tmp))
        data = Path(tmp) / "input.json"
        data.write_text(json.dumps(input_data(messages, max_tokens)))
        for c in concurrency:
            report = Path(tmp) / f"c{c}.csv"
            cmd = [binary, "-m", "bls", "-i", "grpc", "-u", grpc_url, "--streaming", "--async",
                   "--input-data", str(data), "--concurrency-range", f"{c}:{c}", "--measurement-mode", "count_windows",
                   "--measurement-request-count", str(max(measurement_requests, c)), "--stability-percentage", "999",
                   "--max-trials", "3", "-f", str(report), "--percentile", "50"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
            if proc.returncode != 0 or not report.is_file():
                rows.append({"concurrency": c, "error": (proc.stdout + proc.stderr)[-600:]})
                continue
            with open(report) as f:
                row = next(csv.DictReader(f))
            rows.append({"concurrency": c, "requests_s": float(row["Inferences/Second"]),
                         "responses_s": float(row.get("Response Throughput", 0) or 0),
                         "latency_p50_ms": float(row["p50 latency"]) / 1000,
                         "latency_p99_ms": float(row["p99 latency"]) / 1000})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| c | requests/s | responses/s | request latency (to the final response) p50 / p99 ms |", "|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['concurrency']} | error: {r['error'][-120:]!r} | | |")
        else:
            lines.append(f"| {r['concurrency']} | {r['requests_s']:.2f} | {r['responses_s']:.1f} | "
                         f"{r['latency_p50_ms']:.1f} / {r['latency_p99_ms']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grpc-url", default="127.0.0.1:8001")
    ap.add_argument("--messages", default='[{"role": "user", "content": "Write a story."}]')
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=16, help="requests per measurement window")
    args = ap.parse_args()
    rows = run(args.grpc_url, json.loads(args.messages), args.max_tokens,
               [int(c) for c in args.concurrency.split(",")], args.requests)
    print(table(rows))


if __name__ == "__main__":
    main()
