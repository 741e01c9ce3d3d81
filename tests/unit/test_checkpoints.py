"""Tiny checkpoint generator, -hf conversion and Checkpoint.open errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.checkpoints.tiny import main as tiny_main
from vlm_triton.checkpoints.tiny import make_tiny_checkpoint
from vlm_triton.checkpoints.to_hf import convert_to_hf
from vlm_triton.errors import SetupError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>",
            "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
ROUND_TRIP = [
    "Hello, world! What is in this image?",
    "你是书生·万象，英文名是InternVL。请描述这张图片：一只猫🐱坐在桌子上☕️。",
    "emoji 👨‍👩‍👧‍👦 🇨🇳 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑ ∫ ✓ \t tabs\r\n  and   spaces  ",
    "日本語のテキスト、한국어 텍스트, русский текст, العربية",
]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --- generator ------------------------------------------------------------------------------------------------------

def test_deterministic_by_seed(tiny_internvl3: Path, tmp_path: Path) -> None:
    again = make_tiny_checkpoint("internvl3", tmp_path / "again", seed=0)
    for f in sorted(p.name for p in tiny_internvl3.iterdir()):
        assert (again / f).read_bytes() == (tiny_internvl3 / f).read_bytes(), f
    other = _tensors(make_tiny_checkpoint("internvl3", tmp_path / "seed1", seed=1))
    base = _tensors(tiny_internvl3)
    assert other.keys() == base.keys()
    assert not torch.equal(other["mlp1.1.weight"], base["mlp1.1.weight"])
    assert (tmp_path / "seed1" / "tokenizer.json").read_bytes() == (tiny_internvl3 / "tokenizer.json").read_bytes()


def test_cli_overwrites_checkpoint_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "stale.bin").write_text("old")
    tiny_main(["--family", "internvl2_5_qwen", "--out", str(out), "--seed", "3", "--dtype", "float32"])
    assert capsys.readouterr().out.strip() == str(out)
    assert not (out / "stale.bin").exists()
    assert _json(out / "config.json")["template"] == "internvl2_5"
    assert _tensors(out)["mlp1.1.weight"].dtype == torch.float32


def test_refuses_to_overwrite_foreign_dir(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(SetupError, match="not a checkpoint folder"):
        make_tiny_checkpoint("internvl3", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(SetupError, match="unknown tiny family"):
        make_tiny_checkpoint("nope", tmp_path / "x")
    with pytest.raises(SetupError, match="unknown tiny-checkpoint overrides"):
        make_tiny_checkpoint("internvl3", tmp_path / "x", ps_verison="v1")


def test_config_fields(tiny_internvl3: Path) -> None:
    cfg = _json(tiny_internvl3 / "config.json")
    assert cfg["architectures"] == ["InternVLChatModel"] and cfg["model_type"] == "internvl_chat"
    expected = {"template": "internvl2_5", "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": 448,
                "select_layer": -1, "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
                "max_dynamic_patch": 12, "use_backbone_lora": 0, "use_llm_lora": 0, "pad2square": False,
                "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    assert {k: cfg[k] for k in expected} == expected
    assert "system_message" not in cfg
    v = cfg["vision_config"]
    assert {k: v[k] for k in ("model_type", "image_size", "patch_size", "hidden_size", "num_hidden_layers",
                              "num_attention_heads", "intermediate_size", "qkv_bias", "qk_normalization",
                              "norm_type", "layer_norm_eps", "hidden_act", "drop_path_rate", "use_flash_attn")} == {
        "model_type": "intern_vit_6b", "image_size": 448, "patch_size": 14, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "qkv_bias": True,
        "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu",
        "drop_path_rate": 0.0, "use_flash_attn": False}
    llm = cfg["llm_config"]
    assert llm["architectures"] == ["Qwen2ForCausalLM"] and llm["model_type"] == "qwen2"
    assert {k: llm[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                "intermediate_size", "rope_theta", "max_position_embeddings", "rms_norm_eps",
                                "tie_word_embeddings")} == {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "rope_theta": 1e6, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False}
    gen = _json(tiny_internvl3 / "generation_config.json")
    ids = _json(tiny_internvl3 / "added_tokens.json")
    assert ids["<|im_end|>"] in gen["eos_token_id"]


def test_real_key_names_and_shapes(tiny_internvl3: Path) -> None:
    t = _tensors(tiny_internvl3)
    vocab = _json(tiny_internvl3 / "config.json")["llm_config"]["vocab_size"]
    c, i, h, f = 32, 64, 64, 128
    expected = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "vision_model.embeddings.position_embedding": (1, 1025, c),
        "mlp1.0.weight": (4 * c,), "mlp1.0.bias": (4 * c,), "mlp1.1.weight": (h, 4 * c), "mlp1.1.bias": (h,),
        "mlp1.3.weight": (h, h), "mlp1.3.bias": (h,),
        "language_model.model.embed_tokens.weight": (vocab, h), "language_model.model.norm.weight": (h,),
        "language_model.lm_head.weight": (vocab, h),
    }
    for n in range(2):
        v = f"vision_model.encoder.layers.{n}."
        expected.update({
            v + "attn.qkv.weight": (3 * c, c), v + "attn.qkv.bias": (3 * c,), v + "attn.proj.weight": (c, c),
            v + "attn.proj.bias": (c,), v + "mlp.fc1.weight": (i, c), v + "mlp.fc1.bias": (i,),
            v + "mlp.fc2.weight": (c, i), v + "mlp.fc2.bias": (c,), v + "norm1.weight": (c,), v + "norm1.bias": (c,),
            v + "norm2.weight": (c,), v + "norm2.bias": (c,), v + "ls1": (c,), v + "ls2": (c,),
        })
        q = f"language_model.model.layers.{n}."
        expected.update({
            q + "self_attn.q_proj.weight": (h, h), q + "self_attn.q_proj.bias": (h,),
            q + "self_attn.k_proj.weight": (32, h), q + "self_attn.k_proj.bias": (32,),
            q + "self_attn.v_proj.weight": (32, h), q + "self_attn.v_proj.bias": (32,),
            q + "self_attn.o_proj.weight": (h, h), q + "mlp.gate_proj.weight": (f, h),
            q + "mlp.up_proj.weight": (f, h), q + "mlp.down_proj.weight": (h, f),
            q + "input_layernorm.weight": (h,), q + "post_attention_layernorm.weight": (h,),
        })
    assert {k: tuple(v.shape) for k, v in t.items()} == expected
    assert {v.dtype for v in t.values()} == {torch.bfloat16}


def test_6b_style_vision_override(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("internvl3", tmp_path / "6b", vision={"qkv_bias": False, "qk_normalization": True,
                                                                       "norm_type": "rms_norm"})
    keys = set(_tensors(path))
    layer = "vision_model.encoder.layers.0."
    assert {layer + "attn.q_norm.weight", layer + "attn.k_norm.weight", layer + "norm1.weight"} <= keys
    assert not {layer + "attn.qkv.bias", layer + "norm1.bias", layer + "norm2.bias"} & keys


# --- tokenizer ------------------------------------------------------------------------------------------------------

def test_tokenizer_layout_and_round_trip(tiny_internvl3: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_internvl3)
    base = len(_json(tiny_internvl3 / "vocab.json"))
    assert [tok.convert_tokens_to_ids(s) for s in SPECIALS] == list(range(base, base + len(SPECIALS)))
    assert _json(tiny_internvl3 / "added_tokens.json") == {s: base + k for k, s in enumerate(SPECIALS)}
    assert len(tok) == base + len(SPECIALS) == _json(tiny_internvl3 / "config.json")["llm_config"]["vocab_size"]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert _json(tiny_internvl3 / "tokenizer_config.json")["tokenizer_class"] == "Qwen2Tokenizer"
    assert 300 <= base <= 1000
    for text in ROUND_TRIP:
        ids = tok.encode(text, add_special_tokens=True)
        assert tok.decode(ids) == text
    ids = tok.encode("<img><IMG_CONTEXT><IMG_CONTEXT></img>\n你好<|im_end|>")
    assert ids[:4] == [base + 3, base + 5, base + 5, base + 4] and ids[-1] == base + 2
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- -hf conversion -------------------------------------------------------------------------------------------------

def test_hf_conversion_loads_without_missing_or_unexpected(tiny_internvl3: Path, tiny_internvl3_hf: Path) -> None:
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(
        tiny_internvl3_hf, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    orig = _tensors(tiny_internvl3)
    qkv = orig["vision_model.encoder.layers.1.attn.qkv.weight"].float()
    attn = model.model.vision_tower.encoder.layer[1].attention
    for k, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        assert torch.equal(proj.weight, qkv[32 * k:32 * (k + 1)])
    assert torch.equal(model.lm_head.weight, orig["language_model.lm_head.weight"].float())

    tok = AutoTokenizer.from_pretrained(tiny_internvl3_hf)
    base = len(_json(tiny_internvl3 / "vocab.json"))
    assert model.config.image_token_id == tok.context_image_token_id == base + 5
    assert (tok.start_image_token_id, tok.end_image_token_id) == (base + 3, base + 4)
    assert model.config.text_config.eos_token_id == tok.eos_token_id == base + 2
    assert model.config.text_config.vocab_size == base + len(SPECIALS)
    assert model.config.image_seq_length == 256 and model.config.vision_feature_layer == -1


def test_hf_conversion_rejects_ps_v1(tmp_path: Path) -> None:
    src = make_tiny_checkpoint("internvl3", tmp_path / "v1", ps_version="v1")
    with pytest.raises(SetupError, match="pixel shuffle v2"):
        convert_to_hf(src, tmp_path / "v1-hf")


# --- Checkpoint.open ------------------------------------------------------------------------------------------------

def test_checkpoint_open_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(SetupError, match="does not exist") as exc:
        Checkpoint.open(missing)
    assert str(missing) in str(exc.value) and "config.json" in str(exc.value)
    with pytest.raises(SetupError, match="no config.json"):
        Checkpoint.open(tmp_path)


def test_checkpoint_open_reads_tiny(tiny_internvl3: Path) -> None:
    ckpt = Checkpoint.open(tiny_internvl3)
    assert ckpt.config["model_type"] == "internvl_chat"
    assert set(ckpt.load_tensors("mlp1.")) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}
