"""Which waiting requests the engine admits next, and with which KV rows.

`Admission` owns the queue of waiting requests (arrival order) and the KV pool's allocator (kv_pool.py). `pop()`
takes the next prefill from the head of the queue while decode slots are free, the step's token budget holds
(count x longest prompt <= prefill_tokens) and the pool has each request's run of rows, which it reserves: either a
batch of whole prompts, or one prompt longer than the budget alone (the engine prefills it in chunks). The first
request that does not fit stops the pop, and the ones behind it wait too (no overtaking). `add()` queues a request,
`take()` removes queued requests by id (cancels), `drain()` empties the queue (shutdown), and `free()` gives a
request's rows back. Not thread-safe: the engine calls `add`, `take`, `drain` and `pop` under its lock, and `free`
only from its loop thread (the one thread that touches the pool).
"""

from __future__ import annotations

from collections import deque

from vlm_triton.engine.kv_pool import PagePool, RowPool
from vlm_triton.engine.types import ActiveRequest
from vlm_triton.errors import SetupError


class Admission:
    def __init__(self, pool: RowPool | PagePool, *, max_slots: int, prefill_tokens: int, run_rows: int = 0) -> None:
        """`run_rows` > 0: every request reserves that many rows (the default pool's fixed runs of max_seq_len, so
        that a free slot always has its rows); 0: each reserves what it can reach (`ActiveRequest.kv_need`)."""
        self.pool, self.max_slots, self.prefill_tokens, self.run_rows = pool, max_slots, prefill_tokens, run_rows
        self.waiting: deque[ActiveRequest] = deque()
        self.kv_waits = 0  # pops stopped because the pool had no run long enough for the head

    @classmethod
    def sized(cls, kv_cache_tokens: int, *, max_slots: int, max_seq_len: int, prefill_tokens: int,
              page_tokens: int = 0) -> Admission:
        """The engine's admission over a pool of `kv_cache_tokens` rows; 0: max_slots * max_seq_len rows, handed
        out in runs of max_seq_len (the slots of a fixed layout: a free slot always has its rows) unless paged.
        `page_tokens` > 0: the pool is pages of that many rows (rounded up to whole pages, and to max_slots pages
        of max_seq_len by default), and each request reserves the pages of what it can reach."""
        if page_tokens < 0:
            raise SetupError(f"kv_page_tokens must be >= 0, got {page_tokens}")
        capacity = int(kv_cache_tokens) or max_slots * max_seq_len
        if page_tokens:
            per_request = -(-max_seq_len // page_tokens)
            pages = -(-capacity // page_tokens) if kv_cache_tokens else max_slots * per_request
            capacity = pages * page_tokens
        if not max_seq_len <= capacity < 2**31 - 1:  # the attention kernels take int32 row offsets
            raise SetupError(f"kv_cache_tokens {capacity} must be in [max_seq_len={max_seq_len}, 2**31 - 1): a "
                             "request of max_seq_len tokens must fit")
        if page_tokens:
            return cls(PagePool(capacity // page_tokens, page_tokens), max_slots=max_slots,
                       prefill_tokens=prefill_tokens)
        return cls(RowPool(capacity), max_slots=max_slots, prefill_tokens=prefill_tokens,
                   run_rows=0 if kv_cache_tokens else max_seq_len)

    def __len__(self) -> int:
        """Requests waiting."""
        return len(self.waiting)

    def add(self, seq: ActiveRequest) -> None:
        self.waiting.append(seq)

    def take(self, request_ids: set[str]) -> list[ActiveRequest]:
        """Remove the waiting requests with these ids (arrival order); they hold no rows yet."""
        taken = [s for s in self.waiting if s.request_id in request_ids]
        if taken:
            self.waiting = deque(s for s in self.waiting if s.request_id not in request_ids)
        return taken

    def drain(self) -> list[ActiveRequest]:
        """Every waiting request (arrival order), leaving the queue empty."""
        out = list(self.waiting)
        self.waiting.clear()
        return out

    def pop(self, running: int) -> tuple[list[ActiveRequest], ActiveRequest | None]:
        """(the next prefill batch, or a prompt to prefill in chunks) with `running` slots taken; rows reserved."""
        batch: list[ActiveRequest] = []
        longest = 0
        while self.waiting and running + len(batch) < self.max_slots:
            head = self.waiting[0]
            n = max(longest, head.prompt_len)
            chunked = not batch and n > self.prefill_tokens
            if not chunked and n * (len(batch) + 1) > self.prefill_tokens:
                break
            if not self._reserve(head):
                self.kv_waits += 1
                break
            self.waiting.popleft()
            if chunked:
                return [], head
            batch.append(head)
            longest = n
        return batch, None

    def _reserve(self, seq: ActiveRequest) -> bool:
        """Reserve seq's KV rows (a run, or pages); False when the pool has not got them."""
        if isinstance(self.pool, PagePool):
            pages = self.pool.reserve(seq.kv_need)
            if pages is None:
                return False
            seq.kv_pages, seq.kv_page = pages, self.pool.page
            return True
        rows = self.run_rows or seq.kv_need
        start = self.pool.reserve(rows)
        if start is None:
            return False
        seq.kv_start, seq.kv_rows = start, rows
        return True

    def free(self, seq: ActiveRequest) -> None:
        """Give seq's rows back (once; a request without rows is left alone)."""
        if seq.kv_pages is not None:
            assert isinstance(self.pool, PagePool)
            self.pool.release(seq.kv_pages)
            seq.kv_pages = None
        elif seq.kv_rows:
            assert isinstance(self.pool, RowPool)
            self.pool.release(seq.kv_start, seq.kv_rows)
            seq.kv_start, seq.kv_rows = -1, 0
