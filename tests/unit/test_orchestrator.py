"""The BLS logic without Triton: finish reasons, token counts, stop strings, streaming vs not, cancellation, stall
deadlines."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Sequence

import numpy as np
import pytest

from vlm_triton.errors import InvalidRequest, StageStalled
from vlm_triton.pipeline.deadline import within
from vlm_triton.pipeline.orchestrator import Chunk, Detokenized, Prepared, RequestOptions, StageClient, run_pipeline
from vlm_triton.postprocess.detokenizer import decode_delta
from vlm_triton.postprocess.stop_strings import apply_stop_strings

END, EXTRA_STOP = 1, 2  # special ids of the fake tokenizer


class CharTokenizer:
    """id -> chr(id); ids < 32 are special tokens."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i < 32))


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


FOREVER = 3600.0  # a stage that never answers


class FakeStages(StageClient):
    """`script`: the llm's responses. `stall`: a stage that never answers ("preprocess", "vision_encoder",
    "postprocess", or "llm" after `stall_after` responses); `gap_s`: the llm's wait before each response."""

    def __init__(self, script: list[list[int]], num_tiles: int = 0, stall: str = "", stall_after: int = 0,
                 gap_s: float = 0.0) -> None:
        self.script, self.num_tiles = script, num_tiles
        self.stall, self.stall_after, self.gap_s = stall, stall_after, gap_s
        self.closed_early = False
        self.generated = False
        self.encoded = 0
        self.tokenizer = CharTokenizer()

    async def _maybe_stall(self, stage: str) -> None:
        if self.stall == stage:
            await asyncio.sleep(FOREVER)

    async def preprocess(self, messages_json: str) -> Prepared:
        await self._maybe_stall("preprocess")
        return Prepared(
            input_ids=np.arange(7, dtype=np.int32), pixel_values=None, num_tiles=self.num_tiles, end_id=END,
            pad_id=0, stop_words_list=np.array([[EXTRA_STOP], [1]], dtype=np.int32), prompt_vocab_size=0,
        )

    async def encode_images(self, prepared: Prepared) -> Any:
        await self._maybe_stall("vision_encoder")
        self.encoded += 1
        return "table"

    async def generate(self, prepared: Prepared, table: Any, options: RequestOptions) -> AsyncIterator[list[int]]:
        self.generated = True
        done = False
        try:
            for i, step in enumerate(self.script[: options.max_tokens]):
                if i == self.stall_after:
                    await self._maybe_stall("llm")
                await asyncio.sleep(self.gap_s)
                yield step
            done = True
        finally:
            self.closed_early = not done

    async def detokenize(self, window: Sequence[int], prefix_offset: int, read_offset: int, held: str,
                         stop: Sequence[str], final: bool) -> Detokenized:
        await self._maybe_stall("postprocess")
        text, p, r = decode_delta(self.tokenizer, window, prefix_offset, read_offset, final=final)
        result = apply_stop_strings(held, text, stop, final=final)
        return Detokenized(result.emit, p, r, result.held, result.stopped)


def run(stages: FakeStages, stall_timeout_s: float = 0.0, guard_s: float = 10.0, **options: Any) -> list[Chunk]:
    """The chunks of one request; `guard_s` bounds the test itself (a deadline that never fires fails the test
    with the guard's TimeoutError instead of hanging it)."""
    return asyncio.run(collect(stages, [], stall_timeout_s, guard_s, **options))


async def collect(stages: FakeStages, into: list[Chunk], stall_timeout_s: float, guard_s: float,
                  **options: Any) -> list[Chunk]:
    async def pull() -> list[Chunk]:
        chunks = run_pipeline(stages, "[]", RequestOptions(**options), stall_timeout_s=stall_timeout_s)
        async for chunk in chunks:
            into.append(chunk)
        return into

    return await asyncio.wait_for(pull(), guard_s)


def test_length_when_max_tokens_reached() -> None:
    chunks = run(FakeStages([[c] for c in ids("hello world")]), max_tokens=5, stream=True)
    assert "".join(c.text for c in chunks) == "hello"
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 5
    assert all(c.finish_reason is None for c in chunks[:-1]) and len(chunks) > 2
    assert {c.prompt_tokens for c in chunks} == {7}


@pytest.mark.parametrize("last", [END, EXTRA_STOP])
def test_stop_when_an_end_or_stop_token_ends_it(last: int) -> None:
    chunks = run(FakeStages([[c] for c in ids("hi")] + [[last]]), max_tokens=3)
    assert chunks == [Chunk("hi", "stop", 7, 3)]  # the end token counts as a completion token


def test_ignore_eos_reports_length() -> None:
    chunks = run(FakeStages([[c] for c in ids("hi")] + [[END]]), max_tokens=3, ignore_eos=True)
    assert chunks[-1].finish_reason == "length"


def test_stop_string_cuts_and_cancels_generation() -> None:
    stages = FakeStages([[c] for c in ids("one, two. three")])
    chunks = run(stages, max_tokens=15, stream=True, stop=(". ", "xyz"))
    assert "".join(c.text for c in chunks) == "one, two"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == len("one, two. ")
    assert stages.closed_early
    assert not any(". " in c.text for c in chunks)


def test_non_streaming_is_one_chunk_and_images_are_encoded_once() -> None:
    stages = FakeStages([[c] for c in ids("abc")], num_tiles=3)
    chunks = run(stages, max_tokens=10)
    assert chunks == [Chunk("abc", "length", 7, 3)] and stages.encoded == 1
    assert run(FakeStages([[c] for c in ids("abc")]), max_tokens=10)[0].text == "abc"


def test_several_tokens_per_response() -> None:
    chunks = run(FakeStages([ids("ab"), ids("cd"), [END]]), max_tokens=10, stream=True)
    assert "".join(c.text for c in chunks) == "abcd" and chunks[-1] == Chunk("", "stop", 7, 5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5, "top_p": 0.0}, "top_p"),
        ({"max_tokens": 5, "temperature": -1.0}, "temperature"),
        ({"max_tokens": 5, "presence_penalty": 3.0}, "presence_penalty"),
        ({"max_tokens": 5, "stop": tuple("x" * 17)}, "stop strings"),
    ],
)
def test_options_are_validated(options: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        RequestOptions(**options)


def run_stalled(stages: FakeStages, stall_timeout_s: float, **options: Any) -> tuple[StageStalled, list[Chunk], float]:
    """The StageStalled a request ends with, the chunks it got before, and how long it took."""
    chunks: list[Chunk] = []
    start = time.monotonic()
    with pytest.raises(StageStalled) as raised:
        asyncio.run(collect(stages, chunks, stall_timeout_s, 10.0, **options))
    return raised.value, chunks, time.monotonic() - start


def test_stalled_llm_stream_fails_after_the_deadline_and_cancels_it() -> None:
    stages = FakeStages([[c] for c in ids("hello")], stall="llm", stall_after=2)
    error, chunks, took = run_stalled(stages, 0.05, max_tokens=5, stream=True)
    assert str(error) == "llm produced no response for 0.05 s after 2 responses"
    assert error.stage == "llm" and 0.05 <= took < 5
    assert "".join(c.text for c in chunks) == "he"  # what came before the stall was streamed
    assert stages.closed_early  # the wait was cancelled, which closes the stream: the llm request is cancelled


def test_llm_that_never_answers_fails_after_the_deadline() -> None:
    stages = FakeStages([[c] for c in ids("hi")], stall="llm", stall_after=0)
    error, chunks, _ = run_stalled(stages, 0.05, max_tokens=5)
    assert str(error) == "llm produced no response for 0.05 s after 0 responses" and chunks == []
    assert stages.closed_early


def test_slow_but_progressing_llm_stream_does_not_time_out() -> None:
    """Each gap is below the deadline, the whole stream well above it: the deadline is per response."""
    stages = FakeStages([[c] for c in ids("abcdefgh")], gap_s=0.05)
    start = time.monotonic()
    chunks = run(stages, stall_timeout_s=0.25, max_tokens=8, stream=True)
    assert time.monotonic() - start > 0.25 * 1.5
    assert "".join(c.text for c in chunks) == "abcdefgh" and chunks[-1].finish_reason == "length"


@pytest.mark.parametrize("stage, tiles", [("preprocess", 0), ("vision_encoder", 3), ("postprocess", 0)])
def test_a_stalled_stage_call_fails_after_the_deadline(stage: str, tiles: int) -> None:
    stages = FakeStages([[c] for c in ids("abc")], num_tiles=tiles, stall=stage)
    error, chunks, took = run_stalled(stages, 0.05, max_tokens=3, stream=True)
    assert str(error) == f"{stage} produced no response for 0.05 s" and error.stage == stage
    assert chunks == [] and took < 5
    assert stages.generated == (stage == "postprocess")  # the llm is not called after a stalled earlier stage
    assert stages.closed_early == (stage == "postprocess")  # ... and cancelled after a stalled later one


@pytest.mark.parametrize("stall", ["llm", "preprocess"])
def test_deadline_zero_waits_forever(stall: str) -> None:
    stages = FakeStages([[c] for c in ids("abc")], stall=stall)
    with pytest.raises(TimeoutError):  # the test's own guard, not a StageStalled
        run(stages, stall_timeout_s=0, guard_s=0.3, max_tokens=3)


def test_a_stages_own_timeout_error_is_not_a_stall() -> None:
    async def fetch() -> None:
        raise TimeoutError("media fetch timed out")

    with pytest.raises(TimeoutError, match="media fetch"):
        asyncio.run(within(fetch(), "preprocess", 5.0))
