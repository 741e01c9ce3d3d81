"""With VLM_TRITON_STEP_STATS: how late the frontend's event loop wakes a task that asked to sleep 5 ms (its lag),
in the frontend's timing lines as `loop_lag` (count x mean/max ms). Every request, chunk and gRPC message of the
process waits for the same loop, so a lag of L ms delays each of them by up to L: this tells a frontend that limits
the stack (its one loop busy) from time lost elsewhere (docs/benchmarks.md, item 46)."""

from __future__ import annotations

import asyncio
import contextlib

from vlm_triton.engine.observe import StepTiming
from vlm_triton.step_stats import step_stats_period

TIMING = StepTiming()
INTERVAL_S = 0.005


async def _probe(interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval_s)
        TIMING.add("loop_lag", max(0.0, loop.time() - start - interval_s))


@contextlib.asynccontextmanager
async def loop_lag_probe(interval_s: float = INTERVAL_S):  # type: ignore[no-untyped-def]
    """Measures the running loop's lag while the block runs, only with VLM_TRITON_STEP_STATS set."""
    task = asyncio.create_task(_probe(interval_s)) if step_stats_period() is not None else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
