"""Tiles cut by the vision encoder on its device (`preprocess.image_resize = "device"`) are the host's bytes.

`device_resize.resize_planes` against Pillow's own `resize(size, BICUBIC)` over random sizes (up, down, odd, one
pixel, both pass orders); `tiling.device_tiles` against `image_tiles` (pinned to the reference in test_tiling.py);
the InternVL family's device path (decoded planes + grids) against its host path, token ids included; the Triton
adapters (fake `triton_python_backend_utils`): preprocess sends planes and grids, vision_encoder cuts them into the
float pixels of the host path; the deployment switch; KV-reuse content ids per image. On CUDA the same checks run
on the GPU when there is one.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.unit.test_pixels import _message, _prepare, adapters, internvl, media_dir, minicpmv  # noqa: F401
from tests.unit.test_trtllm_contract import FakeTensor
from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.errors import SetupError
from vlm_triton.families import ModelFamily
from vlm_triton.families.base import PreprocessLimits, device_tiles_for
from vlm_triton.multimodal import device_resize
from vlm_triton.multimodal.device_resize import fast_float64, matches_pillow, pass_coefficients, resize_planes
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
from vlm_triton.multimodal.pixels import image_planes
from vlm_triton.multimodal.resample import PASS_ORDERS, pass_order_rule
from vlm_triton.multimodal.tiling import (
    device_cuttable,
    device_tiles,
    grid_tiles,
    image_grid,
    image_tiles,
    num_tiles,
)
from vlm_triton.multimodal.vision_runner import VisionRunner
from vlm_triton.prompt.messages import parse_messages
from vlm_triton.trtllm.kv_reuse import prompt_table_extra_ids

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BICUBIC = Image.Resampling.BICUBIC


def _noise(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _planes(arr: np.ndarray, device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(device)


def _pillow(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize(size, BICUBIC)).transpose(2, 0, 1)


# --- the resize --------------------------------------------------------------------------------------------------
def _random_sizes(n: int, seed: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    return [((int(w), int(h)), (int(ow), int(oh))) for w, h, ow, oh in rng.integers(1, 260, (n, 4))]


@pytest.mark.parametrize("device", DEVICES)
def test_resize_planes_is_pillows_bicubic_byte_for_byte(device: str) -> None:
    cases = _random_sizes(150, 7) + [((1792, 1344), (448, 448)), ((1000, 700), (1344, 896)), ((1, 1), (448, 448)),
                                     ((2000, 3), (448, 448)), ((3, 900), (5, 1344)), ((448, 448), (448, 448))]
    for k, ((w, h), out) in enumerate(cases):
        arr = _noise(w, h, k)
        got = resize_planes(_planes(arr, device), out).cpu().numpy()
        assert np.array_equal(got, _pillow(arr, out)), f"{w}x{h} -> {out}"


def test_the_pass_order_and_every_coefficient_matter() -> None:
    """The comparison above can fail: the other pass order, or one coefficient one unit off, changes bytes."""
    arr = _noise(40, 120, 0)
    other = next(name for name in PASS_ORDERS if name != pass_order_rule())
    assert not np.array_equal(resize_planes(_planes(arr), (36, 30), rule=other).numpy(), _pillow(arr, (36, 30)))
    assert matches_pillow()
    weights = pass_coefficients(40, 36).copy()
    weights[5, np.nonzero(weights[5])[0][0]] += 1 << 13  # 2**-9 of the pixel: visible in some of 120 rows
    planes = _planes(arr).to(torch.float64)
    changed = device_resize._to_bytes(torch.matmul(planes, torch.from_numpy(weights).T))
    exact = device_resize._to_bytes(torch.matmul(planes, torch.from_numpy(pass_coefficients(40, 36)).T))
    assert not torch.equal(changed, exact)


def test_coefficients_are_pillows_fixed_point_rows() -> None:
    for n_in, n_out in ((1792, 448), (300, 1344), (7, 7), (1, 5)):
        weights = pass_coefficients(n_in, n_out)
        assert weights.shape == (n_out, n_in) and np.array_equal(weights, np.trunc(weights))
        # each row sums to 1.0 in 22-bit fixed point, up to half a unit of rounding per coefficient
        assert np.all(np.abs(weights.sum(axis=1) - (1 << 22)) <= 0.5 * np.count_nonzero(weights, axis=1) + 1)
    with pytest.raises(ValueError, match="positive"):
        pass_coefficients(0, 3)


# --- tiles ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_device_tiles_are_image_tiles(device: str) -> None:
    for k, (w, h) in enumerate([(1792, 1344), (300, 200), (448, 448), (1000, 700), (97, 1301), (5, 7)]):
        arr = _noise(w, h, k)
        grid = image_grid(w, h)
        assert grid_tiles(grid) == num_tiles(w, h) == len(image_tiles(Image.fromarray(arr)))
        padded = np.zeros((h + 3, w + 11, 3), np.uint8)  # what a request with a larger image sends for this one
        padded[:h, :w] = arr
        got = device_tiles(_planes(padded, device), grid).cpu().numpy()
        assert np.array_equal(got, image_tiles(Image.fromarray(arr))), f"{w}x{h}"
    with pytest.raises(ValueError, match="do not hold"):
        device_tiles(_planes(_noise(10, 10, 0)), image_grid(20, 10))


def test_image_planes_pad_and_convert() -> None:
    a, b = Image.fromarray(_noise(30, 20, 1)), Image.fromarray(_noise(10, 40, 2)).convert("L")
    planes = image_planes([a, b])
    assert planes.shape == (2, 3, 40, 30) and planes.dtype == np.uint8
    assert np.array_equal(planes[0, :, :20, :30], np.asarray(a).transpose(2, 0, 1)) and not planes[0, :, 20:].any()
    assert np.array_equal(planes[1, :, :40, :10], np.asarray(b.convert("RGB")).transpose(2, 0, 1))
    assert not planes[1, :, :, 10:].any()


# --- the family ----------------------------------------------------------------------------------------------------
SIMILAR = {"p1.jpg": (1792, 1344), "p2.png": (1600, 1200), "p3.png": (1500, 1300)}  # padded: < 1.5x their pixels


@pytest.fixture(scope="module")
def similar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("device_tiles_media")
    for seed, (name, (w, h)) in enumerate(SIMILAR.items()):
        Image.fromarray(_noise(w, h, 50 + seed)).save(root / name)
    return root


def _prepare_on(family: ModelFamily, media_dir: Path, *names: str, device_tiles: bool) -> object:
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(media_dir,)))
    limits = PreprocessLimits(max_prompt_tokens=32768, device_tiles=device_tiles)
    return family.prepare(parse_messages(json.dumps(_message(media_dir, *names))), media, limits)


def test_internvl_device_path_sends_planes_that_make_the_host_tiles(internvl: ModelFamily, similar_dir: Path) -> None:
    names = ("p2.png", "p1.jpg", "p3.png")
    host = _prepare_on(internvl, similar_dir, *names, device_tiles=False)
    device = _prepare_on(internvl, similar_dir, *names, device_tiles=True)
    assert host.image_grids is None and np.array_equal(device.input_ids, host.input_ids)
    assert device.num_image_tokens == host.num_image_tokens
    assert device.image_grids.tolist() == [list(image_grid(*SIMILAR[n])) for n in names]
    assert device.pixel_values.shape == (3, 3, 1344, 1792)  # padded to the largest height and width
    assert torch.equal(internvl.unit_tiles(device), torch.from_numpy(host.pixel_values))
    assert np.array_equal(internvl.float_pixels(device), internvl.float_pixels(host))


def test_requests_the_device_cannot_take_are_tiled_on_the_host(internvl: ModelFamily, media_dir: Path) -> None:
    """A wide and a tall image padded to one size would travel as two large squares: such a request (and one whose
    resize needs pass matrices beyond the limit) gets the host's tiles."""
    names = ("w1.jpg", "tall.png")  # padded 2 x 1792 x 1344 > 1.5 x (1792 x 1344 + 300 x 900)
    device = _prepare_on(internvl, media_dir, *names, device_tiles=True)
    host = _prepare_on(internvl, media_dir, *names, device_tiles=False)
    assert device.image_grids is None and np.array_equal(device.pixel_values, host.pixel_values)
    assert not device_cuttable([(64000, 1000, 12, 1, 1)])  # 64000 -> 5376 columns: 344M matrix entries
    assert device_cuttable([(1792, 1344, 4, 3, 1)]) and not device_cuttable([])
    with pytest.raises(ValueError, match="on the host"):
        resize_planes(torch.zeros(1, 1, 64000, dtype=torch.uint8), (5376, 1))


def test_device_path_needs_a_family_that_cuts_on_the_device(minicpmv: ModelFamily, media_dir: Path) -> None:
    prepared = _prepare_on(minicpmv, media_dir, "wide.png", device_tiles=True)  # MiniCPM-V slices on the host
    assert prepared.image_grids is None
    with pytest.raises(SetupError, match="host"):
        minicpmv.tiles_from_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 5, dtype=torch.int32))


def _cfg(**preprocess: str) -> DeploymentConfig:
    return DeploymentConfig.from_dict({"model": {"checkpoint": "/x"}, "engine": {"device": "cpu"},
                                       "preprocess": preprocess})


def test_image_resize_setting(internvl: ModelFamily, minicpmv: ModelFamily) -> None:
    assert _cfg().preprocess.image_resize == "auto"
    assert not device_tiles_for(_cfg(), internvl)  # auto: the encoder runs on the CPU here
    assert not device_tiles_for(_cfg(image_resize="host"), internvl)
    assert device_tiles_for(_cfg(image_resize="device"), internvl)
    assert PreprocessLimits.from_deployment(_cfg(image_resize="device"), internvl).device_tiles
    assert not PreprocessLimits.from_deployment(_cfg(image_resize="device")).device_tiles  # no family: host
    with pytest.raises(SetupError, match="minicpmv family cuts its images on the host"):
        device_tiles_for(_cfg(image_resize="device"), minicpmv)
    with pytest.raises(SetupError, match="image_resize must be one of auto, host, device"):
        _cfg(image_resize="gpu")
    with pytest.raises(SetupError, match="needs the torch profile"):
        DeploymentConfig.from_dict({"model": {"checkpoint": "/x", "profile": "trtllm"},
                                    "preprocess": {"image_resize": "device"}})
    cuda = DeploymentConfig.from_dict({"model": {"checkpoint": "/x"}, "engine": {"device": "cuda"}})
    # auto on CUDA: on GPUs with full-rate float64, when the bytes are Pillow's
    assert device_tiles_for(cuda, internvl) == (fast_float64("cuda") and matches_pillow())
    assert not device_tiles_for(cuda, minicpmv)


def test_auto_needs_full_rate_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, fast in (((9, 0), True), ((8, 0), True), ((10, 0), True), ((8, 9), False), ((8, 6), False),
                             ((12, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert fast_float64("cuda") == fast, capability
    assert not fast_float64("cpu")


def test_content_ids_per_image(internvl: ModelFamily, similar_dir: Path) -> None:
    device = _prepare_on(internvl, similar_dir, "p2.png", "p3.png", "p2.png", device_tiles=True)
    extra = prompt_table_extra_ids(device.input_ids, vocab_size=internvl.vocab_size,
                                   pixel_values=device.pixel_values, image_grids=device.image_grids)
    image_rows = device.input_ids >= internvl.vocab_size
    assert (extra[image_rows] > 0).all() and not extra[~image_rows].any()
    ids = extra[image_rows]
    tiles = [grid_tiles(g) for g in device.image_grids.tolist()]
    per_tile = len(ids) // sum(tiles)
    first, second, third = np.split(ids, np.cumsum([t * per_tile for t in tiles])[:-1])
    assert len(set(first)) == len(set(second)) == 1 and np.array_equal(first, third) and first[0] != second[0]


# --- the adapters --------------------------------------------------------------------------------------------------
def test_adapters_cut_the_tiles_in_the_vision_encoder(adapters: types.SimpleNamespace, internvl: ModelFamily,
                                                      similar_dir: Path) -> None:
    from tests.unit.test_pixels import _outputs, _preprocess

    messages = np.array([json.dumps(_message(similar_dir, "p1.jpg", "p3.png")).encode()], dtype=np.object_)
    sent = {}
    for on_device in (False, True):
        model = _preprocess(adapters, internvl, np.uint8)
        model.limits = PreprocessLimits(device_tiles=on_device)
        model.media = MediaFetcher(MediaPolicy(allowed_local_dirs=(similar_dir,)))
        (response,) = model.execute([{"messages": FakeTensor("messages", messages)}])
        sent[on_device] = _outputs(response)
    assert sent[False]["image_grids"].shape == (0, 5) and sent[True]["image_grids"].shape == (2, 5)
    assert np.array_equal(sent[True]["input_ids"], sent[False]["input_ids"])
    assert np.array_equal(sent[True]["prompt_table_extra_ids"] > 0, sent[False]["prompt_table_extra_ids"] > 0)

    seen: list[torch.Tensor] = []

    def encoder(pixels: torch.Tensor) -> torch.Tensor:
        seen.append(pixels)
        return pixels[:, :, :2, 0].reshape(pixels.shape[0], 3, 2)  # each tile's own bytes: the order is checked

    model = adapters.vision_encoder.TritonPythonModel.__new__(adapters.vision_encoder.TritonPythonModel)
    model._runner = VisionRunner(internvl, torch.float32, torch.device("cpu"), out_dtype=torch.float32, max_tiles=8,
                                 encoder=encoder)
    model.device, model.timing = torch.device("cpu"), None
    host = {"pixel_values": FakeTensor("pixel_values", sent[False]["pixel_values"])}
    device = {"pixel_values": FakeTensor("pixel_values", sent[True]["pixel_values"]),
              "image_grids": FakeTensor("image_grids", sent[True]["image_grids"])}
    responses = model.execute([host, device])
    n = num_tiles(*SIMILAR["p1.jpg"]) + num_tiles(*SIMILAR["p3.png"])
    assert [r.outputs[0].value.shape[0] for r in responses] == [n, n]
    assert torch.equal(responses[0].outputs[0].value, responses[1].outputs[0].value)
    assert [p.shape[0] for p in seen] == [8] * (2 * n // 8) + ([2 * n % 8] if 2 * n % 8 else [])  # <= max_tiles each
    tiles = torch.from_numpy(internvl.float_pixels(types.SimpleNamespace(
        pixel_values=sent[False]["pixel_values"], tgt_sizes=None, image_grids=None)))
    assert torch.equal(torch.cat(seen), torch.cat([tiles, tiles]))
    # a request whose tiles cannot be made fails alone; the others in its batch are answered
    bad = {"pixel_values": device["pixel_values"],
           "image_grids": FakeTensor("image_grids", sent[True]["image_grids"] * np.array([1, 1, 1, 1, 5], np.int32))}
    seen.clear()
    responses = model.execute([bad, host])
    assert responses[0].error is not None and "invalid image grid" in str(responses[0].error)
    assert responses[1].error is None
    assert torch.equal(responses[1].outputs[0].value, tiles[:, :, :2, 0].reshape(n, 3, 2))


def test_vision_encoder_batches_about_its_tile_budget(internvl: ModelFamily) -> None:
    """Decoded images are whole items of up to 13 tiles: the encoder's max batch is k images, k * 13 <= the tile
    budget, and the bls and vision_table send at most k per request; tiles keep the tile budget."""
    from vlm_triton.deploy.render import render_configs, vision_batch

    base = {"model": {"checkpoint": str(internvl.checkpoint.path)}, "engine": {"device": "cpu"}}
    device = DeploymentConfig.from_dict({**base, "preprocess": {"image_resize": "device"}})
    per_image = internvl.max_tiles_per_image(PreprocessLimits.from_deployment(device))
    assert per_image == 13 and vision_batch(device) == (2, 2)
    wide = DeploymentConfig.from_dict({**base, "preprocess": {"image_resize": "device"},
                                       "triton": {"vision_max_batch_size": 64}})
    assert vision_batch(wide) == (4, 4)
    host = DeploymentConfig.from_dict({**base, "triton": {"vision_max_batch_size": 30}})  # auto on the CPU: host
    assert vision_batch(host) == (30, 28)  # tiles: whole groups of TILE_GROUP per request
    for cfg, items, chunk in ((device, 2, "2"), (host, 30, "28")):
        configs = render_configs(cfg, Path("/d.json"))
        assert configs["vision_encoder"].max_batch_size == items
        assert {configs[m].parameters["vision_chunk"].string_value for m in ("bls", "vision_table")} == {chunk}
        # the decision reaches preprocess through its config, so no stage decides differently
        assert configs["preprocess"].parameters["device_tiles"].string_value == ("1" if cfg is device else "0")
