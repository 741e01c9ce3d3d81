"""Per-request token selection over a batch of logits rows.

Order of operations, as in HF `generate` (logits processors, then warpers):
1. repetition penalty (HF `RepetitionPenaltyLogitsProcessor`): for every id seen in the prompt or generated so far,
   a positive logit is divided by the penalty and a negative one multiplied. HF `generate` counts the prompt
   (its `input_ids` include it), so we do too. Image slot ids (>= vocab_size) are never marked as seen.
2. presence / frequency penalties (OpenAI): logit -= frequency * count + presence * (count > 0), counting the
   generated tokens only.
3. greedy rows (temperature == 0 or top_k == 1) take the argmax here.
4. the other rows: logits / temperature, top-k (0 = off), top-p (1.0 or 0.0 = off; the smallest set of tokens whose
   probability reaches top_p, as HF's `TopPLogitsWarper`), then one draw by inverse CDF from a uniform taken from
   the request's own `torch.Generator` (CPU), so a seeded request gives the same tokens whatever its batch.

Everything is vectorised over rows; penalties are applied to the whole batch when any row uses them (a row with
neutral values is left bit-identical).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlm_triton.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def uses_seen(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def uses_counts(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        if not self.temperature >= 0.0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in [0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0.0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF repetition penalty. logits [B, V]; seen [B, V] bool; penalty [B]."""
    p = penalty.to(logits.dtype).view(-1, 1)
    penalized = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI penalties. logits [B, V]; counts [B, V] (generated tokens); presence, frequency [B]."""
    c = counts.to(logits.dtype)
    return logits - frequency.to(logits.dtype).view(-1, 1) * c - presence.to(logits.dtype).view(-1, 1) * (c > 0)


def _filter_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p on logits sorted in descending order; removed entries become -inf (a kept prefix)."""
    vocab = sorted_logits.shape[-1]
    ranks = torch.arange(vocab, device=sorted_logits.device).view(1, -1)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).view(-1, 1)
    out = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = out.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.where((top_p > 0) & (top_p < 1), top_p, torch.full_like(top_p, 2.0)).view(-1, 1)
    return out.masked_fill(mass_before >= p, float("-inf"))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k / top-p filtering in the original vocabulary order (same result as HF's warpers)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    filtered = _filter_sorted(sorted_logits, top_k.to(logits.device), top_p.to(logits.device, logits.dtype))
    return torch.empty_like(logits).scatter_(-1, order, filtered)


def _draw_uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    return _to_device(u, device)


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without waiting for the work queued there (a plain copy from pageable memory
    synchronises the stream, which would wait for a decode step launched ahead: engine/run_ahead.py)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _param_tensor(values: list[float] | list[int], device: torch.device) -> torch.Tensor:
    return _to_device(torch.tensor(values), device)


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row. logits [B, V] (any float dtype; computed in float32); params/generators: one per
    row; seen [B, V] bool (prompt + generated ids) and counts [B, V] (generated ids) are needed only when some row
    uses the corresponding penalty. Returns int64 [B] on logits' device."""
    rows = logits.shape[0]
    if len(params) != rows or len(generators) != rows:
        raise ValueError(f"{rows} logits rows but {len(params)} params and {len(generators)} generators")
    device = logits.device
    x = logits.float()

    if any(p.uses_seen for p in params):
        if seen is None:
            raise ValueError("repetition_penalty needs the seen-token mask")
        penalty = _param_tensor([p.repetition_penalty for p in params], device)
        x = apply_repetition_penalty(x, seen[:rows], penalty)
    if any(p.uses_counts for p in params):
        if counts is None:
            raise ValueError("presence/frequency penalties need the generated-token counts")
        presence = _param_tensor([p.presence_penalty for p in params], device)
        frequency = _param_tensor([p.frequency_penalty for p in params], device)
        x = apply_presence_frequency_penalty(x, counts[:rows], presence, frequency)

    tokens = x.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens

    idx = _param_tensor(sampled, device)
    sub = x.index_select(0, idx)
    temperature = _param_tensor([params[i].temperature for i in sampled], device).view(-1, 1)
    top_k = _param_tensor([params[i].top_k for i in sampled], device)
    top_p = _param_tensor([params[i].top_p for i in sampled], device)
    sorted_logits, order = (sub / temperature).sort(dim=-1, descending=True)
    probs = _filter_sorted(sorted_logits, top_k, top_p).softmax(dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    u = _draw_uniforms([generators[i] for i in sampled], device)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).view(-1, 1), right=True)
    kept = (probs > 0).sum(dim=-1, keepdim=True)
    pick = torch.minimum(pick, kept - 1)
    tokens[idx] = order.gather(-1, pick).view(-1)
    return tokens
