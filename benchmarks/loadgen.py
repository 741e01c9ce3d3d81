"""OpenAI-level async load generator (httpx): closed loop at a fixed concurrency, streaming or not.

Per request it records the send time, the arrival of every SSE chunk that carries text, and the usage block;
from those: TTFT (first text chunk), TPOT ((last - first chunk) / (usage tokens - 1); a chunk may carry several
tokens when the server coalesces under load), ITL (gaps between text chunks),
output tok/s and req/s over the run's wall time, with p50/p90/p99. Bounded by a request count and a time cap.

    python -m benchmarks.loadgen --url http://127.0.0.1:9997/v1 --model NAME --concurrency 16 --requests 64 \
        --prompt "Hello" --max-tokens 128 [--no-stream] [--image FILE_URL ...] [--time-cap 60]
Loopback use is intended: it is a load generator, point it only at servers you run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from vlm_triton.gc_heap import freeze_heap


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], stream: bool,
               rec: dict[str, Any]) -> None:
    rec["sent"] = time.monotonic()
    times: list[float] = rec["times"]
    if not stream:
        r = await client.post(url, json=body)
        now = time.monotonic()
        if r.status_code != 200:
            rec["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
            return
        usage = r.json().get("usage") or {}
        rec["completion_tokens"] = int(usage.get("completion_tokens", 0))
        rec["end"] = now
        return
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            now = time.monotonic()
            obj = json.loads(data)
            if obj.get("usage"):
                rec["completion_tokens"] = int(obj["usage"].get("completion_tokens", 0))
            for choice in obj.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    if not times:
                        rec["id"] = obj.get("id")
                    times.append(now)
    rec["end"] = time.monotonic()


def write_client_marks(records: list[dict[str, Any]], directory: Path) -> None:
    """The client's ends of each streamed request's first-token path, as `vlm_triton.timeline` lines (client.send,
    client.first) under the response id, which is the frontend's request id: benchmarks/timeline.py joins them."""
    lines = [f"{round(r['sent'] * 1e9)} {r['id']} client.send\n{round(r['times'][0] * 1e9)} {r['id']} client.first\n"
             for r in records if r.get("id") and r["times"]]
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"client-{os.getpid()}.tl", "a") as f:
        f.writelines(lines)


async def _records(url: str, body: dict[str, Any], concurrency: int, n_requests: int, time_cap_s: float,
                   stream: bool, request_timeout_s: float, start_at: float | None = None
                   ) -> tuple[list[dict[str, Any]], float, float]:
    """One process's closed loop: (records, start, end) in time.monotonic() seconds (CLOCK_MONOTONIC: one clock for
    every process of the host, and the clock of vlm_triton.timeline's marks). `start_at` (the same clock): sleep
    until then, so that processes start together."""
    records: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(request_timeout_s)) as client:
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        t0 = time.monotonic()
        counter = iter(range(n_requests))

        async def worker() -> None:
            for _ in counter:
                if time.monotonic() - t0 > time_cap_s:
                    return
                rec: dict[str, Any] = {"times": []}
                records.append(rec)
                try:
                    await _one(client, url, body, stream, rec)
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    rec["error"] = f"{type(exc).__name__}: {exc}"

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records, t0, time.monotonic()


STREAMS_PER_PROC = 4
MAX_AUTO_PROCS = 8
START_DELAY_S = 3.0  # spawned client processes import httpx and open their pools before the common start


def _records_in_process(*args: Any) -> tuple[list[dict[str, Any]], float, float]:
    freeze_heap()
    return asyncio.run(_records(*args))


def auto_procs(concurrency: int) -> int:
    """Client processes for a point: one per 4 streams, at most 8. One process's event loop, parsing every SSE chunk
    of 64 streams, delayed each request's send by ~60 ms on an H100 host (docs/benchmarks.md, item 33)."""
    return min(MAX_AUTO_PROCS, max(1, -(-concurrency // STREAMS_PER_PROC)))


def split(total: int, parts: int) -> list[int]:
    """`total` in `parts` near-equal shares, larger first."""
    return [total // parts + (k < total % parts) for k in range(parts)]


async def run_load(base_url: str, body: dict[str, Any], concurrency: int, n_requests: int, time_cap_s: float,
                   stream: bool = True, request_timeout_s: float = 300.0, timeline_dir: Path | None = None,
                   procs: int | None = 1, freeze: bool = True) -> dict[str, Any]:
    """`timeline_dir`: also write the client's marks of each streamed request there (write_client_marks).
    `procs` > 1: the concurrency (and the requests) shared by that many client processes, so that one Python event
    loop parsing every SSE chunk of every stream is not what limits the measurement; the records are merged and the
    wall time runs from their common start to the last one's end. None: `auto_procs(concurrency)`. `freeze`: the
    measuring process's heap is frozen out of garbage collection before its first point (spawned client processes
    always are)."""
    url = base_url.rstrip("/") + "/chat/completions"
    body = {**body, "stream": stream}
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    else:
        body.pop("stream_options", None)
    procs = max(1, min(auto_procs(concurrency) if procs is None else procs, concurrency))
    skew = 0.0
    if procs == 1:
        # this process may hold torch and transformers (the harness): a full collection of their objects during the
        # point would stop every stream's clock here for ~0.2 s (docs/benchmarks.md, item 37)
        if freeze and gc.get_freeze_count() == 0:  # once per process: later points find it frozen
            freeze_heap()
        records, start, end = await _records(url, body, concurrency, n_requests, time_cap_s, stream, request_timeout_s)
    else:
        loop = asyncio.get_running_loop()
        start_at = time.monotonic() + START_DELAY_S
        with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = await asyncio.gather(*(
                loop.run_in_executor(pool, _records_in_process, url, body, c, n, time_cap_s, stream, request_timeout_s,
                                     start_at)
                for c, n in zip(split(concurrency, procs), split(n_requests, procs))))
        records = [r for part in parts for r in part[0]]
        start, end = min(p[1] for p in parts), max(p[2] for p in parts)
        skew = max(p[1] for p in parts) - start  # > 0: a process was not ready at the common start
    wall = end - start
    ok = [r for r in records if "error" not in r]
    errors = [r["error"] for r in records if "error" in r]
    if timeline_dir is not None and stream:
        write_client_marks(ok, Path(timeline_dir))
    sent = {str(i): r["sent"] for i, r in enumerate(ok)}
    if stream:
        times = {str(i): r["times"] for i, r in enumerate(ok)}
        tokens = {str(i): r["completion_tokens"] for i, r in enumerate(ok) if r.get("completion_tokens")}
        from benchmarks.baselines import summarize  # here: the spawned client processes need no torch

        out = summarize(sent, times, wall, concurrency, errors=len(errors), tokens=tokens)
        out["chunks_per_token"] = (sum(len(r["times"]) for r in ok) /
                                   max(1, sum(r.get("completion_tokens", 0) for r in ok)))
    else:
        lat = [r["end"] - r["sent"] for r in ok]
        from benchmarks.baselines import percentiles

        out = {"concurrency": concurrency, "requests": len(ok), "errors": len(errors), "wall_s": wall,
               "latency_ms": percentiles(lat)}
    tokens = sum(r.get("completion_tokens", 0) for r in ok)
    out["usage_output_tokens"] = tokens
    out["output_tok_s"] = tokens / wall if wall else None  # from usage: counts every generated token
    out["req_s"] = len(ok) / wall if wall else None
    out["stream"] = stream
    out["first_errors"] = errors[:3]
    out["client_procs"] = procs
    out["client_start_skew_s"] = skew
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:9997/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--time-cap", type=float, default=60.0)
    ap.add_argument("--prompt", default="Describe this image in detail.")
    ap.add_argument("--image", action="append", default=[], help="image URL (file://, http(s)://, data:)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--procs", type=int, default=None,
                    help="client processes sharing the concurrency (default: one per 4 streams, at most 8)")
    args = ap.parse_args()
    content: Any = args.prompt
    if args.image:
        content = [*({"type": "image_url", "image_url": {"url": u}} for u in args.image),
                   {"type": "text", "text": args.prompt}]
    body = {"model": args.model, "messages": [{"role": "user", "content": content}], "max_tokens": args.max_tokens,
            "temperature": 0.0, "ignore_eos": True}
    result = asyncio.run(run_load(args.url, body, args.concurrency, args.requests, args.time_cap,
                                  stream=not args.no_stream, procs=args.procs))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
