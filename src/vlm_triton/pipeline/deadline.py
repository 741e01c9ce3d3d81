"""Stall deadlines for one request's stage calls, free of Triton.

A stage that never answers (a dead or wedged stub, a response lost between processes) must not leave the client
waiting forever (docs/benchmarks.md, item 7): `within` bounds one wait and raises `StageStalled` naming the stage
and the wait. The caller applies it to every wait on a stage: a whole preprocess / vision_encoder / postprocess
call, and each next response of the llm stream (the first included). A deadline of 0 waits forever.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from vlm_triton.errors import StageStalled

T = TypeVar("T")


async def within(step: Awaitable[T], stage: str, timeout_s: float, detail: str = "") -> T:
    """`await step`, or after `timeout_s` without its result cancel it and raise StageStalled(stage, ...).

    The step is cancelled inside the current task (no task per call: this runs once per streamed llm response),
    so the cleanup of what it awaited runs before StageStalled is raised and must not wait on the stalled stage."""
    if timeout_s <= 0:
        return await step
    scope = asyncio.timeout(timeout_s)
    try:
        async with scope:
            return await step
    except TimeoutError:
        if scope.expired():
            raise StageStalled(stage, timeout_s, detail) from None
        raise  # a TimeoutError of the step itself
