"""Continuous-batching LLM engine over a transformers causal LM and a pooled KV cache.

KV memory is one pool of `kv_cache_tokens` rows per layer (kv_cache.py). A request is admitted (admission.py) when
a decode slot is free (at most `max_slots` run at once) and the pool has the rows of everything it can reach: a
contiguous run, or with `kv_page_tokens` pages of that many rows; it keeps them until it ends, so nothing is ever
evicted or recomputed (TensorRT-LLM's `guaranteed_no_evict`). The default pool, `max_slots * max_seq_len` rows, is
handed out in runs of `max_seq_len` (the slots of a fixed layout) unless paged; a pool set explicitly hands out just
what each request can reach (kv_pool.py).

Each `step()`:
1. applies pending cancellations (event 'cancelled', slot and KV rows freed);
2. accepts one batched decode step of the running requests, which occupy decode rows 0..n-1 (compact), padded to
   a batch-size bucket (a power of two, or max_slots) whose extra rows write the pool's trash row; the step was
   launched by the step before when nothing could change between them (run_ahead.py), and the next one may be;
3. runs one prefill forward of at most `prefill_tokens` tokens: either waiting requests admitted in arrival order
   (while slots and KV rows last; the first that does not fit waits, and the rest behind it), as one batch, which
   yields their first tokens; or the next chunk of a prompt longer than `prefill_tokens` (chunked prefill), over
   successive steps, each attending to the chunks before it in the request's rows; after the last chunk the request
   joins the running rows and gets its first token. The rest wait for the next step, so decoding goes on between
   prefill forwards and one step never carries more than one prefill of bounded size.
Every request gets exactly one event per step. A request that finishes frees its slot and its rows; the last
running request takes its decode row (no KV moves: a row's K/V are read from the request's own run of the pool),
so that decode always works on the contiguous prefix [:bucket].

Math comes from the model's own modules: `backbone(inputs_embeds=..., position_ids=..., attention_mask=<4D>,
past_key_values=PooledKVCache, use_cache=True)` then `lm_head` on the last position only. On CUDA with
`use_cuda_graphs=True` the decode step (engine/decode.py: embedding -> logits over static input buffers, which
advance on the device while the running set is unchanged) of every batch and KV bucket is captured once at
construction and replayed; elsewhere it runs eagerly. Prefill forwards are packed (engine/packed.py: the prompt
spans one after another, no padding) for models on the engine's attention (`vlm_slot`, from sdpa) and, on CUDA in
fp16/bf16 with `use_cuda_graphs`, replayed from one graph per packed-length bucket; models on eager attention keep
the padded prefill (engine/prefill.py).

Threading: `add_request` and `cancel` may be called from any thread. `step()` must be driven by one thread only,
either the caller's or the background loop of `start()`/`run_forever()`, which sleeps on a condition variable
while there is no work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

from vlm_triton import timeline
from vlm_triton.engine.admission import Admission
from vlm_triton.engine.cuda_graphs import DecodeGraphs
from vlm_triton.engine.decode import MIN_KV_BUCKET, DecodeStep, kv_length_buckets
from vlm_triton.engine.kernels import paged_or_runs, set_up_kernels
from vlm_triton.engine.kv_cache import PooledKVCache
from vlm_triton.engine.model_spec import ModelSpec
from vlm_triton.engine.observe import StepTiming
from vlm_triton.engine.packed import PackedPrefill
from vlm_triton.engine.penalties import SlotPenalties
from vlm_triton.engine.prefill import PrefillForward
from vlm_triton.engine.run_ahead import DecodeSteps
from vlm_triton.engine.step_wait import StepWait
from vlm_triton.engine.types import (
    ActiveRequest,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    prepare_request,
)
from vlm_triton.errors import InvalidRequest, SetupError

logger = logging.getLogger(__name__)


EventCallback = Callable[[list[TokenEvent]], None]

class LLMEngine:
    def __init__(
        self,
        model: nn.Module,
        *,
        max_slots: int,
        max_seq_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        vocab_size: int,
        use_cuda_graphs: bool = False,
        backbone: nn.Module | None = None,
        lm_head: nn.Module | None = None,
        min_kv_bucket: int = MIN_KV_BUCKET,
        compile_pointwise: bool = False,
        prefill_pointwise: bool = False,
        fuse_projections: bool = False,
        prefill_tokens: int = 8192,
        prefill_graphs: bool = True,
        kv_cache_tokens: int = 0,
        kv_page_tokens: int = 0,
        run_ahead: bool = True,
    ) -> None:
        """`model` is a built HF causal LM already on `device` in `dtype` (eval mode is set here). `backbone` /
        `lm_head` default to `model.model` / `model.get_output_embeddings()` (pass them for wrappers such as a VLM
        whose language model sits elsewhere). Ids >= vocab_size are image slots. `compile_pointwise` (CUDA only)
        fuses norms, RoPE and the MLP activation of decode steps into compiled kernels (engine/pointwise.py), and
        with `prefill_pointwise` those of prefill forwards too when the prefill runs from CUDA graphs.
        `fuse_projections` computes each layer's q/k/v and gate/up projections as one GEMM each
        (engine/fused_linear.py). `prefill_tokens` bounds
        a prefill batch (batch x longest prompt). `prefill_graphs` (with `use_cuda_graphs`, fp16/bf16) captures the
        packed prefill forward per packed-length bucket too. `kv_cache_tokens` sizes the KV pool (rows per layer;
        0: max_slots * max_seq_len, reserved in runs of max_seq_len, the slots of a fixed layout);
        `kv_page_tokens` > 0 makes it pages of that many rows (kv_pool.PagePool; decode through
        engine/paged_attention.py). `run_ahead` launches a decode step before the tokens of the one before reach the
        host when nothing can change between them (run_ahead.py)."""
        if max_slots < 1 or max_seq_len < 2:
            raise SetupError(f"need max_slots >= 1 and max_seq_len >= 2, got {max_slots}, {max_seq_len}")
        spec = ModelSpec.of(model, vocab_size=vocab_size, backbone=backbone, lm_head=lm_head)
        self.backbone, self.lm_head, self.hidden_size = spec.backbone, spec.lm_head, spec.hidden_size
        model.eval()
        self.device, self.dtype = torch.device(device), dtype
        self.max_slots, self.max_seq_len, self.vocab_size = max_slots, max_seq_len, vocab_size
        self.prefill_tokens = max(int(prefill_tokens), 1)
        kv_page_tokens = paged_or_runs(kv_page_tokens, self.device, dtype, spec)
        self.admission = Admission.sized(kv_cache_tokens, max_slots=max_slots, max_seq_len=max_seq_len,
                                         prefill_tokens=self.prefill_tokens, page_tokens=kv_page_tokens)
        self.kv_page_tokens = int(kv_page_tokens)
        self.cache = PooledKVCache(num_layers=spec.num_layers, capacity=self.admission.pool.capacity,
                                   kv_heads=spec.kv_heads, head_dim=spec.head_dim, dtype=dtype, device=self.device)
        self.buckets = sorted({min(1 << i, max_slots) for i in range(max_slots.bit_length() + 1)})
        self.kv_buckets = kv_length_buckets(max_seq_len, min_kv_bucket)
        self.decode = DecodeStep(self.backbone, self.lm_head, self.cache, max_slots=max_slots, max_seq_len=max_seq_len,
                                 bool_mask=spec.bool_mask, slot_attention=spec.packed, head_dim=spec.head_dim,
                                 dtype=dtype, page=self.kv_page_tokens)
        self.prefill: PrefillForward | PackedPrefill
        if spec.packed:
            self.prefill = PackedPrefill(self.backbone, self.cache, vocab_size=vocab_size, dtype=dtype,
                                         max_tokens=min(self.prefill_tokens, max_slots * (max_seq_len - 1)),
                                         max_rows=max_slots, max_seq_len=max_seq_len, paged=self.kv_page_tokens > 0)
        else:
            self.prefill = PrefillForward(self.backbone, self.cache, vocab_size=vocab_size, bool_mask=spec.bool_mask,
                                          dtype=dtype)
        self.penalties = SlotPenalties(max_slots, vocab_size, self.device)
        self.decoding = DecodeSteps(self, run_ahead)  # decode steps launched and accepted (run_ahead.py)
        self._active: list[ActiveRequest] = []  # index == slot
        self._chunking: ActiveRequest | None = None  # a prompt longer than prefill_tokens, part-way prefilled
        self._chunk_done = 0  # its prompt tokens already in its KV rows
        self._cancels: set[str] = set()
        self._inflight: set[str] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.slot_moves = 0  # decode-row moves after a release so far (observability, tests)
        self.prefill_batches = self.prefill_requests = 0  # forwards and the prompts they completed
        self.prefill_chunks = 0  # forwards over part of a long prompt (also counted in prefill_batches)
        self.timing = StepTiming()
        self.step_wait = StepWait()  # its release_gil_when: another thread of this process has GPU work to launch
        # the kernels last (kernels.py): after the checks above, so that a model that cannot be served stays unpatched
        self.fused: dict[str, int] = {}  # fused projection groups by kind (fused_linear.py)
        self.pointwise: dict[str, int] = {}  # compiled pointwise ops by kind (pointwise.py)
        self.prefill_pointwise = False  # prefill forwards run the compiled pointwise ops too
        self._graphs: DecodeGraphs | None = None
        set_up_kernels(self, head_dim=spec.head_dim, use_cuda_graphs=use_cuda_graphs, prefill_graphs=prefill_graphs,
                       compile_pointwise=compile_pointwise, prefill_pointwise=prefill_pointwise,
                       fuse_projections=fuse_projections)

    # --- public API -------------------------------------------------------------------------------------------------
    def add_request(self, req: GenerationRequest) -> None:
        """Validate and queue a request (thread-safe). Raises InvalidRequest."""
        seq = prepare_request(
            req, vocab_size=self.vocab_size, hidden_size=self.hidden_size, max_seq_len=self.max_seq_len
        )
        with self._cond:
            if seq.request_id in self._inflight:
                raise InvalidRequest(f"request id {seq.request_id!r} is already in flight")
            self._inflight.add(seq.request_id)
            self._cancels.discard(seq.request_id)  # a stale cancel of an earlier request with this id
            self.admission.add(seq)
            self._cond.notify_all()

    def cancel(self, request_id: str) -> None:
        """Ask for a request to stop; its 'cancelled' event comes from the next step. Unknown ids are ignored."""
        with self._cond:
            if request_id in self._inflight:
                self._cancels.add(request_id)
                self._cond.notify_all()

    def has_work(self) -> bool:
        with self._cond:
            return self._busy()

    def _busy(self) -> bool:
        return bool(len(self.admission) or self._active or self._cancels or self._chunking is not None
                    or self.decoding.ahead is not None)

    def active_slots(self) -> dict[str, int]:
        """request_id -> slot of the running requests."""
        return {s.request_id: s.slot for s in self._active}

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        with self._cond:
            cancels, self._cancels = self._cancels, set()
            for seq in self.admission.take(cancels):
                events.append(self._finish_event(seq, "cancelled"))
        for seq in sorted((s for s in self._active if s.request_id in cancels), key=lambda s: -s.slot):
            events.append(self._finish_event(seq, "cancelled"))
            self._release(seq)
        if self._chunking is not None and self._chunking.request_id in cancels:
            events.append(self._finish_event(self._chunking, "cancelled"))
            self.admission.free(self._chunking)
            self._chunking = None
        if self._active or self.decoding.ahead is not None:
            events += self.decoding.step()
        if self._chunking is None:
            with self._cond:
                batch, chunked = self.admission.pop(len(self._active))
            if chunked is not None:
                self._chunking, self._chunk_done = chunked, 0
            if batch:
                events += self._prefill(batch)
        if self._chunking is not None:
            events += self._prefill_chunk()
        return events

    def run_forever(self, callback: EventCallback) -> None:
        """Step while there is work, sleep while there is none, until shutdown(); exceptions of a step fail the
        running requests ('error' events) and the loop goes on. On shutdown, outstanding requests are cancelled."""
        while True:
            with self._cond:
                while not self._stopping and not self._busy():
                    self._cond.wait()
                if self._stopping:
                    break
            t = time.perf_counter()
            try:
                events = self.step()
            except Exception as exc:  # a server fault: fail what was running, keep serving
                logger.exception("engine step failed")
                events = self._fail(list(self._active), exc)
            self.timing.add("step", time.perf_counter() - t)
            self._emit(callback, events)
        with self._cond:
            waiting = self.admission.drain()
        if self._chunking is not None:
            self.admission.free(self._chunking)
            waiting.insert(0, self._chunking)
            self._chunking = None
        events = [self._finish_event(s, "cancelled") for s in waiting]
        for seq in sorted(self._active, key=lambda s: -s.slot):
            events.append(self._finish_event(seq, "cancelled"))
            self._release(seq)
        self._emit(callback, events)

    def start(self, callback: EventCallback) -> None:
        if self._thread is not None:
            raise RuntimeError("engine loop already started")
        self._stopping = False
        self._thread = threading.Thread(target=self.run_forever, args=(callback,), name="llm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # --- forward passes ---------------------------------------------------------------------------------------------
    def _prefill(self, seqs: list[ActiveRequest]) -> list[TokenEvent]:
        """One forward over the prompts of `seqs`, into their KV rows; they take the next decode rows; their first
        tokens."""
        t = time.perf_counter()
        first = len(self._active)
        self.decode.changed = True
        for k, seq in enumerate(seqs):
            timeline.mark("llm.prefill", seq.request_id)
            seq.slot = first + k
            self._active.append(seq)
        try:
            hidden = self.prefill(seqs, start=0, end=max(seq.prompt_len for seq in seqs))
            self.prefill_batches += 1
            events = self._first_tokens(seqs, hidden)
        except Exception as exc:  # noqa: BLE001 - a failed prefill fails its requests; the engine goes on
            events = self._prefill_failed(seqs, exc)
        self.timing.add("prefill", time.perf_counter() - t)
        return events

    def _prefill_chunk(self) -> list[TokenEvent]:
        """The next chunk (<= prefill_tokens) of the chunked prompt, into its KV rows; after the last chunk the
        request takes the next decode row and its first token is sampled."""
        seq = self._chunking
        assert seq is not None
        t = time.perf_counter()
        start, end = self._chunk_done, min(seq.prompt_len, self._chunk_done + self.prefill_tokens)
        if start == 0:
            timeline.mark("llm.prefill", seq.request_id)
        events: list[TokenEvent] = []
        try:
            hidden = self.prefill([seq], start=start, end=end)
            self.prefill_batches += 1
            self.prefill_chunks += 1
            self._chunk_done = end
            if end == seq.prompt_len:
                self._chunking = None
                seq.slot = len(self._active)
                self._active.append(seq)
                self.decode.changed = True
                events = self._first_tokens([seq], hidden)
        except Exception as exc:  # noqa: BLE001 - as in _prefill
            self._chunking = None
            events = self._prefill_failed([seq], exc)
        self.timing.add("prefill", time.perf_counter() - t)
        return events

    def _first_tokens(self, seqs: list[ActiveRequest], hidden: torch.Tensor) -> list[TokenEvent]:
        """Sample the first token of requests just prefilled into the consecutive running slots of `seqs`."""
        logits = self.lm_head(hidden)
        for seq in seqs:
            self.penalties.admit(seq, int(logits.shape[-1]))
        events = self._accept(seqs, self.step_wait.tokens(self.penalties.sample(logits, seqs, seqs[0].slot)))
        for seq in seqs:
            timeline.mark("llm.token", seq.request_id)
        self.prefill_requests += len(seqs)
        return events

    def _prefill_failed(self, seqs: list[ActiveRequest], exc: Exception) -> list[TokenEvent]:
        logger.exception("prefill of %s failed", [s.request_id for s in seqs])
        return self._fail(seqs, exc)

    def _runs(self, seq: ActiveRequest) -> bool:
        return 0 <= seq.slot < len(self._active) and self._active[seq.slot] is seq

    # --- bookkeeping --------------------------------------------------------------------------------------------------
    def _accept(self, seqs: list[ActiveRequest], tokens: list[int]) -> list[TokenEvent]:
        """Record one new token per sequence, update penalty state, emit events, free finished slots."""
        self.penalties.record(seqs, tokens)
        events: list[TokenEvent] = []
        done: list[ActiveRequest] = []
        for seq, token in zip(seqs, tokens):
            reason = seq.append(token)
            events.append(
                TokenEvent(seq.request_id, token, reason is not None, reason, len(seq.generated) - 1, seq.prompt_len)
            )
            if reason is not None:
                done.append(seq)
        for seq in sorted(done, key=lambda s: -s.slot):
            self._release(seq)
        return events

    def _release(self, seq: ActiveRequest) -> None:
        """Free seq's slot and KV rows; the last running request takes its decode row to keep the rows compact."""
        self.decode.changed = True
        self.admission.free(seq)
        slot = seq.slot
        last = self._active.pop()
        if last is not seq:
            self.penalties.move(last.slot, slot)
            self._active[slot] = last
            last.slot = slot
            self.slot_moves += 1
        seq.slot = -1
        with self._cond:
            self._inflight.discard(seq.request_id)

    def _finish_event(self, seq: ActiveRequest, reason: FinishReason, error: str | None = None) -> TokenEvent:
        with self._cond:
            self._inflight.discard(seq.request_id)
        return TokenEvent(seq.request_id, None, True, reason, len(seq.generated), seq.prompt_len, error)

    def _fail(self, seqs: list[ActiveRequest], exc: BaseException) -> list[TokenEvent]:
        """End `seqs` with an 'error' event each and free the slots of those that run (and the KV rows of all)."""
        self.cache.set_idle()
        self.decoding.ahead = None  # a step launched ahead is dropped
        self.decode.changed = True  # and the next load rebuilds the inputs from the host
        message = f"{type(exc).__name__}: {exc}"
        events = [self._finish_event(s, "error", error=message) for s in seqs]
        for seq in sorted(seqs, key=lambda s: -s.slot):
            if self._runs(seq):
                self._release(seq)
            else:
                self.admission.free(seq)
        return events

    @staticmethod
    def _emit(callback: EventCallback, events: list[TokenEvent]) -> None:
        if not events:
            return
        try:
            callback(events)
        except Exception:
            logger.exception("engine event callback failed")

