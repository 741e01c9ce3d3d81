"""The BLS logic, free of Triton: preprocess -> vision_encoder -> llm (streaming) -> postprocess per response.

`StageClient` is the four stage calls; `triton.bls_model` implements it with async BLS requests, tests with fakes.
`run_pipeline` turns one chat request into text deltas with a correct finish_reason and exact token counts, and
turns a stage that stops answering into `StageStalled` (`stall_timeout_s`, see `pipeline.deadline`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

import numpy as np

from vlm_triton.errors import InvalidRequest
from vlm_triton.pipeline.deadline import within
from vlm_triton.postprocess.detokenizer import decode_delta
from vlm_triton.postprocess.stop_strings import apply_stop_strings


@dataclass(frozen=True)
class RequestOptions:
    max_tokens: int
    stream: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        """Reject out-of-range values with a message saying what is allowed (InvalidRequest)."""
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (len(self.stop) <= 16, "at most 16 stop strings are allowed"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be in [0, 2^63)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(message)


@dataclass(frozen=True)
class Prepared:
    """The preprocess stage's outputs, as plain arrays."""

    input_ids: np.ndarray  # int32 [L]
    pixel_values: Any  # [N, 3, ...] raw uint8 (torch) or FP16 normalised (trtllm); N == 0 for text-only prompts
    num_tiles: int  # N: vision-encoder items (tiles, or decoded images the encoder cuts into tiles)
    end_id: int
    pad_id: int
    stop_words_list: np.ndarray  # int32 [2, K] in the tensorrt_llm format
    prompt_vocab_size: int
    prompt_table_extra_ids: np.ndarray | None = None  # uint64 [L]: 0 for text, image-content ids (KV reuse)
    # per-item tensors that go with pixel_values to the vision encoder (contracts.UNIT_EXTRAS: tgt_sizes, image_grids)
    unit_extras: tuple[Any, ...] = ()
    pixel_ref: Any = None  # with engine.vision_in_llm: where the pixel_values wait (plane_pool.py); None: by value

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def stop_sequences(self) -> list[list[int]]:
        ids, offsets = self.stop_words_list[0], self.stop_words_list[1]
        out, start = [], 0
        for end in offsets:
            if end < 0:
                break
            out.append([int(i) for i in ids[start:end]])
            start = int(end)
        return out


@dataclass(frozen=True)
class Detokenized:
    text: str
    prefix_offset: int
    read_offset: int
    held: str
    stopped: bool


def detokenize_step(
    tokenizer: Any, window: Sequence[int], prefix_offset: int, read_offset: int, held: str, stop: Sequence[str],
    final: bool,
) -> Detokenized:
    """One incremental detokenization + stop-string step: what the `postprocess` model computes per call, for a
    caller that holds the tokenizer itself (the BLS with inline detokenization)."""
    delta, prefix, read = decode_delta(tokenizer, list(window), prefix_offset, read_offset, final=final)
    result = apply_stop_strings(held, delta, stop, final=final)
    return Detokenized(result.emit, prefix, read, result.held, result.stopped)


@dataclass(frozen=True)
class Chunk:
    text: str
    finish_reason: str | None  # None until the last chunk, then "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


class StageClient(ABC):
    @abstractmethod
    async def preprocess(self, messages_json: str) -> Prepared: ...

    @abstractmethod
    async def encode_images(self, prepared: Prepared) -> Any:
        """The prompt embedding table for the request's tiles (opaque: passed on to `generate`)."""

    @abstractmethod
    def generate(self, prepared: Prepared, table: Any, options: RequestOptions) -> AsyncIterator[list[int]]:
        """New token ids per llm response. Closing the iterator early, or cancelling a wait for its next item (a
        stall), cancels the llm request; that cleanup must not wait for the llm (it may be the stalled stage)."""

    @abstractmethod
    async def detokenize(
        self, window: Sequence[int], prefix_offset: int, read_offset: int, held: str, stop: Sequence[str], final: bool
    ) -> Detokenized: ...


def ended_by_stop_token(tail: Sequence[int], end_id: int, stop_sequences: Sequence[Sequence[int]]) -> bool:
    if tail and end_id >= 0 and tail[-1] == end_id:
        return True
    return any(seq and list(tail[-len(seq):]) == list(seq) for seq in stop_sequences)


async def run_pipeline(
    stages: StageClient, messages_json: str, options: RequestOptions, *, stall_timeout_s: float = 0.0
) -> AsyncIterator[Chunk]:
    """The request's chunks. A stage that gives no response for `stall_timeout_s` (a whole preprocess,
    vision_encoder or postprocess call; for the llm, the wait for each next response, the first included) raises
    StageStalled after its call is cancelled; 0 waits forever."""
    timeout = stall_timeout_s
    prepared = await within(stages.preprocess(messages_json), "preprocess", timeout)
    table = await within(stages.encode_images(prepared), "vision_encoder", timeout) if prepared.num_tiles else None
    stop_sequences = prepared.stop_sequences()
    keep_tail = max([1, *(len(s) for s in stop_sequences)])
    window: list[int] = []
    prefix = read = 0
    held, pending = "", []
    tail: list[int] = []
    completion = responses = 0
    stopped = False
    generation = stages.generate(prepared, table, options)
    try:
        while True:
            try:
                waited = f" after {responses} response{'s' * (responses != 1)}"
                new_ids = await within(anext(generation), "llm", timeout, waited)
            except StopAsyncIteration:
                break
            responses += 1
            completion += len(new_ids)
            tail = (tail + list(new_ids))[-keep_tail:]
            window.extend(new_ids)
            step = stages.detokenize(window, prefix, read, held, options.stop, False)
            out = await within(step, "postprocess", timeout)
            del window[: out.prefix_offset]
            prefix, read, held = 0, out.read_offset - out.prefix_offset, out.held
            if out.stopped:
                pending.append(out.text)
                stopped = True
                break
            if out.text:
                if options.stream:
                    yield Chunk(out.text, None, prepared.prompt_tokens, completion)
                else:
                    pending.append(out.text)
    finally:
        # cancels the llm request when we stop early; a no-op after a stall (the cancelled wait closed it)
        await within(generation.aclose(), "llm", timeout, " while being cancelled")
    if not stopped:
        step = stages.detokenize(window, prefix, read, held, options.stop, True)
        out = await within(step, "postprocess", timeout)
        pending.append(out.text)
        stopped = out.stopped
    if stopped or ended_by_stop_token(tail, -1 if options.ignore_eos else prepared.end_id, stop_sequences):
        reason = "stop"
    else:
        reason = "length"
    yield Chunk("".join(pending), reason, prepared.prompt_tokens, completion)
