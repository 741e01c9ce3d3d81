"""Sampling math of the torch engine, checked against HF's logits processors where HF has an equivalent."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlm_triton.engine.sampling import (
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    filter_logits,
    sample_tokens,
)
from vlm_triton.errors import InvalidRequest

V = 50


@pytest.fixture
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, V, generator=g) * 3


def seen_mask(input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    seen = torch.zeros(input_ids.shape[0], vocab, dtype=torch.bool)
    return seen.scatter_(1, input_ids, True)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(logits: torch.Tensor, penalty: float) -> None:
    input_ids = torch.tensor([[1, 2, 3, 3, 40], [0, 0, 7, 8, 9], [49, 10, 11, 12, 13]])
    expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
    got = apply_repetition_penalty(logits, seen_mask(input_ids, V), torch.full((3,), penalty))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_repetition_penalty_per_row(logits: torch.Tensor) -> None:
    input_ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    penalties = [1.5, 1.0, 0.8]
    got = apply_repetition_penalty(logits, seen_mask(input_ids, V), torch.tensor(penalties))
    for row, p in enumerate(penalties):
        expected = RepetitionPenaltyLogitsProcessor(p)(input_ids[row : row + 1], logits[row : row + 1].clone())
        torch.testing.assert_close(got[row : row + 1], expected, rtol=0, atol=0)


def test_presence_frequency_penalty(logits: torch.Tensor) -> None:
    counts = torch.zeros(3, V, dtype=torch.int32)
    counts[0, 5] = 3
    counts[1, 5] = 1
    counts[2, 7] = 2
    out = apply_presence_frequency_penalty(logits, counts, torch.tensor([0.5, 0.0, 1.0]), torch.tensor([0.1, 0.2, 0.0]))
    expected = logits.clone()
    expected[0, 5] -= 0.5 + 0.1 * 3
    expected[1, 5] -= 0.2
    expected[2, 7] -= 1.0
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.8), (10, 0.5), (0, 0.05), (0, 1.0)])
def test_filter_matches_hf_warpers(logits: torch.Tensor, top_k: int, top_p: float) -> None:
    expected = logits.clone()
    if top_k > 0:
        expected = TopKLogitsWarper(top_k)(torch.zeros(3, 1, dtype=torch.long), expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(torch.zeros(3, 1, dtype=torch.long), expected)
    got = filter_logits(logits, torch.full((3,), top_k), torch.full((3,), top_p))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_greedy_rows_take_argmax(logits: torch.Tensor) -> None:
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(temperature=0.0, top_p=0.5)]
    tokens = sample_tokens(logits, params, [None, None, None])
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_seed_dependent(logits: torch.Tensor) -> None:
    flat = torch.zeros(1, V)  # uniform distribution: every seed sequence is visible

    def draw(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [int(sample_tokens(flat, [SamplingParams()], [g])[0]) for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_sampling_respects_filters(logits: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(0)
    top2 = set(logits[0].topk(2).indices.tolist())
    for _ in range(50):
        rows = sample_tokens(logits, [SamplingParams(top_k=2), SamplingParams(top_p=1e-6), SamplingParams()], [g, g, g])
        assert int(rows[0]) in top2
        assert int(rows[1]) == int(logits[1].argmax())


def test_sampling_follows_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1, 0.0])
    logits = probs.clamp_min(1e-30).log().view(1, -1)
    g = torch.Generator().manual_seed(3)
    draws = [int(sample_tokens(logits, [SamplingParams()], [g])[0]) for _ in range(2000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert freq[3] == 0
    torch.testing.assert_close(freq, probs, atol=0.04, rtol=0)


def test_mixed_batch_penalties_and_greedy(logits: torch.Tensor) -> None:
    seen = seen_mask(torch.tensor([[int(logits[0].argmax())]] * 3), V)
    counts = seen.to(torch.int32)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1e6),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0),
    ]
    tokens = sample_tokens(logits, params, [None] * 3, seen=seen, counts=counts)
    assert int(tokens[0]) != int(logits[0].argmax())  # the seen argmax is pushed away
    assert int(tokens[1]) == int(logits[1].argmax())  # neutral row untouched


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=-1.0),
        SamplingParams(top_k=-1),
        SamplingParams(top_p=1.5),
        SamplingParams(repetition_penalty=0.0),
        SamplingParams(presence_penalty=3.0),
    ],
)
def test_invalid_params(params: SamplingParams) -> None:
    with pytest.raises(InvalidRequest):
        params.validate()
