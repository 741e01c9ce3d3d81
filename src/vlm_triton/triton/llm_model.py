"""Triton `llm` (torch profile): the tensorrtllm_backend `tensorrt_llm` contract over our continuous-batching
engine. Decoupled: execute() only queues; the engine thread sends each request's tokens through its sender."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from vlm_triton import timeline
from vlm_triton.engine.engine import LLMEngine
from vlm_triton.engine.observe import describe
from vlm_triton.engine.outbox import Delivery, Outbox
from vlm_triton.engine.types import GenerationRequest, parse_stop_words_list
from vlm_triton.errors import InvalidRequest
from vlm_triton.families.base import PreprocessLimits
from vlm_triton.multimodal.inline_vision import InlineVision, VisionJob
from vlm_triton.multimodal.plane_pool import PlaneReader, pin_for
from vlm_triton.multimodal.vision_runner import VisionRunner
from vlm_triton.multimodal.warmup import warm_up_vision
from vlm_triton.triton.common import (
    CANCEL_POLL_S,
    TRITON_TO_TORCH,
    error_response,
    get_array,
    get_scalar,
    get_torch,
    input_tensors,
    load_deployment,
    load_family,
    log,
    requested_outputs,
    response_of,
    set_torch_threads,
    stage_ready,
    torch_device_dtype,
    trace,
    warm_up,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# The BLS cancels its llm requests with a stop request; is_cancelled() polls (CANCEL_POLL_S) are for direct clients


@dataclass
class _Active:
    request: Any
    sender: Any
    client_id: str
    streaming: bool
    prefix: list[int]  # prompt ids echoed in non-streaming output unless exclude_input_in_output
    prompt_tokens: int
    outputs: frozenset[str]  # the outputs the request asked for (response_of)
    tokens: list[int] = field(default_factory=list)
    polled: float = field(default_factory=time.monotonic)  # the last is_cancelled() poll
    held: list[int] = field(default_factory=list)  # streamed tokens waiting for the stream interval
    sent: float = float("-inf")  # time.monotonic() of the last streamed response

    def response(self, ids: list[int]) -> Any:
        return response_of(self.outputs, {
            "output_ids": lambda: pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int32).reshape(1, 1, -1)),
            "sequence_length": lambda: pb_utils.Tensor("sequence_length", np.array([[len(ids)]], dtype=np.int32)),
            "num_input_tokens": lambda: pb_utils.Tensor(
                "num_input_tokens", np.array([[self.prompt_tokens]], dtype=np.int32)
            ),
        })


@dataclass(frozen=True)
class _Units:
    """A request's vision units as the llm received them (without the batch dim)."""

    pixels: Any  # torch uint8 [N, 3, ...], or None when they wait in preprocess's pool
    grids: Any
    tgt_sizes: Any
    ref: Any = None  # pixel_ref [REF_LEN] (plane_pool.py)


def inline_vision(cfg: Any, family: Any, device: Any, dtype: Any) -> InlineVision | None:
    """The llm's own vision encoder with engine.vision_in_llm (tiles per forward: the bls's vision_chunk)."""
    if not cfg.vision_in_llm:
        return None
    runner = VisionRunner(family, dtype, device, out_dtype=TRITON_TO_TORCH[cfg.tensor_dtypes["EMBED"]],
                          max_tiles=cfg.vision_chunk)
    return InlineVision(runner, max_tiles=cfg.vision_chunk)


class TritonPythonModel:
    stream_interval_s = 0.0  # triton.llm_stream_interval_ms
    vision: InlineVision | None = None  # engine.vision_in_llm
    planes: PlaneReader | None = None  # engine.vision_in_llm: preprocess's pools, mapped as requests name them

    def initialize(self, args: dict[str, Any]) -> None:
        cfg = load_deployment(args)
        family = load_family(cfg)
        device, dtype = torch_device_dtype(cfg)
        threads = set_torch_threads(cfg)
        self.engine = LLMEngine(
            family.build_language_model(dtype, device, max_seq_len=cfg.engine.max_seq_len),
            max_slots=cfg.engine.max_slots,
            max_seq_len=cfg.engine.max_seq_len,
            device=device,
            dtype=dtype,
            vocab_size=family.vocab_size,
            use_cuda_graphs=cfg.engine.cuda_graphs,
            prefill_graphs=cfg.engine.prefill_graphs,
            compile_pointwise=cfg.engine.compile_pointwise,
            prefill_pointwise=cfg.engine.prefill_pointwise,
            fuse_projections=cfg.engine.fuse_projections,
            prefill_tokens=cfg.max_step_tokens,
            kv_cache_tokens=cfg.engine.kv_cache_tokens,
            kv_page_tokens=cfg.engine.kv_page_tokens,
            run_ahead=cfg.engine.run_ahead,
        )
        self._active: dict[str, _Active] = {}
        self._by_client: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._metric_family = pb_utils.MetricFamily(  # must outlive its metrics
            name="vlm_llm_active_requests",
            description="Requests admitted to the llm engine and not yet finished (waiting or decoding)",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._active_gauge = self._metric_family.Metric(labels={"model": args["model_name"]})
        self.stream_interval_s = cfg.triton.llm_stream_interval_ms / 1000.0
        self.outbox = Outbox(self._deliver, on_error=lambda exc: log.exception("llm delivery failed", exc_info=exc),
                             lanes=cfg.triton.llm_send_threads)
        print(f"[{args['model_name']}] engine: {describe(self.engine)}; torch threads {threads}", file=sys.stderr,
              flush=True)
        # engine.vision_in_llm: requests bring their vision units, encoded here on a thread of their own
        self.vision = inline_vision(cfg, family, device, dtype)
        if self.vision is not None:
            if device.type == "cuda" and cfg.triton.stage_warm_up:  # loads the CUDA kernels
                limits = PreprocessLimits.from_deployment(cfg, family)
                warm_up(args["model_name"], "the vision encoder",
                        lambda: warm_up_vision(self.vision.runner, family, limits))
            self.engine.step_wait.release_gil_when = self.vision.busy  # while images are encoded (step_wait.py)
            self.planes = PlaneReader(on_map=pin_for(device))
        self.engine.start(self.outbox.put)
        timing = {"": self.engine.timing, "outbox_": self.outbox.timing}
        if self.vision is not None:
            timing["vision_"] = self.vision.timing
        stage_ready(cfg, args["model_name"], timing)

    def finalize(self) -> None:
        if self.vision is not None:
            self.vision.close()
        self.engine.shutdown()
        self.outbox.close()
        # The metrics go while the stub can still tell tritonserver; left to the interpreter's teardown (the model
        # and its outbox form a reference cycle, freed by the last garbage collection) they crashed the stub there
        self._active_gauge = None
        self._metric_family = None

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            client_id = request.request_id() or ""
            trace(f"execute {client_id!r}")
            inputs = input_tensors(request)
            if get_scalar(inputs, "stop", False):
                self._cancel_client(client_id)
                sender.send(flags=FINAL)
                continue
            try:
                self._admit(request, inputs, sender, client_id)
            except Exception as exc:  # noqa: BLE001
                sender.send(error_response(exc), flags=FINAL)
        return None

    def _admit(self, request: Any, inputs: dict[str, Any], sender: Any, client_id: str) -> None:
        ids = get_array(inputs, "input_ids")
        if ids is None:
            raise InvalidRequest("input_ids is required")
        ids = ids.reshape(-1)
        length = int(get_scalar(inputs, "input_lengths", ids.shape[0]))
        if not 0 < length <= ids.shape[0]:
            raise InvalidRequest(f"input_lengths {length} does not fit {ids.shape[0]} input_ids")
        ids = ids[:length]
        table = get_torch(inputs, "prompt_embedding_table")
        if table is not None:  # [1, R, H] as sent; R == 0 (the ensemble's text-only requests) means no table
            table = table.reshape(-1, table.shape[-1]) if table.numel() else None
        units = self._vision_units(inputs, table)
        internal_id = f"{client_id}#{next(self._ids)}"
        streaming = bool(get_scalar(inputs, "streaming", False))
        exclude = bool(get_scalar(inputs, "exclude_input_in_output", True))  # as the rendered tensorrt_llm
        seed = get_scalar(inputs, "seed", None)
        generation = GenerationRequest(
            request_id=internal_id,
            input_ids=ids,
            max_new_tokens=int(get_scalar(inputs, "request_output_len", 16)),
            prompt_embedding_table=table,
            end_id=int(get_scalar(inputs, "end_id", -1)),
            stop_words=parse_stop_words_list(get_array(inputs, "stop_words_list")),
            temperature=float(get_scalar(inputs, "temperature", 1.0)),
            top_k=int(get_scalar(inputs, "runtime_top_k", 0)),
            top_p=float(get_scalar(inputs, "runtime_top_p", 1.0)),
            repetition_penalty=float(get_scalar(inputs, "repetition_penalty", 1.0)),
            presence_penalty=float(get_scalar(inputs, "presence_penalty", 0.0)),
            frequency_penalty=float(get_scalar(inputs, "frequency_penalty", 0.0)),
            seed=None if seed is None else int(seed),
        )
        prefix = [] if streaming or exclude else ids.tolist()
        with self._lock:
            self._active[internal_id] = _Active(
                request, sender, client_id, streaming, prefix, length, requested_outputs(request)
            )
            self._by_client.setdefault(client_id, set()).add(internal_id)
            self._active_gauge.set(len(self._active))
        timeline.mark("llm.execute", internal_id)
        try:
            if units is None:
                self.engine.add_request(generation)
            else:
                self._encode_then_add(generation, units)
        except Exception:
            self._forget(internal_id)
            raise

    def _vision_units(self, inputs: dict[str, Any], table: Any) -> _Units | None:
        """The request's vision units (pixel_values or the reference to them in preprocess's pool, image_grids and
        tgt_sizes, without the batch dim), or None."""
        pixels = get_torch(inputs, "pixel_values")
        ref = get_array(inputs, "pixel_ref")
        by_reference = ref is not None and ref.size > 0
        if not by_reference and (pixels is None or not pixels.numel()):
            return None
        if self.vision is None or self.planes is None:
            raise InvalidRequest("pixel_values reach the llm only with engine.vision_in_llm")
        if table is not None:
            raise InvalidRequest("send pixel_values or prompt_embedding_table, not both")
        if by_reference and pixels is not None and pixels.numel():
            raise InvalidRequest("send pixel_values or pixel_ref, not both")
        grids, tgt_sizes = (get_torch(inputs, name) for name in ("image_grids", "tgt_sizes"))
        grids, tgt_sizes = (None if t is None or not t.numel() else t[0] for t in (grids, tgt_sizes))
        return _Units(None, grids, tgt_sizes, ref) if by_reference else _Units(pixels[0], grids, tgt_sizes)

    def _encode_then_add(self, generation: GenerationRequest, units: _Units) -> None:
        """Queue the request's units to the vision thread; the engine gets the request with its table."""
        request_id = generation.request_id

        def ready(table: Any) -> None:
            timeline.mark("llm.encoded", request_id)
            self.engine.add_request(replace(generation, prompt_embedding_table=table))

        def failed(exc: BaseException) -> None:
            active = self._forget(request_id)
            if active is not None:
                active.sender.send(error_response(exc), flags=FINAL)

        if units.ref is None:
            self.vision.submit(VisionJob(request_id, units.pixels, units.grids, units.tgt_sizes, ready, failed))
            return
        lease = self.planes.open(units.ref)  # read in place; given back when the encoder is done with them
        try:
            self.vision.submit(VisionJob(request_id, torch.from_numpy(lease.array), units.grids, units.tgt_sizes,
                                         ready, failed, lease.release))
        except Exception:
            lease.release()
            raise

    def _cancel_client(self, client_id: str) -> None:
        with self._lock:
            targets = list(self._by_client.get(client_id, ()))
        for internal_id in targets:
            if self.vision is not None and self.vision.cancel(internal_id):  # still being encoded: ends here
                active = self._forget(internal_id)
                if active is not None:
                    active.sender.send(flags=FINAL)
            else:
                self.engine.cancel(internal_id)

    def _forget(self, internal_id: str) -> _Active | None:
        with self._lock:
            active = self._active.pop(internal_id, None)
            if active is not None:
                group = self._by_client.get(active.client_id)
                if group is not None:
                    group.discard(internal_id)
                    if not group:
                        del self._by_client[active.client_id]
            self._active_gauge.set(len(self._active))
            return active

    def _deliver(self, delivery: Delivery) -> None:
        """Runs on the outbox thread: one response with every token the request has produced since its last one (so
        a slow send never stalls the engine, and falling behind makes responses longer, not late)."""
        try:
            self._deliver_one(delivery)
        except Exception as exc:  # noqa: BLE001 - one request's failed send must not lose the others' tokens
            self._abandon(delivery.request_id, exc)

    def _abandon(self, request_id: str, exc: BaseException) -> None:
        """A send to this request failed: stop its generation and end it with an error (best effort)."""
        log.error("llm delivery to %s failed: %r", request_id, exc)
        self.engine.cancel(request_id)
        active = self._forget(request_id)
        if active is not None:
            try:
                active.sender.send(error_response(RuntimeError(f"llm response delivery failed: {exc}")), flags=FINAL)
            except Exception:  # noqa: BLE001 - the sender itself is broken: nothing more to tell this client
                pass

    def _deliver_one(self, delivery: Delivery) -> None:
        active = self._active.get(delivery.request_id)
        if active is not None:
            first = not active.tokens and bool(delivery.tokens)
            if first:
                timeline.mark("llm.send", delivery.request_id)
            active.tokens.extend(delivery.tokens)
            if delivery.final is not None:
                self._forget(delivery.request_id)
                self._finish(active, delivery)
                # the first token leaves now: a one-token streamed answer, or any non-streamed one
                if (first or not active.streaming) and delivery.final.finish_reason not in ("error", "cancelled"):
                    timeline.mark("llm.sent", delivery.request_id)
            elif active.streaming and delivery.tokens:
                active.held.extend(delivery.tokens)
                now = time.monotonic()
                if now - active.sent < self.stream_interval_s:
                    return  # a running request makes a token every step: a later round sends these
                active.sender.send(active.response(active.held))
                if first:
                    timeline.mark("llm.sent", delivery.request_id)
                active.held, active.sent = [], now
                if now - active.polled >= CANCEL_POLL_S:
                    active.polled = now
                    if active.request.is_cancelled():
                        self.engine.cancel(delivery.request_id)

    def _finish(self, active: _Active, delivery: Delivery) -> None:
        event = delivery.final
        assert event is not None
        trace(f"finish {event.request_id} {event.finish_reason}")
        if event.finish_reason == "error":
            active.sender.send(error_response(RuntimeError(event.error or "engine error")), flags=FINAL)
        elif event.finish_reason == "cancelled":
            active.sender.send(flags=FINAL)
        elif active.streaming:
            active.sender.send(active.response(active.held + delivery.tokens), flags=FINAL)
        else:
            active.sender.send(active.response(active.prefix + active.tokens), flags=FINAL)
