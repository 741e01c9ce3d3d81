"""The cap on generation requests served at once (`--max-inflight`), for one process or shared by the workers of
one server (`--workers`: a counter in shared memory, so the cap is the server's, not each worker's)."""

from __future__ import annotations

from typing import Any


class InflightLimit:
    """`try_acquire()` takes a place if one is free (False: answer 429); `release()` gives it back. `shared`: a
    `multiprocessing.Value("i")` made by the supervisor before it started the workers (None: this process only)."""

    def __init__(self, limit: int, shared: Any = None) -> None:
        self.limit = limit
        self._shared = shared
        self._count = 0

    @property
    def count(self) -> int:
        return self._count if self._shared is None else int(self._shared.value)

    def try_acquire(self) -> bool:
        if self._shared is None:
            if self._count >= self.limit:
                return False
            self._count += 1
            return True
        with self._shared.get_lock():  # a few instructions under a process-shared lock: never held across an await
            if self._shared.value >= self.limit:
                return False
            self._shared.value += 1
            return True

    def release(self) -> None:
        if self._shared is None:
            self._count -= 1
            return
        with self._shared.get_lock():
            self._shared.value -= 1
