"""Decode steps launched one ahead of their tokens reaching the host (vLLM's async scheduling; docs/benchmarks.md,
item 47).

Without it a decode step is: load inputs, launch the forward and the sampling, wait for the sampled ids, then the
host's bookkeeping (append, stop checks, events), and the GPU idles through that bookkeeping and the next load. When
the next step is sure to run the same requests in the same rows, the engine launches it before it reads the current
step's tokens: its inputs come from the device (the sampled ids of the step before, positions + 1: decode.py's
steady load), so the GPU runs step N+1 while the host accepts step N.

When it may: no request of step N can end by length with N's token (known ahead), none uses a penalty (its history
takes N's token on the host, in `SlotPenalties.record`), the running set has not changed since N was loaded. A
request can still end at N by EOS or a stop word, or be cancelled: step N+1 then computed one token too many for it,
which is dropped (its K/V row lies inside its reservation: `kv_need` counts every output token but the last, and a
request ended by EOS before its last); its rows are freed when N is accepted, and stream order puts every later
write to them (a prefill of another request) after step N+1's.

`TokenReadback` copies each step's sampled ids to one of two pinned host buffers and records an event, so reading
step N's tokens waits for step N only, not for step N+1 queued behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_triton.engine.step_wait import StepWait
from vlm_triton.engine.types import ActiveRequest


@dataclass
class LaunchedStep:
    """A decode step on the device whose tokens the host has not read: `seqs` as they were in rows 0..n-1."""

    seqs: list[ActiveRequest]
    tokens: torch.Tensor  # int64 [n] on the device
    host: torch.Tensor | None  # pinned copy of `tokens` (CUDA), written when `done` completes
    done: torch.cuda.Event | None


def may_run_ahead(step: LaunchedStep, running: list[ActiveRequest], changed: bool) -> bool:
    """Whether the step after `step` can be launched before `step`'s tokens are read (see the module doc)."""
    if changed or len(running) != len(step.seqs):
        return False
    for seq in step.seqs:
        if len(seq.generated) + 1 >= seq.max_new or seq.params.uses_seen or seq.params.uses_counts:
            return False
    return True


class TokenReadback:
    """Sampled ids to the host, double-buffered so that two launched steps can be in flight."""

    def __init__(self, max_slots: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._buffers = [torch.zeros(max_slots, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self._next = 0

    def start(self, seqs: list[ActiveRequest], tokens: torch.Tensor) -> LaunchedStep:
        if not self.cuda:
            return LaunchedStep(seqs, tokens, None, None)
        host = self._buffers[self._next][: tokens.shape[0]]
        self._next ^= 1
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return LaunchedStep(seqs, tokens, host, done)

    @staticmethod
    def read(step: LaunchedStep, wait: StepWait) -> list[int]:
        """The step's tokens, once its device work is done (waiting as `wait` says: step_wait.py)."""
        if step.done is None or step.host is None:
            return wait.tokens(step.tokens)
        wait.event(step.done)
        return step.host.tolist()
