"""InternVL dynamic tiling: grid choice (spec 2.1 vectors), pixels vs transformers' PIL GotOcr2 processor and vs
an independent implementation of the reference PIL path, and video frame sampling (spec 2.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_triton.multimodal.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    candidate_grids,
    choose_grid,
    normalize_tiles,
    num_tiles,
    preprocess_image,
    tile_image,
    video_frame_indices,
)

S = 448

# (width, height) -> (cols, rows), tiles; spec 2.1, max_num 12
GRID_VECTORS_MAX12 = [
    ((448, 448), (1, 1), 1),
    ((600, 600), (1, 1), 1),
    ((700, 700), (2, 2), 5),
    ((1000, 1000), (3, 3), 10),
    ((800, 600), (4, 3), 13),
    ((640, 480), (4, 3), 13),
    ((1024, 768), (4, 3), 13),
    ((560, 448), (4, 3), 13),
    ((1920, 1080), (4, 2), 9),
    ((1080, 1920), (2, 4), 9),
    ((500, 2000), (1, 4), 5),
    ((300, 200), (3, 2), 7),
    ((896, 448), (2, 1), 3),
    ((1250, 625), (2, 1), 3),
    ((100, 1000), (1, 10), 11),
    ((2000, 100), (12, 1), 13),
]
GRID_VECTORS_MAX6 = [
    ((800, 600), (3, 2), 7),
    ((1920, 1080), (2, 1), 3),
]
SPEC_ORDER_MAX12 = [
    (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2), (2, 3),
    (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5), (5, 2), (10, 1), (1, 10),
    (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6),
]  # fmt: skip

# sizes for pixel comparisons: square, small-upscaled, tiny, wide, tall, extreme, huge
PIXEL_SIZES = [(448, 448), (300, 200), (5, 7), (1920, 1080), (500, 2000), (2000, 100), (100, 1000), (4000, 3000)]


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise on top of gradients, so that bicubic resampling differences would show (kept small in memory)."""
    rng = np.random.default_rng(seed + width * 7919 + height)
    gx = (np.arange(width, dtype=np.float32) * (255 / max(width - 1, 1))).astype(np.int16)[None, :]
    gy = (np.arange(height, dtype=np.float32) * (255 / max(height - 1, 1))).astype(np.int16)[:, None]
    img = np.empty((height, width, 3), dtype=np.uint8)
    for c, base in enumerate((gx + 0 * gy, gy + 0 * gx, (gx + gy) % 256)):
        noise = rng.integers(-40, 41, size=(height, width), dtype=np.int16)
        img[..., c] = np.clip(base + noise, 0, 255)
    return Image.fromarray(img, "RGB")


# --------------------------------------------------------------------------------------------------- grid choice
def test_candidate_order_matches_reference_set_order():
    assert candidate_grids(1, 12) == SPEC_ORDER_MAX12


def test_candidate_grids_respect_min_and_max():
    grids = candidate_grids(2, 6)
    assert all(2 <= c * r <= 6 for c, r in grids)
    assert len(grids) == len(set(grids)) == sum(1 for c in range(1, 7) for r in range(1, 7) if 2 <= c * r <= 6)
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)


@pytest.mark.parametrize(("size", "grid", "tiles"), GRID_VECTORS_MAX12)
def test_grid_vectors_max12(size, grid, tiles):
    assert choose_grid(*size, min_num=1, max_num=12, image_size=S) == grid
    assert num_tiles(*size, max_num=12) == tiles


@pytest.mark.parametrize(("size", "grid", "tiles"), GRID_VECTORS_MAX6)
def test_grid_vectors_max6(size, grid, tiles):
    assert choose_grid(*size, min_num=1, max_num=6, image_size=S) == grid
    assert num_tiles(*size, max_num=6) == tiles


def test_max_num_1_is_one_tile_without_thumbnail():
    img = _noise_image(1920, 1080)
    tiles = tile_image(img, max_num=1)
    assert len(tiles) == 1 and tiles[0].size == (S, S)
    assert num_tiles(1920, 1080, max_num=1) == 1


def test_grid_matches_transformers_canvas_on_a_sweep():
    pil_mod = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    for max_num in (6, 12):
        for w in range(1, 1500, 37):
            for h in range(1, 1500, 41):
                hf_cols, hf_rows = pil_mod.get_optimal_tiled_canvas((h, w), (S, S), 1, max_num)
                assert choose_grid(w, h, max_num=max_num) == (hf_cols, hf_rows), (w, h, max_num)


def test_bad_arguments():
    with pytest.raises(ValueError):
        choose_grid(0, 10)
    with pytest.raises(ValueError):
        candidate_grids(3, 2)


# --------------------------------------------------------------------------------------------------- tiles
def _reference_pil_path(img: Image.Image, max_num: int = 12) -> torch.Tensor:
    """Independent straightforward implementation of the reference (dynamic_preprocess + build_transform),
    written from spec 2.1 with torch doing torchvision's ToTensor/Normalize arithmetic."""
    w, h = img.size
    ratio = w / h
    best, best_diff = (1, 1), float("inf")
    for cols, rows in SPEC_ORDER_MAX12 if max_num == 12 else candidate_grids(1, max_num):
        d = abs(ratio - cols / rows)
        if d < best_diff:
            best, best_diff = (cols, rows), d
        elif d == best_diff and w * h > 0.5 * S * S * cols * rows:
            best = (cols, rows)
    cols, rows = best
    big = img.resize((S * cols, S * rows))  # PIL default filter (BICUBIC for RGB)
    crops = [big.crop(((k % cols) * S, (k // cols) * S, (k % cols + 1) * S, (k // cols + 1) * S)) for k in range(cols * rows)]
    if len(crops) != 1:
        crops.append(img.resize((S, S)))
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    out = []
    for c in crops:
        t = torch.from_numpy(np.array(c, dtype=np.uint8)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        out.append(t.sub_(mean).div_(std))
    return torch.stack(out)


@pytest.fixture(scope="module")
def hf_processor():
    pil_mod = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    return pil_mod.GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        size={"height": S, "width": S},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


@pytest.mark.parametrize("size", PIXEL_SIZES, ids=[f"{w}x{h}" for w, h in PIXEL_SIZES])
def test_tiles_match_transformers_pil_processor(size, hf_processor):
    img = _noise_image(*size)
    ours = preprocess_image(img, max_num=12)
    hf = hf_processor(images=img, return_tensors="np")
    assert int(hf["num_patches"][0]) == ours.shape[0] == num_tiles(*size)
    theirs = np.asarray(hf["pixel_values"], dtype=np.float32)
    assert theirs.shape == ours.shape == (num_tiles(*size), 3, S, S)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", PIXEL_SIZES, ids=[f"{w}x{h}" for w, h in PIXEL_SIZES])
def test_tiles_bit_identical_to_reference_pil_path(size):
    img = _noise_image(*size, seed=1)
    ours = preprocess_image(img, max_num=12)
    ref = _reference_pil_path(img).numpy()
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)


def test_tile_layout_row_major_and_thumbnail_last():
    img = _noise_image(1920, 1080)
    tiles = tile_image(img)
    cols, rows = choose_grid(1920, 1080)
    big = np.asarray(img.resize((S * cols, S * rows), Image.Resampling.BICUBIC))
    assert len(tiles) == cols * rows + 1
    for k, tile in enumerate(tiles[:-1]):
        r, c = divmod(k, cols)
        assert np.array_equal(np.asarray(tile), big[r * S : (r + 1) * S, c * S : (c + 1) * S])
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((S, S), Image.Resampling.BICUBIC)))


def test_no_thumbnail_when_disabled():
    assert len(tile_image(_noise_image(1920, 1080), use_thumbnail=False)) == 8


def test_non_rgb_modes_are_converted_first():
    rgb = _noise_image(640, 480)
    for mode in ("RGBA", "L", "P"):
        other = rgb.convert(mode)
        tiles = tile_image(other)
        assert all(t.mode == "RGB" for t in tiles)
        expected = preprocess_image(other.convert("RGB"))
        assert np.array_equal(normalize_tiles(tiles), expected)


def test_normalize_resizes_odd_tiles_and_matches_torch_math():
    tile = _noise_image(300, 500)
    out = normalize_tiles([tile])
    resized = tile.resize((S, S), Image.Resampling.BICUBIC)
    assert np.array_equal(out[0], normalize_tiles([resized])[0])
    assert out.shape == (1, 3, S, S) and out.dtype == np.float32


# --------------------------------------------------------------------------------------------------- video
def test_video_indices_spec_example():
    assert video_frame_indices(300, 30.0, 8) == [18, 55, 93, 130, 168, 205, 242, 280]


def test_video_indices_round_half_even_and_bound():
    # seg = 0.5: np.round(0.5*k) is half-to-even -> 0, 0, 1, 2, 2, 2, 3, 4
    assert video_frame_indices(5, 1.0, 8) == [0, 0, 1, 2, 2, 2, 3, 4]
    # 10 s clip from 2 s at 10 fps: start 20, end 120 (clamped by 99 frames -> 99)
    assert video_frame_indices(100, 10.0, 4, bound=(2.0, 12.0)) == [29, 49, 69, 88]
    got = video_frame_indices(1000, 25.0, 32)
    assert len(got) == 32 and got == sorted(got) and 0 <= got[0] and got[-1] <= 999


def test_video_indices_bad_arguments():
    with pytest.raises(ValueError):
        video_frame_indices(0, 30.0, 8)
    with pytest.raises(ValueError):
        video_frame_indices(10, 30.0, 0)
