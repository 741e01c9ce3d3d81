"""The llm's outbox: the engine thread never waits on sends, and tokens that pile up leave together, in order."""

from __future__ import annotations

import threading
import time

from vlm_triton.engine.outbox import Delivery, Outbox, coalesce
from vlm_triton.engine.types import TokenEvent


def ev(rid: str, token: int | None, index: int, reason: str | None = None) -> TokenEvent:
    return TokenEvent(rid, token, reason is not None, reason, index, 5)  # type: ignore[arg-type]


def test_coalesce_groups_by_request_in_order() -> None:
    events = [ev("a", 1, 0), ev("b", 7, 0), ev("a", 2, 1), ev("b", 8, 1, "length"), ev("a", 3, 2)]
    got = coalesce(events)
    assert [(d.request_id, d.tokens) for d in got] == [("a", [1, 2, 3]), ("b", [7, 8])]
    assert got[0].final is None and got[1].final is not None and got[1].final.finish_reason == "length"


def test_tokenless_final_events() -> None:
    (d,) = coalesce([ev("a", 4, 0), ev("a", None, 1, "cancelled")])
    assert d.tokens == [4] and d.final is not None and d.final.finish_reason == "cancelled"


def test_slow_deliveries_do_not_block_put_and_merge_what_piled_up() -> None:
    rounds: list[list[Delivery]] = []
    first_started, release = threading.Event(), threading.Event()

    def deliver(deliveries: list[Delivery]) -> None:
        rounds.append(deliveries)
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
    assert [d.tokens for r in rounds for d in r] == [[0], list(range(1, 51))]
    assert rounds[-1][0].final is not None


def test_a_failing_delivery_is_reported_and_the_thread_goes_on() -> None:
    errors: list[BaseException] = []
    seen: list[str] = []

    def deliver(deliveries: list[Delivery]) -> None:
        seen.extend(d.request_id for d in deliveries)
        if deliveries[0].request_id == "bad":
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

    def deliver(deliveries: list[Delivery]) -> None:
        for d in deliveries:
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
