"""The KV pool: its row allocator (first fit, coalescing) and the engine serving from a pool smaller than
max_slots x max_seq_len (requests wait for rows, reuse freed rows, and still decode as `generate` does)."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from transformers import PreTrainedModel

from tests.unit.engine_helpers import (
    check_events,
    drain,
    greedy,
    hf_greedy,
    join_plan,
    make_engine,
    model,  # noqa: F401 - fixture
    prompt,
    qwen,  # noqa: F401 - fixture
    tokens,
)
from vlm_triton.engine.kv_pool import RowPool
from vlm_triton.errors import SetupError


def test_first_fit_and_coalescing() -> None:
    pool = RowPool(10)
    assert [pool.reserve(3), pool.reserve(3), pool.reserve(3)] == [0, 3, 6]
    assert pool.reserve(2) is None and pool.free_rows == 1 and pool.free_runs() == [(9, 1)]
    pool.release(3, 3)
    assert pool.free_runs() == [(3, 3), (9, 1)]
    assert pool.reserve(4) is None  # 4 rows are free, but not in one run
    pool.release(0, 3)  # merges right
    pool.release(6, 3)  # merges left and right: everything but nothing is reserved
    assert pool.free_runs() == [(0, 10)] and pool.free_rows == 10
    assert pool.reserve(10) == 0 and pool.free_runs() == []


def test_release_checks_the_run() -> None:
    pool = RowPool(8)
    start = pool.reserve(4)
    assert start == 0
    with pytest.raises(ValueError, match="free already"):
        pool.release(2, 4)  # rows 4..5 were never reserved
    with pytest.raises(ValueError, match="not inside"):
        pool.release(6, 4)
    pool.release(0, 4)
    with pytest.raises(ValueError, match="free already"):
        pool.release(0, 4)  # twice
    with pytest.raises(ValueError):
        pool.reserve(0)


def test_random_reservations_match_a_row_map() -> None:
    """Against a per-row map: reserved runs never overlap, first fit picks the lowest start, free runs coalesce."""
    rng = random.Random(7)
    pool = RowPool(64)
    owner: list[int | None] = [None] * 64
    live: dict[int, tuple[int, int]] = {}
    for step in range(2000):
        if live and rng.random() < 0.45:
            key = rng.choice(list(live))
            start, n = live.pop(key)
            pool.release(start, n)
            owner[start : start + n] = [None] * n
        else:
            n = rng.randint(1, 12)
            runs = [i for i in range(64 - n + 1) if all(o is None for o in owner[i : i + n])]
            start = pool.reserve(n)
            assert start == (runs[0] if runs else None)
            if start is not None:
                owner[start : start + n] = [step] * n
                live[step] = (start, n)
        assert pool.free_rows == owner.count(None)
        free = pool.free_runs()
        assert all(a + n < b for (a, n), (b, _) in zip(free, free[1:]))  # sorted, never adjacent (coalesced)


def test_pool_below_max_seq_len_is_refused(qwen: PreTrainedModel) -> None:  # noqa: F811
    with pytest.raises(SetupError, match=r"kv_cache_tokens 39 must be in \[max_seq_len=40"):
        make_engine(qwen, max_slots=4, max_seq_len=40, kv_cache_tokens=39)


@pytest.mark.parametrize("prefill_tokens", [8192, 8])
def test_small_pool_waits_reuses_rows_and_matches_generate(model: PreTrainedModel,  # noqa: F811
                                                           prefill_tokens: int) -> None:
    """Six requests needing 92 rows together through a 40-row pool (4 slots): some wait for rows rather than for a
    slot, freed rows are reserved again, the running requests' runs never overlap, and every request decodes as
    `generate` (prefill_tokens 8: the long prompts are prefilled in chunks into their own runs)."""
    engine = make_engine(model, max_slots=4, max_seq_len=40, kv_cache_tokens=40, prefill_tokens=prefill_tokens)
    assert engine.cache.capacity == 40 and engine.cache.trash_row == 40
    plan = join_plan(30)
    starts: dict[int, set[str]] = defaultdict(set)

    def arrive(step: int) -> None:
        for r in plan.get(step, []):
            engine.add_request(r)
        owners = [*engine._active, *([engine._chunking] if engine._chunking else [])]
        runs = sorted((s.kv_start, s.kv_start + s.kv_rows) for s in owners)
        assert all(0 <= a < b <= 40 for a, b in runs)
        assert all(b <= c for (_, b), (c, _) in zip(runs, runs[1:]))  # disjoint
        assert engine.admission.pool.free_rows == 40 - sum(s.kv_rows for s in owners)
        for s in owners:
            assert s.kv_rows == s.prompt_len + s.max_new - 1
            starts[s.kv_start].add(s.request_id)

    events = drain(engine, arrive)
    assert engine.admission.kv_waits > 0  # waited for rows with a slot free
    assert any(len(ids) > 1 for ids in starts.values())  # a run of rows served two requests
    assert engine.admission.pool.free_rows == 40 and engine.admission.pool.free_runs() == [(0, 40)]
    for r in [r for rs in plan.values() for r in rs]:
        check_events(events[r.request_id])
        assert tokens(events[r.request_id]) == hf_greedy(model, list(r.input_ids), r.max_new_tokens), r.request_id


def test_cancelled_and_failed_requests_give_their_rows_back(qwen: PreTrainedModel) -> None:  # noqa: F811
    engine = make_engine(qwen, max_slots=4, max_seq_len=40, kv_cache_tokens=40, prefill_tokens=8)
    engine.add_request(greedy("long", prompt(5, 20), 5))  # chunked: holds 24 rows from its first chunk
    engine.step()
    assert engine._chunking is not None and engine.admission.pool.free_rows == 16
    engine.cancel("long")
    engine.add_request(greedy("run", prompt(6, 6), 30))
    evs = engine.step()
    assert [e.finish_reason for e in evs if e.request_id == "long"] == ["cancelled"]
    assert engine.admission.pool.free_rows == 40 - 35
    engine.cancel("run")
    drain(engine)
    assert engine.admission.pool.free_rows == 40
    engine.prefill = None  # type: ignore[assignment]  # the next prefill raises: its request fails, rows come back
    engine.add_request(greedy("bad", prompt(7, 4), 3))
    evs = engine.step()
    assert [e.finish_reason for e in evs] == ["error"] and engine.admission.pool.free_rows == 40


def test_default_pool_hands_out_whole_slots(qwen: PreTrainedModel) -> None:  # noqa: F811
    """kv_cache_tokens 0: max_slots x max_seq_len rows in runs of max_seq_len, so a free slot always has its rows
    (first fit over mixed run lengths could leave a request waiting with a slot free); requests of mixed lengths
    arriving and leaving never wait for rows, and each holds an aligned max_seq_len run."""
    engine = make_engine(qwen, max_slots=3, max_seq_len=24)
    assert engine.cache.capacity == 72
    lengths = [(4, 2), (9, 12), (4, 2), (9, 10), (5, 3), (3, 20), (12, 2), (2, 5)]
    plan = {2 * k: [greedy(f"r{k}", prompt(200 + k, n), out)] for k, (n, out) in enumerate(lengths)}

    def arrive(step: int) -> None:
        for r in plan.get(step, []):
            engine.add_request(r)
        for s in engine._active:
            assert s.kv_rows == 24 and s.kv_start % 24 == 0

    events = drain(engine, arrive)
    assert engine.admission.kv_waits == 0 and engine.admission.pool.free_rows == 72
    for r in [r for rs in plan.values() for r in rs]:
        assert tokens(events[r.request_id]) == hf_greedy(qwen, list(r.input_ids), r.max_new_tokens), r.request_id


def test_gathered_rows_stay_within_each_request() -> None:
    """The padded view of the gather paths repeats a request's last written row instead of reading past it (rows of
    other requests, or the trash row, whose contents are not finite-guaranteed, would survive masking as NaN)."""
    import torch

    from vlm_triton.engine.kv_cache import span_rows

    got = span_rows(torch.tensor([10, 0, 40]), 5, torch.tensor([2, 4, 0]))
    assert got.tolist() == [[10, 11, 12, 12, 12], [0, 1, 2, 3, 4], [40, 40, 40, 40, 40]]
    assert span_rows(torch.tensor([7]), 3, 2).tolist() == [[7, 8, 9]]
