"""Where a request's first token spends its time, across the stack's processes (frontend, bls, llm).

With VLM_TRITON_TIMELINE_DIR set (for tritonserver, and so its stubs, and for the frontend), each process appends
one line per mark to `<dir>/<pid>.tl`: `<CLOCK_MONOTONIC ns> <request id> <event> [detail]`. CLOCK_MONOTONIC is one
clock for every process of a host, so marks of different processes compare. Unset (the default), `mark` is one
test of a module global. Only a request's first-token path is marked (a handful of lines per request, none per
token), so the marks cost a few microseconds per request. `benchmarks/timeline.py` joins the files into per-hop
latencies.

The frontend's request id reaches the bls as its Triton request id; the bls binds it (`bind`) for the coroutines
that serve the request, gives it to its preprocess and vision_encoder calls as their request id (those stages mark
under it) and names the id of its llm request in the `bls.llm_call` mark; the llm marks under its engine ids
(`<llm request id>#<n>`).
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import time

_DIR = os.environ.get("VLM_TRITON_TIMELINE_DIR") or None
_fd: int | None = None
_fd_pid = 0
_open_lock = threading.Lock()
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("vlm_timeline_request", default=None)


def enabled() -> bool:
    return _DIR is not None


def _write(line: str) -> None:
    """Best effort: marks never fail a request. A write that fails (disk full, folder gone) turns marking off."""
    global _fd, _fd_pid, _DIR
    try:
        pid = os.getpid()
        with _open_lock:
            if _fd is None or _fd_pid != pid:  # a forked child writes its own file
                os.makedirs(_DIR, exist_ok=True)  # type: ignore[arg-type]
                _fd = os.open(os.path.join(_DIR, f"{pid}.tl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # type: ignore[arg-type]
                _fd_pid = pid
        os.write(_fd, line.encode())  # one O_APPEND write per line: lines of threads never interleave
    except OSError as exc:
        print(f"vlm_triton.timeline: marking off after a failed write: {exc}", file=sys.stderr, flush=True)
        _DIR = None


def mark(event: str, request_id: str | None = None, detail: str = "", at_ns: int | None = None) -> None:
    """Record `event` for `request_id` (default: the request bound to this context; nothing when none is), at
    `at_ns` (time.monotonic_ns(); default now: for a time taken before the request's id was known)."""
    if _DIR is None:
        return
    rid = request_id if request_id is not None else _current.get()
    if rid:
        when = time.monotonic_ns() if at_ns is None else at_ns
        _write(f"{when} {rid} {event}{' ' + detail if detail else ''}\n")


def current() -> str:
    """The request bound to this context ("" when marking is off or none is): the bls names its stage calls with it,
    so that preprocess and vision_encoder mark under the frontend's id."""
    return (_current.get() or "") if _DIR is not None else ""


def bind(request_id: str) -> None:
    """Make `request_id` the request that `mark` without an id refers to, in this context (and the tasks it starts)."""
    if _DIR is not None:
        _current.set(request_id)
