"""Pixels in transit: preprocess sends raw RGB bytes; whoever consumes them normalises them on its own device.

Every family's normalisation maps one byte of one channel to one float, so a float32 [3, 256] lookup table built
with the reference's own float32 arithmetic (x / 255, then - mean, then / std, each rounded to float32, as
torchvision and the MiniCPM-V processor compute it) gives bit-identical pixels with one gather. The bytes are a
quarter of the float32 tensor, and the arithmetic leaves the preprocess CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CHANNELS = 3
LEVELS = 256  # byte values


def normalize_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 [3, 256]: entry [c, v] is byte v of channel c as float32 (v / 255 - mean[c]) / std[c]."""
    x = np.broadcast_to(np.arange(LEVELS, dtype=np.float32), (CHANNELS, LEVELS)).copy()
    x /= np.float32(255.0)
    x -= np.asarray(mean, dtype=np.float32).reshape(CHANNELS, 1)
    x /= np.asarray(std, dtype=np.float32).reshape(CHANNELS, 1)
    return x


def rgb_bytes(img: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of an image (converted to RGB when it is not)."""
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)


def stack_tiles(tiles: Sequence[Image.Image], *, image_size: int) -> np.ndarray:
    """Square tiles -> uint8 [N, 3, S, S] (CHW), each tile resized to S x S (BICUBIC) when it is not."""
    out = np.empty((len(tiles), CHANNELS, image_size, image_size), dtype=np.uint8)
    for k, tile in enumerate(tiles):
        if tile.size != (image_size, image_size):
            tile = tile.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
        out[k] = rgb_bytes(tile).transpose(2, 0, 1)
    return out


def rgb_planes(img: Image.Image) -> list[np.ndarray]:
    """The R, G, B planes of an RGB image as uint8 [H, W] arrays, each packed by Pillow (cheaper than transposing
    the HWC array)."""
    w, h = img.size
    return [np.frombuffer(img.tobytes("raw", band), dtype=np.uint8).reshape(h, w) for band in "RGB"]


def plane_array(img: Image.Image) -> np.ndarray:
    """uint8 [3, H, W]: an image's R, G, B planes (converted to RGB when it is not)."""
    out = np.empty((CHANNELS, img.height, img.width), np.uint8)
    for c, plane in enumerate(rgb_planes(img if img.mode == "RGB" else img.convert("RGB"))):
        out[c] = plane
    return out


def pack_planes(planes: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 [N, 3, Hmax, Wmax] from each image's [3, H, W] planes (`plane_array`), zero padded to the largest height
    and width (one image: its own array, not copied); what preprocess sends when the vision encoder cuts the tiles."""
    if not planes:
        return np.zeros((0, CHANNELS, 0, 0), dtype=np.uint8)
    if len(planes) == 1:
        return planes[0][None]
    out = np.zeros((len(planes), CHANNELS, max(p.shape[1] for p in planes), max(p.shape[2] for p in planes)),
                   np.uint8)
    for k, p in enumerate(planes):
        out[k, :, : p.shape[1], : p.shape[2]] = p
    return out


def image_planes(images: Sequence[Image.Image]) -> np.ndarray:
    """`pack_planes` of the images' planes."""
    return pack_planes([plane_array(img) for img in images])


class TileWriter:
    """Sink for rectangles of a (cols*S) x (rows*S) RGB image: writes their bytes into `out`, uint8 [cols*rows, 3,
    S, S], the image's row-major S x S tiles in CHW. Rectangles may cut across tiles; disjoint ones may be written
    from several threads at once (numpy copies without the GIL)."""

    def __init__(self, out: np.ndarray, *, cols: int) -> None:
        self.out, self.cols, self.size = out, cols, out.shape[-1]
        rows = out.shape[0] // cols
        if out.dtype != np.uint8 or out.shape[1:] != (CHANNELS, self.size, self.size) or rows * cols != out.shape[0]:
            raise ValueError(f"expected uint8 [rows*{cols}, 3, S, S] tiles, got {out.dtype} {out.shape}")

    def __call__(self, x0: int, y0: int, img: Image.Image) -> None:
        s = self.size
        w, h = img.size
        planes = rgb_planes(img)
        for row in range(y0 // s, (y0 + h - 1) // s + 1):
            ys, ye = max(y0, row * s), min(y0 + h, (row + 1) * s)
            for col in range(x0 // s, (x0 + w - 1) // s + 1):
                xs, xe = max(x0, col * s), min(x0 + w, (col + 1) * s)
                tile = self.out[row * self.cols + col, :, ys - row * s:ye - row * s, xs - col * s:xe - col * s]
                for c, plane in enumerate(planes):
                    tile[c] = plane[ys - y0:ye - y0, xs - x0:xe - x0]


def normalize_bytes(raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Host version of `normalize_on_device`: uint8 [N, 3, ...] -> lut.dtype [N, 3, ...] by numpy's take."""
    out = np.empty(raw.shape, dtype=lut.dtype)
    for c in range(CHANNELS):
        np.take(lut[c], raw[:, c], out=out[:, c])
    return out


def normalize_on_device(pixels: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, ...] -> lut.dtype [N, 3, ...] on the pixels' device: out[n, c, ...] = lut[c, pixels[n, c, ...]].

    A table in another dtype than float32 (the encoder's) gives what casting the float32 result would: each entry
    is cast once. On the CPU numpy's take is about twice as fast as torch's gather."""
    if pixels.dtype != torch.uint8 or pixels.dim() < 2 or pixels.shape[1] != CHANNELS:
        raise ValueError(f"expected uint8 [N, 3, ...] pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    if tuple(lut.shape) != (CHANNELS, LEVELS):
        raise ValueError(f"expected a [3, 256] lookup table, got {tuple(lut.shape)}")
    lut = lut.to(pixels.device)
    if pixels.device.type == "cpu" and lut.dtype != torch.bfloat16:
        return torch.from_numpy(normalize_bytes(pixels.numpy(), lut.numpy()))
    offsets = torch.arange(0, CHANNELS * LEVELS, LEVELS, device=pixels.device)
    index = pixels.long() + offsets.view(1, CHANNELS, *([1] * (pixels.dim() - 2)))
    return lut.reshape(-1)[index]


def clear_padding(pixels: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Zero every column (last axis) of item k at or beyond widths[k]: the zero padding of a variable-width layout,
    which normalising the padding bytes would otherwise turn into lut[c, 0]."""
    columns = torch.arange(pixels.shape[-1], device=pixels.device)
    keep = columns < widths.to(pixels.device).reshape(-1, *([1] * (pixels.dim() - 1)))
    return torch.where(keep, pixels, torch.zeros((), dtype=pixels.dtype, device=pixels.device))
