"""`VLM_TRITON_STEP_STATS=N`: every N seconds a serving process logs where its time went since the last line.

`log_timing(sources, name)` starts a daemon thread that prints `[<name> timing] part count x mean/max ms, ...` to
stderr: the parts of each `StepTiming` in `sources` (prefix -> timing; the llm's engine loop and outbox, the vision
encoder's phases) and this process's garbage collections by generation (`gc_gen0..2`, gc_heap.py). Used by every
Triton stage (triton/common.py) and by the frontend.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from vlm_triton.gc_heap import GCPauses


def step_stats_period() -> float | None:
    """VLM_TRITON_STEP_STATS=N: the seconds between a stage's timing lines; None when unset (no timing)."""
    period = os.environ.get("VLM_TRITON_STEP_STATS")
    return float(period) if period else None


def log_timing(sources: dict[str, Any], model_name: str) -> threading.Event | None:
    """Every VLM_TRITON_STEP_STATS seconds, log what each `StepTiming` in `sources` (prefix -> timing) took since the
    last line, and this process's garbage collections (`gc_gen0..2`): `[<model> timing] part count x mean/max ms,
    ...`. Returns an event that stops the logging when set (None: timing is off)."""
    period = step_stats_period()
    if period is None:
        return None
    sources = {**sources, "gc_": GCPauses.install()}
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(period):
            parts = {f"{prefix}{k}": v for prefix, timing in sources.items() for k, v in timing.take().items()}
            if parts:
                summary = ", ".join(f"{k} {v['count']}x {v['mean_ms']:.3f}/{v['max_ms']:.1f} ms"
                                    for k, v in sorted(parts.items()))
                print(f"[{model_name} timing] {summary}", file=sys.stderr, flush=True)

    threading.Thread(target=run, name="timing-log", daemon=True).start()
    return stop
