"""Incremental detokenization with the tiny checkpoint's real byte-level BPE tokenizer, and stop strings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from vlm_triton.checkpoints.tiny import LLM_KINDS
from vlm_triton.postprocess.detokenizer import DetokenizerState
from vlm_triton.postprocess.stop_strings import apply_stop_strings

TEXTS = ["Hello, world! How are you?", "你好，世界。书生·万象", "emoji 🙂🚀 mixed 中文 and text 👩‍👩‍👧", "  leading spaces\nnew lines\t"]


@pytest.fixture(scope="module")
def tokenizer(tiny_internvl3: Path):
    return AutoTokenizer.from_pretrained(str(tiny_internvl3))


@pytest.fixture(scope="module")
def byte_fallback_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The tiny InternLM2 (sentencepiece, byte fallback) tokenizer, as tiny checkpoints write it."""
    out = tmp_path_factory.mktemp("internlm2-tok")
    LLM_KINDS["internlm2"].write_tokenizer(out, llm={"max_position_embeddings": 4096})
    return AutoTokenizer.from_pretrained(str(out))


def _byte_ids(tokenizer) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id] or list(tokenizer.encode("中文🙂"))


@pytest.mark.parametrize("which", ["qwen2", "internlm2"])
def test_text_does_not_depend_on_how_tokens_are_grouped(request, which: str) -> None:
    """An llm response may carry several tokens; the text must be what one-token-at-a-time gives (a byte-fallback
    decoder turns "<0x37><0x87>" into "7\ufffd" one by one but into two U+FFFD at once)."""
    tokenizer = request.getfixturevalue("tokenizer" if which == "qwen2" else "byte_fallback_tokenizer")
    byte_ids, rng = _byte_ids(tokenizer), random.Random(0)
    if which == "internlm2":
        seven, cont = (tokenizer.convert_tokens_to_ids(t) for t in ("<0x37>", "<0x87>"))
        state = DetokenizerState()
        assert state.push(tokenizer, [seven, cont]) + state.push(tokenizer, [], final=True) == "7\ufffd"
    for _ in range(150):
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(len(tokenizer))
               for _ in range(rng.randint(1, 24))]
        one = DetokenizerState()
        expected = "".join(one.push(tokenizer, [i]) for i in ids) + one.push(tokenizer, [], final=True)
        grouped, parts, k = DetokenizerState(), [], 0
        while k < len(ids):
            n = rng.randint(1, 6)
            parts.append(grouped.push(tokenizer, ids[k:k + n]))
            k += n
        parts.append(grouped.push(tokenizer, [], final=True))
        assert "".join(parts) == expected, ids


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
