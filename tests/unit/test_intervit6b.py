"""InternViT-6B-448px-V1-5 style encoder (RMSNorm, no qkv bias, qk-normalization over the full C, layer scale)
and pixel shuffle v1, against a straightforward implementation of spec 3.1-3.3 written here on the same weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.checkpoints.tiny import make_tiny_checkpoint
from vlm_triton.models.internvit import InternVLVisionEncoder


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _reference(weights: dict[str, torch.Tensor], cfg: dict, px: torch.Tensor) -> torch.Tensor:
    v = cfg["vision_config"]
    c, heads, eps, p = v["hidden_size"], v["num_attention_heads"], v["layer_norm_eps"], v["patch_size"]
    d = c // heads
    w = lambda name: weights["vision_model." + name]  # noqa: E731
    x = torch.nn.functional.conv2d(px, w("embeddings.patch_embedding.weight"),
                                   w("embeddings.patch_embedding.bias"), stride=p)
    n, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([w("embeddings.class_embedding").expand(n, 1, c), x], 1) + w("embeddings.position_embedding")
    for i in range(v["num_hidden_layers"]):
        lw = lambda name: w(f"encoder.layers.{i}.{name}")  # noqa: E731,B023
        h = _rms(x, lw("norm1.weight"), eps)
        qkv = h @ lw("attn.qkv.weight").T
        q, k, val = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        q, k = _rms(q, lw("attn.q_norm.weight"), eps), _rms(k, lw("attn.k_norm.weight"), eps)
        out = torch.empty_like(q)
        for head in range(heads):
            sl = slice(head * d, (head + 1) * d)
            att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
            out[..., sl] = att @ val[..., sl]
        x = x + lw("ls1") * (out @ lw("attn.proj.weight").T + lw("attn.proj.bias"))
        h = _rms(x, lw("norm2.weight"), eps)
        mlp = torch.nn.functional.gelu(h @ lw("mlp.fc1.weight").T + lw("mlp.fc1.bias"))
        x = x + lw("ls2") * (mlp @ lw("mlp.fc2.weight").T + lw("mlp.fc2.bias"))
    feats = x[:, 1:].reshape(n, gh, gw, c)
    # pixel shuffle v1 (spec 3.2): token 16j + i holds rows 2i+s, cols 2j+t, channel order (s, t, c)
    tokens = torch.empty(n, (gh // 2) * (gw // 2), 4 * c)
    for i in range(gh // 2):
        for j in range(gw // 2):
            parts = [feats[:, 2 * i + s, 2 * j + t] for s in (0, 1) for t in (0, 1)]
            tokens[:, (gh // 2) * j + i] = torch.cat(parts, dim=-1)
    m = lambda name: weights["mlp1." + name]  # noqa: E731
    y = torch.nn.functional.layer_norm(tokens, (4 * c,), m("0.weight"), m("0.bias"), eps=1e-5)
    y = torch.nn.functional.gelu(y @ m("1.weight").T + m("1.bias"))
    return y @ m("3.weight").T + m("3.bias")


@pytest.fixture(scope="module")
def v15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("internvl_chat_v1_5", tmp_path_factory.mktemp("v15") / "c", seed=5,
                                dtype="float32", vision={"num_hidden_layers": 3, "num_attention_heads": 4})


def test_tiny_v15_is_6b_style(v15: Path) -> None:
    ckpt = Checkpoint.open(v15)
    v = ckpt.config["vision_config"]
    assert (v["qkv_bias"], v["qk_normalization"], v["norm_type"]) == (False, True, "rms_norm")
    names = ckpt.tensor_names()
    assert "vision_model.encoder.layers.0.attn.q_norm.weight" in names
    assert not any(n.endswith("attn.qkv.bias") or n.endswith("norm1.bias") for n in names)
    assert ckpt.config["ps_version"] == "v1"


@pytest.mark.parametrize("tiles", [1, 3])
def test_encoder_equals_straightforward_spec_implementation(v15: Path, tiles: int) -> None:
    ckpt = Checkpoint.open(v15)
    encoder = InternVLVisionEncoder.from_checkpoint(ckpt, dtype=torch.float32)
    px = torch.randn(tiles, 3, 448, 448, generator=torch.Generator().manual_seed(tiles)) * 1.5
    with torch.no_grad():
        got = encoder(px)
    want = _reference(ckpt.load_tensors("", strip_prefix=False), ckpt.config, px)
    assert got.shape == (tiles, 256, 64) and want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
