"""The one client-fault exception type.

Everything a caller did wrong (bad image URL, too many images, prompt too long, malformed messages) raises
`InvalidRequest`. The Triton adapters map it to INVALID_ARGUMENT and the frontend to HTTP 400; every other
exception is a server fault (INTERNAL / HTTP 500).
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The request is wrong; the message says what was wrong and what is allowed."""


class SetupError(RuntimeError):
    """Deployment or environment problem (missing checkpoint, port busy, no tritonserver).

    CLIs print only the message, as one line that says what to do.
    """
