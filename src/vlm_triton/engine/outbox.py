"""Delivers the engine's token events from a thread of its own.

Sending a response through Triton is an IPC round trip that, for a request made over BLS, lasts until the caller's
stub has taken the response. Done on the engine thread, that wait stalls every running request's next step (on an
H100 the stack's TPOT was 2.3x the bare engine's). The engine thread only queues its events here; the outbox thread
delivers them, one request at a time, each delivery carrying every token that request produced since its last one.
Under light load that is one token per response; under heavy load responses grow instead of falling behind.

The order of sends: requests wait in one queue, in the order their tokens arrived, and a request that was just sent
joins its end again; a request's first token and its final event go before every waiting one. So a new request's
first token waits for the one send in progress, not for a round of sends to the other running requests (sessions
5-19 sent in such rounds: at W2 c=64 on an H100 a round of 64 sends took ~41-49 ms, and the queue gained 9-15% of
tokens per second, docs/benchmarks.md item 49).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vlm_triton.engine.observe import StepTiming
from vlm_triton.engine.types import TokenEvent


@dataclass
class Delivery:
    """What one request gets in one send: its new tokens in order and, on its last send, the final event."""

    request_id: str
    tokens: list[int] = field(default_factory=list)
    final: TokenEvent | None = None


class SendQueue:
    """The deliveries waiting for the outbox thread, in sending order (see the module's docstring)."""

    def __init__(self) -> None:
        self._urgent: dict[str, Delivery] = {}  # first tokens and final events (dicts keep insertion order)
        self._waiting: dict[str, Delivery] = {}

    def __bool__(self) -> bool:
        return bool(self._urgent or self._waiting)

    def add(self, events: Iterable[TokenEvent]) -> None:
        for event in events:
            rid = event.request_id
            delivery = self._urgent.get(rid) or self._waiting.get(rid)
            if delivery is None:
                delivery = Delivery(rid)
                urgent = event.finished or event.index == 0  # index: the token's place among the generated ones
                (self._urgent if urgent else self._waiting)[rid] = delivery
            elif event.finished and rid in self._waiting:
                self._urgent[rid] = self._waiting.pop(rid)
            if event.token_id is not None:
                delivery.tokens.append(event.token_id)
            if event.finished:
                delivery.final = event

    def pop(self) -> Delivery:
        """The next delivery to send (the queue must not be empty)."""
        pending = self._urgent or self._waiting
        return pending.pop(next(iter(pending)))


class Outbox:
    """`put` (any thread, never blocks) queues engine events; outbox threads call `deliver` with one delivery at a
    time. An exception from `deliver` is passed to `on_error` and the thread goes on.

    With `lanes` > 1, each request belongs to one of `lanes` threads (by its id), so its deliveries stay in order
    while sends of different requests overlap: a send is a synchronous round trip through other processes (the
    Triton parent and the caller's stub), mostly waiting, so one thread caps the responses per second."""

    def __init__(
        self,
        deliver: Callable[[Delivery], None],
        on_error: Callable[[BaseException], None] | None = None,
        name: str = "llm-outbox",
        lanes: int = 1,
    ) -> None:
        if lanes < 1:
            raise ValueError("an outbox needs at least one lane")
        self._deliver = deliver
        self._on_error = on_error
        self.timing = StepTiming()  # "wake": from a put to the thread taking it; "deliver": one delivery
        self._queues: list[queue.SimpleQueue[tuple[float, list[TokenEvent]] | None]] = []
        self._threads: list[threading.Thread] = []
        for i in range(lanes):
            q: queue.SimpleQueue[tuple[float, list[TokenEvent]] | None] = queue.SimpleQueue()
            thread = threading.Thread(target=self._run, args=(q,), name=f"{name}-{i}" if lanes > 1 else name,
                                      daemon=True)
            self._queues.append(q)
            self._threads.append(thread)
            thread.start()

    def lane_of(self, request_id: str) -> int:
        return hash(request_id) % len(self._queues)

    def put(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        if len(self._queues) == 1:
            self._queues[0].put((now, events))
            return
        split: dict[int, list[TokenEvent]] = {}
        for event in events:
            split.setdefault(self.lane_of(event.request_id), []).append(event)
        for lane, part in split.items():
            self._queues[lane].put((now, part))

    def close(self, timeout: float | None = 30.0) -> None:
        """Deliver what is queued, then stop the threads."""
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def _run(self, inbox: queue.SimpleQueue[tuple[float, list[TokenEvent]] | None]) -> None:
        pending = SendQueue()
        stop = False
        while not (stop and not pending):
            batches = [] if pending else [inbox.get()]  # wait only when nothing is left to send
            while True:  # take everything queued before choosing what to send next
                try:
                    batches.append(inbox.get_nowait())
                except queue.Empty:
                    break
            for batch in batches:
                if batch is None:
                    stop = True
                else:
                    self.timing.add("wake", time.perf_counter() - batch[0])
                    pending.add(batch[1])
            if not pending:
                continue
            delivery = pending.pop()
            started = time.perf_counter()
            try:
                self._deliver(delivery)
                self.timing.add("deliver", time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - a failed send must not stop the other requests' tokens
                if self._on_error is not None:
                    self._on_error(exc)
