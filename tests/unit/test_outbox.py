"""The llm's outbox: the engine thread never waits on sends, tokens that pile up leave together in order, and first
tokens and finals go before the requests that wait."""

from __future__ import annotations

import threading
import time

from vlm_triton.engine.outbox import Delivery, Outbox, SendQueue
from vlm_triton.engine.types import TokenEvent


def ev(rid: str, token: int | None, index: int, reason: str | None = None) -> TokenEvent:
    return TokenEvent(rid, token, reason is not None, reason, index, 5)  # type: ignore[arg-type]


def test_send_queue_merges_each_requests_events_in_order() -> None:
    q = SendQueue()
    q.add([ev("a", 1, 3), ev("b", 7, 5), ev("a", 2, 4), ev("b", 8, 6, "length"), ev("a", 3, 5)])
    b, a = q.pop(), q.pop()  # b's final goes first
    assert not q
    assert (a.request_id, a.tokens, a.final) == ("a", [1, 2, 3], None)
    assert (b.request_id, b.tokens) == ("b", [7, 8]) and b.final is not None and b.final.finish_reason == "length"


def test_tokenless_final_events() -> None:
    q = SendQueue()
    q.add([ev("a", 4, 2), ev("a", None, 3, "cancelled")])
    d = q.pop()
    assert d.tokens == [4] and d.final is not None and d.final.finish_reason == "cancelled"


def test_slow_deliveries_do_not_block_put_and_merge_what_piled_up() -> None:
    sent: list[Delivery] = []
    first_started, release = threading.Event(), threading.Event()

    def deliver(delivery: Delivery) -> None:
        sent.append(delivery)
        first_started.set()
        release.wait(5)

    box = Outbox(deliver)
    box.put([ev("a", 0, 0)])
    assert first_started.wait(5)
    t0 = time.perf_counter()
    for i in range(1, 50):  # the engine keeps stepping while the first send is stuck
        box.put([ev("a", i, i)])
    box.put([ev("a", 50, 50, "length")])
    assert time.perf_counter() - t0 < 0.5
    release.set()
    box.close()
    assert [d.tokens for d in sent] == [[0], list(range(1, 51))]
    assert sent[-1].final is not None


def test_a_failing_delivery_is_reported_and_the_thread_goes_on() -> None:
    errors: list[BaseException] = []
    seen: list[str] = []

    def deliver(delivery: Delivery) -> None:
        seen.append(delivery.request_id)
        if delivery.request_id == "bad":
            raise RuntimeError("send failed")

    box = Outbox(deliver, on_error=errors.append)
    box.put([ev("bad", 1, 0)])
    time.sleep(0.1)
    box.put([ev("good", 2, 0)])
    box.close()
    assert seen == ["bad", "good"] and len(errors) == 1


def test_lanes_overlap_sends_of_different_requests_and_keep_each_request_in_order() -> None:
    lanes = 4
    in_send: set[str] = set()
    overlap = threading.Event()
    lock = threading.Lock()
    got: dict[str, list[int]] = {}
    finals: dict[str, int] = {}

    def deliver(d: Delivery) -> None:
        with lock:
            in_send.add(d.request_id)
            if len(in_send) > 1:
                overlap.set()
        time.sleep(0.002)  # a send is a round trip: mostly waiting
        with lock:
            in_send.discard(d.request_id)
            got.setdefault(d.request_id, []).extend(d.tokens)
            if d.final is not None:
                finals[d.request_id] = finals.get(d.request_id, 0) + 1

    box = Outbox(deliver, lanes=lanes)
    rids = [f"r{i}" for i in range(16)]
    assert len({box.lane_of(r) for r in rids}) > 1
    for step in range(40):
        box.put([ev(r, step, step, "length" if step == 39 else None) for r in rids])
    box.close()
    assert overlap.is_set()
    assert got == {r: list(range(40)) for r in rids}
    assert finals == {r: 1 for r in rids}
    assert len({t.name for t in box._threads}) == lanes


def stuck_first_send() -> tuple[Outbox, list[Delivery], threading.Event, threading.Event]:
    """An outbox whose first send blocks until `release` is set."""
    sent: list[Delivery] = []
    first_started, release = threading.Event(), threading.Event()

    def deliver(delivery: Delivery) -> None:
        if not sent:
            first_started.set()
            release.wait(5)
        sent.append(delivery)

    return Outbox(deliver), sent, first_started, release


def test_queue_sends_first_tokens_and_finals_before_waiting_requests() -> None:
    box, sent, first_started, release = stuck_first_send()
    box.put([ev("a", 0, 0), ev("c", 0, 0)])
    assert first_started.wait(5)  # a's first token is being sent; c's waits
    box.put([ev("a", 1, 1), ev("c", 1, 1)])
    box.put([ev("b", 0, 0)])  # a new request: its first token goes before a's waiting tokens
    box.put([ev("a", 2, 2), ev("c", 2, 2)])
    release.set()
    deadline = time.monotonic() + 5
    while len(sent) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    box.put([ev("a", 3, 3), ev("b", 1, 1), ev("c", 3, 3, "length")])  # c's final goes first
    box.close()
    assert [(d.request_id, d.tokens) for d in sent] == [
        ("a", [0]), ("c", [0, 1, 2]), ("b", [0]), ("a", [1, 2]), ("c", [3]), ("a", [3]), ("b", [1])]
    assert [d.request_id for d in sent if d.final is not None] == ["c"]


def test_queue_moves_a_waiting_request_ahead_when_its_final_arrives() -> None:
    sent: list[Delivery] = []
    x_started, release = threading.Event(), threading.Event()

    def deliver(delivery: Delivery) -> None:
        if delivery.request_id == "x":
            x_started.set()
            release.wait(5)
        sent.append(delivery)

    box = Outbox(deliver)
    box.put([ev("a", 0, 0), ev("b", 0, 0)])
    deadline = time.monotonic() + 5
    while len(sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    box.put([ev("x", 0, 0)])
    assert x_started.wait(5)
    box.put([ev("a", 1, 1), ev("b", 1, 1)])  # both wait, a first
    box.put([ev("b", 2, 2, "stop")])  # b's final: b goes first
    release.set()
    box.close()
    assert [(d.request_id, d.tokens, d.final is not None) for d in sent[2:]] == [
        ("x", [0], False), ("b", [1, 2], True), ("a", [1], False)]

