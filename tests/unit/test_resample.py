"""Split, multi-threaded resizes and tiles (`multimodal.resample`, `tiling.start_images_tiles`) equal the single-threaded
path byte for byte: `Image.resize(size, BICUBIC)` and `image_tiles(img)` (itself pinned to the reference pipeline in
test_tiling.py). Mutation checks show the comparisons catch a strip that is one row off."""

from __future__ import annotations

import random

import numpy as np
import PIL
import pytest
from PIL import Image

from vlm_triton.multimodal import pixels, resample
from vlm_triton.multimodal.minicpmv_slicing import slice_image
from vlm_triton.multimodal.resample import (
    PASS_ORDERS,
    ResizeJob,
    pass_order_rule,
    resize_images,
    split_resize,
    start_resizes,
)
from vlm_triton.multimodal.tiling import choose_grid, image_tiles, start_images_tiles

BICUBIC = Image.Resampling.BICUBIC


def _noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        img = img.convert("RGBA")
        img.putalpha(alpha)
        return img
    return img if mode == "RGB" else img.convert(mode)


def _same(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a, b)


def _rule():  # the pass order of the installed Pillow
    name = pass_order_rule()
    assert name is not None, "no known pass-order rule reproduces this Pillow: the split would never be used"
    return PASS_ORDERS[name]


# --- Pillow facts the split rests on ---------------------------------------------------------------------------------
def test_pass_order_rule_matches_the_pillow_version() -> None:
    major = int(PIL.__version__.split(".")[0])
    assert pass_order_rule() == ("pillow13" if major >= 13 else "horizontal_first")
    # the probes tell the rules apart: the two orders give different bytes on the first probe
    img = _noise(40, 120)
    outs = [np.asarray(split_resize(img, (36, 30), parts=3, horizontal_first=r)) for r in PASS_ORDERS.values()]
    assert not np.array_equal(*outs)


def test_output_row_strips_with_a_box_are_not_exact() -> None:
    """Why the split is by input rows / output columns: `resize(box=...)` strips of the output rows differ."""
    img, size = _noise(142, 587), (872, 826)
    whole = np.asarray(img.resize(size, BICUBIC))
    w, h = img.size
    strips = [np.asarray(img.resize((size[0], b - a), BICUBIC, box=(0, a * h / size[1], w, b * h / size[1])))
              for a, b in ((0, 413), (413, 826))]
    assert not np.array_equal(np.concatenate(strips), whole)


# --- split resize == one resize call ----------------------------------------------------------------------------------
def _sizes() -> list[tuple[tuple[int, int], tuple[int, int]]]:
    rnd = random.Random(7)
    cases = [((w, h), (ow, oh)) for w, h, ow, oh in (
        (1, 1, 448, 448), (1, 300, 448, 448), (300, 1, 40, 40), (17, 19, 17, 240), (240, 19, 33, 19),
        (200, 200, 200, 200), (640, 40, 448, 448), (40, 640, 448, 448), (500, 2000, 448, 1792),
        (2000, 300, 1792, 448), (256, 512, 250, 100), (512, 256, 100, 250), (99, 301, 301, 99),
    )]
    cases += [((rnd.randint(1, 400), rnd.randint(1, 400)), (rnd.randint(1, 400), rnd.randint(1, 400)))
              for _ in range(60)]
    return cases


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_split_resize_equals_one_call_over_sizes_and_strip_counts(mode: str) -> None:
    rule = _rule()
    for k, (size, out) in enumerate(_sizes()):
        img = _noise(*size, seed=k, mode=mode)
        whole = img.resize(out, BICUBIC)
        for parts in (1, 2, 3, 5, 8):
            assert _same(split_resize(img, out, parts=parts, horizontal_first=rule), whole), (size, out, parts)


def test_both_pass_orders_are_split_exactly() -> None:
    """Sizes on each side of Pillow 13's order switch (height shrinking more than twice the width's pixels)."""
    rule = _rule()
    for size, out in [((300, 500), (280, 459)), ((300, 500), (280, 460)), ((300, 500), (280, 461)),
                      ((120, 900), (200, 100)), ((900, 120), (100, 200))]:
        img = _noise(*size)
        for parts in (2, 7):
            assert _same(split_resize(img, out, parts=parts, horizontal_first=rule), img.resize(out, BICUBIC))


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threaded_resize_images_equal_one_call(threads: int) -> None:
    img = _noise(1500, 1100, seed=3)
    requests = [(img, (1792, 1344)), (img, (448, 448)), (img, (1500, 1100)), (img, (37, 900))]
    got = resize_images(requests, threads=threads)
    assert len(got) == len(requests)
    for (src, size), out in zip(requests, got):
        assert _same(out, src.resize(size, BICUBIC)), size


def test_large_jobs_are_really_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard for the equality tests: with threads the work does go through strips (else they would prove little)."""
    calls = []
    strip = resample._strip
    monkeypatch.setattr(resample, "_strip", lambda *a: calls.append(a[1]) or strip(*a))
    img = _noise(1792, 1344)
    assert _same(image_tiles(img, threads=4), image_tiles(img))
    assert calls.count("copy") > 1 and calls.count("h") > 1 and calls.count("v") > 1


def test_modes_pillow_resamples_otherwise_run_whole() -> None:
    img = _noise(900, 700, mode="RGBA")
    assert _same(resize_images([(img, (448, 448))], threads=4)[0], img.resize((448, 448), BICUBIC))


def test_a_failing_sink_raises_after_all_tasks_ended() -> None:
    seen = []

    def sink(x0: int, y0: int, img: Image.Image) -> None:
        seen.append((x0, y0))
        if (x0, y0) != (0, 0):
            raise RuntimeError("sink failed")

    with pytest.raises(RuntimeError, match="sink failed"):
        start_resizes([ResizeJob(_noise(1200, 900), (1792, 1344), sink)], threads=4).wait()
    assert len(seen) > 1


# --- tiles ----------------------------------------------------------------------------------------------------------
TILE_SIZES = [(448, 448), (1792, 1344), (2000, 1500), (300, 200), (5, 7), (1, 1), (1, 2000), (3000, 2),
              (449, 447), (1001, 333), (500, 2000), (1920, 1080), (1080, 1920), (700, 700), (1000, 1000),
              (896, 448), (1344, 448), (2240, 448), (2688, 448), (448, 1792)]


def test_tile_sizes_cover_1_to_12_tiles() -> None:
    grids = {choose_grid(*size) for size in TILE_SIZES}
    assert {c * r for c, r in grids} >= {1, 2, 3, 4, 5, 6, 9, 12}


@pytest.fixture(scope="module")
def tile_cases() -> list[tuple[Image.Image, np.ndarray]]:
    """(image, its single-threaded tiles) for every TILE_SIZES entry."""
    images = [_noise(*size, seed=k) for k, size in enumerate(TILE_SIZES)]
    return [(img, image_tiles(img)) for img in images]


@pytest.mark.parametrize("threads", range(1, 9))
def test_tiles_with_threads_equal_the_single_threaded_tiles(threads: int, tile_cases) -> None:
    for img, reference in tile_cases:
        assert _same(image_tiles(img, threads=threads), reference), (img.size, threads)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "1", "CMYK"])
def test_tiles_of_other_modes_are_converted_first(mode: str) -> None:
    img = _noise(1100, 800, seed=5, mode=mode)
    reference = image_tiles(img)
    for threads in (2, 4):
        assert _same(image_tiles(img, threads=threads), reference), (mode, threads)


def test_start_images_tiles_keeps_order_and_options() -> None:
    images = [_noise(*size, seed=k) for k, size in enumerate([(800, 600), (300, 900), (448, 448), (5, 7)])]
    for kwargs in ({}, {"max_num": 6, "use_thumbnail": False}, {"min_num": 2, "max_num": 4}, {"max_num": 1}):
        reference = [image_tiles(img, **kwargs) for img in images]
        got = start_images_tiles(images, threads=3, **kwargs).result()
        assert len(got) == len(reference) and all(_same(a, b) for a, b in zip(got, reference)), kwargs


def test_minicpmv_slices_with_threads_equal_single_threaded() -> None:
    for k, size in enumerate([(1920, 1080), (448, 448), (1000, 3000), (3000, 700), (333, 1777)]):
        img = _noise(*size, seed=k)
        reference = slice_image(img)
        got = slice_image(img, threads=4)
        assert len(got) == len(reference) and all(_same(a, b) for a, b in zip(got, reference)), size


# --- the comparisons catch a one-row shift ---------------------------------------------------------------------------
def test_a_strip_one_row_off_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    img = _noise(1500, 1100, seed=1)
    reference = image_tiles(img)
    region = resample._region

    def shifted(pieces, mode, box):  # reads rows one lower for every strip but the first
        x0, y0, x1, y1 = box
        return region(pieces, mode, (x0, y0 + 1, x1, y1 + 1) if y0 > 0 else box)

    monkeypatch.setattr(resample, "_region", shifted)
    assert not _same(image_tiles(img, threads=4), reference)


def test_a_tile_written_one_row_off_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    img = _noise(1792, 1344, seed=2)
    reference = image_tiles(img)
    call = pixels.TileWriter.__call__
    monkeypatch.setattr(pixels.TileWriter, "__call__",
                        lambda self, x0, y0, strip: call(self, x0, y0 + 1 if y0 > 0 else y0, strip.crop(
                            (0, 0, strip.width, strip.height - (y0 > 0)))))
    assert not _same(image_tiles(img, threads=4), reference)


def test_pending_tiles_raise_a_task_error_on_result(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, x0: int, y0: int, strip: Image.Image) -> None:
        raise MemoryError("no room for the tile")

    monkeypatch.setattr(pixels.TileWriter, "__call__", broken)
    pending = start_images_tiles([_noise(1200, 900), _noise(448, 448)], threads=4)
    with pytest.raises(MemoryError, match="no room"):
        pending.result()
