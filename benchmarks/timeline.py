"""Where the first token's time goes in the stack: the marks of `vlm_triton.timeline` joined per request.

    python -m benchmarks.timeline DIR [--from NS --to NS]

DIR holds the `<pid>.tl` files that the frontend, the bls and the llm wrote with VLM_TRITON_TIMELINE_DIR=DIR, and
the load generator's `client-<pid>.tl` (`loadgen.run_load(timeline_dir=DIR)`): `benchmarks.stack_variants
--timeline` sets both and prints this table after each load point. Each request's marks
are put in the order of the first token's path; a hop is the time from one mark to the next mark the request has
(`bls.encoded` and the `vis.*` marks only for requests with images). Prints p50 / p90 / mean ms per hop over the requests that the
frontend received within [--from, --to] (CLOCK_MONOTONIC ns; default: all).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The first token's path, in order: where each mark is made
PATH = (
    ("client.send", "load generator: the HTTP request is sent"),
    ("frontend.http", "frontend: the HTTP request reaches the app (its guard middleware)"),
    ("frontend.receive", "frontend: the body is read and validated, the generation starts"),
    ("frontend.send", "frontend: the gRPC stream to the bls starts"),
    ("bls.execute", "bls: execute() starts serving it"),
    ("pre.execute", "preprocess: execute() starts it"),
    ("pre.prepared", "preprocess: fetched, decoded (tiled), rendered and tokenized (family.prepare)"),
    ("pre.done", "preprocess: its output tensors are made"),
    ("bls.preprocessed", "bls: the preprocess call returned"),
    ("vis.execute", "vision_encoder: execute() starts it (with the batch it came in)"),
    ("vis.tiles", "vision_encoder: the batch's tiles are on the device (cut there, or copied)"),
    ("vis.encoded", "vision_encoder: the batch is encoded (device synchronised)"),
    ("bls.encoded", "bls: the vision_encoder call(s) returned"),
    ("bls.llm_call", "bls: the llm call is made"),
    ("llm.execute", "llm: execute() queued it to the engine (or to its vision thread)"),
    ("llm.encoded", "llm: its images were encoded in the llm (engine.vision_in_llm)"),
    ("llm.prefill", "llm: its prefill step starts"),
    ("llm.token", "llm: its first token is sampled"),
    ("llm.send", "llm: the outbox starts sending it"),
    ("llm.sent", "llm: that send returned"),
    ("bls.llm_first", "bls: the llm call returned its first response"),
    ("bls.sent", "bls: the first chunk was sent"),
    ("frontend.first", "frontend: the first gRPC response arrived"),
    ("frontend.sse", "frontend: the first text delta is written"),
    ("client.first", "load generator: the first text delta arrived (its TTFT ends)"),
)
ORDER = {event: k for k, (event, _) in enumerate(PATH)}


def read_marks(directory: Path) -> Iterable[tuple[int, str, str, str]]:
    """(ns, request id, event, detail) of every well-formed line of every `*.tl` file."""
    for path in sorted(Path(directory).glob("*.tl")):
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split(" ", 3)
            if len(parts) < 3 or not parts[0].lstrip("-").isdigit():
                continue
            yield int(parts[0]), parts[1], parts[2], parts[3] if len(parts) > 3 else ""


def join(marks: Iterable[tuple[int, str, str, str]]) -> dict[str, dict[str, int]]:
    """{frontend request id: {event: ns of its first such mark}}. The llm's marks (engine id `<llm id>#<n>`) join
    their request through the bls's `bls.llm_call <llm id>` mark."""
    llm_owner: dict[str, str] = {}
    by_id: dict[str, dict[str, int]] = {}
    for ns, rid, event, detail in marks:
        if event == "bls.llm_call" and detail:
            llm_owner[detail] = rid
        events = by_id.setdefault(rid, {})
        if event not in events or ns < events[event]:
            events[event] = ns
    requests: dict[str, dict[str, int]] = {}
    for rid, events in by_id.items():
        owner = llm_owner.get(rid.split("#", 1)[0])  # an llm request: its marks belong to the request that made it
        if owner is None and "#" in rid:
            continue  # an llm request of no known bls call (e.g. a cancellation)
        target = requests.setdefault(owner or rid, {})
        for event, ns in events.items():
            target[event] = min(ns, target.get(event, ns))
    return requests


def hops(events: dict[str, int]) -> list[tuple[str, float]]:
    """[("a -> b", ms)] between consecutive marks of one request, in path order."""
    present = sorted((e for e in events if e in ORDER), key=ORDER.__getitem__)
    return [(f"{a} -> {b}", (events[b] - events[a]) / 1e6) for a, b in zip(present, present[1:])]


def table(requests: dict[str, dict[str, int]], start_ns: int | None = None, end_ns: int | None = None
          ) -> dict[str, Any]:
    """Per-hop and end-to-end statistics (ms) over the requests the frontend received in [start_ns, end_ns]."""
    chosen = [ev for ev in requests.values() if "frontend.receive" in ev
              and (start_ns is None or ev["frontend.receive"] >= start_ns)
              and (end_ns is None or ev["frontend.receive"] <= end_ns)]
    per_hop: dict[str, list[float]] = {}
    totals = []
    for ev in chosen:
        for name, ms in hops(ev):
            per_hop.setdefault(name, []).append(ms)
        present = sorted((e for e in ev if e in ORDER), key=ORDER.__getitem__)
        totals.append((ev[present[-1]] - ev[present[0]]) / 1e6)
    def path_order(hop: str) -> tuple[int, int]:
        a, b = hop.split(" -> ")
        return ORDER[a], ORDER[b]

    rows = [{"hop": name, **_stats(per_hop[name])} for name in sorted(per_hop, key=path_order)]
    return {"requests": len(chosen), "hops": rows, "total": _stats(totals) if totals else None}


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(ordered), "p50": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "mean": statistics.fmean(ordered)}


def format_table(result: dict[str, Any]) -> list[str]:
    lines = [f"first-token path over {result['requests']} requests (ms)", "| hop | n | p50 | p90 | mean |",
             "|---|---|---|---|---|"]
    for row in result["hops"]:
        lines.append(f"| {row['hop']} | {row['n']} | {row['p50']:.2f} | {row['p90']:.2f} | {row['mean']:.2f} |")
    if result["total"]:
        t = result["total"]
        lines.append(f"| first mark -> last mark | {t['n']} | {t['p50']:.2f} | {t['p90']:.2f} | {t['mean']:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--from", dest="start", type=int, default=None)
    ap.add_argument("--to", dest="end", type=int, default=None)
    args = ap.parse_args()
    print("\n".join(format_table(table(join(read_marks(args.directory)), args.start, args.end))))


if __name__ == "__main__":
    main()
