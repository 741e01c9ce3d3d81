"""InternVL dynamic tiling and pixel normalisation (model_specs.md 2.1), plus video frame sampling (2.3).

This reproduces the reference PIL path of InternVL (`dynamic_preprocess` + `build_transform`):

1. The candidate grids (cols, rows) are every pair with min_num <= cols*rows <= max_num, in the reference's
   order: a CPython set of the pairs (built in the same insertion order) stable-sorted by area. Tuples of small
   ints hash the same in every process, so that order is deterministic.
2. The grid whose cols/rows is closest to W/H wins; on an exact tie the later candidate replaces the current one
   only when W*H > 0.5 * S^2 * cols * rows. The initial choice is (1, 1).
3. The image is resized to (S*cols, S*rows) with PIL BICUBIC and cut into row-major S x S tiles; when there is
   more than one tile (and `use_thumbnail`), the whole image resized to S x S is appended last.
4. Each tile becomes float32 CHW: x/255 (torchvision ToTensor), then (x - mean) / std with the ImageNet
   constants, all in float32 as torchvision computes it. The serving path (`image_tiles`) stops at the uint8 CHW
   bytes; the consumer applies `imagenet_lut` (`multimodal.pixels`), with results bit-identical to step 4.

Small images are upscaled (a 300x200 image becomes 3x2 tiles + thumbnail). EXIF orientation is not applied
(the reference does not either). No torchvision dependency.

`image_tiles(threads=N)` / `start_images_tiles` give the same bytes with the resizes split over N threads
(`multimodal.resample`) and the tiles written without PIL crops; threads=1 is the path above, step by step.
`device_tiles` gives them on a torch device from the decoded image (`multimodal.device_resize`) and its
`image_grid` row, for the vision encoder to cut tiles where it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlm_triton.multimodal.device_resize import fits, resize_planes
from vlm_triton.multimodal.pixels import TileWriter, normalize_bytes, normalize_lut, stack_tiles
from vlm_triton.multimodal.resample import ResizeBatch, ResizeJob, start_resizes

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 448
DEFAULT_MAX_TILES = 12


def _check_tile_range(min_num: int, max_num: int) -> None:
    if not (isinstance(min_num, int) and isinstance(max_num, int)) or min_num < 1 or max_num < min_num:
        raise ValueError(f"tile range must satisfy 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")


@lru_cache(maxsize=64)
def _candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    # Same insertion sequence as the reference so that the set's iteration order (which decides ties between
    # grids of equal area) is identical; sorted() is stable.
    pairs = {
        (cols, rows)
        for n in range(min_num, max_num + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_num <= cols * rows <= max_num
    }
    return tuple(sorted(pairs, key=lambda grid: grid[0] * grid[1]))


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Every (cols, rows) grid with min_num <= cols*rows <= max_num, in the reference's order."""
    _check_tile_range(min_num, max_num)
    return list(_candidate_grids(min_num, max_num))


def choose_grid(
    width: int,
    height: int,
    *,
    min_num: int = 1,
    max_num: int = DEFAULT_MAX_TILES,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> tuple[int, int]:
    """The (cols, rows) grid InternVL picks for a width x height image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    _check_tile_range(min_num, max_num)
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(
    width: int,
    height: int,
    *,
    min_num: int = 1,
    max_num: int = DEFAULT_MAX_TILES,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> int:
    """How many tiles `tile_image` returns for a width x height image (without touching pixels)."""
    return grid_tiles(image_grid(width, height, min_num=min_num, max_num=max_num, image_size=image_size,
                                 use_thumbnail=use_thumbnail))


def tile_image(
    img: Image.Image,
    *,
    min_num: int = 1,
    max_num: int = DEFAULT_MAX_TILES,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Cut `img` into InternVL tiles: row-major grid tiles, then the thumbnail (when more than one tile)."""
    if img.mode != "RGB":
        # The reference opens images with .convert('RGB'); resizing a "P"/"1" image would otherwise use NEAREST.
        img = img.convert("RGB")
    width, height = img.size
    cols, rows = choose_grid(width, height, min_num=min_num, max_num=max_num, image_size=image_size)
    resized = img.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for k in range(cols * rows):
        col, row = k % cols, k // cols
        box = (col * image_size, row * image_size, (col + 1) * image_size, (row + 1) * image_size)
        tiles.append(resized.crop(box))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(img.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def normalize_tiles(tiles: Sequence[Image.Image], *, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Tiles -> float32 [N, 3, S, S]: RGB, resize to S x S (BICUBIC, a no-op for S x S tiles), /255, ImageNet norm.

    The arithmetic is torchvision's (ToTensor divides a float32 copy by 255, Normalize subtracts and divides by
    float32 mean/std), done once per byte value in `imagenet_lut`, so the result is bit-identical to
    `build_transform` on the same PIL tiles.
    """
    return normalize_bytes(stack_tiles(tiles, image_size=image_size), _normalize_lut())


@lru_cache(maxsize=1)
def _normalize_lut() -> np.ndarray:
    return imagenet_lut()


def imagenet_lut() -> np.ndarray:
    """[3, 256] float32: every byte value through torchvision's arithmetic (a float32 x / 255, - mean, / std), so
    a lookup gives bit-identical results at a fraction of the cost."""
    return normalize_lut(IMAGENET_MEAN, IMAGENET_STD)


def image_tiles(
    img: Image.Image,
    *,
    min_num: int = 1,
    max_num: int = DEFAULT_MAX_TILES,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_thumbnail: bool = True,
    threads: int = 1,
) -> np.ndarray:
    """`tile_image` as uint8 [n_tiles, 3, S, S] (CHW): what the serving path sends; `imagenet_lut` normalises it.

    threads > 1: the same bytes from `start_images_tiles` (resizes split over threads, tiles packed without PIL
    crops)."""
    if threads > 1:
        return start_images_tiles([img], min_num=min_num, max_num=max_num, image_size=image_size,
                                  use_thumbnail=use_thumbnail, threads=threads).result()[0]
    tiles = tile_image(img, min_num=min_num, max_num=max_num, image_size=image_size, use_thumbnail=use_thumbnail)
    return stack_tiles(tiles, image_size=image_size)


class PendingTiles:
    """Tiles being made on the image pool; `result()` waits for them (and raises what a task raised)."""

    def __init__(self, tiles: list[np.ndarray], batch: ResizeBatch | None = None) -> None:
        self._tiles, self._batch = tiles, batch

    def result(self) -> list[np.ndarray]:
        if self._batch is not None:
            self._batch.wait()
        return self._tiles


def start_images_tiles(
    images: Sequence[Image.Image],
    *,
    min_num: int = 1,
    max_num: int = DEFAULT_MAX_TILES,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_thumbnail: bool = True,
    threads: int = 1,
) -> PendingTiles:
    """`image_tiles` of every image (bit-identical), started now with all their resizes sharing `threads` threads;
    `result()` waits. Returns at once (threads <= 1: made now, in this thread, by `image_tiles`).

    Each image gives two jobs for `resample.start_resizes`: the resize to the grid and the thumbnail (both from the
    image, so they run concurrently), each split into strips as its share of the threads allows. The strips are
    written straight into the uint8 tiles (`pixels.TileWriter`): the grid's tiles are slices of the resized image,
    as the PIL crops of `tile_image` are. How many tiles each image gets is `num_tiles` of its size."""
    if threads <= 1:
        return PendingTiles([image_tiles(img, min_num=min_num, max_num=max_num, image_size=image_size,
                                         use_thumbnail=use_thumbnail) for img in images])
    jobs: list[ResizeJob] = []
    outs: list[np.ndarray] = []
    s = image_size
    for img in images:
        if img.mode != "RGB":
            img = img.convert("RGB")  # as tile_image
        cols, rows = choose_grid(*img.size, min_num=min_num, max_num=max_num, image_size=s)
        n = cols * rows
        out = np.empty((n + int(use_thumbnail and n != 1), 3, s, s), dtype=np.uint8)
        jobs.append(ResizeJob(img, (s * cols, s * rows), TileWriter(out[:n], cols=cols)))
        if out.shape[0] > n:
            jobs.append(ResizeJob(img, (s, s), TileWriter(out[n:], cols=1)))
        outs.append(out)
    return PendingTiles(outs, start_resizes(jobs, threads=threads))


GRID_FIELDS = ("width", "height", "cols", "rows", "thumbnail")  # one `image_grids` row


def image_grid(
    width: int,
    height: int,
    *,
    min_num: int = 1,
    max_num: int = DEFAULT_MAX_TILES,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> tuple[int, int, int, int, int]:
    """(width, height, cols, rows, thumbnail) of a width x height image: what `device_tiles` needs to cut the tiles
    `image_tiles` makes; thumbnail is 1 when a thumbnail tile follows the grid."""
    cols, rows = choose_grid(width, height, min_num=min_num, max_num=max_num, image_size=image_size)
    return width, height, cols, rows, int(use_thumbnail and cols * rows != 1)


MAX_PADDING = 1.5  # decoded images travel zero padded to the largest height and width of their request


def grid_tiles(grid: Sequence[int]) -> int:
    """Tiles of an `image_grid` row: the grid's, plus the thumbnail."""
    return int(grid[2]) * int(grid[3]) + int(grid[4])


def device_cuttable(grids: Sequence[Sequence[int]], *, image_size: int = DEFAULT_IMAGE_SIZE) -> bool:
    """Whether a request's images (their `image_grid` rows) may go to the vision encoder as decoded planes: every
    resize within `device_resize.fits`, and the padded planes at most MAX_PADDING times the images' own pixels (a
    wide and a tall image together would otherwise travel as two large squares)."""
    if not grids:
        return False
    s = image_size
    for w, h, cols, rows, _ in grids:
        if not (fits((w, h), (s * cols, s * rows)) and fits((w, h), (s, s))):
            return False
    padded = len(grids) * max(g[0] for g in grids) * max(g[1] for g in grids)
    return padded <= MAX_PADDING * sum(g[0] * g[1] for g in grids)


def device_tiles(planes: torch.Tensor, grid: Sequence[int], *, image_size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """uint8 [3, H >= height, W >= width] planes of a decoded RGB image (padding beyond its size is ignored) and its
    `image_grid` row -> uint8 [cols * rows (+ 1), 3, S, S] on the planes' device: the bytes of `image_tiles`."""
    width, height, cols, rows, thumbnail = (int(v) for v in grid)
    if planes.dim() != 3 or planes.shape[0] != 3 or planes.shape[1] < height or planes.shape[2] < width:
        raise ValueError(f"planes {tuple(planes.shape)} do not hold a {width}x{height} RGB image")
    if min(width, height, cols, rows) < 1 or thumbnail not in (0, 1):
        raise ValueError(f"invalid image grid {tuple(grid)}")
    s = image_size
    image = planes[:, :height, :width]
    grid_image = resize_planes(image, (s * cols, s * rows))  # [3, rows*S, cols*S]
    tiles = grid_image.reshape(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, s, s)
    if thumbnail:
        tiles = torch.cat([tiles, resize_planes(image, (s, s))[None]])
    return tiles


def preprocess_image(img: Image.Image, **tiling: Any) -> np.ndarray:
    """The reference `pixel_values` [n_tiles, 3, S, S] float32 of one image: `image_tiles` (same keywords)
    normalised on the host."""
    return normalize_bytes(image_tiles(img, **tiling), _normalize_lut())


def video_frame_indices(
    num_frames_total: int,
    fps: float,
    num_segments: int,
    *,
    bound: tuple[float, float] | None = None,
    first_idx: int = 0,
) -> list[int]:
    """Frame indices the InternVL model cards sample from a video (`get_index`).

    The clip [bound[0], bound[1]] seconds (the whole video when `bound` is None) is split into `num_segments`
    equal segments and the middle frame of each is taken: start + seg/2 + round_half_even(seg*k), truncated.
    Example: 300 frames, 8 segments -> [18, 55, 93, 130, 168, 205, 242, 280].
    """
    if num_frames_total < 1:
        raise ValueError(f"the video has no frames (num_frames_total={num_frames_total})")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    start, end = bound if bound else (-100000.0, 100000.0)
    max_frame = num_frames_total - 1
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg = float(end_idx - start_idx) / num_segments
    return [int(start_idx + seg / 2 + float(np.round(seg * k))) for k in range(num_segments)]
