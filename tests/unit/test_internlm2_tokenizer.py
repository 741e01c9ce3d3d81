"""The tiny InternLM2 tokenizer: its tokenizer.json encodes exactly as the InternLM2 slow tokenizer would with
its sentencepiece tokenizer.model (split at special tokens, sentencepiece per piece, `<s>` first)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlm_triton.checkpoints.tiny import make_tiny_checkpoint

SPECIALS = ("<unk>", "<s>", "</s>", "<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>",
            "<|im_end|>", "<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>",
            "</ref>", "<box>", "</box>")
TEXTS = [
    "<|im_start|>system\n你是书生·万象<|im_end|><|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nHi<|im_end|>",
    "  leading spaces, trailing space ",
    "The quick brown fox jumps over the lazy dog. 123 + 4.5 = ?",
    "emoji 🦊 and rare 字符 ǅ \t tab\n\nnewlines",
    "<ref>box</ref><box>[[1, 2, 3, 4]]</box><|action_start|><|plugin|>x<|action_end|>",
    "",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("internvl2_5_internlm2", tmp_path_factory.mktemp("tok") / "c")


def _slow_encode(sp: object, text: str) -> list[int]:
    pattern = "(" + "|".join(re.escape(t) for t in SPECIALS) + ")"
    ids = [sp.piece_to_id("<s>")]  # type: ignore[attr-defined]
    extra = {t: 600 + i for i, t in enumerate(SPECIALS[9:])}
    for piece in re.split(pattern, text):
        if not piece:
            continue
        if piece in extra:
            ids.append(extra[piece])
        elif piece in SPECIALS:
            ids.append(sp.piece_to_id(piece))  # type: ignore[attr-defined]
        else:
            ids.extend(sp.encode(piece))  # type: ignore[attr-defined]
    return ids


@pytest.mark.parametrize("text", TEXTS)
def test_fast_tokenizer_equals_sentencepiece(ckpt: Path, text: str) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=True)
    assert tok.encode(text) == _slow_encode(sp, text)
    assert tok.decode(tok.encode(text)[1:]) == text


def test_special_token_layout(ckpt: Path) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=True)
    n = sp.get_piece_size()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    # InternLM2's chat tokens are the last sentencepiece pieces; InternVL's markers follow as added tokens
    assert [sp.piece_to_id(t) for t in SPECIALS[3:9]] == list(range(n - 6, n))
    assert [tok.convert_tokens_to_ids(t) for t in SPECIALS[9:]] == list(range(n, n + 9))
    config = json.loads((ckpt / "config.json").read_text())
    assert config["llm_config"]["vocab_size"] == n + 9 == len(tok)
    assert "auto_map" not in json.loads((ckpt / "tokenizer_config.json").read_text())  # no remote code needed
