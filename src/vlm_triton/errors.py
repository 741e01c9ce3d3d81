"""The one client-fault exception type, and the server faults that have a type of their own.

Everything a caller did wrong (bad image URL, too many images, prompt too long, malformed messages) raises
`InvalidRequest`. The Triton adapters map it to INVALID_ARGUMENT and the frontend to HTTP 400; every other
exception is a server fault (INTERNAL / HTTP 500), `StageStalled` included.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The request is wrong; the message says what was wrong and what is allowed."""


class SetupError(RuntimeError):
    """Deployment or environment problem (missing checkpoint, port busy, no tritonserver).

    CLIs print only the message, as one line that says what to do.
    """


class StageStalled(RuntimeError):
    """A pipeline stage made no progress for `timeout_s` (`triton.bls_stall_timeout_s`): a server fault, raised
    instead of waiting forever. The message names the stage and the wait."""

    def __init__(self, stage: str, timeout_s: float, detail: str = "") -> None:
        self.stage, self.timeout_s = stage, timeout_s
        super().__init__(f"{stage} produced no response for {timeout_s:g} s{detail}")
