"""Decoded images passed by reference: preprocess writes them into a shared-memory pool, the llm maps it.

With `engine.vision_in_llm` the llm cuts and encodes a request's decoded images (uint8 planes [N, 3, H, W]: 2.4 MB
for W3's four images, 7.2 MB for W1's one). Sent as a tensor they travel preprocess -> Triton -> bls -> Triton ->
llm, copied at each hop: ~4 and ~9 ms of W3's and W1's first token at c=1 on an H100 (docs/benchmarks.md, item 54).
Here preprocess copies them once into a pool it owns and sends a small reference (`pixel_ref`); the llm reads them
from its own mapping of the same pool.

One pool per preprocess instance (a process): a file in /dev/shm, `PlanePool.SIZE` bytes of which are allocated and
mapped with their pages present when it is made (so no request pays page faults), named by the owner's pid and a
random 63-bit token that every reference must carry (a client cannot name a pool it was not told of). The owner
alone allocates: first fit over 64 KiB blocks. Each allocation takes a record of the pool's header, whose two words
(besides where its bytes are) are written by one side each, so neither needs an atomic read-modify-write across
processes:
- `filled[r]`, written by the owner: the generation of the planes now in record r (generations only grow);
- `released[r]`, written by the reader: the generation it is done with.
A record is free again when `released[r] == filled[r]`. The reader checks `filled[r]` against the reference's
generation when it opens the planes and again when it releases them, so planes overwritten in between (the owner
takes back records held longer than `stale_s`, when it needs the room) fail their request instead of feeding it
other pixels. A request dropped between preprocess and the llm leaves its record until then.

When the pool has no room, `put` returns None and preprocess sends the planes by value as before; so it does with no
pool at all, when /dev/shm cannot hold one and still keep SHM_RESERVE free for Triton's own stubs (e.g. a container
started with Docker's default 64 MB /dev/shm).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlm_triton.engine.kv_pool import RowPool
from vlm_triton.errors import InvalidRequest

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "vlm-triton-planes"
MAGIC = 0x564C4D504C414E45  # "VLMPLANE"
BLOCK = 64 * 1024
RECORDS = 256
SHM_RESERVE = 512 * 1024 * 1024  # /dev/shm a pool leaves free (Triton's Python backend keeps its stubs' tensors there)
_HEADER_WORDS = 4  # magic, token, records, data bytes
_RECORD_WORDS = 4  # filled, released, offset, bytes: arrays of RECORDS words each
DATA_OFFSET = mmap.PAGESIZE * -(-(8 * (_HEADER_WORDS + _RECORD_WORDS * RECORDS)) // mmap.PAGESIZE)
REF_LEN = 9  # pid, token, record, generation, offset, then the planes' shape [N, 3, H, W]


def pool_path(pid: int, token: int) -> Path:
    return SHM_DIR / f"{PREFIX}-{pid}-{token:016x}"


def _map(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))


class _Layout:
    """Views of a mapped pool: its header words, the per-record arrays, and the data bytes."""

    def __init__(self, mm: mmap.mmap) -> None:
        words = np.frombuffer(mm, dtype=np.int64, count=_HEADER_WORDS + _RECORD_WORDS * RECORDS)
        self.header = words[:_HEADER_WORDS]
        self.filled, self.released, self.offset, self.nbytes = words[_HEADER_WORDS:].reshape(_RECORD_WORDS, RECORDS)
        self.data = np.frombuffer(mm, dtype=np.uint8, offset=DATA_OFFSET)


@dataclass
class _Held:
    start: int  # first block
    blocks: int
    since: float


class PlanePool:
    """The owner's side (one preprocess instance): `put` copies planes in and returns their reference."""

    def __init__(self, data_bytes: int, *, stale_s: float = 300.0) -> None:
        blocks = data_bytes // BLOCK
        if blocks < 1:
            raise ValueError(f"a plane pool needs at least {BLOCK} bytes, got {data_bytes}")
        self.pid, self.token = os.getpid(), secrets.randbits(63)
        self.path = pool_path(self.pid, self.token)
        self.stale_s = stale_s
        size = DATA_OFFSET + blocks * BLOCK
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # tmpfs: ENOSPC here rather than SIGBUS on first touch
            self._mm = _map(fd, size)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._view = _Layout(self._mm)
        self._view.header[:] = (MAGIC, self.token, RECORDS, blocks * BLOCK)
        self._blocks = RowPool(blocks)
        self._held: dict[int, _Held] = {}  # record -> its allocation, until released
        self._generation = 0
        self._lock = threading.Lock()

    @classmethod
    def create(cls, mib: int, **kwargs: float) -> PlanePool | None:
        """A pool of `mib` MiB, or None (planes by value) when mib is 0 or it cannot be made here: /dev/shm must keep
        SHM_RESERVE free besides it, for the shared memory of Triton's own Python backend stubs."""
        if mib <= 0:
            return None
        try:
            fs = os.statvfs(SHM_DIR)
            free = fs.f_bavail * fs.f_frsize
            if free < mib * 1024 * 1024 + SHM_RESERVE:
                raise OSError(f"{free >> 20} MiB free, and {SHM_RESERVE >> 20} MiB must stay free for Triton")
            return cls(mib * 1024 * 1024, **kwargs)
        except OSError as exc:
            log.warning("planes go by value: no %d MiB plane pool in %s (%s)", mib, SHM_DIR, exc)
            return None

    def put(self, planes: np.ndarray) -> np.ndarray | None:
        """Copy uint8 planes [N, 3, H, W] into the pool -> their reference int64 [REF_LEN]; None when no room."""
        if planes.dtype != np.uint8 or planes.ndim != 4 or planes.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W] planes, got {planes.dtype} {planes.shape}")
        blocks = max(1, -(-planes.nbytes // BLOCK))
        with self._lock:
            place = self._reserve(blocks)
            if place is None:
                return None
            record, offset = place
            self._generation += 1
            generation = self._generation
            target = self._view.data[offset:offset + planes.nbytes].reshape(planes.shape)
            np.copyto(target, planes)
            self._view.offset[record], self._view.nbytes[record] = offset, planes.nbytes
            self._view.filled[record] = generation  # last: a reader that sees it sees the rest
        return np.array([self.pid, self.token, record, generation, offset, *planes.shape], dtype=np.int64)

    def _reserve(self, blocks: int) -> tuple[int, int] | None:
        self._collect(stale=False)
        place = self._try(blocks)
        if place is None and self._collect(stale=True):
            place = self._try(blocks)
        return place

    def _try(self, blocks: int) -> tuple[int, int] | None:
        if len(self._held) >= RECORDS:
            return None
        start = self._blocks.reserve(blocks)
        if start is None:
            return None
        record = next(r for r in range(RECORDS) if r not in self._held)
        self._held[record] = _Held(start, blocks, time.monotonic())
        return record, start * BLOCK

    def _collect(self, *, stale: bool) -> int:
        """Free the records their readers released (and with `stale`, those held longer than stale_s)."""
        view, now, freed = self._view, time.monotonic(), 0
        for record, held in list(self._held.items()):
            done = view.released[record] == view.filled[record]
            if done or (stale and now - held.since > self.stale_s):
                if not done:
                    log.warning("plane pool: record %d held for %.0f s, taken back", record, now - held.since)
                    view.filled[record] = -1  # its reader, if it comes, finds the planes gone
                del self._held[record]
                self._blocks.release(held.start, held.blocks)
                freed += 1
        return freed

    def in_use(self) -> int:
        """Records not yet released (tests, metrics)."""
        with self._lock:
            self._collect(stale=False)
            return len(self._held)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


class PlaneLease:
    """Planes opened by a reader: `array` is a view of the pool; `release` gives them back (idempotent) and says
    whether they were still intact (False: the owner took the record back meanwhile, and the bytes may be others')."""

    def __init__(self, view: _Layout, record: int, generation: int, array: np.ndarray) -> None:
        self._view, self._record, self._generation, self.array = view, record, generation, array

    def intact(self) -> bool:
        return bool(self._view.filled[self._record] == self._generation)

    def release(self) -> bool:
        intact = self.intact()
        self._view.released[self._record] = self._generation
        return intact


class PlaneReader:
    """The llm's side: maps each pool a reference names (once) and opens the planes it holds."""

    def __init__(self, on_map: Callable[[mmap.mmap], None] | None = None) -> None:
        """`on_map(mm)`: called with each pool's mapping when it is first mapped (the llm registers it with CUDA)."""
        self._pools: dict[tuple[int, int], tuple[mmap.mmap, _Layout]] = {}
        self._lock = threading.Lock()
        self._on_map = on_map

    def open(self, ref: np.ndarray) -> PlaneLease:
        ref = np.asarray(ref).reshape(-1)
        if ref.shape != (REF_LEN,) or ref.dtype != np.int64:
            raise InvalidRequest(f"pixel_ref must be {REF_LEN} int64 values, got {ref.dtype} {list(ref.shape)}")
        pid, token, record, generation, offset, n, c, h, w = (int(x) for x in ref)
        if min(pid, token, record, generation, offset, n, h, w) < 0 or c != 3 or record >= RECORDS:
            raise InvalidRequest(f"pixel_ref {ref.tolist()} is malformed")
        view = self._pool(pid, token)
        nbytes = n * c * h * w
        if view.filled[record] != generation or view.offset[record] != offset or view.nbytes[record] != nbytes:
            raise InvalidRequest("pixel_ref names no planes of its pool (expired or never written)")
        array = view.data[offset:offset + nbytes].reshape(n, c, h, w)
        return PlaneLease(view, record, generation, array)

    def _pool(self, pid: int, token: int) -> _Layout:
        key = (pid, token)
        with self._lock:
            known = self._pools.get(key)
            if known is not None:
                return known[1]
            path = pool_path(pid, token)
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                raise InvalidRequest("pixel_ref names no plane pool on this host") from None
            try:
                size = os.fstat(fd).st_size
                mm = _map(fd, size) if size > DATA_OFFSET else None
            finally:
                os.close(fd)
            view = None if mm is None else _Layout(mm)
            if view is None or int(view.header[0]) != MAGIC or int(view.header[1]) != token:
                if mm is not None:
                    del view
                    mm.close()
                raise InvalidRequest("pixel_ref names no plane pool on this host")
            if self._on_map is not None:
                self._on_map(mm)
            self._pools[key] = (mm, view)
            return view


def pin_for(device: torch.device) -> Callable[[mmap.mmap], None] | None:
    """For a CUDA reader: page-locks each pool it maps (cudaHostRegister), so the planes go to the device by DMA
    straight from the pool (a refusal, e.g. a low RLIMIT_MEMLOCK, leaves them pageable)."""
    if device.type != "cuda":
        return None

    def pin(mm: mmap.mmap) -> None:
        cudart = torch.cuda.cudart()
        address = ctypes.addressof(ctypes.c_char.from_buffer(mm))  # the export keeps the mapping open
        error = cudart.cudaHostRegister(address, len(mm), 0)
        if error != cudart.cudaError.success:
            log.warning("plane pool stays pageable: cudaHostRegister of %d MiB failed (%s)", len(mm) >> 20, error)

    return pin
