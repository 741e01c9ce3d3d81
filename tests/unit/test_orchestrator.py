"""The BLS logic without Triton: finish reasons, token counts, stop strings, streaming vs not, cancellation."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Sequence

import numpy as np
import pytest

from vlm_triton.errors import InvalidRequest
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


class FakeStages(StageClient):
    def __init__(self, script: list[list[int]], num_tiles: int = 0) -> None:
        self.script, self.num_tiles = script, num_tiles
        self.closed_early = False
        self.encoded = 0
        self.tokenizer = CharTokenizer()

    async def preprocess(self, messages_json: str) -> Prepared:
        return Prepared(
            input_ids=np.arange(7, dtype=np.int32), pixel_values=None, num_tiles=self.num_tiles, end_id=END,
            pad_id=0, stop_words_list=np.array([[EXTRA_STOP], [1]], dtype=np.int32), prompt_vocab_size=0,
        )

    async def encode_images(self, prepared: Prepared) -> Any:
        self.encoded += 1
        return "table"

    async def generate(self, prepared: Prepared, table: Any, options: RequestOptions) -> AsyncIterator[list[int]]:
        done = False
        try:
            for step in self.script[: options.max_tokens]:
                yield step
            done = True
        finally:
            self.closed_early = not done

    async def detokenize(self, window: Sequence[int], prefix_offset: int, read_offset: int, held: str,
                         stop: Sequence[str], final: bool) -> Detokenized:
        text, p, r = decode_delta(self.tokenizer, window, prefix_offset, read_offset, final=final)
        result = apply_stop_strings(held, text, stop, final=final)
        return Detokenized(result.emit, p, r, result.held, result.stopped)


def run(stages: FakeStages, **options: Any) -> list[Chunk]:
    async def collect() -> list[Chunk]:
        return [c async for c in run_pipeline(stages, "[]", RequestOptions(**options))]

    return asyncio.run(collect())


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
