"""`prompt_table_extra_ids`: what lets TensorRT-LLM reuse the KV cache of a prompt that holds images.

Image tokens are fake ids `vocab_size + k` (the prompt-table row), so two different images at the same place of
a prompt have the same token ids. tensorrt_llm keys reused KV blocks on (token id, extra id); giving every image
token the hash of the pixels behind its row makes equal images match and different images differ. Text tokens
get 0. (The backend uses the tensor only when it has one entry per input token.)
"""

from __future__ import annotations

import hashlib

import numpy as np

from vlm_triton.errors import SetupError


def content_id(data: bytes) -> int:
    """A non-zero 64-bit id of `data` (0 means "text token")."""
    value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return value or 1


def prompt_table_extra_ids(input_ids: np.ndarray, *, vocab_size: int, pixel_values: np.ndarray,
                           image_grids: np.ndarray | None = None) -> np.ndarray:
    """uint64 [L]: 0 for text tokens; for image token `vocab_size + k`, the id of the unit (tile, frame, slice) that
    row k belongs to. Rows are unit-major with the same count per unit (true of every family we serve).

    With `image_grids` (int32 [N, 5], `tiling.image_grid` rows), the units are decoded images [N, 3, Hmax, Wmax]
    that become cols * rows (+ 1) tiles each: an image's rows get the id of its bytes (without padding) and grid."""
    ids = np.asarray(input_ids).reshape(-1)
    out = np.zeros(ids.shape[0], dtype=np.uint64)
    rows = ids.astype(np.int64) - vocab_size
    image = rows >= 0
    if not image.any():
        return out
    num_rows = int(rows[image].max()) + 1
    if image_grids is None:
        units = [np.ascontiguousarray(u).tobytes() for u in pixel_values]
        tiles = np.ones(len(units), dtype=np.int64)
    else:
        grids = np.asarray(image_grids, dtype=np.int32).reshape(-1, 5)
        units = [np.ascontiguousarray(u[:, :h, :w]).tobytes() + g.tobytes()
                 for u, g, (w, h) in zip(pixel_values, grids, grids[:, :2])]
        tiles = grids[:, 2].astype(np.int64) * grids[:, 3] + grids[:, 4]
    total = int(tiles.sum())
    if not units or total == 0 or num_rows % total:
        raise SetupError(f"{num_rows} image tokens cannot be split evenly over {total} vision-encoder tiles")
    unit_ids = np.array([content_id(u) for u in units], dtype=np.uint64)
    row_unit = np.repeat(np.arange(len(units)), tiles * (num_rows // total))  # the unit of each table row
    out[image] = unit_ids[row_unit[rows[image]]]
    return out
