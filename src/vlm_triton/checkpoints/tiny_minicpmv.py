"""Tiny random-weight MiniCPM-V-2.6 checkpoints in the real on-disk format (model_specs.md 1.7), for tests.

`make_tiny_minicpmv(out, seed=0)` (also `make_tiny_checkpoint("minicpmv2_6", out)`) writes config.json
(`MiniCPMV`, model_type `minicpmv`, version 2.6, Qwen2 fields at the top level, `vision_config` for SigLIP with
image_size 980 / patch 14, `slice_config`), preprocessor_config.json (the keys the image processor reads),
generation_config.json, model.safetensors (`vpm.*`, `resampler.*`, `llm.*`; the resampler's sin-cos table is not
stored, as in the release) and Qwen2-style tokenizer files with the MiniCPM-V markers. Dimensions are tiny
(SigLIP 64 wide, LLM 256 wide so that the resampler has 256 // 128 = 2 heads) so a 9-slice image runs in seconds
on a CPU. The order of the added special tokens after `<|im_end|>` is a guess (the real ids are unverified; the
serving code resolves every marker by its string).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlm_triton.checkpoints.tiny import (
    CHATML_SPECIAL_TOKENS,
    ParamSpec,
    _dump,
    _fresh_dir,
    _random_tensor,
    build_qwen2_style_tokenizer,
)
from vlm_triton.errors import SetupError

MINICPMV_SPECIAL_TOKENS = (
    "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>",
    "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>",
)
# Qwen2's ChatML template with its default system prompt (believed to be the 2.6 template; unverified).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_SIGLIP: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
    "image_size": 980, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}
TINY_QWEN2_LLM: dict[str, Any] = {
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
}
_TOP_LEVEL: dict[str, Any] = {
    "query_num": 64, "image_size": 448, "patch_size": 14, "drop_vision_last_layer": False, "batch_vision_input": True,
    "use_image_id": True, "vision_batch_size": 16, "slice_mode": True,
    "slice_config": {"model_type": "minicpmv", "patch_size": 14, "max_slice_nums": 9, "scale_resolution": 448},
}
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _params(cfg: dict[str, Any]) -> ParamSpec:
    v, d, vocab = cfg["vision_config"], cfg["hidden_size"], cfg["vocab_size"]
    c, inter, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    specs: ParamSpec = {
        "vpm.embeddings.patch_embedding.weight": ((c, 3, p, p), "linear"),
        "vpm.embeddings.patch_embedding.bias": ((c,), "bias"),
        "vpm.embeddings.position_embedding.weight": (((v["image_size"] // p) ** 2, c), "embed"),
        "vpm.post_layernorm.weight": ((c,), "norm"),
        "vpm.post_layernorm.bias": ((c,), "bias"),
    }
    for n in range(v["num_hidden_layers"]):
        pre = f"vpm.encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs[pre + f"self_attn.{proj}.weight"] = ((c, c), "linear")
            specs[pre + f"self_attn.{proj}.bias"] = ((c,), "bias")
        for norm in ("layer_norm1", "layer_norm2"):
            specs[pre + f"{norm}.weight"] = ((c,), "norm")
            specs[pre + f"{norm}.bias"] = ((c,), "bias")
        specs[pre + "mlp.fc1.weight"] = ((inter, c), "linear")
        specs[pre + "mlp.fc1.bias"] = ((inter,), "bias")
        specs[pre + "mlp.fc2.weight"] = ((c, inter), "linear")
        specs[pre + "mlp.fc2.bias"] = ((c,), "bias")
    specs.update({
        "resampler.query": ((cfg["query_num"], d), "token"),
        "resampler.kv_proj.weight": ((d, c), "linear"),
        "resampler.attn.in_proj_weight": ((3 * d, d), "linear"),
        "resampler.attn.in_proj_bias": ((3 * d,), "bias"),
        "resampler.attn.out_proj.weight": ((d, d), "linear"),
        "resampler.attn.out_proj.bias": ((d,), "bias"),
        "resampler.proj": ((d, d), "linear"),
    })
    for norm in ("ln_q", "ln_kv", "ln_post"):
        specs[f"resampler.{norm}.weight"] = ((d,), "norm")
        specs[f"resampler.{norm}.bias"] = ((d,), "bias")
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, f = d // heads, cfg["intermediate_size"]
    specs["llm.model.embed_tokens.weight"] = ((vocab, d), "token")
    for n in range(cfg["num_hidden_layers"]):
        pre = f"llm.model.layers.{n}."
        for proj, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            specs[pre + f"self_attn.{proj}.weight"] = ((rows, d), "linear")
            specs[pre + f"self_attn.{proj}.bias"] = ((rows,), "bias")
        specs[pre + "self_attn.o_proj.weight"] = ((d, heads * hd), "linear")
        specs[pre + "mlp.gate_proj.weight"] = ((f, d), "linear")
        specs[pre + "mlp.up_proj.weight"] = ((f, d), "linear")
        specs[pre + "mlp.down_proj.weight"] = ((d, f), "linear")
        specs[pre + "input_layernorm.weight"] = ((d,), "norm")
        specs[pre + "post_attention_layernorm.weight"] = ((d,), "norm")
    specs["llm.model.norm.weight"] = ((d,), "norm")
    specs["llm.lm_head.weight"] = ((vocab, d), "linear")
    return specs


def _write_tokenizer(out: Path, *, num_merges: int, max_len: int) -> dict[str, int]:
    specials = CHATML_SPECIAL_TOKENS + MINICPMV_SPECIAL_TOKENS
    tok = build_qwen2_style_tokenizer(num_merges=num_merges, specials=specials)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))
    ids = {t: tok.token_to_id(t) for t in specials}
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for t, i in ids.items()}
    additional = [t for t in specials if t not in ("<|endoftext|>", "<unk>")]
    _dump(out / "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": additional, "bos_token": None, "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": max_len, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": "<unk>",
    })
    _dump(out / "special_tokens_map.json", {"additional_special_tokens": additional,
                                            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                            "unk_token": "<unk>"})
    _dump(out / "added_tokens.json", dict(sorted(ids.items(), key=lambda kv: kv[1])))
    return ids


def preprocessor_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The image processor's settings, consistent with config.json (the reference asserts the overlap)."""
    sc = cfg["slice_config"]
    return {
        "image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
        "auto_map": {"AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                     "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
        "max_slice_nums": sc["max_slice_nums"], "scale_resolution": sc["scale_resolution"],
        "patch_size": cfg["patch_size"], "use_image_id": cfg["use_image_id"], "image_feature_size": cfg["query_num"],
        "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
        "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>", "slice_mode": cfg["slice_mode"],
        "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "version": cfg["version"],
    }


def make_tiny_minicpmv(out: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny MiniCPM-V-2.6 checkpoint into `out` (replaced if it already holds a checkpoint).

    overrides: `dtype` ("bfloat16" | "float32" | "float16"), `vision` (merged into vision_config), `llm` (merged
    into the Qwen2 dims, plus `num_merges`), or top-level fields (use_image_id, drop_vision_last_layer, ...).
    """
    overrides = dict(overrides)
    dtype_name = overrides.pop("dtype", "bfloat16")
    if dtype_name not in _DTYPES:
        raise SetupError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
    vision = {**TINY_SIGLIP, **overrides.pop("vision", {})}
    llm = {**TINY_QWEN2_LLM, **overrides.pop("llm", {})}
    num_merges = int(llm.pop("num_merges", 400))
    unknown = set(overrides) - set(_TOP_LEVEL)
    if unknown:
        raise SetupError(f"unknown tiny MiniCPM-V overrides {sorted(unknown)}; known: {sorted(_TOP_LEVEL)}")
    out = Path(out)
    tmp = _fresh_dir(out.parent / f".{out.name}.tmp")
    ids = _write_tokenizer(tmp, num_merges=num_merges, max_len=int(llm["max_position_embeddings"]))
    cfg: dict[str, Any] = {
        "architectures": ["MiniCPMV"], "model_type": "minicpmv", "version": 2.6,
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
                     "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"},
        **_TOP_LEVEL, **overrides, **llm,
        "vocab_size": max(ids.values()) + 1, "hidden_act": "silu", "attention_dropout": 0.0,
        "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False,
        "sliding_window": llm["max_position_embeddings"], "max_window_layers": llm["num_hidden_layers"],
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "torch_dtype": dtype_name,
        "vision_config": {"model_type": "siglip", **vision},
    }
    cfg["slice_config"] = {**cfg["slice_config"], "patch_size": cfg["patch_size"]}
    _dump(tmp / "config.json", dict(sorted(cfg.items())))
    _dump(tmp / "preprocessor_config.json", preprocessor_config(cfg))
    _dump(tmp / "generation_config.json", {"bos_token_id": ids["<|endoftext|>"],
                                           "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                                           "pad_token_id": ids["<|endoftext|>"]})
    dtype = _DTYPES[dtype_name]
    tensors = {name: _random_tensor(name, shape, kind, seed).to(dtype).contiguous()
               for name, (shape, kind) in _params(cfg).items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "model.safetensors").chmod(0o644)
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file()):
            raise SetupError(f"{out} exists and is not a checkpoint folder; refusing to overwrite it")
        shutil.rmtree(out)
    tmp.rename(out)
    return out
