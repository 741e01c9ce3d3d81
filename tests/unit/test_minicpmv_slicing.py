"""MiniCPM-V-2.6 slicing: grid / sizes against the spec 2.2 test vectors, placeholder strings (spec 4.3),
the per-patch pixel layout against the reference's unfold-based `reshape_by_patch`, and the card's video sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_triton.families.minicpmv import MAX_PATCHES_PER_ITEM
from vlm_triton.multimodal.minicpmv_slicing import (
    card_frame_indices,
    image_placeholder,
    pad_items,
    slice_image,
    slice_plan,
    sliced_grid,
    to_patch_layout,
)

# (w, h) -> grid, source (w, h), cell (w, h), items, tgt of the source, tgt of a cell   [spec 2.2 vectors]
SPEC_VECTORS = [
    ((448, 448), None, (448, 448), None, 1, (32, 32), None),
    ((300, 200), None, (546, 364), None, 1, (26, 39), None),
    ((800, 600), (2, 2), (518, 392), (518, 392), 5, (28, 37), (28, 37)),
    ((1344, 1344), (3, 3), (448, 448), (448, 448), 10, (32, 32), (32, 32)),
    ((1920, 1080), (4, 2), (602, 336), (420, 476), 9, (24, 43), (34, 30)),
    ((640, 480), (2, 1), (518, 392), (364, 546), 3, (28, 37), (39, 26)),
    ((500, 2000), (1, 4), (224, 896), (448, 448), 5, (64, 16), (32, 32)),
]


@pytest.mark.parametrize(("size", "grid", "source", "cell", "items", "tgt_source", "tgt_cell"), SPEC_VECTORS)
def test_plan_matches_spec_vectors(size, grid, source, cell, items, tgt_source, tgt_cell) -> None:
    plan = slice_plan(size=size)
    assert (plan.grid, plan.source_size, plan.cell_size, plan.num_items) == (grid, source, cell, items)
    tgts = plan.tgt_sizes()
    assert tgts[0] == tgt_source and len(tgts) == items
    assert all(t == tgt_cell for t in tgts[1:])


def test_refine_size_of_1920x1080() -> None:
    assert slice_plan(size=(1920, 1080)).refine_size == (1680, 952)


@pytest.mark.parametrize(("size", "max_slices", "grid"), [
    ((800, 600), 2, (2, 1)),  # multiple = 2: counts {2, 3} minus those > 2 -> [1,2], [2,1]; 4:3 is closer to 2:1
    ((1920, 1080), 2, (2, 1)),
    ((1000, 1000), 9, (2, 2)),  # ratio 4.98 -> multiple 5: counts 4, 5, 6 -> (2, 2) is exact
    ((448, 449), 9, (1, 2)),  # just over S^2: multiple 2, counts {2, 3}; [1, 2] comes first with the least error
    ((449, 448), 9, (2, 1)),
    ((4000, 100), 9, (3, 1)),  # ratio 1.99 -> multiple 2: counts {2, 3}
    ((9000, 200), 9, (9, 1)),  # ratio 8.97 -> multiple 9: counts {8, 9}
])
def test_grid_choice(size, max_slices, grid) -> None:
    assert sliced_grid(size=size, max_slice_nums=max_slices, scale_resolution=448) == grid


def test_slices_are_cut_row_major_from_the_refined_image() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8))
    items = slice_image(img)
    refined = img.resize((1036, 784), Image.Resampling.BICUBIC)
    assert [i.size for i in items] == [(518, 392)] * 5
    assert np.array_equal(np.asarray(items[0]), np.asarray(img.resize((518, 392), Image.Resampling.BICUBIC)))
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        box = (c * 518, r * 392, (c + 1) * 518, (r + 1) * 392)
        assert np.array_equal(np.asarray(items[1 + k]), np.asarray(refined.crop(box)))


def _reference_reshape_by_patch(img: Image.Image, patch: int = 14) -> np.ndarray:
    """The processor's path: float32 /255, (x - 0.5) / 0.5 channel-last, CHW, then torch unfold re-layout."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255
    x = (x - np.array([0.5, 0.5, 0.5], dtype=np.float32)) / np.array([0.5, 0.5, 0.5], dtype=np.float32)
    chw = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
    cols = torch.nn.functional.unfold(chw, (patch, patch), stride=(patch, patch))
    cols = cols.reshape(3, patch, patch, -1).permute(0, 1, 3, 2).reshape(3, patch, -1)
    return cols.numpy()


@pytest.mark.parametrize("size", [(518, 392), (28, 14), (14, 70)])
def test_patch_layout_equals_reference_unfold(size) -> None:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    ours, grid = to_patch_layout(img)
    assert grid == (size[1] // 14, size[0] // 14)
    np.testing.assert_array_equal(ours, _reference_reshape_by_patch(img))


def test_pad_items_zero_pads_on_the_right() -> None:
    a, b = np.ones((3, 14, 28), np.float32), np.full((3, 14, 56), 2.0, np.float32)
    out = pad_items([a, b], max_patches=5)
    assert out.shape == (2, 3, 14, 70)
    assert (out[0, ..., :28] == 1).all() and (out[0, ..., 28:] == 0).all() and (out[1, ..., 56:] == 0).all()
    with pytest.raises(ValueError):
        pad_items([np.ones((3, 14, 98), np.float32)], max_patches=5)


def test_placeholder_layout_2_6() -> None:
    text = image_placeholder(grid=(2, 2), image_index=3, use_image_id=True, query_num=2)
    cell = "<slice><unk><unk></slice>"
    assert text == "<image_id>3</image_id><image><unk><unk></image>" + cell * 2 + "\n" + cell * 2
    assert image_placeholder(grid=None, image_index=0, use_image_id=False, query_num=2) == "<image><unk><unk></image>"
    wide = image_placeholder(grid=(4, 2), image_index=0, use_image_id=False)
    assert wide.count("<unk>") == 64 * 9 and wide.count("\n") == 1 and wide.count("<slice>") == 8


@pytest.mark.parametrize("size", [(1, 100), (100, 1), (3000, 30), (37, 3700), (8192, 8192), (1, 1), (5, 7)])
def test_items_fit_the_fixed_layout_up_to_100_to_1(size) -> None:
    assert max(r * c for r, c in slice_plan(size=size).tgt_sizes()) <= MAX_PATCHES_PER_ITEM


def test_card_video_sampling() -> None:
    assert card_frame_indices(total_frames=300, fps=30.0) == list(range(0, 300, 30))
    idx = card_frame_indices(total_frames=30 * 200, fps=29.97)  # 200 s -> 200 candidates -> 64 kept
    assert len(idx) == 64 and idx[0] == 30 and idx == sorted(idx)
    assert card_frame_indices(total_frames=5, fps=0.2) == [0, 1, 2, 3, 4]
