"""Pillow's 8-bit BICUBIC resize on any torch device, byte for byte (libImaging/Resample.c).

Pillow resizes an 8-bit image in two separable passes (`multimodal.resample` explains the order). A pass maps each
line of length `n_in` to a line of length `n_out`: output pixel i is

    clip8((2**21 + sum_j in[bounds_i + j] * k_i[j]) >> 22)

with `k_i` the filter's double coefficients normalised to sum 1 and rounded to 22-bit fixed point
(`precompute_coeffs`, `normalize_coeffs_8bpc`), `>>` an arithmetic shift and clip8 a clamp to 0..255. The
intermediate image between the passes is 8-bit.

Here a pass is one matrix product: the fixed-point coefficients as a dense float64 [n_out, n_in] matrix (zeros off
each pixel's support) times the planes as float64. Every product is an integer below 2**31 and every partial sum an
integer below 2**40, so float64 holds them exactly and the sum is the same integer in any order, on any device; the
shift is then exact float arithmetic (floor of a division by a power of two).

The coefficients are computed with numpy's float64 in the C code's order of operations, which reproduces Pillow's
doubles where the C compiler does not contract multiply-adds into FMA (the x86-64 wheels). `matches_pillow()` checks
the whole path against the installed Pillow on probe sizes; callers use it before trusting the device path.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache
from threading import Lock

import numpy as np
import torch
from PIL import Image

from vlm_triton.multimodal.resample import PASS_ORDERS, Size, _passes, pass_order_rule

PRECISION_BITS = 32 - 8 - 2
_HALF = float(1 << (PRECISION_BITS - 1))
_ONE = float(1 << PRECISION_BITS)
BICUBIC_SUPPORT = 2.0


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Resample.c `bicubic_filter` (a = -0.5), elementwise in float64 with the C expression's order."""
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


# A pass's dense matrix holds n_out * n_in float64 entries; beyond this many (1 GiB) the image is cut on the host
# instead (`fits`): e.g. 8192 -> 1792 is 14.7M entries, a 64000 x 1000 panorama's 64000 -> 5376 is 344M
MAX_MATRIX_ENTRIES = 1 << 27


def fits(in_size: Size, out_size: Size) -> bool:
    """Whether resizing in_size -> out_size keeps every pass matrix within MAX_MATRIX_ENTRIES."""
    (w_in, h_in), (w_out, h_out) = in_size, out_size
    return w_in * w_out <= MAX_MATRIX_ENTRIES and h_in * h_out <= MAX_MATRIX_ENTRIES


@lru_cache(maxsize=256)
def _compact(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(first input pixel int64 [n_out], fixed-point coefficients float64 [n_out, ksize], zero past each pixel's
    support): Pillow's `precompute_coeffs` for the box 0..n_in and `normalize_coeffs_8bpc`. A few KB per size."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"resize lengths must be positive, got {n_in} -> {n_out}")
    scale = float(np.float32(n_in)) / n_out  # (double)(in1 - in0) / outSize, with in0 = 0 and in1 a C float
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv_filterscale = 1.0 / filterscale
    centers = (np.arange(n_out, dtype=np.float64) + 0.5) * scale  # in0 + (xx + 0.5) * scale, in0 = 0.0
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # (int) truncates; negatives clamp to 0
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), n_in) - xmin  # taps used
    taps = np.arange(ksize, dtype=np.int64)
    used = taps[None, :] < xmax[:, None]
    # (x + xmin - center + 0.5) * inv_filterscale: int + int, then - double, + double, * double
    w = _bicubic((((taps[None, :] + xmin[:, None]).astype(np.float64) - centers[:, None]) + 0.5) * inv_filterscale)
    w = np.where(used, w, 0.0)
    ww = np.zeros(n_out, dtype=np.float64)
    for x in range(ksize):  # the C loop's sequential sum (numpy's sum is pairwise: other roundings)
        ww = ww + w[:, x]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    fixed = np.trunc(np.where(w < 0, -0.5 + w * _ONE, 0.5 + w * _ONE))  # (int)(±0.5 + k * 2**22)
    return xmin, np.where(used, fixed, 0.0)


def _dense(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """float64 [n_out, n_in] on `device`: row i holds output pixel i's fixed-point coefficients, zero elsewhere."""
    xmin, fixed = _compact(n_in, n_out)
    rows, taps = np.nonzero(fixed)
    out = torch.zeros((n_out, n_in), dtype=torch.float64, device=device)
    cols = torch.from_numpy(xmin[rows] + taps).to(device)
    out[torch.from_numpy(rows).to(device), cols] = torch.from_numpy(fixed[rows, taps]).to(device)
    return out


def pass_coefficients(n_in: int, n_out: int) -> np.ndarray:
    """float64 [n_out, n_in]: the dense matrix of a pass (integers), for tests and inspection."""
    return _dense(n_in, n_out, torch.device("cpu")).numpy()


class _DeviceCache:
    """The pass matrices already on a device, least recently used first out, at most `max_bytes` in all (a large
    photo's take tens of MB; a size is built again when it comes back)."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self._items: OrderedDict[tuple[int, int, str], torch.Tensor] = OrderedDict()
        self._max_bytes, self._bytes, self._lock = max_bytes, 0, Lock()

    def get(self, n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
        key = (n_in, n_out, str(device))
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        value = _dense(n_in, n_out, device)
        size = value.numel() * value.element_size()
        if size > self._max_bytes:
            return value  # used once, not kept
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self._bytes += size
            while self._bytes > self._max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return value


_coefficients = _DeviceCache()


def _to_bytes(acc: torch.Tensor) -> torch.Tensor:
    """Fixed-point sums (exact integers in float64) -> clip8((2**21 + acc) >> 22) as float64 values 0..255."""
    return torch.floor((acc + _HALF) / _ONE).clamp_(0.0, 255.0)


def resize_planes(planes: torch.Tensor, size: Size, *, rule: str | None = None) -> torch.Tensor:
    """uint8 [C, H, W] planes -> uint8 [C, h, w] for size (w, h): the bytes of Pillow's `resize(size, BICUBIC)` of
    the image, on the planes' device. `rule` names the pass order (`resample.PASS_ORDERS`; default: the installed
    Pillow's)."""
    if planes.dtype != torch.uint8 or planes.dim() != 3:
        raise ValueError(f"expected uint8 [C, H, W] planes, got {planes.dtype} {tuple(planes.shape)}")
    rule = rule or pass_order_rule()
    if rule is None:
        raise RuntimeError("no known pass-order rule reproduces the installed Pillow")
    _, h_in, w_in = planes.shape
    w_out, h_out = int(size[0]), int(size[1])
    if not fits((w_in, h_in), (w_out, h_out)):
        raise ValueError(f"resizing {w_in}x{h_in} to {w_out}x{h_out} needs pass matrices over "
                         f"{MAX_MATRIX_ENTRIES} entries: cut this image on the host")
    passes = _passes((w_in, h_in), (w_out, h_out), PASS_ORDERS[rule])
    if not passes:
        return planes.clone()
    weights = {kind: _coefficients.get(w_in, w_out, planes.device).T if kind == "h"
               else _coefficients.get(h_in, h_out, planes.device) for kind in passes}
    out = torch.empty((planes.shape[0], h_out, w_out), dtype=torch.uint8, device=planes.device)
    for c, plane in enumerate(planes):  # a channel at a time: float64 copies of one plane, not three
        x = plane.to(torch.float64)
        for kind in passes:
            x = _to_bytes(torch.matmul(x, weights[kind]) if kind == "h" else torch.matmul(weights[kind], x))
        out[c] = x
    return out


FAST_FLOAT64 = {(8, 0), (9, 0), (10, 0)}  # compute capabilities with full-rate FP64: A100, H100/H200, B200


def fast_float64(device: torch.device | str) -> bool:
    """Whether `device` runs float64 matrix products at a useful rate (data-center GPUs; others run FP64 at 1/32 to
    1/64 of FP32, where cutting tiles on the host is faster)."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) in FAST_FLOAT64)


# (input, output) sizes that exercise both pass orders, up- and downscaling, odd lengths and one-pixel lines
_PROBES: tuple[tuple[Size, Size], ...] = (
    ((40, 120), (36, 30)), ((48, 200), (36, 61)), ((120, 40), (30, 36)), ((33, 47), (95, 130)),
    ((97, 61), (40, 25)), ((64, 64), (64, 17)), ((64, 64), (23, 64)), ((1, 9), (5, 3)), ((301, 203), (448, 448)),
    ((1000, 700), (112, 112)), ((517, 389), (1344, 896)), ((1792, 1344), (448, 448)),
)


@lru_cache(maxsize=1)
def matches_pillow() -> bool:
    """True when `resize_planes` (on the CPU) gives the installed Pillow's bytes on every probe: the pass order and
    the coefficients are Pillow's here. Images are random noise (every coefficient counts)."""
    if pass_order_rule() is None:
        return False
    rng = np.random.default_rng(1234)
    for (w, h), out in _PROBES:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.asarray(Image.fromarray(arr).resize(out, Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        got = resize_planes(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), out).numpy()
        if not np.array_equal(want, got):
            return False
    return True
