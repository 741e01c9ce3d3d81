"""The serving processes' garbage collector: start-up heap frozen (stubs by config, the frontend by flag), pauses
timed by generation for the timing lines."""

from __future__ import annotations

import gc
import threading
import time
import types
from collections.abc import Iterator

import pytest

from benchmarks.stack_variants import split_settings
from openai_frontend.__main__ import parse_args
from tests.unit.fake_triton import adapters_with, fake_pb_utils
from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.engine.observe import StepTiming
from vlm_triton.gc_heap import GCPauses, freeze_heap
from vlm_triton.step_stats import log_timing


@pytest.fixture
def unfrozen() -> Iterator[int]:
    """The objects frozen before the test (torch may freeze some); what the test freezes goes back to the
    collector afterwards (the test process must not keep it)."""
    try:
        yield gc.get_freeze_count()
    finally:
        gc.unfreeze()


@pytest.fixture
def pauses() -> Iterator[GCPauses]:
    GCPauses.uninstall()
    try:
        yield GCPauses.install()
    finally:
        GCPauses.uninstall()


def test_freeze_heap_moves_the_live_objects_out_of_collection(unfrozen: int) -> None:
    alive = len(gc.get_objects())
    frozen = freeze_heap()
    assert frozen >= alive * 0.9 and gc.get_freeze_count() > 0  # frozen objects still die by refcount
    assert len(gc.get_objects()) < alive * 0.1  # what collections still walk


def test_pauses_are_timed_by_generation_and_taken_once(pauses: GCPauses) -> None:
    assert GCPauses.install() is pauses and gc.callbacks.count(pauses._on_collect) == 1
    gc.collect(0)
    gc.collect(2)
    gc.collect(2)
    got = pauses.take()
    assert got["gen0"]["count"] >= 1 and got["gen2"]["count"] >= 2
    assert 0 < got["gen2"]["mean_ms"] <= got["gen2"]["max_ms"]
    assert pauses.take() == {}
    GCPauses.uninstall()
    assert pauses._on_collect not in gc.callbacks


def test_collections_during_take_and_during_locked_work_do_not_deadlock(pauses: GCPauses) -> None:
    """Collections start inside any allocation: inside `take()` itself, and inside code that holds some lock (here
    StepTiming's). With a collection at almost every allocation, one thread taking the pauses and one doing locked
    work both finish (a recorder that took a lock in its callback would wait on itself)."""
    timing = StepTiming()
    taken: list[dict[str, dict[str, float]]] = []
    thresholds = gc.get_threshold()
    gc.set_threshold(1)

    def work() -> None:
        for i in range(2000):
            timing.add(f"part{i % 50}", 0.001)

    def take() -> None:
        for _ in range(300):
            taken.append(pauses.take())
            _ = [[i] for i in range(20)]  # allocations between takes

    try:
        threads = [threading.Thread(target=f, daemon=True) for f in (work, take)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    finally:
        gc.set_threshold(*thresholds)
    assert not any(thread.is_alive() for thread in threads)
    assert sum(t.get("gen0", {}).get("count", 0) for t in [*taken, pauses.take()]) > 0


@pytest.fixture
def common(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    monkeypatch.delenv("VLM_TRITON_STEP_STATS", raising=False)
    for (module,) in adapters_with(monkeypatch, fake_pb_utils(), "vlm_triton.triton.common"):
        yield module


@pytest.mark.parametrize("freeze", [True, False])
def test_stage_ready_freezes_the_stub_heap_when_configured(common: types.ModuleType, unfrozen: int,
                                                           freeze: bool) -> None:
    cfg = DeploymentConfig.from_dict({"model": {"checkpoint": "/x"}, "triton": {"stub_freeze_heap": freeze}})
    common.stage_ready(cfg, "stage")
    assert (gc.get_freeze_count() > unfrozen) is freeze


def test_the_frontend_freezes_by_default_and_the_benchmarks_can_switch_it_off() -> None:
    assert parse_args(["--model-name", "m"]).freeze_heap is True
    assert parse_args(["--model-name", "m", "--no-freeze-heap"]).freeze_heap is False
    config, flags, env, frontend = split_settings(["frontend.no_freeze_heap", "frontend.loop=asyncio",
                                                   "triton.stub_freeze_heap=false", "--log-verbose=1", "X_Y=1"])
    assert frontend == ("--no-freeze-heap", "--loop", "asyncio")
    assert config == ["triton.stub_freeze_heap=false"] and flags == ("--log-verbose=1",) and env == {"X_Y": "1"}


def test_timing_lines_carry_the_collections(monkeypatch: pytest.MonkeyPatch, pauses: GCPauses,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    """VLM_TRITON_STEP_STATS: the timing line has each source's parts and this process's collections (the frontend
    logs only the latter); unset, nothing starts."""
    monkeypatch.delenv("VLM_TRITON_STEP_STATS", raising=False)
    assert log_timing({}, "frontend") is None
    monkeypatch.setenv("VLM_TRITON_STEP_STATS", "0.05")
    timing = StepTiming()
    timing.add("step", 0.002)
    stop = log_timing({"engine_": timing}, "stage")
    assert stop is not None
    try:
        gc.collect(2)
        time.sleep(0.5)  # ten periods: the collection's pause is in a line by now
    finally:
        stop.set()
    time.sleep(0.2)  # a line being written finishes (reading the capture while a thread writes can lose it)
    err = capfd.readouterr().err
    assert "[stage timing]" in err and "engine_step 1x 2.000/2.0 ms" in err and "gc_gen2 " in err, err
