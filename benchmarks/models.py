"""Real-shaped InternVL3 checkpoints with random weights, made locally from the published configs' dimensions.

No download: `make_model("internvl3-1b", out)` writes an original-format (`InternVLChatModel`) checkpoint whose
every tensor has the published shape (bf16), with the project's tiny byte-level BPE tokenizer. The LLM keeps the
real vocabulary size (151674 rows in embed_tokens / lm_head); the tokenizer is padded to that size with filler
tokens (" ab", " ac", ... never produced by encoding) and its special tokens moved to the real Qwen2.5 ids
(<|endoftext|> = 151643, <|im_start|> = 151644, <|im_end|> = 151645, ...), so that every id a random model can
emit decodes to text, as with the real tokenizer: each generated token becomes one streamed delta.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

VIT_300M = {  # InternViT-300M-448px-V2_5 (InternVL3-1B/2B/8B)
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
    "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
    "image_size": 448, "patch_size": 14,
}
_QWEN25 = {"rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "vocab_size": 151674}
QWEN25_0_5B = {**_QWEN25, "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
               "num_key_value_heads": 2, "intermediate_size": 4864}
QWEN25_1_5B = {**_QWEN25, "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
               "num_key_value_heads": 2, "intermediate_size": 8960}
QWEN25_7B = {**_QWEN25, "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "intermediate_size": 18944}
TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
            "image_size": 448, "patch_size": 14}
TINY_LLM = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "vocab_size": 2048}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"vision": TINY_VIT, "llm": TINY_LLM},  # CPU smoke test
    "internvl3-1b": {"vision": VIT_300M, "llm": QWEN25_0_5B},
    "internvl3-2b": {"vision": VIT_300M, "llm": QWEN25_1_5B},
    "internvl3-8b": {"vision": VIT_300M, "llm": QWEN25_7B},
}


def make_model(preset: str, out: Path, seed: int = 0) -> Path:
    """Write the checkpoint of `preset` into `out` (skipped when `out` already holds one of that preset)."""
    from vlm_triton.checkpoints import tiny

    out = Path(out)
    stamp = out / "bench_preset.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"preset": preset, "seed": seed}:
        return out
    dims = PRESETS[preset]
    vocab = int(dims["llm"]["vocab_size"])
    kind = tiny.LLM_KINDS["qwen2"]

    def make_config(d: dict[str, Any], ids: dict[str, int]) -> dict[str, Any]:
        cfg = kind.make_config(d, ids)
        cfg["vocab_size"] = max(cfg["vocab_size"], vocab)  # the tiny writer sizes the vocab to its tokenizer
        return cfg

    tiny.LLM_KINDS["qwen2"] = dataclasses.replace(kind, make_config=make_config)
    try:
        tiny.make_tiny_checkpoint("internvl3", out, seed=seed, dtype="bfloat16", vision=dict(dims["vision"]),
                                  llm=dict(dims["llm"]))
    finally:
        tiny.LLM_KINDS["qwen2"] = kind
    pad_tokenizer(out, vocab)
    stamp.write_text(json.dumps({"preset": preset, "seed": seed}))
    return out


def _filler_names(taken: set[str]):
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while True:
        s, j = "", i
        while True:
            s = letters[j % 26] + s
            j //= 26
            if j == 0:
                break
        i += 1
        name = "\u0120" + s  # byte-level "Ġ" = a leading space
        if name not in taken:
            yield name


def pad_tokenizer(ckpt: Path, vocab_size: int) -> None:
    """Pad the BPE vocabulary with filler tokens up to `vocab_size` and move the specials to the top ids."""
    tj_path = ckpt / "tokenizer.json"
    tj = json.loads(tj_path.read_text())
    model_vocab: dict[str, int] = tj["model"]["vocab"]
    specials = sorted(tj["added_tokens"], key=lambda a: a["id"])
    base = len(model_vocab)
    if max(model_vocab.values()) != base - 1 or [a["id"] for a in specials] != list(range(base, base + len(specials))):
        raise RuntimeError("unexpected tokenizer layout: base vocab, then contiguous specials")
    new_base = vocab_size - len(specials)
    if new_base < base:
        raise RuntimeError(f"vocab_size {vocab_size} is smaller than the tokenizer's {base + len(specials)}")
    names = _filler_names(set(model_vocab))
    for i in range(base, new_base):
        model_vocab[next(names)] = i
    remap = {a["id"]: new_base + k for k, a in enumerate(specials)}
    for a in specials:
        a["id"] = remap[a["id"]]
    tj_path.write_text(json.dumps(tj, ensure_ascii=False))
    (ckpt / "vocab.json").write_text(json.dumps(dict(sorted(model_vocab.items(), key=lambda kv: kv[1])),
                                                ensure_ascii=False))
    tc_path = ckpt / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["added_tokens_decoder"] = {str(remap[int(k)]): v for k, v in tc["added_tokens_decoder"].items()}
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False))
    at_path = ckpt / "added_tokens.json"
    at_path.write_text(json.dumps({k: remap[v] for k, v in json.loads(at_path.read_text()).items()}, indent=2))

    def fix(value: Any) -> Any:
        if isinstance(value, list):
            return [remap.get(v, v) for v in value]
        return remap.get(value, value) if isinstance(value, int) else value

    gen_path = ckpt / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen_path.write_text(json.dumps({k: fix(v) if k.endswith("token_id") else v for k, v in gen.items()}, indent=2))
    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in cfg["llm_config"]:
            cfg["llm_config"][key] = fix(cfg["llm_config"][key])
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def weight_bytes(ckpt: Path) -> dict[str, int]:
    """Bytes of the LLM weights read per decode step (all but the input embedding table) and of the ViT."""
    from safetensors import safe_open

    out = {"llm_step": 0, "llm_embed": 0, "vision": 0}
    with safe_open(str(Path(ckpt) / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            n = 2
            for d in sl.get_shape():
                n *= d
            if name.startswith("language_model.model.embed_tokens"):
                out["llm_embed"] += n
            elif name.startswith("language_model."):
                out["llm_step"] += n
            else:
                out["vision"] += n
    return out
