"""The InternLM2 / InternLM2.5 half of the tiny-checkpoint generator: llm_config, weights and tokenizer files.

Real InternLM2 checkpoints ship a sentencepiece `tokenizer.model` and InternLM's own tokenizer code
(`tokenization_internlm2.py`, loaded through `trust_remote_code`). The tiny ones ship a real sentencepiece
`tokenizer.model` (byte-fallback BPE trained on a small corpus; `<unk>` 0, `<s>` 1, `</s>` 2; the InternLM2 chat
tokens are the last pieces of the model, as in the real one) plus an equivalent `tokenizer.json`, so that
`AutoTokenizer.from_pretrained(path)` loads it with no remote code and without converting the sentencepiece
file. The InternVL markers (`<img>` ... `</box>`) are added tokens after the sentencepiece vocabulary.

The `tokenizer.json` reproduces the InternLM2 slow tokenizer: text is cut at special tokens, each piece is
encoded with sentencepiece (no dummy prefix, spaces as `▁`, byte fallback) and `<s>` is prepended (`add_bos_token`).
`tests/unit/test_internlm2_tokenizer.py` checks that equivalence against `sentencepiece` itself.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

# In sentencepiece-id order; the real ones are 92538..92543 at the end of a 92544-piece model [spec 1.3].
INTERNLM2_CHAT_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
                         "<|im_start|>")
INTERNLM2_CONTROL_TOKENS = ("<unk>", "<s>", "</s>")
_USER_DEFINED = 4  # sentencepiece ModelProto.SentencePiece.Type.USER_DEFINED


def train_sentencepiece(corpus: list[str], *, vocab_size: int) -> bytes:
    """A serialized byte-fallback BPE sentencepiece model whose chat tokens are its last pieces."""
    import sentencepiece as spm
    from transformers.utils import sentencepiece_model_pb2_new as spm_pb2  # works with protobuf 4 and 5

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=list(INTERNLM2_CHAT_TOKENS),
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    pieces = list(proto.pieces)
    reordered = [p for p in pieces if p.type != _USER_DEFINED] + [p for p in pieces if p.type == _USER_DEFINED]
    copies = [spm_pb2.ModelProto.SentencePiece(piece=p.piece, score=p.score, type=p.type) for p in reordered]
    del proto.pieces[:]
    proto.pieces.extend(copies)
    return proto.SerializeToString()


def _vocab_and_merges(model: bytes) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocab and merges equivalent to the sentencepiece model: a pair merges when its concatenation is a
    piece, ranked by that piece's id (sentencepiece BPE pieces are sorted by score)."""
    from transformers.utils import sentencepiece_model_pb2_new as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == 1}  # NORMAL pieces only
    merges = []
    for merged, rank in normal.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges.sort()
    return vocab, [(m[3], m[4]) for m in merges]


def build_internlm2_tokenizer_json(model: bytes, extra_specials: tuple[str, ...]) -> Tokenizer:
    vocab, merges = _vocab_and_merges(model)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    specials = INTERNLM2_CONTROL_TOKENS + INTERNLM2_CHAT_TOKENS
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + extra_specials])
    return tok


def write_internlm2_tokenizer(out: Path, *, corpus: list[str], extra_specials: tuple[str, ...],
                              vocab_size: int, max_length: int) -> dict[str, int]:
    """tokenizer.model + tokenizer.json + tokenizer_config.json + special_tokens_map.json; returns {token: id}."""
    model = train_sentencepiece(corpus, vocab_size=vocab_size)
    (out / "tokenizer.model").write_bytes(model)
    tok = build_internlm2_tokenizer_json(model, extra_specials)
    tok.save(str(out / "tokenizer.json"))
    specials = INTERNLM2_CONTROL_TOKENS + INTERNLM2_CHAT_TOKENS + extra_specials
    ids = {t: tok.token_to_id(t) for t in specials}
    base = len(_vocab_and_merges(model)[0])
    if [ids[t] for t in extra_specials] != list(range(base, base + len(extra_specials))):
        raise AssertionError(f"InternVL tokens are not contiguous after the sentencepiece vocab: {ids}")
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for t, i in ids.items()}
    additional = list(INTERNLM2_CHAT_TOKENS + extra_specials)
    _dump(out / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": additional, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "model_max_length": max_length, "pad_token": "</s>", "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    _dump(out / "special_tokens_map.json", {"additional_special_tokens": additional, "bos_token": "<s>",
                                            "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"})
    return ids


def internlm2_config(dims: dict[str, Any], ids: dict[str, int]) -> dict[str, Any]:
    """An InternLM2.5-style llm_config (bias false explicitly: the config class default is True)."""
    cfg: dict[str, Any] = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "attn_implementation": "eager",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": False, "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["</s>"],
        "hidden_act": "silu", "initializer_range": 0.02, "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "tie_word_embeddings": False, "use_cache": True,
    }
    cfg.update({k: v for k, v in dims.items() if k != "sp_vocab_size"})
    cfg["vocab_size"] = max(ids.values()) + 1
    return dict(sorted(cfg.items()))


def internlm2_params(llm: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parameter inventory in the original names (`language_model.model.*`, fused wqkv, `output`)."""
    h, f, vocab = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    d = h // heads
    specs: dict[str, tuple[tuple[int, ...], str]] = {"language_model.model.tok_embeddings.weight": ((vocab, h), "token")}
    for n in range(llm["num_hidden_layers"]):
        pre = f"language_model.model.layers.{n}."
        specs[pre + "attention.wqkv.weight"] = (((heads + 2 * kv) * d, h), "linear")
        specs[pre + "attention.wo.weight"] = ((h, heads * d), "linear")
        specs[pre + "feed_forward.w1.weight"] = ((f, h), "linear")
        specs[pre + "feed_forward.w3.weight"] = ((f, h), "linear")
        specs[pre + "feed_forward.w2.weight"] = ((h, f), "linear")
        specs[pre + "attention_norm.weight"] = ((h,), "norm")
        specs[pre + "ffn_norm.weight"] = ((h,), "norm")
    specs["language_model.model.norm.weight"] = ((h,), "norm")
    specs["language_model.output.weight"] = ((vocab, h), "linear")
    return specs


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
