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

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlm_triton.engine.step_wait import StepWait
from vlm_triton.engine.types import ActiveRequest, TokenEvent

if TYPE_CHECKING:
    from vlm_triton.engine.engine import LLMEngine


@dataclass
class LaunchedStep:
    """A decode step on the device whose tokens the host has not read: `seqs` as they were in rows 0..n-1."""

    seqs: list[ActiveRequest]
    tokens: torch.Tensor  # int64 [n] on the device
    host: torch.Tensor | None  # pinned copy of `tokens` (CUDA), written when `done` completes
    done: torch.cuda.Event | None


def may_run_ahead(step: LaunchedStep, changed: bool) -> bool:
    """Whether the step after `step` can be launched before `step`'s tokens are read (see the module doc); `changed`:
    the running set changed since `step` was loaded (`DecodeStep.changed`: set by every admission and release)."""
    if changed:
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
        self._events = [torch.cuda.Event() for _ in range(2)] if self.cuda else []  # recorded again, not made per step
        self._next = 0

    def start(self, seqs: list[ActiveRequest], tokens: torch.Tensor) -> LaunchedStep:
        """Start the copy of `tokens` into the buffer not used by the step launched before (read by then: at most two
        steps are in flight, and the older is read before a third is launched)."""
        if not self.cuda:
            return LaunchedStep(seqs, tokens, None, None)
        host, done = self._buffers[self._next][: tokens.shape[0]], self._events[self._next]
        self._next ^= 1
        host.copy_(tokens, non_blocking=True)
        done.record()
        return LaunchedStep(seqs, tokens, host, done)

    @staticmethod
    def read(step: LaunchedStep, wait: StepWait, release_gil: bool) -> list[int]:
        """The step's tokens, once its device work is done (waiting as `wait` says: step_wait.py)."""
        if step.done is None or step.host is None:
            return wait.tokens(step.tokens)
        wait.event(step.done, release_gil)
        return step.host.tolist()


class DecodeSteps:
    """The engine's decode steps: `step()` accepts one, launched ahead by the call before or launched now, after
    launching the next one when it may run ahead (`enabled`: LLMEngine's `run_ahead`)."""

    def __init__(self, engine: LLMEngine, enabled: bool) -> None:
        self.engine, self.enabled = engine, enabled
        self.readback = TokenReadback(engine.max_slots, engine.device)
        self.ahead: LaunchedStep | None = None  # launched ahead of the step the next call accepts
        self.launched_ahead = 0  # steps launched before the tokens of the step before reached the host

    def step(self) -> list[TokenEvent]:
        e = self.engine
        step, self.ahead = self.ahead, None
        if step is None:  # nothing in flight: the running requests' step, launched now
            step = self.launch(lag=0)
        if self.enabled and may_run_ahead(step, e.decode.changed):
            self.ahead = self.launch(lag=1)
            self.launched_ahead += 1
        t = time.perf_counter()
        tokens = self.readback.read(step, e.step_wait, release_gil=self.enabled)
        t1 = time.perf_counter()
        running = [(s, tok) for s, tok in zip(step.seqs, tokens) if e._runs(s)]  # not cancelled or ended meanwhile
        events = e._accept([s for s, _ in running], [tok for _, tok in running])
        e.timing.add("decode_wait", t1 - t)
        e.timing.add("decode_accept", time.perf_counter() - t1)
        return events

    def launch(self, lag: int) -> LaunchedStep:
        """Load, run and sample one decode step of the running requests, without waiting for it; `lag` 1: the step
        before it is still on its way to the host (its tokens are not in `generated` yet)."""
        e = self.engine
        t0 = time.perf_counter()
        n = len(e._active)
        bucket = next(b for b in e.buckets if b >= n)
        e.decode.load(e._active, bucket)
        last = max(s.prompt_len + len(s.generated) - 1 for s in e._active) + lag
        kv_len = next(k for k in e.kv_buckets if k > last)
        t1 = time.perf_counter()
        logits = e._graphs.replay(bucket, kv_len) if e._graphs is not None else e.decode.forward(bucket, kv_len)
        e.cache.set_idle()
        tokens = e.penalties.sample(logits[:n], e._active, 0)
        e.decode.last_tokens = tokens
        step = self.readback.start(list(e._active), tokens)
        e.timing.add("decode_prepare", t1 - t0)
        e.timing.add("decode_launch", time.perf_counter() - t1)
        return step
