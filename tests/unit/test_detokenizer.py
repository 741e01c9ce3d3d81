"""Incremental detokenization with the tiny checkpoint's real byte-level BPE tokenizer, and stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from vlm_triton.postprocess.detokenizer import DetokenizerState
from vlm_triton.postprocess.stop_strings import apply_stop_strings

TEXTS = ["Hello, world! How are you?", "你好，世界。书生·万象", "emoji 🙂🚀 mixed 中文 and text 👩‍👩‍👧", "  leading spaces\nnew lines\t"]


@pytest.fixture(scope="module")
def tokenizer(tiny_internvl3: Path):
    return AutoTokenizer.from_pretrained(str(tiny_internvl3))


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_never_emits_a_broken_character(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids) or text.isascii()  # multi-byte chars are split
    state, deltas = DetokenizerState(), []
    for i in ids:
        deltas.append(state.push(tokenizer, [i]))
        assert len(state.window) <= 8, "the window must stay short"
    deltas.append(state.push(tokenizer, [], final=True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped(tokenizer) -> None:
    ids = tokenizer.encode("fine") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    state = DetokenizerState()
    text = "".join(state.push(tokenizer, [i]) for i in ids) + state.push(tokenizer, [], final=True)
    assert text == "fine"


def test_stop_strings_hold_back_partial_matches() -> None:
    r = apply_stop_strings("", "Hello wo", ["world"])
    assert (r.emit, r.held, r.stopped) == ("Hello ", "wo", False)
    r = apply_stop_strings(r.held, "rld!", ["world"])
    assert (r.emit, r.held, r.stopped) == ("", "", True)
    r = apply_stop_strings("", "no match here", ["xyz"])
    assert (r.emit, r.held, r.stopped) == ("no match here", "", False)
    r = apply_stop_strings("", "ends with x", ["xyz"])
    assert (r.emit, r.held) == ("ends with ", "x")
    r = apply_stop_strings(r.held, "", ["xyz"], final=True)
    assert (r.emit, r.held, r.stopped) == ("x", "", False)
    r = apply_stop_strings("", "a STOP b stop", ["stop", "STOP"])
    assert (r.emit, r.stopped) == ("a ", True)
