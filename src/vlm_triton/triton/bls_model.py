"""Triton `bls`: the decoupled entry point. Drives preprocess -> vision_encoder -> llm -> postprocess with async
BLS calls and streams text deltas; the logic is `pipeline.orchestrator.run_pipeline`, this file only adapts it."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Sequence

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack

from vlm_triton import timeline
from vlm_triton.contracts import UNIT_EXTRAS
from vlm_triton.errors import InvalidRequest, StageStalled
from vlm_triton.pipeline.orchestrator import (
    Chunk,
    Detokenized,
    Prepared,
    RequestOptions,
    StageClient,
    detokenize_step,
    run_pipeline,
)
from vlm_triton.triton.common import (
    CANCEL_POLL_S,
    TRITON_TO_TORCH,
    check_response,
    error_response,
    get_scalar,
    get_text,
    get_texts,
    input_tensors,
    load_deployment,
    load_family,
    log,
    report_stall,
    requested_outputs,
    response_of,
    stage_ready,
    text_output,
    torch_output,
    trace,
    vision_chunk,
)
from vlm_triton.triton.vision_client import prompt_table

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PREPROCESS_OUT = [
    "input_ids", "pixel_values", "end_id", "pad_id", "stop_words_list", "prompt_vocab_size", "prompt_table_extra_ids",
    *UNIT_EXTRAS,
]
POSTPROCESS_OUT = ["text", "prefix_offset", "read_offset", "held_text", "stopped"]


def _scalar_tensor(name: str, value: Any, dtype: type) -> Any:
    return pb_utils.Tensor(name, np.array([[value]], dtype=dtype))


def _out(response: Any, name: str) -> Any:
    return pb_utils.get_output_tensor_by_name(response, name)


def _int(response: Any, name: str) -> int:
    """A per-request scalar output ([1] or [1, 1])."""
    return int(_out(response, name).as_numpy().reshape(-1)[0])


# The decoupled BLS ResponseIterator is synchronous: each next() blocks until that request's next response. One
# worker thread per stream pulls it and hands every response to the event loop, which takes all that arrived since
# it last looked as one batch: when the loop falls behind under load, a batch carries several llm responses and costs
# one detokenize call and one chunk to the client instead of one each (docs/benchmarks.md, item 23).
_RESPONSE_PULLERS = ThreadPoolExecutor(max_workers=512, thread_name_prefix="bls-responses")
_DONE = object()

# A finished ResponseIterator must not be freed by the stub's own C++ thread. The Python backend (r24.10, and its
# main branch as of 2026-06) keeps each iterator in a map too, and erases it on its stub-to-parent thread, without the
# GIL, when it tells the parent the stream is over. If Python had already dropped its references, that erase frees the
# iterator there: every response it kept, with the numpy arrays of their tensors, is released without the GIL, and the
# stub dies (SIGSEGV). The dead stub then never acknowledges the llm's next response to it, so the llm's sender waits
# forever and every stream stalls (docs/benchmarks.md, item 26). Python keeps every finished iterator RETAIN_S longer,
# so its last reference is always dropped here, under the GIL, long after the map's.
RETAIN_S = 10.0
_RETAINED: deque[tuple[float, Any]] = deque()
_RETAINED_LOCK = threading.Lock()


def _retain(iterator: Any, now: float | None = None) -> None:
    """Hold `iterator` for RETAIN_S; drop those held longer (any thread: pullers call it as their streams end)."""
    now = time.monotonic() if now is None else now
    expired = []
    with _RETAINED_LOCK:
        _RETAINED.append((now + RETAIN_S, iterator))
        while _RETAINED[0][0] <= now:
            expired.append(_RETAINED.popleft())
    del expired  # freed here, outside the lock: each is finished, so freeing it does not wait for responses


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _response_batches(iterator: Any) -> AsyncIterator[list[Any]]:
    loop = asyncio.get_running_loop()
    inbox: deque[Any] = deque()
    ready = asyncio.Event()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(ready.set)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def pull() -> None:
        try:
            for response in iterator:
                inbox.append(response)
                wake()
        except BaseException as exc:  # noqa: BLE001 - handed to the stream's reader
            inbox.append(_Failed(exc))
        _retain(iterator)  # before the reader can see the end and drop its own reference
        inbox.append(_DONE)
        wake()

    _RESPONSE_PULLERS.submit(pull)
    while True:
        await ready.wait()
        ready.clear()  # before draining: a response appended after the drain has its wake() still to come
        batch = []
        while inbox:
            item = inbox.popleft()
            if isinstance(item, _Failed):
                raise item.exc
            if item is _DONE:
                if batch:
                    yield batch
                return
            batch.append(item)
        if batch:
            yield batch


_CANCELS: set[asyncio.Task[None]] = set()  # llm cancellations under way (the loop keeps only weak references)


class TritonStages(StageClient):
    def __init__(self, embed_dtype: torch.dtype | None = None, vision_chunk: int = 32, tokenizer: Any = None,
                 gpu_prompt_table: bool = False, vision_in_llm: bool = False) -> None:
        self.embed_dtype = embed_dtype  # the llm's prompt-table dtype (tensorrt_llm: the engine dtype)
        self.gpu_prompt_table = gpu_prompt_table  # False: copy the table to host memory before the llm call
        self.vision_chunk = vision_chunk  # most tiles per vision_encoder request (its max batch size)
        self.tokenizer = tokenizer  # set: detokenize here (inline) instead of a `postprocess` call per chunk
        self.vision_in_llm = vision_in_llm  # the llm encodes the images (no vision_encoder call)

    async def preprocess(self, messages_json: str) -> Prepared:
        outputs = [*PREPROCESS_OUT, "pixel_ref"] if self.vision_in_llm else PREPROCESS_OUT
        request = pb_utils.InferenceRequest(
            model_name="preprocess", requested_output_names=outputs, inputs=[text_output("messages", messages_json)],
            request_id=timeline.current(),
        )
        response = check_response(await request.async_exec(), "preprocess")
        timeline.mark("bls.preprocessed")
        pixels = _out(response, "pixel_values")
        ref = _out(response, "pixel_ref") if self.vision_in_llm else None
        by_reference = ref is not None and ref.shape()[-1] > 0  # [1, 0]: by value
        extra_ids = _out(response, "prompt_table_extra_ids")
        extras = [_out(response, name) for name in UNIT_EXTRAS]
        return Prepared(
            input_ids=_out(response, "input_ids").as_numpy().reshape(-1),
            pixel_values=pixels,
            num_tiles=int(pixels.shape()[0]),
            pixel_ref=ref if by_reference else None,
            end_id=_int(response, "end_id"),
            pad_id=_int(response, "pad_id"),
            stop_words_list=_out(response, "stop_words_list").as_numpy().reshape(2, -1),
            prompt_vocab_size=_int(response, "prompt_vocab_size"),
            prompt_table_extra_ids=None if extra_ids is None else extra_ids.as_numpy().reshape(-1),
            unit_extras=tuple(t for t in extras if t is not None and t.shape()[0]),  # empty: none for this request
        )

    async def encode_images(self, prepared: Prepared) -> list[Any]:
        """The llm inputs that carry the request's images: its prompt table, or with engine.vision_in_llm its vision
        units as preprocess made them (contracts.LLM_VISION_INPUTS, with the llm's batch dim) for the llm to encode."""
        if self.vision_in_llm:
            by_value = prepared.pixel_ref is None
            units = [prepared.pixel_values] if by_value else []
            units.extend(prepared.unit_extras)
            inputs = [torch_output(t.name(), from_dlpack(t.to_dlpack()).unsqueeze(0)) for t in units]
            # pixel_ref is [1, REF_LEN] already: the llm reads the planes from preprocess's pool
            return inputs if by_value else [prepared.pixel_ref, *inputs]
        # Host memory by default: no CUDA tensor may ever reach this stub. The first one makes Triton share its CUDA
        # memory pool with the stub, and in Python backends before r26.07 that handshake can leave the stub's
        # parent-to-stub thread waiting forever (triton-inference-server/python_backend#439). That thread also
        # delivers every decoupled llm response after the first, so each stream then stalls after one token
        # (docs/benchmarks.md, item 7). Triton copies the embeddings to host memory for us.
        table = await prompt_table(prepared.pixel_values, prepared.unit_extras, self.vision_chunk, self.embed_dtype,
                                   host=not self.gpu_prompt_table)
        timeline.mark("bls.encoded")
        return [torch_output("prompt_embedding_table", table)]

    async def generate(self, prepared: Prepared, table: Any, options: RequestOptions) -> AsyncIterator[list[int]]:
        request_id = uuid.uuid4().hex
        end_id = -1 if options.ignore_eos else prepared.end_id
        inputs = [
            pb_utils.Tensor("input_ids", prepared.input_ids.reshape(1, -1).astype(np.int32)),
            _scalar_tensor("input_lengths", prepared.prompt_tokens, np.int32),
            _scalar_tensor("request_output_len", options.max_tokens, np.int32),
            _scalar_tensor("end_id", end_id, np.int32),
            _scalar_tensor("pad_id", prepared.pad_id, np.int32),
            _scalar_tensor("temperature", options.temperature, np.float32),
            _scalar_tensor("runtime_top_k", options.top_k, np.int32),
            _scalar_tensor("runtime_top_p", options.top_p, np.float32),
            _scalar_tensor("repetition_penalty", options.repetition_penalty, np.float32),
            _scalar_tensor("presence_penalty", options.presence_penalty, np.float32),
            _scalar_tensor("frequency_penalty", options.frequency_penalty, np.float32),
            _scalar_tensor("streaming", True, np.bool_),
            _scalar_tensor("exclude_input_in_output", True, np.bool_),
        ]
        if not options.ignore_eos:
            inputs.append(pb_utils.Tensor("stop_words_list", prepared.stop_words_list[None].astype(np.int32)))
        if options.seed is not None:
            inputs.append(_scalar_tensor("seed", options.seed, np.uint64))
        if table is not None:
            inputs.extend(table)
            inputs.append(_scalar_tensor("prompt_vocab_size", prepared.prompt_vocab_size, np.int32))
            if prepared.prompt_table_extra_ids is not None:
                extra_ids = prepared.prompt_table_extra_ids.reshape(1, -1).astype(np.uint64)
                inputs.append(pb_utils.Tensor("prompt_table_extra_ids", extra_ids))
        request = pb_utils.InferenceRequest(
            model_name="llm", requested_output_names=["output_ids"], inputs=inputs, request_id=request_id
        )
        finished = False
        try:
            trace(f"llm exec {request_id}")
            timeline.mark("bls.llm_call", detail=request_id)
            iterator = await request.async_exec(decoupled=True)  # returns with the llm's first response
            trace(f"llm iterator {request_id}")
            timeline.mark("bls.llm_first")
            async for batch in _response_batches(iterator):
                new_ids: list[int] = []
                for response in batch:
                    check_response(response, "llm")
                    ids = _out(response, "output_ids")
                    if ids is not None and ids.as_numpy().size:
                        new_ids.extend(ids.as_numpy().reshape(-1).tolist())
                if new_ids:
                    yield new_ids
            finished = True
        finally:
            if not finished:  # closed early or its wait cancelled (a stall): the llm may be what hangs, so no waiting
                task = asyncio.get_running_loop().create_task(self._cancel(request_id))
                _CANCELS.add(task)
                task.add_done_callback(_cancel_done)

    async def _cancel(self, request_id: str) -> None:
        """tensorrt_llm-style cancellation: a request with the same id and stop=True."""
        zero = np.zeros((1, 1), dtype=np.int32)
        request = pb_utils.InferenceRequest(
            model_name="llm",
            requested_output_names=["output_ids"],
            request_id=request_id,
            inputs=[
                pb_utils.Tensor("input_ids", zero),
                pb_utils.Tensor("input_lengths", zero),
                pb_utils.Tensor("request_output_len", zero),
                _scalar_tensor("stop", True, np.bool_),
            ],
        )
        async for _ in _response_batches(await request.async_exec(decoupled=True)):
            pass

    async def detokenize(
        self, window: Sequence[int], prefix_offset: int, read_offset: int, held: str, stop: Sequence[str], final: bool
    ) -> Detokenized:
        if self.tokenizer is not None:
            return detokenize_step(self.tokenizer, window, prefix_offset, read_offset, held, stop, final)
        inputs = [
            pb_utils.Tensor("token_ids", np.asarray(window, dtype=np.int32).reshape(1, 1, -1)),
            pb_utils.Tensor("prefix_offset", np.array([prefix_offset], dtype=np.int32)),
            pb_utils.Tensor("read_offset", np.array([read_offset], dtype=np.int32)),
            text_output("held_text", held),
            pb_utils.Tensor("final", np.array([final], dtype=np.bool_)),
        ]
        if stop:
            inputs.append(text_output("stop", list(stop)))
        request = pb_utils.InferenceRequest(
            model_name="postprocess", requested_output_names=POSTPROCESS_OUT, inputs=inputs
        )
        response = check_response(await request.async_exec(), "postprocess")
        return Detokenized(
            text=_out(response, "text").as_numpy()[0].decode("utf-8"),
            prefix_offset=int(_out(response, "prefix_offset").as_numpy()[0]),
            read_offset=int(_out(response, "read_offset").as_numpy()[0]),
            held=_out(response, "held_text").as_numpy()[0].decode("utf-8"),
            stopped=bool(_out(response, "stopped").as_numpy()[0]),
        )


def _cancel_done(task: asyncio.Task[None]) -> None:
    _CANCELS.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("cancelling an llm request failed: %r", task.exception())


def read_options(request: Any, default_max_tokens: int) -> RequestOptions:
    """A request's sampling options (`request`: the request or its `input_tensors`)."""
    seed = get_scalar(request, "seed", None)
    return RequestOptions(
        max_tokens=int(get_scalar(request, "max_tokens", default_max_tokens)),
        stream=bool(get_scalar(request, "stream", False)),
        temperature=float(get_scalar(request, "temperature", 0.0)),
        top_p=float(get_scalar(request, "top_p", 1.0)),
        top_k=int(get_scalar(request, "top_k", 0)),
        seed=None if seed is None else int(seed),
        repetition_penalty=float(get_scalar(request, "repetition_penalty", 1.0)),
        presence_penalty=float(get_scalar(request, "presence_penalty", 0.0)),
        frequency_penalty=float(get_scalar(request, "frequency_penalty", 0.0)),
        stop=tuple(get_texts(request, "stop")),
        ignore_eos=bool(get_scalar(request, "ignore_eos", False)),
    )


def _response(chunk: Chunk, requested: frozenset[str]) -> Any:
    return response_of(requested, {
        "text": lambda: text_output("text", chunk.text),
        "finish_reason": lambda: text_output("finish_reason", chunk.finish_reason or ""),
        "prompt_tokens": lambda: pb_utils.Tensor("prompt_tokens", np.array([chunk.prompt_tokens], dtype=np.int32)),
        "completion_tokens": lambda: pb_utils.Tensor(
            "completion_tokens", np.array([chunk.completion_tokens], dtype=np.int32)
        ),
    })


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        cfg = load_deployment(args)
        self.default_max_tokens = cfg.limits.default_max_tokens
        self.stall_timeout_s = cfg.triton.bls_stall_timeout_s
        tokenizer = load_family(cfg).load_tokenizer() if cfg.triton.bls_detokenize == "inline" else None
        if cfg.triton.bls_gpu_prompt_table:
            log.warning("triton.bls_gpu_prompt_table = true: CUDA tensors reach the bls stub, which stalls llm streams "
                        "with Triton Python backends before r26.07 (python_backend#439); keep it false there")
        self.stages = TritonStages(
            embed_dtype=TRITON_TO_TORCH[cfg.tensor_dtypes["EMBED"]], vision_chunk=vision_chunk(args, cfg),
            tokenizer=tokenizer,
            gpu_prompt_table=cfg.triton.bls_gpu_prompt_table, vision_in_llm=cfg.vision_in_llm,
        )
        stage_ready(cfg, args["model_name"])

    def finalize(self) -> None:
        # The retained iterators go while the stub is whole: freed by the interpreter's teardown, after the stub's
        # own objects, they crashed it there (SIGSEGV in the last garbage collection)
        with _RETAINED_LOCK:
            _RETAINED.clear()

    async def execute(self, requests: list[Any]) -> None:
        await asyncio.gather(*(self._serve(r) for r in requests))

    async def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        timeline.bind(request.request_id())
        timeline.mark("bls.execute")
        sent = False
        try:
            inputs = input_tensors(request)
            messages = get_text(inputs, "messages")
            if messages is None:
                raise InvalidRequest("the 'messages' input is required")
            options = read_options(inputs, self.default_max_tokens)
            requested = requested_outputs(request)
            chunks = run_pipeline(self.stages, messages, options, stall_timeout_s=self.stall_timeout_s)
            polled = time.monotonic()
            try:
                async for chunk in chunks:
                    if time.monotonic() - polled >= CANCEL_POLL_S:
                        polled = time.monotonic()
                        if request.is_cancelled():  # the client went away: closing `chunks` cancels the llm request
                            cancelled = pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)
                            sender.send(pb_utils.InferenceResponse(error=cancelled), flags=FINAL)
                            return
                    sender.send(_response(chunk, requested), flags=FINAL if chunk.finish_reason else 0)
                    if not sent:
                        sent = True
                        timeline.mark("bls.sent")
            finally:
                await chunks.aclose()
        except Exception as exc:  # noqa: BLE001 - the error goes to this request's client
            if isinstance(exc, StageStalled):
                report_stall(request.request_id(), exc)
            sender.send(error_response(exc), flags=FINAL)
