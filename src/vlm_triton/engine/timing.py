"""Where a serving loop spends its time, for logs."""

from __future__ import annotations

import threading


class StepTiming:
    """Seconds spent per part of the engine loop since the last `take()` (count, total, max), for a serving
    process to log: tells a slow device step from time lost around it (thread switches, sends)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[str, list[float]] = {}

    def add(self, part: str, seconds: float) -> None:
        with self._lock:
            entry = self._parts.setdefault(part, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += seconds
            entry[2] = max(entry[2], seconds)

    def take(self) -> dict[str, dict[str, float]]:
        """{part: {count, mean_ms, max_ms}} since the last take, and reset."""
        with self._lock:
            parts, self._parts = self._parts, {}
        return {k: {"count": c, "mean_ms": 1e3 * total / c, "max_ms": 1e3 * peak} for k, (c, total, peak) in parts.items()}
