"""Decoded images passed by reference (multimodal/plane_pool.py): what the reader opens is what the owner put, in
another process too; a released record's room is reused and an unreleased one's is not; a full pool answers None
(the caller sends by value); references that name no pool, another token, a stale generation or a bad shape are
refused; records held past stale_s are taken back only when room is needed, and their late reader finds them
gone; a pool that cannot be made, or would leave /dev/shm short of the reserve Triton's stubs need, leaves planes by
value; close removes the file. The preprocess adapter sends a
reference only when its caller asks for pixel_ref (the bls with engine.vision_in_llm, not the ensemble) and the
pool has room."""

from __future__ import annotations

import json
import multiprocessing
import types
from pathlib import Path

import numpy as np
import pytest

from tests.unit.fake_triton import FakeTensor
from tests.unit.test_pixels import _message, _outputs, _preprocess, adapters, internvl, media_dir  # noqa: F401
from vlm_triton.errors import InvalidRequest
from vlm_triton.families import ModelFamily
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
from vlm_triton.multimodal import plane_pool
from vlm_triton.multimodal.plane_pool import BLOCK, REF_LEN, PlanePool, PlaneReader


@pytest.fixture(autouse=True)
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "shm"
    path.mkdir()
    monkeypatch.setattr(plane_pool, "SHM_DIR", path)
    return path


def _planes(n: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8)


def test_the_reader_opens_what_was_put_and_a_release_frees_its_room(shm_dir: Path) -> None:
    pool = PlanePool(4 * BLOCK)
    reader = PlaneReader()
    a, b = _planes(1, 128, 256, 0), _planes(2, 60, 70, 1)  # 98,304 and 25,200 bytes: two blocks and one
    ref_a, ref_b = pool.put(a), pool.put(b)
    assert ref_a is not None and ref_b is not None and ref_a.shape == (REF_LEN,) and ref_a.dtype == np.int64
    lease_a, lease_b = reader.open(ref_a), reader.open(ref_b)
    assert np.array_equal(lease_a.array, a) and np.array_equal(lease_b.array, b)
    assert pool.in_use() == 2
    big = _planes(1, 128, 300, 2)  # 115,200 bytes: two blocks, which fit only with a's back
    assert pool.put(big) is None
    assert lease_a.release() and lease_a.release()  # idempotent
    assert pool.in_use() == 1
    ref_big = pool.put(big)
    assert ref_big is not None and np.array_equal(reader.open(ref_big).array, big)
    assert lease_b.intact()  # b's bytes were not touched by the reuse
    assert np.array_equal(lease_b.array, b)
    pool.close()
    assert not list(shm_dir.iterdir())


def test_a_full_pool_answers_none_until_its_reader_releases() -> None:
    pool = PlanePool(2 * BLOCK)
    reader = PlaneReader()
    first = pool.put(_planes(1, 128, 170, 0))  # 65,280 bytes: one block
    second = pool.put(_planes(1, 128, 170, 1))
    assert first is not None and second is not None
    assert pool.put(_planes(1, 8, 8, 2)) is None  # no block left: by value
    assert pool.put(_planes(1, 256, 256, 3)) is None  # larger than the pool
    reader.open(second).release()
    assert pool.put(_planes(1, 8, 8, 2)) is not None


def test_references_that_name_no_planes_are_refused() -> None:
    pool = PlanePool(2 * BLOCK)
    reader = PlaneReader()
    ref = pool.put(_planes(1, 10, 10, 0))
    assert ref is not None

    def with_(index: int, value: int) -> np.ndarray:
        out = ref.copy()
        out[index] = value
        return out

    for bad, message in [
        (with_(1, int(ref[1]) ^ 1), "no plane pool"),  # another token: a pool nobody was told of
        (with_(0, int(ref[0]) + 1), "no plane pool"),
        (with_(3, int(ref[3]) + 1), "expired or never written"),  # a generation not (or no longer) in the record
        (with_(4, BLOCK), "expired or never written"),  # not where the record's planes are
        (with_(8, 11), "expired or never written"),  # another size
        (with_(6, 4), "malformed"),  # 4 channels
        (with_(5, -1), "malformed"),
        (ref[:5], "int64 values"),
        (ref.astype(np.int32), "int64 values"),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            reader.open(bad)
    assert np.array_equal(reader.open(ref).array, _planes(1, 10, 10, 0))  # the good one still opens
    for content in (b"", bytes(2 * BLOCK)):  # a file with a pool's name that is not one: too short, no magic
        plane_pool.pool_path(1, 5).write_bytes(content)
        with pytest.raises(InvalidRequest, match="no plane pool"):
            reader.open(np.array([1, 5, 0, 1, 0, 1, 3, 4, 4], np.int64))


def test_stale_records_are_taken_back_only_when_room_is_needed() -> None:
    pool = PlanePool(BLOCK, stale_s=0.0)
    reader = PlaneReader()
    ref = pool.put(_planes(1, 100, 100, 0))
    assert ref is not None
    lease = reader.open(ref)
    assert pool.in_use() == 1  # stale, but nobody needed the room
    again = pool.put(_planes(1, 100, 100, 1))  # needs it: the stale record goes
    assert again is not None and pool.in_use() == 1
    assert not lease.intact() and not lease.release()  # its late reader learns the bytes may be others'
    with pytest.raises(InvalidRequest, match="expired"):
        reader.open(ref)
    assert np.array_equal(reader.open(again).array, _planes(1, 100, 100, 1))
    assert pool.in_use() == 1  # the stale reader's release did not free the new planes


def _owner(conn: object, shm: str) -> None:
    plane_pool.SHM_DIR = Path(shm)
    pool = PlanePool(4 * BLOCK)
    conn.send(pool.put(_planes(2, 90, 120, 7)))  # type: ignore[attr-defined]
    conn.recv()  # type: ignore[attr-defined]  # the reader is done
    conn.send(pool.in_use())  # type: ignore[attr-defined]
    pool.close()


def test_another_process_reads_the_owners_planes_and_releases_them(shm_dir: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    owner = ctx.Process(target=_owner, args=(there, str(shm_dir)))
    owner.start()
    try:
        ref = here.recv()
        lease = PlaneReader().open(ref)
        assert np.array_equal(lease.array, _planes(2, 90, 120, 7))
        assert lease.release()
        here.send("done")
        assert here.recv() == 0
    finally:
        owner.join(30)
    assert owner.exitcode == 0
    assert not list(shm_dir.iterdir())


def test_no_pool_means_planes_by_value(shm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert PlanePool.create(0) is None
    with pytest.raises(ValueError, match="at least"):
        PlanePool(BLOCK - 1)
    pool = PlanePool(BLOCK)
    with pytest.raises(ValueError, match="uint8"):
        pool.put(np.zeros((1, 3, 4, 4), np.float32))
    pool.close()
    free = plane_pool.SHM_RESERVE + 3 * 1024 * 1024  # a /dev/shm with 3 MiB to spare above the reserve
    monkeypatch.setattr(plane_pool.os, "statvfs", lambda path: types.SimpleNamespace(f_bavail=free, f_frsize=1))
    made = PlanePool.create(2)
    assert made is not None and made.put(_planes(1, 8, 8, 0)) is not None
    made.close()
    assert PlanePool.create(4) is None  # it would eat into the reserve: by value
    assert not list(shm_dir.iterdir())
    monkeypatch.setattr(plane_pool, "SHM_DIR", shm_dir / "missing")
    assert PlanePool.create(1) is None


class _AskingRequest(dict):
    """A fake preprocess request (its inputs) that names the outputs it asks for, as the bls does."""

    def __init__(self, inputs: dict, asked: list[str]) -> None:
        super().__init__(inputs)
        self.asked = asked

    def requested_output_names(self) -> list[str]:
        return self.asked


def test_preprocess_sends_a_reference_only_when_asked_and_while_there_is_room(
        adapters: types.SimpleNamespace, internvl: ModelFamily, media_dir: Path) -> None:
    model = _preprocess(adapters, internvl, np.uint8)
    model.media = MediaFetcher(MediaPolicy(allowed_local_dirs=(media_dir,)))
    model.planes = PlanePool(12 * 1024 * 1024)  # room for one request of 13 tiles (7.8 MB), not two
    reader = PlaneReader()

    def send(name: str, asked: list[str]) -> dict[str, np.ndarray]:
        messages = np.array([json.dumps(_message(media_dir, name)).encode()], dtype=np.object_)
        (response,) = model.execute([_AskingRequest({"messages": FakeTensor("messages", messages)}, asked)])
        return _outputs(response)

    by_value = send("wide.png", ["input_ids", "pixel_values"])  # the ensemble: pixel_ref not asked for
    assert by_value["pixel_ref"].shape == (1, 0) and by_value["pixel_values"].shape[0] > 0
    by_ref = send("wide.png", ["input_ids", "pixel_values", "pixel_ref"])
    assert by_ref["pixel_values"].shape == (by_value["pixel_values"].shape[0], 3, 0, 0)  # N stays: the bls's count
    assert by_ref["pixel_ref"].shape == (1, REF_LEN) and by_ref["pixel_ref"][0, 5] == by_value["pixel_values"].shape[0]
    lease = reader.open(by_ref["pixel_ref"][0])
    assert np.array_equal(lease.array, by_value["pixel_values"])
    assert np.array_equal(by_ref["input_ids"], by_value["input_ids"])
    no_room = send("w1.jpg", ["input_ids", "pixel_values", "pixel_ref"])  # while the first is held: by value
    assert no_room["pixel_ref"].shape == (1, 0) and no_room["pixel_values"].shape == (13, 3, 448, 448)
    assert model.planes.in_use() == 1
    lease.release()
    assert send("w1.jpg", ["input_ids", "pixel_values", "pixel_ref"])["pixel_ref"].shape == (1, REF_LEN)
    assert {how: c.value for how, c in model._sent.items()} == {"reference": 2, "value": 2}
