"""Engine prefill against `model.generate`: batched prompts under a token budget, and chunked prefill of prompts
longer than the budget (between decode steps, image rows across chunks, cancel mid-chunks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel

from tests.unit.engine_helpers import (
    VOCAB,
    check_events,
    drain,
    generate_with_table,
    greedy,
    hf_greedy,
    make_engine,
    prompt,
    tokens,
)


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
    on), then joins the running batch. Chunks that start mid-prompt attend to the earlier chunks in the request's rows;
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


def test_chunked_prefill_image_rows_across_chunks(qwen: PreTrainedModel) -> None:
    """Image rows split over chunk boundaries embed from the request's table as in one forward."""
    table = torch.randn(9, 64, generator=torch.Generator().manual_seed(6)) * 0.5
    ids = [3, 17, *range(VOCAB, VOCAB + 9), 44, 9, 12]
    engine = make_engine(qwen, prefill_tokens=4)
    engine.add_request(greedy("img", np.array(ids, dtype=np.int32), 10, prompt_embedding_table=table.numpy()))
    events = drain(engine)
    assert tokens(events["img"]) == generate_with_table(qwen, ids, table, 10) and engine.prefill_chunks == 4


def test_chunked_prefill_cancel_and_penalties(qwen: PreTrainedModel) -> None:
    """A cancel during the chunks ends the request and frees its rows for the next long prompt; the next one
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


# --- (b3) the packed prefill padded to its token buckets, as its CUDA graphs run it ---------------------------------
def test_packed_prefill_padded_to_buckets_matches_generate(qwen: PreTrainedModel) -> None:
    """Every packed forward run at its bucket's length (the graphs' shapes; padding tokens write the trash row and
    belong to no sequence), with the chunked prompt's rows holding a prefix across steps: tokens as `generate`, and
    the trash row is the pool's row past its capacity, which no request owns."""
    from vlm_triton.engine.packed import PackedPrefill, token_buckets

    assert token_buckets(4095) == [64, 128, 256, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072,
                                   3584, 4095]
    assert token_buckets(64) == [64] and token_buckets(600) == [64, 128, 256, 512, 600]
    assert token_buckets(8192)[-5:] == [4096, 5120, 6144, 7168, 8192]  # W1's 2 x 3.4k prompts: 7168, not 8192
    assert token_buckets(4095, per_octave=1) == [64, 128, 256, 512, 1024, 2048, 4095]  # before item 46
    engine = make_engine(qwen, max_slots=4, prefill_tokens=24)
    prefill = engine.prefill
    assert isinstance(prefill, PackedPrefill) and prefill.buckets == [24]
    assert prefill.trash_row == engine.cache.capacity == 4 * engine.max_seq_len
    used: list[int] = []

    class Padded:  # replays at the bucket's length from the last load, like PrefillGraphs
        def replay(self, bucket: int) -> torch.Tensor:
            used.append(bucket)
            return prefill.forward(bucket, bucket, prefill.spans)

    prefill.graphs = Padded()
    reqs = [greedy("a", prompt(60, 5), 7), greedy("b", prompt(61, 11), 5), greedy("long", prompt(62, 40), 6),
            greedy("c", prompt(63, 1), 4)]
    for r in reqs:
        engine.add_request(r)
    events = drain(engine)
    for r in reqs:
        assert tokens(events[r.request_id]) == hf_greedy(qwen, list(r.input_ids), r.max_new_tokens), r.request_id
    assert used and set(used) == {24} and engine.prefill_chunks == 2


def test_packed_load_fills_the_attention_offsets(qwen: PreTrainedModel) -> None:
    """The device-side description of a packed step, which only the CUDA kernel reads (the CPU path attends from
    the host spans): sequence offsets, cache-row offsets, attended lengths, last rows, positions and cache rows,
    for a batch from position 0 and for a chunk that continues a cached prefix, at the requests' own KV offsets."""
    from vlm_triton.engine.packed import PackedPrefill
    from vlm_triton.engine.types import prepare_request

    engine = make_engine(qwen, max_slots=4, prefill_tokens=64)
    packed = engine.prefill
    assert isinstance(packed, PackedPrefill)
    seqs = [prepare_request(greedy(f"r{i}", prompt(90 + i, n), 3), vocab_size=VOCAB, hidden_size=64,
                            max_seq_len=engine.max_seq_len) for i, n in enumerate([3, 7, 1])]
    starts = [50, 9, 120]  # any runs of the pool, in any order
    for seq, start in zip(seqs, starts):
        seq.kv_start = start
    spans = packed.load(seqs, start=0, end=7)
    assert spans == [(0, 3, 50, 3), (3, 10, 9, 7), (10, 11, 120, 1)]
    assert packed.cu_q.tolist() == [0, 3, 10, 11, 11]  # unused sequences are empty
    assert packed.cu_k.tolist() == [50, 9, 120, 0, 0]
    assert packed.used_k.tolist() == [3, 7, 1, 0]
    assert packed.last.tolist() == [2, 9, 10, 0]
    pos = [0, 1, 2, *range(7), 0]
    assert packed.pos[:11].tolist() == pos
    assert packed.rows[:11].tolist() == [p + start for start, n in zip(starts, [3, 7, 1]) for p in range(n)]
    assert set(packed.rows[11:].tolist()) == {packed.trash_row}
    spans = packed.load(seqs[1:2], start=4, end=7)  # the last 3 tokens of a 7-token prompt
    assert spans == [(0, 3, 9, 7)]
    assert packed.cu_q.tolist() == [0, 3, 3, 3, 3] and packed.used_k.tolist() == [7, 0, 0, 0]
    assert packed.pos[:3].tolist() == [4, 5, 6] and packed.rows[:3].tolist() == [9 + p for p in (4, 5, 6)]
