"""Per-slot token history for the sampling penalties, kept on the device next to the KV cache.

`seen` [max_slots, V] bool (prompt + generated ids: repetition penalty) and `counts` [max_slots, V] int32
(generated ids: presence / frequency penalties) are allocated the first time a request needs them, filled when a
request is admitted into its slot, updated with every accepted token and moved with the slot on compaction.
"""

from __future__ import annotations

import torch

from vlm_triton.engine.sampling import sample_tokens
from vlm_triton.engine.types import ActiveRequest


class SlotPenalties:
    def __init__(self, max_slots: int, vocab_size: int, device: torch.device) -> None:
        self.max_slots, self.vocab_size, self.device = max_slots, vocab_size, device
        self.seen: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def admit(self, seq: ActiveRequest, vocab: int) -> None:
        """Start `seq`'s history in its slot (`vocab`: the logits' width); image slot ids are never "seen"."""
        s = seq.slot
        if seq.params.uses_seen:
            if self.seen is None:
                self.seen = torch.zeros(self.max_slots, vocab, dtype=torch.bool, device=self.device)
            self.seen[s].zero_()
            self.seen[s, seq.ids[seq.ids < min(vocab, self.vocab_size)].to(self.device)] = True
        if seq.params.uses_counts:
            if self.counts is None:
                self.counts = torch.zeros(self.max_slots, vocab, dtype=torch.int32, device=self.device)
            self.counts[s].zero_()

    def sample(self, logits: torch.Tensor, seqs: list[ActiveRequest], first_slot: int) -> torch.Tensor:
        """One token per row of `logits` for `seqs`, which occupy slots [first_slot, first_slot + len(seqs))."""
        rows = slice(first_slot, first_slot + len(seqs))
        return sample_tokens(
            logits, [s.params for s in seqs], [s.generator for s in seqs],
            None if self.seen is None else self.seen[rows], None if self.counts is None else self.counts[rows],
        )  # fmt: skip

    def record(self, seqs: list[ActiveRequest], tokens: list[int]) -> None:
        """Add one accepted token per sequence to the histories that are kept."""
        seen_rows = [(s.slot, t) for s, t in zip(seqs, tokens) if s.params.uses_seen]
        count_rows = [(s.slot, t) for s, t in zip(seqs, tokens) if s.params.uses_counts]
        if seen_rows and self.seen is not None:
            slots, toks = torch.tensor(seen_rows, device=self.device).T
            self.seen[slots, toks] = True
        if count_rows and self.counts is not None:
            slots, toks = torch.tensor(count_rows, device=self.device).T
            self.counts.index_put_((slots, toks), torch.ones_like(slots, dtype=torch.int32), accumulate=True)

    def move(self, src: int, dst: int) -> None:
        for state in (self.seen, self.counts):
            if state is not None:
                state[dst] = state[src]
