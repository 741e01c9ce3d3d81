"""The frontend's event-loop lag probe (openai_frontend/loop_lag.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from openai_frontend import loop_lag


def _run(blocked_s: float) -> dict:
    async def main() -> None:
        async with loop_lag.loop_lag_probe(0.002):
            await asyncio.sleep(0.02)
            time.sleep(blocked_s)  # a callback that holds the loop
            await asyncio.sleep(0.02)

    loop_lag.TIMING.take()
    asyncio.run(main())
    return loop_lag.TIMING.take()


def test_lag_is_the_time_the_loop_was_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_TRITON_STEP_STATS", "5")
    lag = _run(0.05)["loop_lag"]
    assert lag["count"] >= 3 and 40 <= lag["max_ms"] < 1000


def test_no_probe_without_step_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLM_TRITON_STEP_STATS", raising=False)
    assert _run(0.01) == {}
