"""Python's cyclic garbage collector in a serving process: the start-up heap frozen, and collection pauses timed.

A full collection (generation 2) walks every object the collector tracks, and every thread of the process waits for
it (it runs under the GIL). A process that imported torch and transformers tracks ~370,000 objects before it builds
anything (a full collection takes ~185 ms on the 2-core CI machine), and under load Python starts one whenever the
objects promoted since the last one reach a quarter of the long-lived ones. `freeze_heap()` after start-up moves
everything alive into the permanent generation, which collections skip, so a full collection walks only what was
made since (vLLM freezes its engine's heap after start-up the same way). Nothing is freed by it that would otherwise
be: frozen objects are start-up state that lives as long as the process.

`GCPauses` times each collection (`gc.callbacks`) for the timing lines of `VLM_TRITON_STEP_STATS`. It records without
locks: a collection can start inside any allocation, including one made while some lock is held, so the callback
must not take one.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from typing import Any


def freeze_heap() -> int:
    """Collect once, then move every object still alive to the permanent generation; how many are frozen now."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GCPauses:
    """Seconds of each collection of this process by generation since the last `take()`, in `StepTiming.take()`'s
    shape ({"gen0": {count, mean_ms, max_ms}, ...}). One per process: `GCPauses.install()`."""

    _installed: GCPauses | None = None

    def __init__(self) -> None:
        self._started = 0.0
        self._pauses: deque[tuple[int, float]] = deque()  # append/popleft are atomic under the GIL

    @classmethod
    def install(cls) -> GCPauses:
        """This process's recorder, its callback registered once."""
        if cls._installed is None:
            cls._installed = cls()
            gc.callbacks.append(cls._installed._on_collect)
        return cls._installed

    @classmethod
    def uninstall(cls) -> None:
        if cls._installed is not None:
            gc.callbacks.remove(cls._installed._on_collect)
            cls._installed = None

    def _on_collect(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":  # collections never overlap: one start at a time
            self._started = time.perf_counter()
        else:
            self._pauses.append((int(info["generation"]), time.perf_counter() - self._started))

    def take(self) -> dict[str, dict[str, float]]:
        parts: dict[int, list[float]] = {}
        for _ in range(len(self._pauses)):
            generation, seconds = self._pauses.popleft()
            parts.setdefault(generation, []).append(seconds)
        return {f"gen{g}": {"count": len(s), "mean_ms": 1e3 * sum(s) / len(s), "max_ms": 1e3 * max(s)}
                for g, s in sorted(parts.items())}
