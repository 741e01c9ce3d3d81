"""How the engine thread waits for a step's sampled tokens (docs/benchmarks.md, items 41 and 44).

By default in `Tensor.tolist`: one copy that waits for the step. Item 41 waited first on a CUDA event with the GIL
released, so that the llm's vision thread could launch its work during a step (its rounds under W1 load: 450-530 ->
150-230 ms on an H100); on text load that wait cost 6-14% of tokens per second (item 44, cause not measured). So the
event wait is used only while `release_gil_when()` says another thread has GPU work (the llm stage sets it to its
vision thread being busy, engine.vision_in_llm). An engine whose decode steps run ahead (run_ahead.py, item 47) reads
them from pinned memory after their event, with the GIL released: the GPU then has the next step already. Measurement
knob VLM_TRITON_HOST_WAIT, read at import: "event" always releases the GIL while waiting, "tolist" never does.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

_HOST_WAIT = os.environ.get("VLM_TRITON_HOST_WAIT", "auto")


def _never() -> bool:
    return False


class StepWait:
    """One per engine, called by the thread that drives its steps."""

    def __init__(self) -> None:
        self.release_gil_when: Callable[[], bool] = _never
        self._done: torch.cuda.Event | None = None  # recorded again every step, not created per token

    def releases(self, asked: bool = False) -> bool:
        """Whether a wait releases the GIL: when `asked` or `release_gil_when()`, unless the knob says otherwise."""
        return _HOST_WAIT == "event" or (_HOST_WAIT != "tolist" and (asked or self.release_gil_when()))

    def tokens(self, sampled: torch.Tensor) -> list[int]:
        """`sampled.tolist()`, first waiting for the device on a CUDA event with the GIL released when it releases."""
        if sampled.is_cuda and self.releases():
            if self._done is None:
                self._done = torch.cuda.Event()
            self._done.record()
            self._done.synchronize()  # releases the GIL while it waits
        return sampled.tolist()

    def event(self, done: torch.cuda.Event, release_gil: bool = False) -> None:
        """Wait for `done` (recorded after a copy of sampled ids to pinned memory, run_ahead.py): with the GIL released
        when `release_gil` (an engine whose decode steps run ahead: the GPU has the next step, the host nothing to do;
        session 19's A B A B, item 47: W2 c=64 ITL p99 -18 to -19% and tok/s +1 to +6%) or when it releases anyway,
        otherwise holding it between polls, as `Tensor.tolist` holds it."""
        if self.releases(release_gil):
            done.synchronize()
        else:
            while not done.query():
                pass
