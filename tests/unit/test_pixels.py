"""Raw uint8 pixels normalised by lookup (`multimodal.pixels`) equal the CPU float path bit for bit.

The ImageNet table is checked against torchvision's arithmetic for every byte; InternVL tiles against
`tiling.preprocess_image` (pinned to the reference PIL path in test_tiling.py), on CUDA for the gather; MiniCPM-V
against `minicpmv_slicing.to_patch_layout` + `pad_items` (the processor's float arithmetic), with `np.array_equal` /
`torch.equal`. The Triton adapters run on a fake `triton_python_backend_utils`: preprocess emits the bytes (torch
profile) or FP16 normalised pixels (trtllm), and vision_encoder hands its encoder exactly the float pixels the CPU
path makes.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.unit.fake_triton import adapters_with
from tests.unit.test_ensemble import FakeInferenceResponse
from tests.unit.test_trtllm_contract import FakeTensor, fake_pb_utils
from vlm_triton.checkpoints.tiny import make_tiny_checkpoint
from vlm_triton.errors import InvalidRequest
from vlm_triton.families import ModelFamily, open_family
from vlm_triton.families.base import PreprocessLimits
from vlm_triton.families.minicpmv import MAX_PATCHES_PER_ITEM
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
from vlm_triton.multimodal.minicpmv_slicing import (
    minicpmv_lut,
    pad_items,
    patch_layout_bytes,
    slice_image,
    to_patch_layout,
)
from vlm_triton.multimodal.pixels import clear_padding, normalize_on_device, stack_tiles
from vlm_triton.multimodal.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_tiles,
    imagenet_lut,
    preprocess_image,
)
from vlm_triton.multimodal.vision_runner import VisionRunner
from vlm_triton.prompt.messages import parse_messages

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZES = [(448, 448), (300, 200), (5, 7), (1920, 1080), (500, 2000), (1792, 1344)]
IMAGES = {"wide.png": (800, 600), "tall.png": (300, 900), "w1.jpg": (1792, 1344)}


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _every_byte(side: int = 16) -> Image.Image:
    """side x side RGB with every byte value in every channel (side >= 16), each channel in another order."""
    v = np.arange(side * side, dtype=np.int64).reshape(side, side) % 256
    return Image.fromarray(np.stack([v, 255 - v, (v * 7 + 3) % 256], axis=-1).astype(np.uint8))


def _normalize(raw: np.ndarray, lut: np.ndarray, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return normalize_on_device(torch.from_numpy(raw).to(device), torch.from_numpy(lut).to(device, dtype)).cpu()


# --- the lookup tables and the gather ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_luts_give_the_reference_arithmetic_for_every_byte(device: str) -> None:
    img = _every_byte()
    internvl = _normalize(stack_tiles([img], image_size=16), imagenet_lut(), device)
    chw = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    torchvision = chw.float().div(255).sub_(mean).div_(std)  # ToTensor, then Normalize, as torchvision computes them
    assert torch.equal(internvl[0], torchvision)
    raw, grid = patch_layout_bytes(img, patch_size=2)
    reference, ref_grid = to_patch_layout(img, patch_size=2)
    assert grid == ref_grid and raw.dtype == np.uint8
    assert torch.equal(_normalize(raw[None], minicpmv_lut(), device)[0], torch.from_numpy(reference))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_table_in_the_encoder_dtype_equals_casting_the_floats(device: str, dtype: torch.dtype) -> None:
    raw = image_tiles(_noise(640, 480))
    floats = _normalize(raw, imagenet_lut(), device)
    assert torch.equal(_normalize(raw, imagenet_lut(), device, dtype), floats.to(dtype))


def test_bad_shapes_are_refused() -> None:
    lut = torch.from_numpy(imagenet_lut())
    with pytest.raises(ValueError, match="uint8"):
        normalize_on_device(torch.zeros(1, 3, 2, 2), lut)
    with pytest.raises(ValueError, match="256"):
        normalize_on_device(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), lut[:, :255])


# --- InternVL tiles ------------------------------------------------------------------------------------------------
# preprocess_image is these bytes normalised on the host (test_tiling.py pins it against torchvision's arithmetic and
# transformers' processor); on a GPU the gather must give the same floats
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA gather (on the CPU both sides are numpy's take)")
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_internvl_tiles_bit_identical_on_cuda(size: tuple[int, int]) -> None:
    img = _noise(*size, seed=size[0])
    raw = image_tiles(img, max_num=12)
    assert raw.dtype == np.uint8
    assert torch.equal(_normalize(raw, imagenet_lut(), "cuda"), torch.from_numpy(preprocess_image(img, max_num=12)))


# --- MiniCPM-V items -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_minicpmv_items_bit_identical_padding_included(size: tuple[int, int], device: str) -> None:
    items = slice_image(_noise(*size, seed=size[1]))
    layouts = [patch_layout_bytes(item) for item in items]
    raw = pad_items([p for p, _ in layouts], max_patches=MAX_PATCHES_PER_ITEM, dtype=np.uint8)
    reference = pad_items([to_patch_layout(item)[0] for item in items], max_patches=MAX_PATCHES_PER_ITEM)
    widths = torch.tensor([rows * cols * 14 for _, (rows, cols) in layouts]).to(device)
    out = clear_padding(normalize_on_device(torch.from_numpy(raw).to(device),
                                            torch.from_numpy(minicpmv_lut()).to(device)), widths).cpu()
    assert torch.equal(out, torch.from_numpy(reference))


# --- whole families: prepare's bytes, normalised, equal the float path of the reference functions ------------------
@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pixels_media")
    for seed, (name, size) in enumerate(IMAGES.items()):
        _noise(*size, seed=seed).save(root / name)
    return root


def _message(media_dir: Path, *names: str) -> list[dict[str, Any]]:
    images = [{"type": "image_url", "image_url": {"url": f"file://{media_dir}/{n}"}} for n in names]
    return [{"role": "user", "content": [*images, {"type": "text", "text": "What is this?"}]}]


@pytest.fixture(scope="module")
def internvl(tmp_path_factory: pytest.TempPathFactory) -> ModelFamily:
    return open_family(make_tiny_checkpoint("internvl3", tmp_path_factory.mktemp("px_internvl") / "ckpt"))


@pytest.fixture(scope="module")
def minicpmv(tmp_path_factory: pytest.TempPathFactory) -> ModelFamily:
    return open_family(make_tiny_checkpoint("minicpmv2_6", tmp_path_factory.mktemp("px_minicpmv") / "ckpt"))


def _prepare(family: ModelFamily, media_dir: Path, *names: str, image_threads: int = 1) -> Any:
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(media_dir,)))
    limits = PreprocessLimits(max_prompt_tokens=32768, image_threads=image_threads)
    return family.prepare(parse_messages(json.dumps(_message(media_dir, *names))), media, limits)


@pytest.mark.parametrize("device", DEVICES)
def test_internvl_family_pixels(internvl: ModelFamily, media_dir: Path, device: str) -> None:
    prepared = _prepare(internvl, media_dir, "wide.png", "tall.png")
    names = ("wide.png", "tall.png")
    reference = np.concatenate([preprocess_image(Image.open(media_dir / n), max_num=12) for n in names])
    assert prepared.pixel_values.dtype == np.uint8 and prepared.pixel_values.shape == reference.shape
    lut = torch.from_numpy(internvl.pixel_lut()).to(device)
    out = internvl.normalize_pixels(torch.from_numpy(prepared.pixel_values).to(device), lut).cpu()
    assert torch.equal(out, torch.from_numpy(reference))
    assert np.array_equal(internvl.float_pixels(prepared), reference)


@pytest.mark.parametrize("device", DEVICES)
def test_minicpmv_family_pixels(minicpmv: ModelFamily, media_dir: Path, device: str) -> None:
    prepared = _prepare(minicpmv, media_dir, "wide.png", "tall.png")
    items = [item for n in ("wide.png", "tall.png") for item in slice_image(Image.open(media_dir / n))]
    reference = pad_items([to_patch_layout(item)[0] for item in items], max_patches=MAX_PATCHES_PER_ITEM)
    assert prepared.pixel_values.dtype == np.uint8 and prepared.pixel_values.shape == reference.shape
    lut = torch.from_numpy(minicpmv.pixel_lut()).to(device)
    tgt_sizes = torch.from_numpy(prepared.tgt_sizes).to(device)
    out = minicpmv.normalize_pixels(torch.from_numpy(prepared.pixel_values).to(device), lut, tgt_sizes).cpu()
    assert torch.equal(out, torch.from_numpy(reference))
    assert np.array_equal(minicpmv.float_pixels(prepared), reference)
    with pytest.raises(ValueError, match="tgt_sizes"):
        minicpmv.normalize_pixels(torch.from_numpy(prepared.pixel_values), lut.cpu())


@pytest.mark.parametrize("family_name", ["internvl", "minicpmv"])
def test_family_prepare_is_the_same_with_image_threads(family_name: str, media_dir: Path,
                                                       request: pytest.FixtureRequest) -> None:
    family = request.getfixturevalue(family_name)
    names = ("w1.jpg", "wide.png", "tall.png", "w1.jpg")
    reference = _prepare(family, media_dir, *names)
    for threads in (2, 4, 8):
        got = _prepare(family, media_dir, *names, image_threads=threads)
        assert np.array_equal(got.input_ids, reference.input_ids)
        assert got.pixel_values.shape == reference.pixel_values.shape
        assert np.array_equal(got.pixel_values, reference.pixel_values)
        assert (got.tgt_sizes is None) == (reference.tgt_sizes is None)
        assert got.tgt_sizes is None or np.array_equal(got.tgt_sizes, reference.tgt_sizes)
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(media_dir,)))
    messages = parse_messages(json.dumps(_message(media_dir, *names)))
    with pytest.raises(InvalidRequest, match="tokens"):  # while the tiles may still be in the making
        family.prepare(messages, media, PreprocessLimits(max_prompt_tokens=100, image_threads=4))


# --- the Triton adapters ---------------------------------------------------------------------------------------------
class FakeError:
    INVALID_ARG, INTERNAL = 3, 13

    def __init__(self, message: str, code: int | None = None) -> None:
        self.message = message

    def __repr__(self) -> str:
        return self.message


@pytest.fixture
def adapters(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    fake = fake_pb_utils()
    fake.InferenceResponse = FakeInferenceResponse
    fake.get_input_tensor_by_name = lambda request, name: request.get(name)
    fake.TritonError = FakeError
    modules = ("vlm_triton.triton.preprocess_model", "vlm_triton.triton.vision_encoder_model")
    for pre, vision in adapters_with(monkeypatch, fake, *modules):
        yield types.SimpleNamespace(preprocess=pre, vision_encoder=vision)


def _preprocess(adapters: types.SimpleNamespace, family: ModelFamily, pixel_dtype: type) -> Any:
    model = adapters.preprocess.TritonPythonModel.__new__(adapters.preprocess.TritonPythonModel)
    model.family, model.tokenizer, model.limits = family, family.load_tokenizer(), PreprocessLimits()
    model.end_id = model.pad_id = 0
    model.stop_words = adapters.preprocess.stop_words_list([])
    model.pixel_dtype, model.content_ids = pixel_dtype, True
    model.planes = None  # planes by value (test_plane_pool.py: by reference)
    model._sent = {"reference": Counter(), "value": Counter()}  # vlm_preprocess_image_planes_total
    return model


class Counter:
    """A stand-in for a Triton counter metric."""

    def __init__(self) -> None:
        self.value = 0

    def increment(self, by: int) -> None:
        self.value += by


def _outputs(response: Any) -> dict[str, np.ndarray]:
    assert response.error is None, response.error
    return {t.name(): t.as_numpy() for t in response.outputs}


def test_preprocess_sends_bytes_for_torch_and_fp16_floats_for_trtllm(
        adapters: types.SimpleNamespace, internvl: ModelFamily, media_dir: Path) -> None:
    messages = np.array([json.dumps(_message(media_dir, "w1.jpg")).encode()], dtype=np.object_)
    sent = {}
    for name, dtype in (("torch", np.uint8), ("trtllm", np.float16)):
        model = _preprocess(adapters, internvl, dtype)
        model.media = MediaFetcher(MediaPolicy(allowed_local_dirs=(media_dir,)))
        (response,) = model.execute([{"messages": FakeTensor("messages", messages)}])
        sent[name] = _outputs(response)
    reference = preprocess_image(Image.open(media_dir / "w1.jpg"), max_num=12)  # the W1 image: 13 tiles
    torch_px, trt_px = sent["torch"]["pixel_values"], sent["trtllm"]["pixel_values"]
    assert torch_px.dtype == np.uint8 and torch_px.shape == reference.shape == (13, 3, 448, 448)
    sent_tiles = types.SimpleNamespace(pixel_values=torch_px, tgt_sizes=None, image_grids=None)
    assert np.array_equal(internvl.float_pixels(sent_tiles), reference)
    assert trt_px.dtype == np.float16 and np.array_equal(trt_px, reference.astype(np.float16))
    # KV-reuse content ids: from the bytes, the same in both profiles, one id per tile
    extra = sent["torch"]["prompt_table_extra_ids"]
    assert np.array_equal(extra, sent["trtllm"]["prompt_table_extra_ids"])
    assert len(set(extra[extra > 0].tolist())) == 13


@pytest.mark.parametrize("which", ["internvl", "minicpmv"])
def test_vision_encoder_normalises_the_bytes_of_every_request(
        adapters: types.SimpleNamespace, media_dir: Path, which: str, request: pytest.FixtureRequest) -> None:
    family: ModelFamily = request.getfixturevalue(which)
    prepared = [_prepare(family, media_dir, "wide.png"), _prepare(family, media_dir, "tall.png")]
    seen: list[torch.Tensor] = []

    def encoder(pixels: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        seen.append(pixels)
        return torch.zeros(pixels.shape[0], 2, 4)

    model = adapters.vision_encoder.TritonPythonModel.__new__(adapters.vision_encoder.TritonPythonModel)
    model._runner = VisionRunner(family, torch.float32, torch.device("cpu"), out_dtype=torch.float32, max_tiles=64,
                                 encoder=encoder)
    model.device, model.timing = torch.device("cpu"), None
    requests = [{"pixel_values": FakeTensor("pixel_values", p.pixel_values),
                 **({} if p.tgt_sizes is None else {"tgt_sizes": FakeTensor("tgt_sizes", p.tgt_sizes)})}
                for p in prepared]
    responses = model.execute(requests)
    assert [r.outputs[0].value.shape[0] for r in responses] == [p.pixel_values.shape[0] for p in prepared]
    (pixels,) = seen
    assert torch.equal(pixels, torch.from_numpy(np.concatenate([family.float_pixels(p) for p in prepared])))
