"""Decode steps launched ahead of their predecessor's tokens (engine/run_ahead.py): the same events as one step at
a time, with requests joining, leaving by EOS, stop words and length, cancelled mid-flight, sampled with seeds."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from tests.unit.engine_helpers import VOCAB, greedy, hf_greedy, make_engine, prompt, qwen  # noqa: F401

from vlm_triton.engine import GenerationRequest, LLMEngine, TokenEvent
from vlm_triton.engine.run_ahead import LaunchedStep, may_run_ahead
from vlm_triton.engine.types import prepare_request


def plan_of(free: list[int]) -> dict[int, list[GenerationRequest]]:
    """step -> arrivals: EOS and a stop word in mid-decode, lengths that end on different steps, late joiners."""
    eos = free[6] if free[6] not in free[:6] else free[7]
    return {
        0: [greedy("eos", prompt(80, 7), 20, end_id=eos), greedy("long", prompt(81, 9), 30),
            greedy("word", prompt(80, 7), 20, stop_words=[free[9:11]])],
        3: [greedy("late", prompt(82, 5), 12),
            GenerationRequest("seeded", prompt(83, 6), 15, temperature=0.9, top_p=0.9, seed=3)],
        5: [greedy("cancelled", prompt(84, 4), 25)],
        11: [greedy("last", prompt(85, 12), 6, end_id=-1)],
    }


def run_events(engine: LLMEngine, plan: dict[int, list[GenerationRequest]]) -> dict[str, list[tuple]]:
    events: dict[str, list[TokenEvent]] = {}
    step = 0
    while step < 500:
        for req in plan.get(step, []):
            engine.add_request(req)
        if step == 9:
            engine.cancel("cancelled")
        if not engine.has_work() and step > max(plan, default=0):
            break
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
        step += 1
    return {rid: [(e.token_id, e.index, e.finished, e.finish_reason) for e in evs] for rid, evs in events.items()}


@pytest.mark.parametrize("pool", [0, 160])  # 160 rows: the requests' runs lie next to each other
def test_run_ahead_gives_the_events_of_one_step_at_a_time(qwen: PreTrainedModel, pool: int) -> None:  # noqa: F811
    free = hf_greedy(qwen, prompt(80, 7), 20)
    ahead = make_engine(qwen, max_slots=4, kv_cache_tokens=pool)
    stepwise = make_engine(qwen, max_slots=4, kv_cache_tokens=pool, run_ahead=False)
    got, want = run_events(ahead, plan_of(free)), run_events(stepwise, plan_of(free))
    assert got == want
    assert ahead.decoding.launched_ahead > 10 and stepwise.decoding.launched_ahead == 0
    assert got["eos"][-1][3] == "stop" and got["word"][-1][3] == "stop" and got["cancelled"][-1][3] == "cancelled"
    assert [t for t, *_ in got["long"]] == hf_greedy(qwen, prompt(81, 9), 30)
    assert not ahead.has_work() and ahead.admission.pool.free_runs() == stepwise.admission.pool.free_runs()


def _seq(rid: str, generated: int, max_new: int, **kw: object) -> object:
    seq = prepare_request(GenerationRequest(rid, [1, 2, 3], max_new, temperature=0.0, **kw),  # type: ignore[arg-type]
                          vocab_size=VOCAB, hidden_size=64, max_seq_len=64)
    seq.generated = list(range(generated))
    return seq


def test_a_step_runs_ahead_only_when_nothing_can_change_before_it() -> None:
    a, b = _seq("a", 3, 10), _seq("b", 8, 10)
    step = LaunchedStep([a, b], torch.zeros(2, dtype=torch.long), None, None)
    assert may_run_ahead(step, changed=False)
    assert not may_run_ahead(step, changed=True)  # a release or a prefill since the step was loaded
    last = _seq("b", 9, 10)  # the step's token is its last: the next step would run without it
    assert not may_run_ahead(LaunchedStep([a, last], step.tokens, None, None), changed=False)
    for penalty in ({"repetition_penalty": 1.2}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5}):
        pen = _seq("p", 1, 10, **penalty)  # its history takes each token on the host before the next step
        assert not may_run_ahead(LaunchedStep([a, pen], step.tokens, None, None), changed=False)


@pytest.mark.parametrize("max_slots", [1, 3])
def test_run_ahead_with_penalties_and_full_slots(qwen: PreTrainedModel, max_slots: int) -> None:  # noqa: F811
    reqs = [greedy(f"r{i}", prompt(90 + i, 5 + i), 9 + i, repetition_penalty=1.5 if i == 1 else 1.0) for i in range(4)]
    ahead, stepwise = make_engine(qwen, max_slots=max_slots), make_engine(qwen, max_slots=max_slots, run_ahead=False)
    for engine in (ahead, stepwise):
        for r in reqs:
            engine.add_request(r)
    assert run_events(ahead, {}) == run_events(stepwise, {})


def test_no_step_runs_past_a_request_that_ends_by_length(qwen: PreTrainedModel) -> None:  # noqa: F811
    """"short" ends by length while "next" decodes in the run of KV rows right after its own: a step launched ahead
    for "short" would write K/V one row past its run, over the first row of "next"."""
    engine = make_engine(qwen, max_slots=4, kv_cache_tokens=160)
    engine.add_request(greedy("short", prompt(95, 5), 4))
    engine.add_request(greedy("next", prompt(96, 6), 20))
    events: dict[str, list[int]] = {"short": [], "next": []}
    while engine.has_work():
        for ev in engine.step():
            events[ev.request_id] += [] if ev.token_id is None else [ev.token_id]
    assert events["short"] == hf_greedy(qwen, prompt(95, 5), 4)
    assert events["next"] == hf_greedy(qwen, prompt(96, 6), 20)
    assert engine.decoding.launched_ahead > 0
