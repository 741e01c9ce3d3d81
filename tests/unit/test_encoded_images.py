"""multimodal.encoded_images and the family's `encoded_images` path: preprocess sends each image as fetched (its
header read, nothing decoded), and the planes the consumer decodes from those bytes are the planes preprocess would
have sent, so the tiles are the host's, byte for byte; a body that does not decode is the request's error."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.unit.test_device_tiles import SIMILAR, similar_dir  # noqa: F401
from tests.unit.test_pixels import _message, internvl  # noqa: F401
from vlm_triton.errors import InvalidRequest
from vlm_triton.families import ModelFamily
from vlm_triton.families.base import PreprocessLimits
from vlm_triton.multimodal.encoded_images import PendingPlanes
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
from vlm_triton.multimodal.tiling import image_grid
from vlm_triton.multimodal.vision_runner import VisionRunner
from vlm_triton.prompt.messages import parse_messages


def _prepare(family: ModelFamily, media_dir: Path, names: tuple[str, ...], threads: int, **limits: bool) -> object:
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(media_dir,)))
    lim = PreprocessLimits(max_prompt_tokens=32768, image_threads=threads, **limits)
    return family.prepare(parse_messages(json.dumps(_message(media_dir, *names))), media, lim)


@pytest.mark.parametrize("threads", [1, 2])
def test_encoded_images_decode_to_the_planes_preprocess_would_send(
        internvl: ModelFamily, similar_dir: Path, threads: int) -> None:  # noqa: F811
    names = ("p2.png", "p1.jpg", "p3.png")
    planes = _prepare(internvl, similar_dir, names, threads, device_tiles=True)
    encoded = _prepare(internvl, similar_dir, names, threads, device_tiles=True, encoded_images=True)
    assert encoded.image_data == tuple((similar_dir / n).read_bytes() for n in names)
    assert encoded.pixel_values.shape[0] == 0
    assert np.array_equal(encoded.input_ids, planes.input_ids) and np.array_equal(encoded.image_grids,
                                                                                  planes.image_grids)
    pending = PendingPlanes(encoded.image_data, encoded.image_grids, MediaPolicy(), threads=threads)
    assert torch.equal(pending.result(), torch.from_numpy(planes.pixel_values))
    runner = VisionRunner(internvl, torch.float32, torch.device("cpu"), out_dtype=torch.float32, max_tiles=64,
                          encoder=torch.nn.Identity())
    grids = torch.from_numpy(encoded.image_grids)
    host = _prepare(internvl, similar_dir, names, threads)  # tiles cut on the host
    assert torch.equal(runner.tiles(PendingPlanes(encoded.image_data, encoded.image_grids, MediaPolicy()), grids),
                       torch.from_numpy(host.pixel_values))


def test_without_device_tiles_the_ask_changes_nothing(internvl: ModelFamily, similar_dir: Path) -> None:  # noqa: F811
    asked = _prepare(internvl, similar_dir, ("p1.jpg",), 1, encoded_images=True)
    host = _prepare(internvl, similar_dir, ("p1.jpg",), 1)
    assert asked.image_data == () and np.array_equal(asked.pixel_values, host.pixel_values)


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 60, 90)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("threads", [1, 2])
def test_the_first_image_that_fails_is_the_error(threads: int) -> None:
    good, cut = _png((40, 30)), _png((50, 20))[:-30]
    grids = np.array([image_grid(40, 30), image_grid(50, 20), image_grid(40, 30)], dtype=np.int32)
    with pytest.raises(InvalidRequest, match="image 2 of the request: the image is truncated or corrupt"):
        PendingPlanes([good, cut, good], grids, MediaPolicy(), threads=threads).result()
    with pytest.raises(InvalidRequest, match="image 1 of the request: decoded as 40x30, its header said 41x30"):
        PendingPlanes([good], np.array([image_grid(41, 30)], dtype=np.int32), MediaPolicy()).result()
    with pytest.raises(InvalidRequest, match="2 encoded images but 1 image grids"):
        PendingPlanes([good, good], grids[:1], MediaPolicy())
    with pytest.raises(InvalidRequest, match="not a supported image"):
        PendingPlanes([b"GIF89a-not-really"], grids[:1], MediaPolicy(image_formats=("png",))).result()
