"""The host-side allocators of the KV pool: contiguous runs of cache rows (first fit), or pages.

`PagePool` (the default on `engine.kv_page_tokens` > 0): the pool is pages of `page` rows and a request takes
any free pages for what it can reach, so there is no external fragmentation; the decode kernel finds its rows
through a page table (engine/paged_attention.py). `RowPool` (`kv_page_tokens` = 0), described below, hands out runs.

The engine's KV cache (kv_cache.py) is one pool of `capacity` rows per layer (a row = one position's K or V for
every KV head). A request reserves, when it is admitted, one run of rows long enough for every position it can
write (`prompt + max_new_tokens - 1`; with the default pool, `max_slots * max_seq_len`, a whole `max_seq_len`, so
that the runs are the old fixed slots and a free slot always has its rows), and gives it back when it ends; nothing
is evicted while it runs (TensorRT-LLM's `guaranteed_no_evict` policy). First fit can leave the free rows of an
explicit pool in runs too short for the next request, which then waits (and the requests behind it: arrival
order) until a neighbour ends. A run is contiguous so that the attention
kernels read each request's K/V as one span of rows from an offset (FlashAttention-2 varlen's `cu_seqlens_k` +
`seqused_k`; torch 2.11's bundled FA2 takes no block table). What a request does not use of `max_seq_len` stays
free for others. Both reserve the rows of outputs not yet generated (`kv_need`).
"""

from __future__ import annotations

import bisect


class RowPool:
    """Free runs of rows in [0, capacity), kept sorted by start and coalesced; first-fit reservations."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a row pool needs at least 1 row, got {capacity}")
        self.capacity = capacity
        self._starts = [0]  # free runs: starts (sorted) and lengths
        self._lengths = [capacity]
        self.free_rows = capacity

    def reserve(self, n: int) -> int | None:
        """The start of a run of `n` rows now reserved, the lowest that fits; None when no free run is that long."""
        if n < 1:
            raise ValueError(f"reserve at least 1 row, got {n}")
        for i, length in enumerate(self._lengths):
            if length >= n:
                start = self._starts[i]
                if length == n:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i], self._lengths[i] = start + n, length - n
                self.free_rows -= n
                return start
        return None

    def release(self, start: int, n: int) -> None:
        """Give back the run [start, start + n), which must be reserved; merges with free neighbours."""
        if n < 1 or start < 0 or start + n > self.capacity:
            raise ValueError(f"run [{start}, {start + n}) is not inside the pool of {self.capacity} rows")
        i = bisect.bisect_left(self._starts, start)
        if (i < len(self._starts) and self._starts[i] < start + n) or (
            i > 0 and self._starts[i - 1] + self._lengths[i - 1] > start
        ):
            raise ValueError(f"run [{start}, {start + n}) is (partly) free already")
        merge_left = i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start
        merge_right = i < len(self._starts) and self._starts[i] == start + n
        if merge_left and merge_right:
            self._lengths[i - 1] += n + self._lengths[i]
            del self._starts[i], self._lengths[i]
        elif merge_left:
            self._lengths[i - 1] += n
        elif merge_right:
            self._starts[i], self._lengths[i] = start, self._lengths[i] + n
        else:
            self._starts.insert(i, start)
            self._lengths.insert(i, n)
        self.free_rows += n

    def free_runs(self) -> list[tuple[int, int]]:
        """(start, length) of every free run, by start (for tests and logs)."""
        return list(zip(self._starts, self._lengths))


class PagePool:
    """Free pages of `page` rows each, pages [0, pages): a request takes any free pages, not one run, so a pool
    never fragments (kv_cache.py maps position p of a request to row `pages[p // page] * page + p % page`)."""

    def __init__(self, pages: int, page: int) -> None:
        if pages < 1 or page < 1:
            raise ValueError(f"a page pool needs at least 1 page of at least 1 row, got {pages} x {page}")
        self.pages, self.page = pages, page
        self.capacity = pages * page
        self._free = list(range(pages - 1, -1, -1))  # a stack: the lowest page is handed out first
        self._taken = bytearray(pages)

    @property
    def free_rows(self) -> int:
        return len(self._free) * self.page

    def pages_for(self, rows: int) -> int:
        return -(-rows // self.page)

    def reserve(self, rows: int) -> list[int] | None:
        """Pages for `rows` rows now reserved (in position order); None when fewer are free."""
        if rows < 1:
            raise ValueError(f"reserve at least 1 row, got {rows}")
        n = self.pages_for(rows)
        if n > len(self._free):
            return None
        taken = self._free[-n:][::-1]
        del self._free[-n:]
        for p in taken:
            self._taken[p] = 1
        return taken

    def release(self, pages: list[int]) -> None:
        """Give back reserved pages."""
        if any(not 0 <= p < self.pages or not self._taken[p] for p in pages) or len(set(pages)) != len(pages):
            raise ValueError(f"pages {pages} are not all reserved")
        for p in pages:
            self._taken[p] = 0
        self._free.extend(reversed(pages))
