"""The torch LLM engine against `model.generate`, token for token, on tiny random Qwen2 / Llama models (CPU)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from tests.unit.engine_helpers import (
    MAX_SEQ,
    VOCAB,
    _tiny,
    check_events,
    drain,
    drain_one,
    generate_with_table,
    greedy,
    hf_greedy,
    join_plan,
    make_engine,
    prompt,
    run_plan,
    tokens,
)
from vlm_triton.engine import (
    GenerationRequest,
    TokenEvent,
    attention,
    decode,
    parse_stop_words_list,
)
from vlm_triton.errors import InvalidRequest


# --- (a) (b) greedy equality -----------------------------------------------------------------------------------------
def test_single_prompt_matches_generate(model: PreTrainedModel) -> None:
    ids = prompt(0, 11)
    events = drain_one(make_engine(model), greedy("a", ids, 20))
    assert tokens(events) == hf_greedy(model, ids, 20)
    assert events[-1].finish_reason == "length" and events[-1].prompt_tokens == 11
    check_events(events)


def test_every_wait_for_sampled_tokens_goes_through_the_step_wait(qwen: PreTrainedModel) -> None:
    """The first token's wait and each decode step's go through `engine.step_wait` (step_wait.py: on CUDA it waits on
    an event with the GIL released while `release_gil_when()`, the llm's vision thread busy, item 44)."""
    engine = make_engine(qwen)
    waits: list[int] = []
    tokens_of = engine.step_wait.tokens
    def recording(sampled: torch.Tensor) -> list[int]:
        waits.append(len(sampled))
        return tokens_of(sampled)

    engine.step_wait.tokens = recording  # type: ignore[method-assign]
    assert tokens(drain_one(engine, greedy("a", prompt(0, 7), 5))) == hf_greedy(qwen, prompt(0, 7), 5)
    assert waits == [1] * 5  # one prefill, four decode steps, one request each


@pytest.mark.parametrize("full_kv", [False, True])
def test_join_mid_flight_with_compaction(model: PreTrainedModel, full_kv: bool) -> None:
    engine = make_engine(model, max_slots=4)
    if full_kv:  # the CUDA-graph shape: attend over the whole cache length, masked per row
        eager = engine.decode.forward
        engine.decode.forward = lambda bucket, kv_len: eager(bucket, engine.max_seq_len)  # type: ignore[method-assign]
    plan = join_plan(20)
    events = run_plan(engine, plan)
    for r in [r for rs in plan.values() for r in rs]:
        ids = list(r.input_ids)
        assert tokens(events[r.request_id]) == hf_greedy(model, ids, r.max_new_tokens), r.request_id


# --- (d) image slots ---------------------------------------------------------------------------------------------------
def test_image_slots_match_generate_with_inputs_embeds(model: PreTrainedModel) -> None:
    table = torch.randn(6, 64, generator=torch.Generator().manual_seed(5)) * 0.5
    ids = [3, 17, VOCAB, VOCAB + 1, VOCAB + 2, VOCAB + 3, VOCAB + 4, VOCAB + 5, 44, 9]
    engine = make_engine(model)
    engine.add_request(greedy("text", prompt(30, 6), 7))  # a text-only neighbour in the same batch
    engine.add_request(greedy("img", np.array(ids, dtype=np.int32), 12, prompt_embedding_table=table.numpy()))
    events = drain(engine)
    assert tokens(events["img"]) == generate_with_table(model, ids, table, 12)
    assert tokens(events["text"]) == hf_greedy(model, prompt(30, 6), 7)


def test_image_slot_validation(qwen: PreTrainedModel) -> None:
    engine = make_engine(qwen)
    table = np.zeros((2, 64), np.float32)
    with pytest.raises(InvalidRequest, match="needs row 2"):
        engine.add_request(greedy("x", [1, VOCAB + 2], 3, prompt_embedding_table=table))
    with pytest.raises(InvalidRequest, match="no prompt_embedding_table"):
        engine.add_request(greedy("x", [1, VOCAB], 3))
    with pytest.raises(InvalidRequest, match="must be \\[rows, 64\\]"):
        engine.add_request(greedy("x", [1, VOCAB], 3, prompt_embedding_table=np.zeros((2, 32), np.float32)))


# --- (e) stop conditions -----------------------------------------------------------------------------------------------
def test_eos_length_and_stop_words(qwen: PreTrainedModel) -> None:
    ids = prompt(40, 7)
    free = hf_greedy(qwen, ids, 16)
    eos = free[4] if free[4] not in free[:4] else free[5]
    first = free.index(eos)
    word = free[6:8]
    word_end = next(i for i in range(len(word) - 1, len(free)) if free[i - len(word) + 1 : i + 1] == word) + 1
    engine = make_engine(qwen)
    engine.add_request(greedy("eos", ids, 16, end_id=eos))
    engine.add_request(greedy("ignore", ids, 16, end_id=eos, ignore_eos=True))
    engine.add_request(greedy("len", ids, 5))
    engine.add_request(greedy("word", ids, 16, stop_words=[[VOCAB - 1, VOCAB - 2], word]))
    engine.add_request(greedy("clip", prompt(41, MAX_SEQ - 3), 50))
    events = drain(engine)
    assert tokens(events["eos"]) == free[: first + 1] == hf_greedy(qwen, ids, 16, eos_token_id=eos)
    assert events["eos"][-1].finish_reason == "stop"
    assert tokens(events["ignore"]) == free and events["ignore"][-1].finish_reason == "length"
    assert tokens(events["len"]) == free[:5] and events["len"][-1].finish_reason == "length"
    assert tokens(events["word"]) == free[:word_end] and events["word"][-1].finish_reason == "stop"
    assert len(tokens(events["clip"])) == 3 and events["clip"][-1].finish_reason == "length"


def test_parse_stop_words_list() -> None:
    arr = np.array([[5, 6, 7, 0], [2, 3, -1, -1]], dtype=np.int32)
    assert parse_stop_words_list(arr) == [[5, 6], [7]]
    assert parse_stop_words_list(arr[None]) == [[5, 6], [7]]
    assert parse_stop_words_list(np.array([[0], [-1]], np.int32)) == []
    assert parse_stop_words_list(None) == []
    with pytest.raises(InvalidRequest):
        parse_stop_words_list(np.array([[1, 2], [5, -1]], np.int32))
    with pytest.raises(InvalidRequest):
        parse_stop_words_list(np.zeros((3, 2), np.int32))


# --- (f) cancellation --------------------------------------------------------------------------------------------------
def test_cancel_frees_slot(qwen: PreTrainedModel) -> None:
    engine = make_engine(qwen, max_slots=2)
    for rid in ("a", "b", "waiting", "late"):
        engine.add_request(greedy(rid, prompt(50, 6), 30))
    first = engine.step()
    assert {e.request_id for e in first} == {"a", "b"} and engine.active_slots() == {"a": 0, "b": 1}
    engine.cancel("a")
    engine.cancel("waiting")
    engine.cancel("unknown")
    second = {e.request_id: e for e in engine.step()}
    assert second["a"].finished and second["a"].finish_reason == "cancelled" and second["a"].token_id is None
    assert second["waiting"].finish_reason == "cancelled"
    assert not second["b"].finished and second["late"].index == 0  # "late" took the freed slot
    assert engine.active_slots() == {"b": 0, "late": 1}
    events = drain(engine)
    assert [second["late"].token_id, *tokens(events["late"])] == hf_greedy(qwen, prompt(50, 6), 30)
    engine.add_request(greedy("a", prompt(50, 6), 2))  # the id is free again
    assert len(tokens(drain(engine)["a"])) == 2


# --- (g) seeded sampling ------------------------------------------------------------------------------------------------
def test_seeded_sampling_reproducible(qwen: PreTrainedModel) -> None:
    def sampled(rid: str, seed: int) -> GenerationRequest:
        return GenerationRequest(rid, prompt(60, 8), 20, temperature=1.0, top_k=50, top_p=0.95, seed=seed)

    engine = make_engine(qwen)
    engine.add_request(sampled("solo", 7))
    solo = tokens(drain(engine)["solo"])
    engine.add_request(greedy("g", prompt(61, 5), 10))
    for rid, seed in (("same", 7), ("other", 8), ("again", 7)):
        engine.add_request(sampled(rid, seed))
    events = drain(engine)
    assert tokens(events["same"]) == solo == tokens(events["again"])
    assert tokens(events["other"]) != solo


def test_repetition_penalty_matches_generate(qwen: PreTrainedModel) -> None:
    engine = make_engine(qwen, max_slots=2)
    reqs = [greedy(f"p{i}", prompt(70 + i, 4 + 3 * i), 12 + i, repetition_penalty=1.8) for i in range(3)]
    for r in reqs:
        engine.add_request(r)
    events = drain(engine)
    for r in reqs:
        ref = hf_greedy(qwen, list(r.input_ids), r.max_new_tokens, repetition_penalty=1.8)
        assert tokens(events[r.request_id]) == ref


# --- (i) validation -----------------------------------------------------------------------------------------------------
def test_invalid_requests(qwen: PreTrainedModel) -> None:
    engine = make_engine(qwen)
    with pytest.raises(InvalidRequest, match="at most"):
        engine.add_request(greedy("long", prompt(0, MAX_SEQ), 1))
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        engine.add_request(greedy("zero", [1, 2], 0))
    with pytest.raises(InvalidRequest, match="empty"):
        engine.add_request(greedy("empty", [], 3))
    with pytest.raises(InvalidRequest, match="temperature"):
        engine.add_request(GenerationRequest("t", [1], 3, temperature=-1.0))
    engine.add_request(greedy("dup", [1, 2], 3))
    with pytest.raises(InvalidRequest, match="already in flight"):
        engine.add_request(greedy("dup", [1, 2], 3))
    assert not engine.has_work() or engine.step()


# --- background loop ---------------------------------------------------------------------------------------------------
def test_background_loop_blocks_when_idle(qwen: PreTrainedModel) -> None:
    engine = make_engine(qwen)
    steps = 0
    step = engine.step

    def counting_step() -> list[TokenEvent]:
        nonlocal steps
        steps += 1
        return step()

    engine.step = counting_step  # type: ignore[method-assign]
    got: dict[str, list[TokenEvent]] = defaultdict(list)
    done = threading.Event()

    def callback(events: list[TokenEvent]) -> None:
        for e in events:
            got[e.request_id].append(e)
        if all(got[r] and got[r][-1].finished for r in ("x", "y")):
            done.set()

    engine.start(callback)
    try:
        engine.add_request(greedy("x", prompt(80, 5), 6))
        engine.add_request(greedy("y", prompt(81, 9), 9))
        assert done.wait(30)
        idle_steps = steps
        time.sleep(0.3)
        assert steps == idle_steps  # asleep on the condition variable, not spinning
        engine.add_request(greedy("z", prompt(82, 3), 50))
        engine.shutdown()
    finally:
        engine.shutdown()
    assert tokens(got["x"]) == hf_greedy(qwen, prompt(80, 5), 6)
    assert tokens(got["y"]) == hf_greedy(qwen, prompt(81, 9), 9)
    assert got["z"][-1].finished and got["z"][-1].finish_reason in ("cancelled", "length")


# --- (e) the varlen decode path's inputs (cache row view, used lengths, row offsets), checked on the CPU -------------
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_varlen_decode_inputs_match_generate(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the decode attention is FA2's varlen kernel over the cache's rows (engine/attention.py); here a
    plain per-row SDPA over exactly the rows [cu_k[b], cu_k[b] + lengths[b]) stands in for the kernel, so the
    engine's row view, lengths and offsets must reproduce `generate` token for token."""
    model = _tiny(kind)
    calls: list[int] = []

    def varlen_reference(query: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                         rows: attention.DecodeRows, scale: float) -> torch.Tensor:
        out = []
        for b in range(query.shape[0]):
            start, n = int(rows.cu_k[b]), int(rows.lengths[b])
            assert 1 <= n <= rows.max_k and int(rows.cu_q[b]) == b
            k, v = (t[start : start + n].transpose(0, 1)[None] for t in (k_rows, v_rows))
            o = F.scaled_dot_product_attention(query[b : b + 1], k, v, scale=scale, enable_gqa=True)
            out.append(o.transpose(1, 2))
        calls.append(query.shape[0])
        return torch.cat(out)

    monkeypatch.setattr(decode, "decode_reads_rows", lambda device, dtype, head_dim, **_: True)
    monkeypatch.setattr(attention, "flash_decode", varlen_reference)
    plan = join_plan(70)
    events = run_plan(make_engine(model, max_slots=4), plan)
    assert calls  # every decode step went through the varlen path
    for r in [r for rs in plan.values() for r in rs]:
        assert tokens(events[r.request_id]) == hf_greedy(model, list(r.input_ids), r.max_new_tokens), r.request_id
