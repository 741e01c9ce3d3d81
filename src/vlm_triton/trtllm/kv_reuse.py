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


def prompt_table_extra_ids(input_ids: np.ndarray, *, vocab_size: int, pixel_values: np.ndarray) -> np.ndarray:
    """uint64 [L]: 0 for text tokens; for image token `vocab_size + k`, the id of the unit (tile, frame, slice) that
    row k belongs to. Rows are unit-major with the same count per unit (true of every family we serve)."""
    ids = np.asarray(input_ids).reshape(-1)
    out = np.zeros(ids.shape[0], dtype=np.uint64)
    rows = ids.astype(np.int64) - vocab_size
    image = rows >= 0
    if not image.any():
        return out
    units = int(pixel_values.shape[0])
    num_rows = int(rows[image].max()) + 1
    if units == 0 or num_rows % units:
        raise SetupError(f"{num_rows} image tokens cannot be split evenly over {units} vision-encoder units")
    per_unit = num_rows // units
    unit_ids = np.array([content_id(np.ascontiguousarray(u).tobytes()) for u in pixel_values], dtype=np.uint64)
    out[image] = unit_ids[rows[image] // per_unit]
    return out
