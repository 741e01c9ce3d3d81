"""The llm's own vision encoder (`engine.vision_in_llm`, multimodal/inline_vision.py): each request's table equals
the one the `vision_encoder` stage would have made for it alone, with the real tiny InternVL encoder, from host
tiles and from decoded images cut on the device; requests queued together share forwards of at most `max_tiles`
tiles; a request whose tiles cannot be made fails alone, an encoder error fails its round and the thread goes on;
a cancelled request's callbacks never run; the deployment switch renders the llm's extra inputs (torch only)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.unit.test_pixels import _message, _prepare, internvl, media_dir, minicpmv  # noqa: F401
from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.errors import InvalidRequest, SetupError
from vlm_triton.families import ModelFamily
from vlm_triton.families.base import PreprocessLimits
from vlm_triton.multimodal.inline_vision import InlineVision, VisionJob
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
from vlm_triton.multimodal.vision_runner import VisionRunner
from vlm_triton.prompt.messages import parse_messages

CPU = torch.device("cpu")


class Outcomes:
    """What the worker hands each job: a table or an error, with a way to wait for n of them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.got: dict[str, Any] = {}

    def job(self, job_id: str, pixels: Any, grids: Any = None) -> VisionJob:
        def ready(table: torch.Tensor) -> None:
            with self.cond:
                self.got[job_id] = table
                self.cond.notify_all()

        def failed(exc: BaseException) -> None:
            with self.cond:
                self.got[job_id] = exc
                self.cond.notify_all()

        as_tensor = (lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)))
        return VisionJob(job_id, as_tensor(pixels), as_tensor(grids), None, ready, failed)

    def wait(self, n: int, timeout_s: float = 60.0) -> dict[str, Any]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n, timeout_s), f"{len(self.got)} of {n} outcomes"
            return dict(self.got)


def _device_prepare(family: ModelFamily, media: Path, name: str) -> Any:
    """The family's prepare with the tiles left to the device: decoded planes and their grids."""
    limits = PreprocessLimits(max_prompt_tokens=32768, image_threads=1, device_tiles=True)
    fetcher = MediaFetcher(MediaPolicy(allowed_local_dirs=(media,)))
    return family.prepare(parse_messages(json.dumps(_message(media, name))), fetcher, limits)


def test_tables_equal_the_stage_encoding_each_request_alone(internvl: ModelFamily, media_dir: Path) -> None:
    runner = VisionRunner(internvl, torch.float32, CPU, out_dtype=torch.float32, max_tiles=8)
    host = _prepare(internvl, media_dir, "wide.png")
    device = _device_prepare(internvl, media_dir, "tall.png")
    assert device.image_grids is not None and device.pixel_values.shape[0] == 1
    outcomes = Outcomes()
    vision = InlineVision(runner, max_tiles=32)
    try:
        vision.submit(outcomes.job("host", host.pixel_values))
        vision.submit(outcomes.job("device", device.pixel_values, device.image_grids))
        got = outcomes.wait(2)
    finally:
        vision.close()
    with torch.inference_mode():
        for name, prepared in (("host", host), ("device", device)):
            grids = None if prepared.image_grids is None else torch.from_numpy(prepared.image_grids)
            tiles = runner.tiles(torch.from_numpy(prepared.pixel_values), grids)
            alone, _ = runner.encode([tiles])
            assert got[name].shape == (alone.shape[0] * alone.shape[1], alone.shape[2])
            assert torch.equal(got[name], alone.reshape(-1, alone.shape[-1])), name
    host_tiles = host.pixel_values.shape[0]
    assert got["host"].shape[0] == host_tiles * internvl.tokens_per_tile
    assert vision.pending() == 0


class GatedEncoder:
    """A stand-in encoder: records each forward's tile count; the first forward waits for `release`."""

    def __init__(self, fail_once: bool = False) -> None:
        self.forwards: list[int] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail_once = fail_once

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.release.wait(30)
        self.forwards.append(int(pixels.shape[0]))
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("encoder failed")
        return pixels[:, :, :2, 0].reshape(pixels.shape[0], 3, 2)  # each tile's own bytes


def _tiles(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)


def _runner(family: ModelFamily, encoder: Any, max_tiles: int) -> VisionRunner:
    return VisionRunner(family, torch.float32, CPU, out_dtype=torch.float32, max_tiles=max_tiles, encoder=encoder)


@contextlib.contextmanager
def gated_vision(family: ModelFamily, max_tiles: int = 64, fail_once: bool = False
                 ) -> Iterator[tuple[InlineVision, GatedEncoder, Outcomes]]:
    """A vision thread over a `GatedEncoder`; closed at the end (its gate opened first, so that a failed test does
    not leave the thread waiting on it)."""
    encoder = GatedEncoder(fail_once=fail_once)
    vision = InlineVision(_runner(family, encoder, max_tiles=max_tiles), max_tiles=max_tiles)
    try:
        yield vision, encoder, Outcomes()
    finally:
        encoder.release.set()
        vision.close()


def test_jobs_queued_together_share_forwards_of_at_most_max_tiles(internvl: ModelFamily) -> None:
    with gated_vision(internvl, max_tiles=8) as (vision, encoder, outcomes):
        vision.submit(outcomes.job("first", _tiles(3, 0)))
        assert encoder.entered.wait(30)  # the first round is under way alone; the next four queue behind it
        for k in range(1, 5):
            vision.submit(outcomes.job(f"r{k}", _tiles(5, k)))
        assert vision.pending() == 5 and vision.busy()  # the engine releases the GIL in its waits meanwhile
        encoder.release.set()
        got = outcomes.wait(5)
    # rounds: [first] then r1+r2 (10 tiles >= 8: the round is full), then r3+r4; each forward holds <= 8 tiles
    assert encoder.forwards == [3, 8, 2, 8, 2]
    assert not vision.busy()
    for k in range(1, 5):  # each request's rows: its own tiles, normalised, in order
        assert torch.equal(got[f"r{k}"], _normalised(internvl, _tiles(5, k))[:, :, :2, 0].reshape(5 * 3, 2))
    timing = vision.timing.take()
    assert timing["round"]["count"] == 3
    assert {"round_of_1_requests_3_tiles", "round_of_2_requests_10_tiles"} <= set(timing)


def _normalised(family: ModelFamily, tiles: np.ndarray) -> torch.Tensor:
    return family.normalize_pixels(torch.from_numpy(tiles), torch.from_numpy(family.pixel_lut()))


def test_a_bad_job_fails_alone_and_an_encoder_error_fails_its_round(internvl: ModelFamily, media_dir: Path) -> None:
    device = _device_prepare(internvl, media_dir, "tall.png")
    bad_grids = device.image_grids * np.array([1, 1, 1, 1, 5], np.int32)  # thumbnail flag 5: not a grid
    with gated_vision(internvl, fail_once=True) as (vision, encoder, outcomes):
        vision.submit(outcomes.job("doomed", _tiles(2, 0)))  # its round's forward raises
        assert encoder.entered.wait(30)
        vision.submit(outcomes.job("bad", device.pixel_values, bad_grids))
        vision.submit(outcomes.job("good", _tiles(2, 1)))
        encoder.release.set()
        got = outcomes.wait(3)
    assert isinstance(got["doomed"], RuntimeError) and "encoder failed" in str(got["doomed"])
    assert isinstance(got["bad"], Exception) and "encoder failed" not in str(got["bad"])
    assert isinstance(got["good"], torch.Tensor) and got["good"].shape == (2 * 3, 2)
    assert vision.pending() == 0


def test_a_cancelled_job_is_never_handed_over(internvl: ModelFamily) -> None:
    with gated_vision(internvl) as (vision, encoder, outcomes):
        vision.submit(outcomes.job("running", _tiles(2, 0)))
        assert encoder.entered.wait(30)
        vision.submit(outcomes.job("queued", _tiles(2, 1)))
        assert vision.cancel("running") and vision.cancel("queued")  # one in a forward, one still queued
        assert not vision.cancel("queued") and not vision.cancel("unknown")
        vision.submit(outcomes.job("after", _tiles(2, 2)))
        encoder.release.set()
        got = outcomes.wait(1)
    assert set(got) == {"after"}
    assert not vision.cancel("after")  # handed over: the engine's cancel applies from here


def test_a_refused_hand_over_fails_the_job_and_ids_are_unique_while_encoding(internvl: ModelFamily) -> None:
    def refuse(table: torch.Tensor) -> None:
        raise ValueError("the engine refused it")

    with gated_vision(internvl) as (vision, encoder, outcomes):
        encoder.release.set()
        vision.submit(replace(outcomes.job("refused", _tiles(1, 0)), ready=refuse))
        got = outcomes.wait(1)
        encoder.release.clear()
        vision.submit(outcomes.job("held", _tiles(1, 0)))  # stays in its forward until released
        with pytest.raises(InvalidRequest, match="already being encoded"):
            vision.submit(outcomes.job("held", _tiles(1, 1)))
        encoder.release.set()
        got = outcomes.wait(2)
    assert isinstance(got["refused"], ValueError) and isinstance(got["held"], torch.Tensor)


def test_each_job_is_released_once_its_pixels_are_no_longer_read(internvl: ModelFamily, media_dir: Path) -> None:
    """Pixels read in place from preprocess's pool go back after their round's encode, when their job fails or when
    it is cancelled in the queue; a job whose pixels were overwritten meanwhile fails instead of being handed over."""
    released: list[str] = []
    gate = threading.Event()
    device = _device_prepare(internvl, media_dir, "tall.png")
    bad_grids = device.image_grids * np.array([1, 1, 1, 1, 5], np.int32)

    def job(outcomes: Outcomes, name: str, pixels: np.ndarray, grids: Any = None, intact: bool = True) -> VisionJob:
        def release() -> bool:
            if name == "running":
                assert gate.is_set(), "released while its forward still reads it"
            released.append(name)
            return intact

        return replace(outcomes.job(name, pixels, grids), release=release)

    with gated_vision(internvl) as (vision, encoder, outcomes):
        vision.submit(job(outcomes, "running", _tiles(2, 0)))
        assert encoder.entered.wait(30)
        vision.submit(job(outcomes, "queued", _tiles(2, 1)))
        vision.submit(job(outcomes, "bad", device.pixel_values, bad_grids))
        vision.submit(job(outcomes, "overwritten", _tiles(1, 2), intact=False))
        vision.submit(job(outcomes, "good", _tiles(1, 3)))
        assert vision.cancel("queued")
        assert released == ["queued"]  # at once: no round reads it
        gate.set()
        encoder.release.set()
        got = outcomes.wait(4)
        assert vision.pending() == 0
    assert sorted(released) == ["bad", "good", "overwritten", "queued", "running"]  # each once
    assert isinstance(got["running"], torch.Tensor) and isinstance(got["good"], torch.Tensor)
    assert isinstance(got["bad"], Exception)
    assert isinstance(got["overwritten"], RuntimeError) and "expired in transit" in str(got["overwritten"])


def _cfg(**sections: dict) -> DeploymentConfig:
    return DeploymentConfig.from_dict({"model": {"checkpoint": "/models/x"}, **sections})


def test_the_switch_renders_the_llm_pixel_inputs_for_the_torch_profile_only(tmp_path: Path) -> None:
    from tritonclient.grpc import model_config_pb2 as pb

    from vlm_triton.deploy.render import render_configs

    def llm_inputs(cfg: DeploymentConfig) -> dict[str, Any]:
        return {t.name: t for t in render_configs(cfg, tmp_path / "deployment.json")["llm"].input}

    off = llm_inputs(_cfg(engine={"device": "cpu"}))
    on = llm_inputs(_cfg(engine={"device": "cpu", "vision_in_llm": True}))
    assert set(on) - set(off) == {"pixel_values", "pixel_ref", "tgt_sizes", "image_grids"}
    pixels = on["pixel_values"]
    assert pb.DataType.Name(pixels.data_type) == "TYPE_UINT8" and tuple(pixels.dims) == (-1, 3, -1, -1)
    assert all(on[n].optional for n in ("pixel_values", "pixel_ref", "tgt_sizes", "image_grids"))
    with pytest.raises(SetupError, match="vision_in_llm needs the torch profile"):
        _cfg(model={"checkpoint": "/models/x", "profile": "trtllm"}, engine={"vision_in_llm": True})


def test_auto_encodes_in_the_llm_with_the_torch_profile_on_cuda_only_and_is_the_default(tmp_path: Path) -> None:
    from vlm_triton.deploy.render import render_configs

    def decided(**sections: dict) -> bool:
        cfg = _cfg(**sections)
        rendered = {t.name for t in render_configs(cfg, tmp_path / "deployment.json")["llm"].input}
        assert ("pixel_values" in rendered) == cfg.vision_in_llm  # the llm's inputs follow the decision
        return cfg.vision_in_llm

    assert _cfg(engine={"device": "cuda"}).vision_in_llm is True  # the default, "auto" (docs/benchmarks.md, item 46)
    assert _cfg(engine={"device": "cpu"}).vision_in_llm is False
    assert decided(engine={"device": "cuda", "vision_in_llm": "auto"}) is True
    assert decided(engine={"device": "cuda:1", "vision_in_llm": "auto"}) is True
    assert decided(engine={"device": "cpu", "vision_in_llm": "auto"}) is False
    assert decided(engine={"device": "cuda", "vision_in_llm": False}) is False
    assert decided(engine={"device": "cpu", "vision_in_llm": True}) is True
    trtllm = {"checkpoint": "/models/x", "profile": "trtllm"}
    assert _cfg(model=trtllm, engine={"device": "cuda", "vision_in_llm": "auto"}).vision_in_llm is False
    with pytest.raises(SetupError, match='vision_in_llm must be true, false or "auto"'):
        _cfg(engine={"vision_in_llm": "yes"})


def test_variable_size_tiles_of_requests_queued_together(minicpmv: ModelFamily, media_dir: Path) -> None:
    """MiniCPM-V's slices carry their own patch grids (tgt_sizes): a round of such requests encodes them together,
    and each table equals the request encoded alone."""
    runner = VisionRunner(minicpmv, torch.float32, CPU, out_dtype=torch.float32, max_tiles=64)
    real, gate, entered = runner.encoder, threading.Event(), threading.Event()

    def gated(*args: Any) -> torch.Tensor:
        entered.set()
        gate.wait(30)
        return real(*args)

    runner.encoder = gated
    prepared = {n: _prepare(minicpmv, media_dir, n) for n in ("wide.png", "tall.png", "w1.jpg")}
    assert len({tuple(p.tgt_sizes[0]) for p in prepared.values()}) > 1
    outcomes = Outcomes()
    vision = InlineVision(runner, max_tiles=64)
    try:
        first = prepared["w1.jpg"]
        vision.submit(replace(outcomes.job("first", first.pixel_values), tgt_sizes=torch.from_numpy(first.tgt_sizes)))
        assert entered.wait(30)
        for name, p in prepared.items():
            vision.submit(replace(outcomes.job(name, p.pixel_values), tgt_sizes=torch.from_numpy(p.tgt_sizes)))
        gate.set()
        got = outcomes.wait(4)
    finally:
        vision.close()
    assert torch.equal(got["first"], got["w1.jpg"])
    with torch.inference_mode():
        for name, p in prepared.items():
            alone, _ = runner.encode([torch.from_numpy(p.pixel_values)], [torch.from_numpy(p.tgt_sizes)])
            assert torch.equal(got[name], alone.reshape(-1, alone.shape[-1])), name
    assert "round_of_3_requests" in " ".join(vision.timing.take())


def test_requests_with_tiles_of_different_shapes_go_in_runs_of_one_shape(internvl: ModelFamily) -> None:
    calls: list[tuple[int, ...]] = []

    def encoder(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(pixels.shape))
        return pixels[:, :, :2, 0].reshape(pixels.shape[0], 3, 2)

    runner = _runner(internvl, encoder, max_tiles=8)
    small = [torch.from_numpy(_tiles(2, 0)), torch.from_numpy(_tiles(1, 1))]
    large = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 3, 16, 16), dtype=np.uint8))
    with torch.inference_mode():
        embeds, sizes = runner.encode([small[0], small[1], large])
    assert sizes == [2, 1, 3] and calls == [(3, 3, 8, 8), (3, 3, 16, 16)]
    want = torch.cat([_normalised(internvl, t.numpy())[:, :, :2, 0] for t in (*small, large)])
    assert torch.equal(embeds, want.reshape(6, 3, 2))
