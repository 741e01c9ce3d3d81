"""MiniCPM-V-2.6 image slicing, per-patch pixel layout and placeholders (model_specs.md 2.2, 4.3).

The reference is the remote-code `MiniCPMVImageProcessor` (slice_mode on):

1. `sliced_grid`: ratio = W*H / S^2 and multiple = min(ceil(ratio), max_slice_nums). multiple <= 1 means no
   slicing. Otherwise the slice counts {multiple-1, multiple, multiple+1} (without 1 and without counts above
   max_slice_nums) give candidates [m, n/m] = (cols, rows) for every divisor m of n (m ascending); the first one
   with the strictly smallest |ln(W/H) - ln(cols/rows)| wins.
2. No grid: the only item is the image resized (PIL BICUBIC, upscaling allowed) to `find_best_resize`.
   With a grid: the source item is the image downscaled (never upscaled) to `find_best_resize`, then the image is
   resized to the refine size and cut row-major into cols x rows cells. Items: [source, cell(0,0), cell(0,1), ...].
3. Each item becomes float32 (x/255 - 0.5)/0.5 and is laid out by patch: [3, h, w] -> [3, P, (h/P)*(w/P)*P], patch k
   (row-major over the patch grid) in columns [kP, kP+P). Its `tgt_size` is (h/P, w/P). The serving path lays out
   the uint8 bytes (`patch_layout_bytes`) and normalises them later with `minicpmv_lut` (`multimodal.pixels`).
4. Placeholder per image: optional `<image_id>i</image_id>`, then `<image>` + `<unk>`*64 + `</image>`, then (with a
   grid) `rows` lines joined by "\\n", each line `cols` x (`<slice>` + `<unk>`*64 + `</slice>`).

All size arithmetic is Python's, exactly as the reference writes it (`round` is half-to-even, `int` truncates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlm_triton.multimodal.pixels import normalize_lut, rgb_bytes
from vlm_triton.multimodal.resample import resize_images

DEFAULT_SCALE_RESOLUTION = 448
DEFAULT_PATCH_SIZE = 14
DEFAULT_MAX_SLICE_NUMS = 9
DEFAULT_QUERY_NUM = 64
NORM_MEAN = NORM_STD = (0.5, 0.5, 0.5)

Size = tuple[int, int]  # (width, height), PIL order


@dataclass(frozen=True)
class PlaceholderTokens:
    """The marker strings of `preprocessor_config.json` (im_start, im_end, slice_start, ...)."""

    im_start: str = "<image>"
    im_end: str = "</image>"
    slice_start: str = "<slice>"
    slice_end: str = "</slice>"
    unk: str = "<unk>"
    im_id_start: str = "<image_id>"
    im_id_end: str = "</image_id>"

    def all(self) -> tuple[str, ...]:
        return (self.im_start, self.im_end, self.slice_start, self.slice_end, self.unk, self.im_id_start,
                self.im_id_end)


@dataclass(frozen=True)
class SlicePlan:
    """What slicing does to one image, without touching pixels."""

    source_size: Size  # (w, h) of the source item
    grid: tuple[int, int] | None  # (cols, rows), None: no slices
    refine_size: Size | None  # (w, h) the image is resized to before it is cut
    cell_size: Size | None  # (w, h) of every slice

    @property
    def num_items(self) -> int:
        return 1 + (self.grid[0] * self.grid[1] if self.grid else 0)

    def tgt_sizes(self, *, patch_size: int = DEFAULT_PATCH_SIZE) -> list[tuple[int, int]]:
        """(rows, cols) of patches per item, in item order (the reference's `tgt_sizes`)."""
        sizes = [(self.source_size[1] // patch_size, self.source_size[0] // patch_size)]
        if self.grid and self.cell_size:
            cell = (self.cell_size[1] // patch_size, self.cell_size[0] // patch_size)
            sizes += [cell] * (self.grid[0] * self.grid[1])
        return sizes


def ensure_divide(*, length: float, patch_size: int) -> int:
    """The nearest multiple of `patch_size` (half to even), at least `patch_size`."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(
    *, size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool
) -> Size:
    """Keep the aspect ratio, aim at scale_resolution^2 pixels (only shrink unless allow_upscale), patch multiples."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return (ensure_divide(length=width, patch_size=patch_size), ensure_divide(length=height, patch_size=patch_size))


def sliced_grid(*, size: Size, max_slice_nums: int, scale_resolution: int) -> tuple[int, int] | None:
    """(cols, rows) of the slice grid for a (w, h) image, or None when the image is not sliced."""
    if max_slice_nums < 1:
        raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")
    width, height = size
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    best, best_error = (1, 1), float("inf")
    for n in counts:
        for m in range(1, n + 1):
            if n % m:
                continue
            error = abs(log_ratio - math.log(m / (n // m)))
            if error < best_error:
                best, best_error = (m, n // m), error
    return best


def slice_plan(
    *,
    size: Size,
    max_slice_nums: int = DEFAULT_MAX_SLICE_NUMS,
    scale_resolution: int = DEFAULT_SCALE_RESOLUTION,
    patch_size: int = DEFAULT_PATCH_SIZE,
) -> SlicePlan:
    """The source size, grid, refine size and cell size the reference picks for a (w, h) image."""
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"image size must be positive, got {size[0]}x{size[1]}")
    grid = sliced_grid(size=size, max_slice_nums=max_slice_nums, scale_resolution=scale_resolution)
    if grid is None:
        source = find_best_resize(size=size, scale_resolution=scale_resolution, patch_size=patch_size,
                                  allow_upscale=True)
        return SlicePlan(source_size=source, grid=None, refine_size=None, cell_size=None)
    source = find_best_resize(size=size, scale_resolution=scale_resolution, patch_size=patch_size,
                              allow_upscale=False)
    cols, rows = grid
    refine_w = ensure_divide(length=size[0], patch_size=cols)
    refine_h = ensure_divide(length=size[1], patch_size=rows)
    cell = find_best_resize(size=(refine_w / cols, refine_h / rows), scale_resolution=scale_resolution,
                            patch_size=patch_size, allow_upscale=True)
    return SlicePlan(source_size=source, grid=grid, refine_size=(cell[0] * cols, cell[1] * rows), cell_size=cell)


def slice_image(
    img: Image.Image,
    *,
    max_slice_nums: int = DEFAULT_MAX_SLICE_NUMS,
    scale_resolution: int = DEFAULT_SCALE_RESOLUTION,
    patch_size: int = DEFAULT_PATCH_SIZE,
    threads: int = 1,
) -> list[Image.Image]:
    """[source, cell(0,0), cell(0,1), ...] as PIL images (RGB).

    threads > 1: the source and refine resizes run concurrently, each split into strips (`resample.resize_all`),
    with the same bytes."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    plan = slice_plan(size=img.size, max_slice_nums=max_slice_nums, scale_resolution=scale_resolution,
                      patch_size=patch_size)
    if not (plan.grid and plan.refine_size and plan.cell_size):
        return resize_images([(img, plan.source_size)], threads=threads)
    items = resize_images([(img, plan.source_size), (img, plan.refine_size)], threads=threads)
    refined = items.pop()
    (cols, rows), (cw, ch) = plan.grid, plan.cell_size
    items += [refined.crop((c * cw, r * ch, (c + 1) * cw, (r + 1) * ch)) for r in range(rows) for c in range(cols)]
    return items


def patch_layout_bytes(img: Image.Image, *, patch_size: int = DEFAULT_PATCH_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """One item -> (uint8 [3, P, n*P] laid out by patch, (rows, cols) of patches): what `to_patch_layout` normalises."""
    return _patch_layout(rgb_bytes(img), patch_size)


def to_patch_layout(img: Image.Image, *, patch_size: int = DEFAULT_PATCH_SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """One item -> (float32 [3, P, n*P] normalised with mean = std = 0.5, (rows, cols) of patches)."""
    x = np.asarray(img.convert("RGB"), dtype=np.uint8).astype(np.float32)  # [h, w, 3]
    x /= np.float32(255.0)
    x -= np.float32(0.5)
    x /= np.float32(0.5)
    return _patch_layout(x, patch_size)


def minicpmv_lut() -> np.ndarray:
    """float32 [3, 256]: `to_patch_layout`'s arithmetic for every byte value (the serving path's lookup table)."""
    return normalize_lut(NORM_MEAN, NORM_STD)


def _patch_layout(x: np.ndarray, patch_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    h, w = x.shape[:2]
    if w % patch_size or h % patch_size:
        raise ValueError(f"item size {w}x{h} is not a multiple of the patch size {patch_size}")
    nh, nw = h // patch_size, w // patch_size
    # [nh, P, nw, P, 3] -> [3, P(row in patch), nh, nw, P(col in patch)] -> [3, P, nh*nw*P]
    patches = x.reshape(nh, patch_size, nw, patch_size, 3).transpose(4, 1, 0, 2, 3)
    return np.ascontiguousarray(patches.reshape(3, patch_size, nh * nw * patch_size)), (nh, nw)


def pad_items(
    items: list[np.ndarray], *, max_patches: int, patch_size: int = DEFAULT_PATCH_SIZE, dtype: type = np.float32
) -> np.ndarray:
    """Stack [3, P, n_i*P] items into [N, 3, P, max_patches*P] of `dtype`, zero-padded on the right (as the
    reference; the serving path stacks uint8 bytes and `clear_padding` restores the zeros after normalising)."""
    out = np.zeros((len(items), 3, patch_size, max_patches * patch_size), dtype=dtype)
    for k, item in enumerate(items):
        width = item.shape[-1]
        if width > max_patches * patch_size:
            raise ValueError(f"item {k} has {width // patch_size} patches; the layout holds {max_patches}")
        out[k, :, :, :width] = item
    return out


def image_placeholder(
    *,
    grid: tuple[int, int] | None,
    image_index: int,
    use_image_id: bool,
    query_num: int = DEFAULT_QUERY_NUM,
    tokens: PlaceholderTokens = PlaceholderTokens(),
) -> str:
    """The text that replaces the image_index-th `(<image>./</image>)` of a prompt (2.6 layout)."""
    text = f"{tokens.im_id_start}{image_index}{tokens.im_id_end}" if use_image_id else ""
    text += tokens.im_start + tokens.unk * query_num + tokens.im_end
    if grid is not None:
        cols, rows = grid
        cell = tokens.slice_start + tokens.unk * query_num + tokens.slice_end
        text += "\n".join(cell * cols for _ in range(rows))
    return text


def card_frame_indices(*, total_frames: int, fps: float, max_frames: int = 64) -> list[int]:
    """The MiniCPM-V-2.6 card's `encode_video` sampling: one frame per second (step round(fps)); more than
    `max_frames` are thinned to idx[int(i*g + g/2)], g = len/max_frames (spec 2.3)."""
    if total_frames < 1 or not fps > 0 or max_frames < 1:
        raise ValueError(f"need total_frames >= 1, fps > 0, max_frames >= 1; got {total_frames}, {fps}, {max_frames}")
    idx = list(range(0, total_frames, max(round(fps), 1)))
    if len(idx) > max_frames:
        gap = len(idx) / max_frames
        idx = [idx[int(i * gap + gap / 2)] for i in range(max_frames)]
    return idx
