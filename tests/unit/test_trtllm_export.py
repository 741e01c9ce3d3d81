"""The LLM export (convert_checkpoint.py's input) is a plain Hugging Face LLM folder with the checkpoint's LLM, and
prompt_table_extra_ids give equal images equal ids and text 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from vlm_triton.errors import SetupError
from vlm_triton.families import open_family
from vlm_triton.models.language_model import load_language_model
from vlm_triton.trtllm.kv_reuse import prompt_table_extra_ids
from vlm_triton.trtllm.llm_export import export_llm_folder


def test_exported_llm_loads_as_plain_qwen2_with_the_same_logits(tiny_internvl3: Path, tmp_path: Path) -> None:
    family = open_family(tiny_internvl3)
    out = export_llm_folder(family, tmp_path / "llm", progress=False)
    assert AutoConfig.from_pretrained(out).architectures == ["Qwen2ForCausalLM"]
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_language_model(family.checkpoint, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours(ids).logits)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("hello world") == family.load_tokenizer().encode("hello world")
    with pytest.raises(SetupError, match="is not empty"):
        export_llm_folder(family, out, progress=False)


def test_prompt_table_extra_ids() -> None:
    vocab, per_tile = 100, 3
    a, b = np.zeros((3, 4, 4), np.float16), np.ones((3, 4, 4), np.float16)
    ids = np.array([1, 2, *range(vocab, vocab + 3 * per_tile), 5], dtype=np.int32)
    extra = prompt_table_extra_ids(ids, vocab_size=vocab, pixel_values=np.stack([a, b, a]))
    assert extra.dtype == np.uint64 and extra.shape == ids.shape
    assert extra[0] == extra[1] == extra[-1] == 0
    tiles = extra[2:-1].reshape(3, per_tile)
    assert (tiles == tiles[:, :1]).all() and tiles[0, 0] == tiles[2, 0] != tiles[1, 0] and tiles.min() > 0
    assert not prompt_table_extra_ids(np.array([1, 2], np.int32), vocab_size=vocab,
                                      pixel_values=np.zeros((0, 3, 4, 4))).any()
    with pytest.raises(SetupError, match="cannot be split evenly"):
        prompt_table_extra_ids(ids[:-2], vocab_size=vocab, pixel_values=np.stack([a, b, a]))
