"""Tiny random Qwen2 / Llama models and the helpers the engine tests share: engines over them, greedy references
from `model.generate`, driving an engine until it is idle, and a join plan with slot compaction."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from vlm_triton.engine import GenerationRequest, LLMEngine, TokenEvent
from vlm_triton.engine.types import TokenIds

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
    out = model.generate(torch.tensor([ids], device=model.device),
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
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


def drain_one(engine: LLMEngine, req: GenerationRequest) -> list[TokenEvent]:
    engine.add_request(req)
    return drain(engine)[req.request_id]


@torch.no_grad()
def generate_with_table(model: PreTrainedModel, ids: list[int], table: torch.Tensor, n: int) -> list[int]:
    """Greedy `generate` over inputs_embeds: text ids embedded by the model, image slot ids (>= VOCAB) by `table`."""
    t = torch.tensor(ids)
    embeds = model.get_input_embeddings()(t.clamp(max=VOCAB - 1)).clone()
    embeds[t >= VOCAB] = table[t[t >= VOCAB] - VOCAB]
    out: list[int] = model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(ids)),
                                    do_sample=False, max_new_tokens=n)[0].tolist()
    return out


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
