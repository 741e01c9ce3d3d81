"""The torch LLM engine against `model.generate`, token for token, on tiny random Qwen2 / Llama models (CPU)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from vlm_triton.engine import attention
from vlm_triton.engine import GenerationRequest, LLMEngine, TokenEvent, parse_stop_words_list
from vlm_triton.engine.types import TokenIds
from vlm_triton.errors import InvalidRequest

VOCAB = 300
MAX_SEQ = 96


def _tiny(kind: str) -> PreTrainedModel:
    torch.manual_seed(1234)
    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,  # larger than the default: well separated logits, no argmax near-ties
        attn_implementation="eager" if kind.endswith("eager") else "sdpa",
    )
    model: PreTrainedModel = (
        Qwen2ForCausalLM(Qwen2Config(**common)) if kind.startswith("qwen2") else LlamaForCausalLM(LlamaConfig(**common))
    )
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen2-eager"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return _tiny(request.param)


@pytest.fixture(scope="module")
def qwen() -> PreTrainedModel:
    return _tiny("qwen2")


def make_engine(model: PreTrainedModel, max_slots: int = 8, max_seq_len: int = MAX_SEQ, **kw: Any) -> LLMEngine:
    return LLMEngine(  # small KV-length buckets: decode steps cross buckets as requests grow
        model, max_slots=max_slots, max_seq_len=max_seq_len, device="cpu", dtype=torch.float32, vocab_size=VOCAB,
        min_kv_bucket=16, **kw,
    )


def greedy(request_id: str, ids: TokenIds, n: int, **kw: Any) -> GenerationRequest:
    return GenerationRequest(request_id, ids, max_new_tokens=n, temperature=0.0, **kw)


@torch.no_grad()
def hf_greedy(model: PreTrainedModel, ids: list[int], n: int, **kw: object) -> list[int]:
    # an explicit mask: without one generate masks out every prompt id equal to pad_token_id (0 here)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, **kw)
    return out[0, len(ids) :].tolist()


def drain(engine: LLMEngine, on_step: Callable[[int], None] | None = None) -> dict[str, list[TokenEvent]]:
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    step = 0
    while True:
        if on_step is not None:
            on_step(step)  # arrivals before the step
        if not engine.has_work():
            break
        for ev in engine.step():
            events[ev.request_id].append(ev)
        step += 1
        assert step < 1000
    return events


def tokens(evs: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in evs if e.token_id is not None]


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_events(evs: list[TokenEvent]) -> None:
    assert [e.index for e in evs] == list(range(len(evs)))
    assert all(not e.finished for e in evs[:-1]) and evs[-1].finished


# --- (a) (b) greedy equality -----------------------------------------------------------------------------------------
def test_single_prompt_matches_generate(model: PreTrainedModel) -> None:
    ids = prompt(0, 11)
    events = drain_one(make_engine(model), greedy("a", ids, 20))
    assert tokens(events) == hf_greedy(model, ids, 20)
    assert events[-1].finish_reason == "length" and events[-1].prompt_tokens == 11
    check_events(events)


def drain_one(engine: LLMEngine, req: GenerationRequest) -> list[TokenEvent]:
    engine.add_request(req)
    return drain(engine)[req.request_id]


# prompts of 3, 17, 1, 30 and 8 tokens -> prefill batches by the token budget (count x longest prompt); a prompt
# longer than the budget is prefilled in chunks (30 tokens at 20: two forwards, the request completes in the second)
@pytest.mark.parametrize("budget,batches,forwards", [(8192, [5], 1), (40, [2, 1, 1, 1], 4), (20, [1, 1, 1, 1, 1], 6)])
def test_ragged_batch_matches_generate(model: PreTrainedModel, budget: int, batches: list[int], forwards: int) -> None:
    engine = make_engine(model, prefill_tokens=budget)
    reqs = [
        greedy(f"r{i}", prompt(10 + i, n), m) for i, (n, m) in enumerate([(3, 14), (17, 9), (1, 12), (30, 16), (8, 5)])
    ]
    for r in reqs:
        engine.add_request(r)
    admitted: list[int] = []

    def count(step: int) -> None:
        admitted.append(engine.prefill_requests - sum(admitted))

    events = drain(engine, count)
    for r in reqs:
        check_events(events[r.request_id])
        assert tokens(events[r.request_id]) == hf_greedy(model, list(r.input_ids), r.max_new_tokens), r.request_id
    assert engine.active_slots() == {}
    assert [n for n in admitted if n] == batches and engine.prefill_batches == forwards


# --- (b2) chunked prefill: prompts longer than the budget, in chunks between decode steps -----------------------------
@pytest.mark.parametrize("budget", [1, 7, 16])
def test_chunked_prefill_matches_generate(model: PreTrainedModel, budget: int) -> None:
    """Long prompts arrive while others decode; each is prefilled chunk by chunk (one chunk per step, decoding goes
    on), then joins the running batch. Chunks that start mid-prompt attend to the earlier chunks in the spare slot;
    with budget 1 every prompt token is its own forward."""
    engine = make_engine(model, max_slots=4, prefill_tokens=budget)
    plan = {
        0: [greedy("short", prompt(40, 3), 20), greedy("long", prompt(41, 37), 9)],
        2: [greedy("mid", prompt(42, 12), 12)],
        5: [greedy("long2", prompt(43, 50), 6), greedy("tiny", prompt(44, 1), 4)],
    }
    chunking_while_decoding = []

    def arrive(step: int) -> None:
        for r in plan.get(step, []):
            engine.add_request(r)
        chunking_while_decoding.append(engine._chunking is not None and bool(engine.active_slots()))

    events = drain(engine, arrive)
    for r in [r for rs in plan.values() for r in rs]:
        check_events(events[r.request_id])
        assert tokens(events[r.request_id]) == hf_greedy(model, list(r.input_ids), r.max_new_tokens), r.request_id
    long_prompts = sum(-(-n // budget) for n in (37, 12, 50, 3) if n > budget)
    assert engine.prefill_chunks == long_prompts
    assert any(chunking_while_decoding) and engine.active_slots() == {}


@torch.no_grad()
def test_chunked_prefill_image_rows_across_chunks(qwen: PreTrainedModel) -> None:
    """Image rows split over chunk boundaries embed from the request's table as in one forward."""
    table = torch.randn(9, 64, generator=torch.Generator().manual_seed(6)) * 0.5
    ids = [3, 17, *range(VOCAB, VOCAB + 9), 44, 9, 12]
    engine = make_engine(qwen, prefill_tokens=4)
    engine.add_request(greedy("img", np.array(ids, dtype=np.int32), 10, prompt_embedding_table=table.numpy()))
    events = drain(engine)
    t = torch.tensor(ids)
    embeds = qwen.get_input_embeddings()(t.clamp(max=VOCAB - 1)).clone()
    embeds[t >= VOCAB] = table[t[t >= VOCAB] - VOCAB]
    ref = qwen.generate(inputs_embeds=embeds[None], do_sample=False, max_new_tokens=10)[0].tolist()
    assert tokens(events["img"]) == ref and engine.prefill_chunks == 4


def test_chunked_prefill_cancel_and_penalties(qwen: PreTrainedModel) -> None:
    """A cancel during the chunks ends the request and frees the spare slot for the next long prompt; the next one
    (with a repetition penalty, whose history covers the whole prompt) still matches generate."""
    engine = make_engine(qwen, prefill_tokens=5)
    engine.add_request(greedy("gone", prompt(50, 23), 5))
    engine.add_request(greedy("next", prompt(51, 19), 8, repetition_penalty=1.3))
    first = engine.step()
    assert first == [] and engine._chunking is not None and engine._chunking.request_id == "gone"
    engine.cancel("gone")
    events = drain(engine)
    assert [e.finish_reason for e in events["gone"]] == ["cancelled"]
    assert tokens(events["next"]) == hf_greedy(qwen, prompt(51, 19), 8, repetition_penalty=1.3)


# --- (c) requests join mid-flight and leave at different times; slots are compacted ------------------------------------
def join_plan(seed: int) -> dict[int, list[GenerationRequest]]:
    """step -> requests arriving before it (6 requests for 4 slots: some wait for a free slot)."""
    return {
        0: [
            greedy("a", prompt(seed, 5), 3),
            greedy("b", prompt(seed + 1, 12), 15),
            greedy("c", prompt(seed + 2, 2), 6),
        ],
        2: [greedy("d", prompt(seed + 3, 9), 10)],
        4: [greedy("e", prompt(seed + 4, 4), 4), greedy("f", prompt(seed + 5, 20), 8)],
    }


def run_plan(engine: LLMEngine, plan: dict[int, list[GenerationRequest]]) -> dict[str, list[TokenEvent]]:
    seen_slots: dict[str, set[int]] = defaultdict(set)

    def arrive(step: int) -> None:
        for r in plan.get(step, []):
            engine.add_request(r)
        for rid, slot in engine.active_slots().items():
            seen_slots[rid].add(slot)
        assert sorted(engine.active_slots().values()) == list(range(len(engine.active_slots())))  # compact

    events = drain(engine, arrive)
    assert engine.slot_moves > 0
    assert any(len(s) > 1 for s in seen_slots.values())  # some request was moved to another slot
    for r in [r for rs in plan.values() for r in rs]:
        check_events(events[r.request_id])
    return events


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
@torch.no_grad()
def test_image_slots_match_generate_with_inputs_embeds(model: PreTrainedModel) -> None:
    table = torch.randn(6, 64, generator=torch.Generator().manual_seed(5)) * 0.5
    ids = [3, 17, VOCAB, VOCAB + 1, VOCAB + 2, VOCAB + 3, VOCAB + 4, VOCAB + 5, 44, 9]
    engine = make_engine(model)
    engine.add_request(greedy("text", prompt(30, 6), 7))  # a text-only neighbour in the same batch
    engine.add_request(greedy("img", np.array(ids, dtype=np.int32), 12, prompt_embedding_table=table.numpy()))
    events = drain(engine)

    t = torch.tensor(ids)
    embeds = model.get_input_embeddings()(t.clamp(max=VOCAB - 1)).clone()
    embeds[t >= VOCAB] = table[t[t >= VOCAB] - VOCAB]
    ref = model.generate(inputs_embeds=embeds[None], do_sample=False, max_new_tokens=12)[0].tolist()
    assert tokens(events["img"]) == ref
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
                         rows: attention.DecodeRows, kv_len: int, scale: float) -> torch.Tensor:
        out = []
        for b in range(query.shape[0]):
            start, n = int(rows.cu_k[b]), int(rows.lengths[b])
            assert 1 <= n <= kv_len and int(rows.cu_q[b]) == b
            k, v = (t[start : start + n].transpose(0, 1)[None] for t in (k_rows, v_rows))
            o = F.scaled_dot_product_attention(query[b : b + 1], k, v, scale=scale, enable_gqa=True)
            out.append(o.transpose(1, 2))
        calls.append(query.shape[0])
        return torch.cat(out)

    monkeypatch.setattr(attention, "_flash_applies", lambda query: True)
    monkeypatch.setattr(attention, "flash_decode", varlen_reference)
    plan = join_plan(70)
    events = run_plan(make_engine(model, max_slots=4), plan)
    assert calls  # every decode step went through the varlen path
    for r in [r for rs in plan.values() for r in rs]:
        assert tokens(events[r.request_id]) == hf_greedy(model, list(r.input_ids), r.max_new_tokens), r.request_id
