"""Start-up warm-up (multimodal/warmup.py): the synthetic image obeys the deployment's media policy, each image
family prepares it as a client's image (tiles or decoded planes), a short prompt limit gets a one-tile image, families
that take video prepare a small video too, and the vision warm-up sends the encoder the units the preprocess made."""

from __future__ import annotations

import base64
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_triton.checkpoints.tiny import make_tiny_checkpoint
from vlm_triton.checkpoints.tiny_minicpmv import make_tiny_minicpmv
from vlm_triton.families import open_family
from vlm_triton.families.base import ModelFamily, PreprocessLimits
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy, decode_image
from vlm_triton.multimodal.vision_runner import VisionRunner
from vlm_triton.multimodal import warmup
from vlm_triton.multimodal.warmup import SMALL_SIDE, WARM_UP_SIDE, warm_up_image_url, warm_up_prompt, warm_up_vision


@pytest.fixture(scope="module")
def internvl(tmp_path_factory: pytest.TempPathFactory) -> ModelFamily:
    return open_family(make_tiny_checkpoint("internvl3", tmp_path_factory.mktemp("wu_internvl") / "ckpt"))


def _decoded(url: str, policy: MediaPolicy) -> Image.Image:
    return decode_image(base64.b64decode(url.partition(",")[2]), policy=policy)


def test_the_image_fits_the_policy_and_decodes_under_it() -> None:
    default = MediaPolicy()
    assert _decoded(warm_up_image_url(default), default).size == (WARM_UP_SIDE, WARM_UP_SIDE)
    assert warm_up_image_url(default).startswith("data:image/jpeg;base64,")
    small = MediaPolicy(max_image_pixels=300 * 200, image_formats=("png",))
    url = warm_up_image_url(small)
    assert url.startswith("data:image/png;base64,")
    image = _decoded(url, small)
    assert image.size == (244, 244) and image.width * image.height <= small.max_image_pixels  # isqrt(60000)
    assert len(np.unique(np.asarray(image))) > 100  # a gradient, not a flat image the decoder shortcuts


@pytest.mark.parametrize("device_tiles", [False, True])
def test_internvl_prepares_the_large_image_as_a_client_image(internvl: ModelFamily, device_tiles: bool) -> None:
    prepared = warm_up_prompt(internvl, PreprocessLimits(max_prompt_tokens=32768, device_tiles=device_tiles))
    assert prepared is not None and prepared.num_image_tokens > 0
    if device_tiles:  # the decoded image and its grid: the vision encoder cuts the tiles
        assert prepared.pixel_values.shape == (1, 3, WARM_UP_SIDE, WARM_UP_SIDE)
        width, height, cols, rows, thumbnail = prepared.image_grids.reshape(-1).tolist()
        assert (width, height) == (WARM_UP_SIDE, WARM_UP_SIDE) and cols * rows > 1 and thumbnail == 1
    else:
        tiles = prepared.pixel_values.shape[0]
        assert tiles > 1 and prepared.num_image_tokens == tiles * internvl.tokens_per_tile


def test_a_short_prompt_limit_gets_a_one_tile_image(internvl: ModelFamily) -> None:
    limit = internvl.tokens_per_tile + 100  # room for one tile only
    prepared = warm_up_prompt(internvl, PreprocessLimits(max_prompt_tokens=limit))
    assert prepared is not None and prepared.pixel_values.shape == (1, 3, SMALL_SIDE, SMALL_SIDE)


def test_minicpmv_prepares_its_slices(tmp_path: Path) -> None:
    family = open_family(make_tiny_minicpmv(tmp_path / "ckpt"))
    prepared = warm_up_prompt(family, PreprocessLimits(max_prompt_tokens=32768))
    assert prepared is not None and prepared.pixel_values.shape[0] > 1 and prepared.tgt_sizes is not None


def test_a_video_family_prepares_the_warm_up_video(tmp_path: Path) -> None:
    family = open_family(make_tiny_checkpoint("internvideo2_5", tmp_path / "ckpt"))  # takes video only
    prepared = warm_up_prompt(family, PreprocessLimits())
    assert prepared is not None and "Frame1: <image>" in prepared.prompt_text
    assert prepared.pixel_values.shape[1:] == (3, family.image_size, family.image_size)


def test_an_image_family_that_takes_video_prepares_both(internvl: ModelFamily) -> None:
    media = _Recording(MediaPolicy())
    prepared = warm_up_prompt(internvl, PreprocessLimits(max_prompt_tokens=32768), media)
    assert [u[:15] for u in media.urls] == ["data:image/jpeg", "data:video/mp4;"]
    assert prepared is not None and "Frame1" not in prepared.prompt_text  # the image request's prompt is returned


def test_without_pyav_the_image_still_warms_up(internvl: ModelFamily, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment without PyAV takes no video (run 25's GPU image): the warm-up prepares the image and skips the
    video instead of failing as a whole."""
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    media = _Recording(MediaPolicy())
    prepared = warm_up_prompt(internvl, PreprocessLimits(max_prompt_tokens=32768), media)
    assert [u[:15] for u in media.urls] == ["data:image/jpeg"]
    assert prepared is not None and prepared.prompt_text.count("<image>") == 1


class _Recording(MediaFetcher):
    """A fetcher that keeps the start of every URL it fetches."""

    def __init__(self, policy: MediaPolicy) -> None:
        super().__init__(policy)
        self.urls: list[str] = []

    def fetch_bytes(self, url: str) -> bytes:
        self.urls.append(url[:23])
        return super().fetch_bytes(url)


def test_the_given_fetcher_and_its_policy_are_used(internvl: ModelFamily) -> None:
    media = _Recording(MediaPolicy(image_formats=("png",)))
    assert warm_up_prompt(internvl, PreprocessLimits(max_prompt_tokens=32768), media) is not None
    assert media.urls[0] == "data:image/png;base64,i"


class _Recorder(torch.nn.Module):
    """A stand-in encoder: records the normalised tiles it is given and returns rows of their means."""

    def __init__(self, tokens: int, hidden: int) -> None:
        super().__init__()
        self.tokens, self.hidden, self.calls = tokens, hidden, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixels: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(pixels.shape))
        return pixels.mean(dim=(1, 2, 3))[:, None, None].expand(-1, self.tokens, self.hidden)


@pytest.mark.parametrize("device_tiles", [False, True])
def test_the_vision_warm_up_encodes_the_warm_up_units(internvl: ModelFamily, device_tiles: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    limits = PreprocessLimits(max_prompt_tokens=32768, device_tiles=device_tiles)
    tiles = warm_up_prompt(internvl, replace(limits, device_tiles=False)).pixel_values.shape[0]  # the host cut's
    recorder = _Recorder(internvl.tokens_per_tile, 8)
    runner = VisionRunner(internvl, torch.float32, torch.device("cpu"), out_dtype=torch.float32, max_tiles=64,
                          encoder=recorder)

    def no_video(*args: object) -> str:
        raise AssertionError("the vision stages encode the image only: no video is made or decoded there")

    monkeypatch.setattr(warmup, "warm_up_video_url", no_video)
    warm_up_vision(runner, internvl, limits)
    size = internvl.image_size
    assert recorder.calls == [(tiles, 3, size, size)]  # the same tiles, cut here when the preprocess sends images

