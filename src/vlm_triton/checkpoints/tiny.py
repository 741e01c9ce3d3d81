"""Tiny random-weight checkpoints in the real original (OpenGVLab) on-disk format, for tests.

`make_tiny_checkpoint("internvl3", out, seed=0)` writes config.json, generation_config.json, model.safetensors
(real parameter names and layouts, bf16 by default) and Qwen2-style byte-level BPE tokenizer files whose
special tokens follow the real InternVL3 order. Weights are a pure function of (family, seed, overrides).

CLI: ``python -m vlm_triton.checkpoints.tiny --family internvl3 --out DIR --seed 0``
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

from vlm_triton.checkpoints.tiny_internlm2 import internlm2_config, internlm2_params, write_internlm2_tokenizer
from vlm_triton.errors import SetupError

# --- tokenizer -----------------------------------------------------------------------------------------------------

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
INTERNVL_SPECIAL_TOKENS = (
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is in this image? Please describe the picture in detail.",
    "There is a cat sitting on the table next to a cup of coffee. The sky is blue and the grass is green.",
    "Answer the question with a single word or phrase. How many people are there in the photo? Two.",
    "You are a helpful assistant. The user uploaded a document; read the text and summarize it briefly.",
    "InternVL is a multimodal large language model that understands images, videos and text.",
    "Image-1: <image>\nImage-2: <image>\nFrame1: <image>\nWhat are the differences between these images?",
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
    "请详细描述这张图片。图片中有一只猫坐在桌子上，旁边有一杯咖啡。天空是蓝色的，草地是绿色的。",
    "这是什么？这是一张照片。图中有几个人？两个人。请用一个词或短语回答问题。",
    "The numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 and symbols ( ) [ ] { } < > , . ; : ! ? - + = * / \\ \" '",
)


def build_qwen2_style_tokenizer(*, num_merges: int = 400, specials: tuple[str, ...]) -> Tokenizer:
    """A byte-level BPE with Qwen2's normalizer/pre-tokenizer/decoder, trained on a small built-in corpus."""
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + num_merges, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet, special_tokens=[])
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def _write_qwen2_tokenizer(out: Path, *, llm: dict[str, Any]) -> dict[str, int]:
    """Writes the Qwen2Tokenizer file set; returns {special token: id}."""
    specials = CHATML_SPECIAL_TOKENS + INTERNVL_SPECIAL_TOKENS
    tok = build_qwen2_style_tokenizer(num_merges=int(llm.get("num_merges", 400)), specials=specials)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt (base vocab only, like the real files)
    ids = {t: tok.token_to_id(t) for t in specials}
    base = tok.get_vocab_size(with_added_tokens=False)
    if sorted(ids.values()) != list(range(base, base + len(specials))):
        raise AssertionError(f"special tokens are not contiguous after the base vocab: {ids}")
    added_decoder = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for t, i in ids.items()
    }
    additional = [t for t in specials if t != "<|endoftext|>"]
    tokenizer_config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added_decoder,
        "additional_special_tokens": additional, "bos_token": None, "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": int(llm["max_position_embeddings"]), "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    special_map = {"additional_special_tokens": additional, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    _dump(out / "tokenizer_config.json", tokenizer_config)
    _dump(out / "special_tokens_map.json", special_map)
    _dump(out / "added_tokens.json", dict(sorted(ids.items(), key=lambda kv: kv[1])))
    return ids


# --- parameters ----------------------------------------------------------------------------------------------------
# Each entry: name -> (shape, init kind). Kinds: "linear" (std 1/sqrt(fan_in)), "bias", "norm" (1 + noise),
# "scale" (layer scale ~0.5), "embed" (std 0.5), "token" (std 1).
ParamSpec = dict[str, tuple[tuple[int, ...], str]]


def _vision_params(v: dict[str, Any], *, llm_hidden: int, downsample_ratio: float) -> ParamSpec:
    c, i, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    grid = v["image_size"] // p
    specs: ParamSpec = {
        "vision_model.embeddings.class_embedding": ((1, 1, c), "embed"),
        "vision_model.embeddings.patch_embedding.weight": ((c, 3, p, p), "linear"),
        "vision_model.embeddings.patch_embedding.bias": ((c,), "bias"),
        "vision_model.embeddings.position_embedding": ((1, 1 + grid * grid, c), "embed"),
    }
    for n in range(v["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{n}."
        specs[pre + "attn.qkv.weight"] = ((3 * c, c), "linear")
        if v["qkv_bias"]:
            specs[pre + "attn.qkv.bias"] = ((3 * c,), "bias")
        if v["qk_normalization"]:
            specs[pre + "attn.q_norm.weight"] = ((c,), "norm")
            specs[pre + "attn.k_norm.weight"] = ((c,), "norm")
        specs[pre + "attn.proj.weight"] = ((c, c), "linear")
        specs[pre + "attn.proj.bias"] = ((c,), "bias")
        specs[pre + "mlp.fc1.weight"] = ((i, c), "linear")
        specs[pre + "mlp.fc1.bias"] = ((i,), "bias")
        specs[pre + "mlp.fc2.weight"] = ((c, i), "linear")
        specs[pre + "mlp.fc2.bias"] = ((c,), "bias")
        for norm in ("norm1", "norm2"):
            specs[pre + f"{norm}.weight"] = ((c,), "norm")
            if v["norm_type"] == "layer_norm":
                specs[pre + f"{norm}.bias"] = ((c,), "bias")
        specs[pre + "ls1"] = ((c,), "scale")
        specs[pre + "ls2"] = ((c,), "scale")
    wide = c * int(round(1 / downsample_ratio)) ** 2
    specs["mlp1.0.weight"] = ((wide,), "norm")
    specs["mlp1.0.bias"] = ((wide,), "bias")
    specs["mlp1.1.weight"] = ((llm_hidden, wide), "linear")
    specs["mlp1.1.bias"] = ((llm_hidden,), "bias")
    specs["mlp1.3.weight"] = ((llm_hidden, llm_hidden), "linear")
    specs["mlp1.3.bias"] = ((llm_hidden,), "bias")
    return specs


def _qwen2_params(llm: dict[str, Any]) -> ParamSpec:
    h, f, vocab = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    d = h // heads
    specs: ParamSpec = {"language_model.model.embed_tokens.weight": ((vocab, h), "token")}
    for n in range(llm["num_hidden_layers"]):
        pre = f"language_model.model.layers.{n}."
        for proj, rows in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
            specs[pre + f"self_attn.{proj}.weight"] = ((rows, h), "linear")
            specs[pre + f"self_attn.{proj}.bias"] = ((rows,), "bias")
        specs[pre + "self_attn.o_proj.weight"] = ((h, heads * d), "linear")
        specs[pre + "mlp.gate_proj.weight"] = ((f, h), "linear")
        specs[pre + "mlp.up_proj.weight"] = ((f, h), "linear")
        specs[pre + "mlp.down_proj.weight"] = ((h, f), "linear")
        specs[pre + "input_layernorm.weight"] = ((h,), "norm")
        specs[pre + "post_attention_layernorm.weight"] = ((h,), "norm")
    specs["language_model.model.norm.weight"] = ((h,), "norm")
    specs["language_model.lm_head.weight"] = ((vocab, h), "linear")
    return specs


def _random_tensor(name: str, shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    """Deterministic per (seed, name), so adding a parameter never changes the others."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if kind == "linear":
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        return x / fan_in**0.5
    scale = {"bias": (0.0, 0.1), "norm": (1.0, 0.1), "scale": (0.5, 0.1), "embed": (0.0, 0.5), "token": (0.0, 1.0)}
    mean, std = scale[kind]
    return mean + std * x


# --- families ------------------------------------------------------------------------------------------------------

TINY_VISION = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
    "image_size": 448, "patch_size": 14,
}
TINY_QWEN2 = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
}


@dataclass(frozen=True)
class LLMKind:
    """How to write one LLM family: its llm_config, parameter inventory and tokenizer files."""

    architecture: str
    make_config: Callable[[dict[str, Any], dict[str, int]], dict[str, Any]]
    params: Callable[[dict[str, Any]], ParamSpec]
    write_tokenizer: Callable[..., dict[str, int]]
    generation: Callable[[dict[str, int]], dict[str, Any]] = lambda ids: {  # generation_config.json
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }


def _qwen2_config(dims: dict[str, Any], ids: dict[str, int]) -> dict[str, Any]:
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"], "hidden_act": "silu",
        "initializer_range": 0.02, "max_window_layers": dims["num_hidden_layers"], "rope_scaling": None,
        "sliding_window": dims["max_position_embeddings"], "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_bfloat16": True, "use_cache": True, "use_sliding_window": False,
    }
    cfg.update({k: v for k, v in dims.items() if k != "num_merges"})
    cfg["vocab_size"] = max(ids.values()) + 1
    return dict(sorted(cfg.items()))


def _write_internlm2_tokenizer(out: Path, *, llm: dict[str, Any]) -> dict[str, int]:
    return write_internlm2_tokenizer(out, corpus=list(_CORPUS) * 4, extra_specials=INTERNVL_SPECIAL_TOKENS,
                                     vocab_size=int(llm.get("sp_vocab_size", 600)),
                                     max_length=int(llm["max_position_embeddings"]))


LLM_KINDS: dict[str, LLMKind] = {
    "qwen2": LLMKind("Qwen2ForCausalLM", _qwen2_config, _qwen2_params, _write_qwen2_tokenizer),
    "internlm2": LLMKind("InternLM2ForCausalLM", internlm2_config, internlm2_params, _write_internlm2_tokenizer,
                         lambda ids: {"bos_token_id": ids["<s>"], "eos_token_id": [ids["<|im_end|>"], ids["</s>"]],
                                      "pad_token_id": ids["</s>"]}),
}


@dataclass(frozen=True)
class TinyFamily:
    llm_kind: str
    template: str
    vision: dict[str, Any] = field(default_factory=lambda: dict(TINY_VISION))
    llm: dict[str, Any] = field(default_factory=lambda: dict(TINY_QWEN2))
    top: dict[str, Any] = field(default_factory=dict)  # top-level config fields beyond _TOP_LEVEL_DEFAULTS


TINY_INTERNLM2 = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
}
TINY_VIT_6B = {**TINY_VISION, "qkv_bias": False, "qk_normalization": True, "norm_type": "rms_norm"}


def _auto_map(modeling: str) -> dict[str, Any]:
    model = f"{modeling}.InternVLChatModel"
    return {"auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig", "AutoModel": model,
                         "AutoModelForCausalLM": model}}


TINY_INTERNLM2_FAMILIES: dict[str, TinyFamily] = {  # InternVL2.5-2B/8B/26B, InternVL-Chat-V1.5, InternVideo2.5
    "internvl2_5_internlm2": TinyFamily("internlm2", "internvl2_5", llm=dict(TINY_INTERNLM2),
                                        top=_auto_map("modeling_internvl_chat")),
    "internvl_chat_v1_5": TinyFamily("internlm2", "internlm2-chat", vision=dict(TINY_VIT_6B),
                                     llm=dict(TINY_INTERNLM2), top={**_auto_map("modeling_internvl_chat"),
                                                                    "ps_version": "v1"}),
    "internvideo2_5": TinyFamily("internlm2", "internlm2-chat", llm=dict(TINY_INTERNLM2),
                                 top=_auto_map("modeling_internvl_chat_hico2")),
}

TINY_FAMILIES: dict[str, TinyFamily] = {
    "internvl3": TinyFamily(llm_kind="qwen2", template="internvl2_5"),
    "internvl2_5_qwen": TinyFamily(llm_kind="qwen2", template="internvl2_5"),
    **TINY_INTERNLM2_FAMILIES,
}

_TOP_LEVEL_DEFAULTS: dict[str, Any] = {
    "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "dynamic_image_size": True,
    "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12, "use_backbone_lora": 0,
    "use_llm_lora": 0, "pad2square": False,
}
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _tiny_minicpmv(out: Path, **kwargs: Any) -> Path:
    from vlm_triton.checkpoints.tiny_minicpmv import make_tiny_minicpmv  # imported late: it uses this module

    return make_tiny_minicpmv(out, **kwargs)


# Families written by their own module: name -> writer(out, seed=..., **overrides).
TINY_WRITERS: dict[str, Callable[..., Path]] = {"minicpmv2_6": _tiny_minicpmv}


def make_tiny_checkpoint(family: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny checkpoint of `family` into `out` (replaced if it already holds a checkpoint).

    overrides: `dtype` ("bfloat16" | "float32" | "float16"), `vision` (dict merged into vision_config),
    `llm` (dict merged into the LLM dims, e.g. hidden_size, num_merges), `template`, or any top-level
    config field (ps_version, select_layer, downsample_ratio, force_image_size, ...).
    """
    if family in TINY_WRITERS:
        return TINY_WRITERS[family](Path(out), seed=seed, **overrides)
    if family not in TINY_FAMILIES:
        raise SetupError(f"unknown tiny family {family!r}; known: {', '.join(sorted({*TINY_FAMILIES, *TINY_WRITERS}))}")
    fam = TINY_FAMILIES[family]
    kind = LLM_KINDS[fam.llm_kind]
    overrides = dict(overrides)
    dtype_name = overrides.pop("dtype", "bfloat16")
    if dtype_name not in _DTYPES:
        raise SetupError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
    vision = {**fam.vision, **overrides.pop("vision", {})}
    llm_dims = {**fam.llm, **overrides.pop("llm", {})}
    template = overrides.pop("template", fam.template)
    top = {**_TOP_LEVEL_DEFAULTS, **fam.top}
    top["force_image_size"] = vision["image_size"]
    unknown = set(overrides) - set(top)
    if unknown:
        raise SetupError(f"unknown tiny-checkpoint overrides {sorted(unknown)}")
    top.update(overrides)

    out = Path(out)
    tmp = _fresh_dir(out.parent / f".{out.name}.tmp")
    ids = kind.write_tokenizer(tmp, llm=llm_dims)
    llm_config = kind.make_config(llm_dims, ids)
    llm_config["torch_dtype"] = dtype_name
    vision_config = _vision_config(vision, dtype_name)
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "llm_config": llm_config,
        "vision_config": vision_config, "template": template, **top, "tie_word_embeddings": False,
        "torch_dtype": dtype_name,
    }
    _dump(tmp / "config.json", config)
    _dump(tmp / "generation_config.json", kind.generation(ids))
    specs = _vision_params(vision_config, llm_hidden=llm_config["hidden_size"],
                           downsample_ratio=top["downsample_ratio"])
    specs.update(kind.params(llm_config))
    dtype = _DTYPES[dtype_name]
    tensors = {name: _random_tensor(name, shape, k, seed).to(dtype).contiguous()
               for name, (shape, k) in specs.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "model.safetensors").chmod(0o644)  # readable by a serving container running as another user

    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file()):
            raise SetupError(f"{out} exists and is not a checkpoint folder; refusing to overwrite it")
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _vision_config(v: dict[str, Any], dtype_name: str) -> dict[str, Any]:
    cfg = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "attention_dropout": 0.0,
        "drop_path_rate": 0.0, "dropout": 0.0, "hidden_act": "gelu", "initializer_factor": 1.0,
        "initializer_range": 0.02, "num_channels": 3, "torch_dtype": dtype_name, "use_flash_attn": False,
    }
    cfg.update(v)
    return dict(sorted(cfg.items()))


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="internvl3", choices=sorted({*TINY_FAMILIES, *TINY_WRITERS}))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    args = parser.parse_args(argv)
    try:
        path = make_tiny_checkpoint(args.family, args.out, seed=args.seed, dtype=args.dtype)
    except SetupError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(path)


if __name__ == "__main__":
    main()
