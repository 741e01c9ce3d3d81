"""Our InternViT encoder and LLM loader against transformers' InternVL (via the -hf conversion), plus pixel shuffle."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.checkpoints.tiny import make_tiny_checkpoint
from vlm_triton.checkpoints.to_hf import convert_to_hf
from vlm_triton.errors import SetupError
from vlm_triton.models.internvit import InternVLVisionEncoder, pixel_shuffle
from vlm_triton.models.language_model import load_language_model

TOL = dict(atol=1e-5, rtol=1e-5)


def _hf_model(path: Path):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def _hf_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixel_values)
    return out.pooler_output  # transformers 5.x: a ModelOutput; the projected rows are pooler_output


def _tiles(n: int, seed: int = 0, size: int = 448) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.fixture(scope="module")
def hf_model(tiny_internvl3_hf: Path):
    return _hf_model(tiny_internvl3_hf)


@pytest.fixture(scope="module")
def encoder(tiny_internvl3: Path) -> InternVLVisionEncoder:
    return InternVLVisionEncoder.from_checkpoint(Checkpoint.open(tiny_internvl3), dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("tiles", [1, 3])
def test_encoder_matches_hf_image_features(encoder: InternVLVisionEncoder, hf_model, tiles: int) -> None:
    px = _tiles(tiles, seed=tiles)
    with torch.no_grad():
        ours = encoder(px)
    ref = _hf_features(hf_model, px)
    assert ours.shape == (tiles, 256, 64) == ref.shape
    assert ref.abs().mean() > 0.1  # outputs are not vanishingly small, so the tolerance means something
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("overrides", [
    {"vision": {"qkv_bias": False, "qk_normalization": True, "norm_type": "rms_norm"}},  # InternViT-6B style
    {"select_layer": -2, "vision": {"num_hidden_layers": 3}},
], ids=["6b-style", "select-layer-2"])
def test_encoder_variants_match_hf(tmp_path: Path, overrides: dict) -> None:
    src = make_tiny_checkpoint("internvl3", tmp_path / "src", seed=5, dtype="float32", **overrides)
    hf = _hf_model(convert_to_hf(src, tmp_path / "hf"))
    enc = InternVLVisionEncoder.from_checkpoint(Checkpoint.open(src), dtype=torch.float32, device="cpu")
    if "select_layer" in overrides:
        assert len(enc.vision_model.encoder.layers) == 2  # only the layers feeding select_layer run
    px = _tiles(2, seed=9)
    with torch.no_grad():
        ours = enc(px)
    torch.testing.assert_close(ours, _hf_features(hf, px), **TOL)


def test_position_embedding_interpolation_matches_hf(tiny_internvl3: Path, hf_model) -> None:
    ckpt = Checkpoint.open(tiny_internvl3)
    cfg = {**ckpt.config, "force_image_size": 224}  # the 448 position table is resampled to a 16x16 grid
    enc = InternVLVisionEncoder.from_checkpoint(dataclasses.replace(ckpt, config=cfg), dtype=torch.float32)
    assert enc.tokens_per_tile == 64
    px = _tiles(2, seed=4, size=224)
    with torch.no_grad():
        ours = enc(px)
    torch.testing.assert_close(ours, _hf_features(hf_model, px), **TOL)


def _index_tensor(n: int = 2, rows: int = 8, cols: int = 8, ch: int = 3) -> torch.Tensor:
    """X[b, r, c, k] = 1e6 b + 1e4 r + 1e2 c + k (exact in float64), so any misplaced element is detectable."""
    b, r, c, k = torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in (n, rows, cols, ch)), indexing="ij")
    return 1e6 * b + 1e4 * r + 1e2 * c + k


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_follows_spec_formula(version: str) -> None:
    x = _index_tensor()
    n, rows, cols, ch = x.shape
    y = pixel_shuffle(x, factor=2, version=version)
    assert y.shape == (n, rows // 2, cols // 2, 4 * ch)
    flat = y.reshape(n, -1, 4 * ch)
    half = cols // 2
    for b in range(n):
        for i in range(rows // 2):
            for j in range(half):
                token = half * i + j if version == "v2" else half * j + i
                for s in range(2):
                    for t in range(2):
                        for k in range(ch):
                            assert flat[b, token, 2 * ch * s + ch * t + k] == x[b, 2 * i + s, 2 * j + t, k]


def test_pixel_shuffle_v2_matches_hf_and_v1_differs() -> None:
    from transformers.models.internvl.modeling_internvl import InternVLModel

    x = _index_tensor(n=1, rows=32, cols=32, ch=4)
    ref = InternVLModel.pixel_shuffle(None, x, scale_factor=0.5)
    assert torch.equal(pixel_shuffle(x, version="v2"), ref)
    assert torch.equal(pixel_shuffle(x, version="v1"), ref.transpose(1, 2))


def test_ps_v1_checkpoint_uses_v1_layout(tmp_path: Path) -> None:
    src = make_tiny_checkpoint("internvl3", tmp_path / "v1", ps_version="v1", dtype="float32")
    enc = InternVLVisionEncoder.from_checkpoint(Checkpoint.open(src), dtype=torch.float32)
    px = _tiles(1, seed=2)
    with torch.no_grad():
        feats = enc.vit_features(px).reshape(1, 32, 32, 32)
        ours = enc(px)
        v1 = enc.mlp1(feats.reshape(1, 32, 32, 32).reshape(1, 16, 2, 16, 2, 32).permute(0, 3, 1, 2, 4, 5)
                      .reshape(1, 256, 128))
        v2 = enc.mlp1(pixel_shuffle(feats, version="v2").reshape(1, 256, 128))
    torch.testing.assert_close(ours, v1, atol=0, rtol=0)
    assert not torch.allclose(ours, v2)


def test_encoder_rejects_mismatched_weights(tiny_internvl3: Path) -> None:
    ckpt = Checkpoint.open(tiny_internvl3)
    cfg = {**ckpt.config, "vision_config": {**ckpt.config["vision_config"], "qk_normalization": True}}
    with pytest.raises(SetupError, match="missing"):
        InternVLVisionEncoder.from_checkpoint(dataclasses.replace(ckpt, config=cfg))


# --- language model -------------------------------------------------------------------------------------------------

def test_language_model_logits_match_hf(tiny_internvl3: Path, hf_model) -> None:
    from transformers import Qwen2ForCausalLM

    lm = load_language_model(Checkpoint.open(tiny_internvl3), dtype=torch.float32, device="cpu")
    assert isinstance(lm, Qwen2ForCausalLM) and not lm.training
    assert lm.config._attn_implementation == "sdpa"
    ids = torch.randint(0, lm.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = lm(input_ids=ids).logits
        ref = hf_model(input_ids=ids).logits
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(ours, ref, **TOL)


def test_language_model_bf16_keeps_fp32_rope(tiny_internvl3: Path, tiny_internvl3_hf: Path) -> None:
    from transformers import InternVLForConditionalGeneration

    lm = load_language_model(Checkpoint.open(tiny_internvl3), dtype=torch.bfloat16)
    assert lm.lm_head.weight.dtype == torch.bfloat16
    assert lm.model.rotary_emb.inv_freq.dtype == torch.float32  # as transformers' own from_pretrained keeps it
    ref_model = InternVLForConditionalGeneration.from_pretrained(tiny_internvl3_hf, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, lm.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, ref_model(input_ids=ids).logits, atol=1e-2, rtol=1e-2)


def test_language_model_strict_loading(tiny_internvl3: Path) -> None:
    ckpt = Checkpoint.open(tiny_internvl3)
    bigger = {**ckpt.config, "llm_config": {**ckpt.config["llm_config"], "num_hidden_layers": 3}}
    with pytest.raises(SetupError, match=r"missing \['model\.layers\.2\."):
        load_language_model(dataclasses.replace(ckpt, config=bigger))
    other = {**ckpt.config, "llm_config": {**ckpt.config["llm_config"], "architectures": ["FooForCausalLM"]}}
    with pytest.raises(SetupError, match="FooForCausalLM"):
        load_language_model(dataclasses.replace(ckpt, config=other))
