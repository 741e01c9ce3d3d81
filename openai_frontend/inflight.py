"""The cap on generation requests served at once (`--max-inflight`), for one process or shared by the workers of
one server (`--workers`: a counter in shared memory, so the cap is the server's, not each worker's)."""

from __future__ import annotations

from typing import Any

LOCK_TIMEOUT_S = 1.0


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
        lock = self._shared.get_lock()  # held for a few instructions, never across an await
        if not lock.acquire(timeout=LOCK_TIMEOUT_S):  # a worker died holding it: the supervisor is stopping them all
            return False
        try:
            if self._shared.value >= self.limit:
                return False
            self._shared.value += 1
            return True
        finally:
            lock.release()

    def release(self) -> None:
        if self._shared is None:
            self._count -= 1
            return
        lock = self._shared.get_lock()
        if lock.acquire(timeout=LOCK_TIMEOUT_S):
            try:
                self._shared.value -= 1
            finally:
                lock.release()
