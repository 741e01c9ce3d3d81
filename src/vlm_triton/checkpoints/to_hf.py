"""Convert an original-format InternVL checkpoint (`InternVLChatModel`) to the transformers-native "-hf" layout.

The output loads with `transformers.InternVLForConditionalGeneration` and `AutoTokenizer` / `InternVLProcessor`
(spec 1.5). Tests use it as the reference implementation, so every key must be accounted for: an unknown
source key or a leftover is an error. Only `ps_version: "v2"` can be expressed in the -hf format.

CLI: ``python -m vlm_triton.checkpoints.to_hf SRC OUT``
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.errors import SetupError

HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
EXTRA_SPECIAL_TOKENS = {
    "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json",
                    "tokenizer.model")
_DROP_LLM_KEYS = {"_name_or_path", "auto_map", "use_flash_attn", "attn_implementation", "_attn_implementation",
                  "_attn_implementation_autoset", "use_bfloat16", "drop_path_rate", "bias", "transformers_version"}

# (pattern, replacement) applied to the part of a vision/projector key; each key must match exactly one.
_VISION_RULES: tuple[tuple[str, str], ...] = (
    (r"vision_model\.embeddings\.class_embedding", "model.vision_tower.embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
     r"model.vision_tower.embeddings.patch_embeddings.projection.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)",
     r"model.vision_tower.encoder.layer.\1.attention.projection_layer.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight",
     r"model.vision_tower.encoder.layer.\1.attention.\2.weight"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)",
     r"model.vision_tower.encoder.layer.\1.mlp.\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)",
     r"model.vision_tower.encoder.layer.\1.layernorm_before.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)",
     r"model.vision_tower.encoder.layer.\1.layernorm_after.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls([12])", r"model.vision_tower.encoder.layer.\1.lambda_\2"),
    (r"mlp1\.0\.(weight|bias)", r"model.multi_modal_projector.layer_norm.\1"),
    (r"mlp1\.1\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"mlp1\.3\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
)
_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")


@dataclass(frozen=True)
class TextConverter:
    """How one LLM architecture maps to the -hf text model: config model_type and tensor renames."""

    model_type: str
    convert: Callable[[dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]]
    extra_config: Callable[[dict[str, Any]], dict[str, Any]] = lambda llm_config: {}  # text_config additions


def _qwen2_tensors(tensors: dict[str, torch.Tensor], llm_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("language_model.model."):
            out["model.language_model." + name[len("language_model.model."):]] = t
        elif name == "language_model.lm_head.weight":
            out["lm_head.weight"] = t
        else:
            raise SetupError(f"unexpected Qwen2 language-model tensor {name!r}")
    return out


def _wqkv_rows(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[list[int], list[int], list[int]]:
    """Row indices of q, k, v inside InternLM2's fused wqkv, head by head (spec 5.2: groups of G q heads, then
    one k head, then one v head, per kv head). Written independently of the serving loader's reshape split."""
    group = num_heads // num_kv_heads
    q_rows, k_rows, v_rows = [], [], []
    for head in range(num_heads):
        start = ((head // group) * (group + 2) + head % group) * head_dim
        q_rows.extend(range(start, start + head_dim))
    for kv in range(num_kv_heads):
        start = kv * (group + 2) * head_dim
        k_rows.extend(range(start + group * head_dim, start + (group + 1) * head_dim))
        v_rows.extend(range(start + (group + 1) * head_dim, start + (group + 2) * head_dim))
    return q_rows, k_rows, v_rows


_INTERNLM2_NAMES = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
                    "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
                    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_INTERNLM2_LAYER = re.compile(r"language_model\.model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def _internlm2_tensors(tensors: dict[str, torch.Tensor], llm_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    heads, kv = int(llm_config["num_attention_heads"]), int(llm_config["num_key_value_heads"])
    head_dim = int(llm_config.get("head_dim") or int(llm_config["hidden_size"]) // heads)
    q_rows, k_rows, v_rows = _wqkv_rows(heads, kv, head_dim)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name == "language_model.model.tok_embeddings.weight":
            out["model.language_model.embed_tokens.weight"] = t
        elif name == "language_model.model.norm.weight":
            out["model.language_model.norm.weight"] = t
        elif name == "language_model.output.weight":
            out["lm_head.weight"] = t
        elif (m := _INTERNLM2_LAYER.fullmatch(name)) and m.group(2) == "attention.wqkv":
            pre = f"model.language_model.layers.{m.group(1)}.self_attn"
            for proj, rows in (("q_proj", q_rows), ("k_proj", k_rows), ("v_proj", v_rows)):
                out[f"{pre}.{proj}.{m.group(3)}"] = t[torch.tensor(rows)].clone()
        elif m and m.group(2) in _INTERNLM2_NAMES:
            out[f"model.language_model.layers.{m.group(1)}.{_INTERNLM2_NAMES[m.group(2)]}.{m.group(3)}"] = t
        else:
            raise SetupError(f"unexpected InternLM2 language-model tensor {name!r}")
    return out


def _internlm2_config(llm_config: dict[str, Any]) -> dict[str, Any]:
    return {"attention_bias": bool(llm_config.get("bias", True)), "mlp_bias": False}


# Keyed by llm_config.architectures[0].
TEXT_CONVERTERS: dict[str, TextConverter] = {
    "Qwen2ForCausalLM": TextConverter("qwen2", _qwen2_tensors),
    "InternLM2ForCausalLM": TextConverter("llama", _internlm2_tensors, _internlm2_config),
}


def convert_to_hf(src: str | Path, out: str | Path) -> Path:
    """Write the -hf version of the original-format checkpoint `src` into `out` (replaced if present)."""
    ckpt = Checkpoint.open(src)
    cfg = ckpt.config
    if cfg.get("model_type") != "internvl_chat":
        raise SetupError(f"{ckpt.path} is not an original-format InternVL checkpoint (model_type "
                         f"{cfg.get('model_type')!r}, expected 'internvl_chat')")
    ps_version = cfg.get("ps_version", "v1")
    if ps_version != "v2":
        raise SetupError(f"ps_version {ps_version!r} cannot be converted: the transformers InternVL code only "
                         "implements pixel shuffle v2")
    if cfg.get("use_backbone_lora") or cfg.get("use_llm_lora"):
        raise SetupError("LoRA checkpoints must be merged before conversion (use_backbone_lora/use_llm_lora != 0)")
    llm_config = dict(cfg["llm_config"])
    arch = (llm_config.get("architectures") or ["?"])[0]
    if arch not in TEXT_CONVERTERS:
        raise SetupError(f"LLM architecture {arch!r} is not supported; known: {', '.join(sorted(TEXT_CONVERTERS))}")
    text = TEXT_CONVERTERS[arch]
    tokens = _special_token_ids(ckpt.path)
    image_token_id = tokens["<IMG_CONTEXT>"]

    vision = cfg["vision_config"]
    size = int(cfg.get("force_image_size") or vision["image_size"])
    if size != int(vision["image_size"]):
        raise SetupError(f"force_image_size {size} != vision_config.image_size {vision['image_size']}; the -hf "
                         "format cannot express position-embedding interpolation at load time")
    patch = int(vision["patch_size"])
    ratio = float(cfg.get("downsample_ratio", 0.5))
    dtype_name = str(cfg.get("torch_dtype", "bfloat16"))

    text_config = {k: v for k, v in llm_config.items() if k not in _DROP_LLM_KEYS}
    text_config.update(model_type=text.model_type, tie_word_embeddings=False, use_cache=True,
                       **text.extra_config(llm_config))
    eos = _tokenizer_eos(ckpt.path)
    if eos is not None and eos in tokens:
        text_config["eos_token_id"] = tokens[eos]
    vision_config = {
        "model_type": "internvl_vision",
        "hidden_size": vision["hidden_size"], "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"], "intermediate_size": vision["intermediate_size"],
        "attention_bias": bool(vision.get("qkv_bias", False)),
        "use_qk_norm": bool(vision.get("qk_normalization", True)),
        "norm_type": vision.get("norm_type", "rms_norm"), "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "hidden_act": vision.get("hidden_act", "gelu"), "image_size": [size, size], "patch_size": [patch, patch],
        "num_channels": vision.get("num_channels", 3),
        "attention_dropout": 0.0, "projection_dropout": 0.0, "hidden_dropout_prob": 0.0,
        "initializer_range": vision.get("initializer_range", 0.02), "layer_scale_init_value": 0.1,
        "use_absolute_position_embeddings": True, "use_mask_token": False, "use_mean_pooling": True,
    }
    hf_config = {
        "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
        "text_config": text_config, "vision_config": vision_config, "image_token_id": image_token_id,
        "image_seq_length": int((size // patch) ** 2 * ratio**2), "downsample_ratio": ratio,
        "projector_hidden_act": "gelu", "vision_feature_layer": int(cfg.get("select_layer", -1)),
        "vision_feature_select_strategy": "default", "tie_word_embeddings": False, "dtype": dtype_name,
    }

    source = ckpt.load_tensors("")
    lm = {k: v for k, v in source.items() if k.startswith("language_model.")}
    tensors = convert_vision_tensors({k: v for k, v in source.items() if k not in lm},
                                     hidden=int(vision["hidden_size"]))
    tensors.update(text.convert(lm, llm_config))

    out = Path(out)
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file()):
            raise SetupError(f"{out} exists and is not a checkpoint folder; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _dump(out / "config.json", hf_config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    gen_file = ckpt.path / "generation_config.json"
    if gen_file.is_file():
        shutil.copyfile(gen_file, out / "generation_config.json")
    _write_processor_files(ckpt.path, out, size=size, image_seq_length=hf_config["image_seq_length"],
                           max_patches=int(cfg.get("max_dynamic_patch", 12)),
                           min_patches=int(cfg.get("min_dynamic_patch", 1)))
    return out


def convert_vision_tensors(tensors: dict[str, torch.Tensor], *, hidden: int) -> dict[str, torch.Tensor]:
    """Rename vision_model.* / mlp1.* tensors to the -hf names, splitting qkv into q/k/v row blocks."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        qkv = _QKV.fullmatch(name)
        if qkv:
            layer, kind = qkv.groups()
            if t.shape[0] != 3 * hidden:
                raise SetupError(f"{name} has {t.shape[0]} rows, expected 3 x {hidden}")
            for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
                key = f"model.vision_tower.encoder.layer.{layer}.attention.{part}.{kind}"
                out[key] = t[i * hidden:(i + 1) * hidden].clone()
            continue
        for pattern, repl in _VISION_RULES:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, repl, name)] = t
                break
        else:
            raise SetupError(f"unexpected tensor {name!r} in the vision/projector weights")
    return out


def _special_token_ids(path: Path) -> dict[str, int]:
    """Added-token ids, read from tokenizer.json (or added_tokens.json)."""
    tok_file = path / "tokenizer.json"
    if tok_file.is_file():
        added = json.loads(tok_file.read_text(encoding="utf-8")).get("added_tokens", [])
        ids = {a["content"]: int(a["id"]) for a in added}
    elif (path / "added_tokens.json").is_file():
        ids = {k: int(v) for k, v in json.loads((path / "added_tokens.json").read_text(encoding="utf-8")).items()}
    else:
        raise SetupError(f"{path} has no tokenizer.json or added_tokens.json")
    if "<IMG_CONTEXT>" not in ids:
        raise SetupError(f"the tokenizer in {path} has no <IMG_CONTEXT> token")
    return ids


def _tokenizer_eos(path: Path) -> str | None:
    cfg_file = path / "tokenizer_config.json"
    if not cfg_file.is_file():
        return None
    eos = json.loads(cfg_file.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _write_processor_files(src: Path, out: Path, *, size: int, image_seq_length: int, max_patches: int,
                           min_patches: int) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_cfg.pop("auto_map", None)
    tok_cfg.update(extra_special_tokens=EXTRA_SPECIAL_TOKENS, chat_template=HF_CHAT_TEMPLATE,
                   processor_class="InternVLProcessor")
    _dump(out / "tokenizer_config.json", tok_cfg)
    _dump(out / "preprocessor_config.json", {
        "image_processor_type": "GotOcr2ImageProcessor", "processor_class": "InternVLProcessor",
        "crop_to_patches": True, "min_patches": min_patches, "max_patches": max_patches,
        "size": {"height": size, "width": size}, "do_resize": True, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
    })
    _dump(out / "processor_config.json", {"processor_class": "InternVLProcessor",
                                          "image_seq_length": image_seq_length})
    (out / "chat_template.jinja").write_text(HF_CHAT_TEMPLATE, encoding="utf-8")


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        print(convert_to_hf(args.src, args.out))
    except SetupError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
