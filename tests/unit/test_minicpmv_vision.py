"""MiniCPM-V-2.6 vision on the tiny checkpoint: SigLIP against transformers' `SiglipVisionModel` where the
architectures coincide (one 980x980 item: 70x70 patches, positions 0..4899, no padding), and the whole encoder
(navit position ids + padding masks + resampler) against a straightforward per-item implementation written here
from the spec, on transformers' SigLIP layers and torch's `nn.MultiheadAttention`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SiglipVisionConfig, SiglipVisionModel

from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.checkpoints.tiny import make_tiny_checkpoint
from vlm_triton.models.minicpmv_resampler import sincos_2d
from vlm_triton.models.minicpmv_vision import MiniCPMVVisionEncoder, navit_position_ids
from vlm_triton.multimodal.minicpmv_slicing import pad_items, slice_image, to_patch_layout


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return Checkpoint.open(make_tiny_checkpoint("minicpmv2_6", tmp_path_factory.mktemp("mcpv") / "tiny", seed=0))


@pytest.fixture(scope="module")
def encoder(ckpt: Checkpoint) -> MiniCPMVVisionEncoder:
    return MiniCPMVVisionEncoder.from_checkpoint(ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_siglip(ckpt: Checkpoint) -> SiglipVisionModel:
    v = ckpt.config["vision_config"]
    cfg = SiglipVisionConfig(**{k: v[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "image_size", "patch_size", "hidden_act",
                                                  "layer_norm_eps")}, vision_use_head=False)
    model = SiglipVisionModel(cfg).eval()
    weights = {k: t.float() for k, t in ckpt.load_tensors("vpm.").items()}  # transformers 5: no vision_model.
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(h // 7, 1), max(w // 7, 1), 3), dtype=np.uint8)
    noise = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))
    return Image.fromarray((base // 2 + noise).astype(np.uint8))


def test_siglip_equals_transformers_on_a_full_980_item(encoder, hf_siglip) -> None:
    img = _image(980, 980, 0)
    patches, grid = to_patch_layout(img)
    assert grid == (70, 70)
    ours = encoder.vpm(torch.from_numpy(patches)[None], [grid], None)
    chw = (np.asarray(img, np.float32) / 255 - 0.5) / 0.5
    with torch.no_grad():
        ref = hf_siglip(pixel_values=torch.from_numpy(chw.transpose(2, 0, 1).copy())[None]).last_hidden_state
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def _reference_position_ids(rows: int, cols: int) -> torch.Tensor:
    """The remote code's loop body, for one item (70 patches per side)."""
    boundaries = torch.arange(1 / 70, 1.0, 1 / 70)
    tgt = torch.tensor([rows, cols], dtype=torch.int32)
    fh = torch.arange(0, 1 - 1e-6, 1 / tgt[0])
    fw = torch.arange(0, 1 - 1e-6, 1 / tgt[1])
    return (torch.bucketize(fh, boundaries, right=True)[:, None] * 70
            + torch.bucketize(fw, boundaries, right=True)).flatten()


@pytest.mark.parametrize(("rows", "cols"), [(28, 37), (32, 32), (25, 49), (1, 714), (70, 70), (100, 3)])
def test_position_ids_follow_the_reference_float_ops(rows, cols) -> None:
    assert torch.equal(navit_position_ids(rows=rows, cols=cols, patches_per_side=70), _reference_position_ids(rows, cols))


def test_position_id_edge_effect_is_kept() -> None:
    """5/25 == 14/70 exactly, but in float32 the fraction lands below the boundary: bucket 13, not floor(70*5/25)."""
    ids = navit_position_ids(rows=25, cols=1, patches_per_side=70)
    assert int(ids[5]) == 13 * 70


def test_sincos_table_matches_float64_formula() -> None:
    d, rows, cols = 256, 5, 7
    w = np.arange(cols)[None, :].repeat(rows, 0)
    h = np.arange(rows)[:, None].repeat(cols, 1)
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
    parts = [np.sin(w[..., None] * omega), np.cos(w[..., None] * omega),
             np.sin(h[..., None] * omega), np.cos(h[..., None] * omega)]
    expected = np.concatenate(parts, axis=-1).reshape(rows * cols, d)
    np.testing.assert_allclose(sincos_2d(dim=d, rows=rows, cols=cols).numpy(), expected, atol=2e-6)


def reference_item_embeddings(ckpt: Checkpoint, hf_siglip: SiglipVisionModel, patches: np.ndarray,
                              grid: tuple[int, int]) -> torch.Tensor:
    """One item, unpadded: conv patches + table[reference ids] -> transformers' SigLIP layers + post LN ->
    kv_proj, LN_kv, keys + sincos PE (float64 formula), nn.MultiheadAttention from LN_q(query), LN_post, @ proj."""
    w = {k: t.float() for k, t in ckpt.load_tensors("resampler.").items()}
    vm = getattr(hf_siglip, "vision_model", hf_siglip)
    x = torch.from_numpy(patches)[None]
    with torch.no_grad():
        emb = vm.embeddings.patch_embedding(x).flatten(2).transpose(1, 2)
        emb = emb + vm.embeddings.position_embedding(_reference_position_ids(*grid))[None]
        h = emb
        for layer in vm.encoder.layers:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
        h = vm.post_layernorm(h)[0]  # [L, C]
        d = w["query"].shape[1]
        kv = F.layer_norm(h @ w["kv_proj.weight"].T, (d,), w["ln_kv.weight"], w["ln_kv.bias"], 1e-6)
        rows, cols = grid
        omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
        cc, rr = np.meshgrid(np.arange(cols), np.arange(rows))
        pe = np.concatenate([np.sin(cc[..., None] * omega), np.cos(cc[..., None] * omega),
                             np.sin(rr[..., None] * omega), np.cos(rr[..., None] * omega)], -1)
        pe_t = torch.from_numpy(pe.reshape(rows * cols, d)).float()
        mha = torch.nn.MultiheadAttention(d, d // 128)
        mha.load_state_dict({"in_proj_weight": w["attn.in_proj_weight"], "in_proj_bias": w["attn.in_proj_bias"],
                             "out_proj.weight": w["attn.out_proj.weight"], "out_proj.bias": w["attn.out_proj.bias"]})
        q = F.layer_norm(w["query"], (d,), w["ln_q.weight"], w["ln_q.bias"], 1e-6)
        out = mha(q[:, None], (kv + pe_t)[:, None], kv[:, None], need_weights=False)[0][:, 0]
        out = F.layer_norm(out, (d,), w["ln_post.weight"], w["ln_post.bias"], 1e-6)
        return out @ w["proj"]


def test_encoder_equals_independent_per_item_reference(ckpt, encoder, hf_siglip) -> None:
    items = slice_image(_image(800, 600, 1)) + slice_image(_image(300, 200, 2)) + slice_image(_image(90, 700, 3))
    laid = [to_patch_layout(i) for i in items]
    assert len({g for _, g in laid}) >= 3  # different sizes in one batch
    pixels = torch.from_numpy(pad_items([p for p, _ in laid], max_patches=1200))
    tgt = torch.tensor([g for _, g in laid], dtype=torch.int32)
    ours = encoder(pixels, tgt)
    assert ours.shape == (len(items), 64, 256)
    for k, (patches, grid) in enumerate(laid):
        ref = reference_item_embeddings(ckpt, hf_siglip, patches, grid)
        torch.testing.assert_close(ours[k], ref, atol=1e-4, rtol=1e-4)


def test_items_do_not_depend_on_their_batch(encoder) -> None:
    laid = [to_patch_layout(i) for i in slice_image(_image(1344, 1344, 4)) + slice_image(_image(300, 900, 5))]
    pixels = torch.from_numpy(pad_items([p for p, _ in laid], max_patches=1200))
    tgt = torch.tensor([g for _, g in laid], dtype=torch.int32)
    together = encoder(pixels, tgt)
    alone = torch.cat([encoder(pixels[k: k + 1, ..., : 14 * int(tgt[k].prod())], tgt[k: k + 1])
                       for k in range(len(laid))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_bf16_encoder_runs(ckpt: Checkpoint, tmp_path: Path) -> None:
    enc = MiniCPMVVisionEncoder.from_checkpoint(ckpt, dtype=torch.bfloat16)
    patches, grid = to_patch_layout(_image(448, 448, 6))
    out = enc(torch.from_numpy(pad_items([patches], max_patches=1200)), torch.tensor([grid]))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 64, 256) and torch.isfinite(out.float()).all()
