"""With `engine.vision_in_llm`: the llm stage's own vision encoder, on a thread of its own.

The llm's execute() submits a request's vision units as a `VisionJob` and returns. This thread makes each job's
tiles (`VisionRunner.tiles`: as sent, or cut on the device from decoded images), encodes the tiles of the jobs that
queued together in shared forwards (the vision encoder batched across requests, as Triton's dynamic batcher does for
the `vision_encoder` stage; a round takes jobs until it holds `max_tiles` tiles), and hands each job its prompt table
[rows, H] on the device, in arrival order. On CUDA the work runs on a stream of its own, so that it overlaps the
engine's decode steps on the GPU; a round's stream is synchronised before its tables are handed over, and a table
lives until its request ends, long after the engine step that read it has synchronised.

A job whose tiles cannot be made fails alone; an encoder error fails the jobs of its round. `cancel` drops a job not
yet handed over, and after it returns True the job's callbacks are never called: a job is handed over (`ready`)
under the same lock, so a cancel either finds it here or finds it gone to the engine.

A job's `release` runs once its pixels are no longer read (after its round's encode, or when it fails or is
cancelled before its round): pixels read from preprocess's shared-memory pool (plane_pool.py) go back to it then,
and a job whose pixels were overwritten meanwhile (`release` returns False) fails instead of being handed over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlm_triton.engine.observe import StepTiming
from vlm_triton.errors import InvalidRequest
from vlm_triton.multimodal.vision_runner import VisionRunner

log = logging.getLogger(__name__)


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The vision thread's CUDA stream. VLM_TRITON_VISION_STREAM (measurement knob, docs/benchmarks.md item 40):
    "side" (default, a stream of normal priority), "high" (a high-priority one: the GPU schedules its kernels ahead of
    the engine's), "engine" (none: the thread's current stream, which the engine's kernels also use)."""
    mode = os.environ.get("VLM_TRITON_VISION_STREAM", "side")
    if device.type != "cuda" or mode == "engine":
        return None
    return torch.cuda.Stream(device, priority=-1) if mode == "high" else torch.cuda.Stream(device)


@dataclass(frozen=True)
class VisionJob:
    job_id: str
    pixels: torch.Tensor  # uint8 units [N, 3, ...] (tiles, or decoded images with grids)
    grids: torch.Tensor | None  # image_grids [N, 5] when the units are decoded images
    tgt_sizes: torch.Tensor | None  # [N, 2] for variable-size tiles (MiniCPM-V)
    ready: Callable[[torch.Tensor], None]  # the table [rows, H] on the device; runs under the worker's lock: be quick
    failed: Callable[[BaseException], None]
    release: Callable[[], bool] = lambda: True  # its pixels are no longer read; False: they were not intact


EXPIRED = "the request's images expired in transit (preprocess's plane pool took them back; see preprocess.plane_pool_mib)"


class InlineVision:
    def __init__(self, runner: VisionRunner, *, max_tiles: int) -> None:
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
        self.runner, self.max_tiles = runner, max_tiles
        self.timing = StepTiming()  # wall time per round, and per round size
        self._cond = threading.Condition()
        self._queue: deque[VisionJob] = deque()
        self._tracked: set[str] = set()  # submitted and neither handed over, failed nor cancelled
        self._closed = False
        self._stream = _side_stream(runner.device)
        self._thread = threading.Thread(target=self._run, name="inline-vision", daemon=True)
        self._thread.start()

    # --- called by the llm stage's threads --------------------------------------------------------------------------
    def submit(self, job: VisionJob) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the llm's vision encoder is shut down")
            if job.job_id in self._tracked:
                raise InvalidRequest(f"request id {job.job_id!r} is already being encoded")
            self._tracked.add(job.job_id)
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job_id: str) -> bool:
        """Drop the job if it was not handed over yet (True: its callbacks will never run; the caller ends it)."""
        with self._cond:
            if job_id not in self._tracked:
                return False
            self._tracked.discard(job_id)
            dropped = [j for j in self._queue if j.job_id == job_id]
            self._queue = deque(j for j in self._queue if j.job_id != job_id)
        for job in dropped:  # a job in a round is released by its round
            job.release()
        return True

    def pending(self) -> int:
        """Jobs submitted and not yet handed over, failed or cancelled."""
        with self._cond:
            return len(self._tracked)

    def busy(self) -> bool:
        """Jobs in progress (read without the lock: the engine asks it every step, a stale answer costs one step)."""
        return bool(self._tracked)

    def close(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # --- the worker thread ------------------------------------------------------------------------------------------
    def _take(self, wait: bool) -> VisionJob | None:
        with self._cond:
            while wait and not self._queue and not self._closed:
                self._cond.wait()
            if self._closed or not self._queue:
                return None
            return self._queue.popleft()

    def _run(self) -> None:
        while not self._closed:
            try:
                self._round()
            except Exception:  # noqa: BLE001 - a callback failed (e.g. a send): the other requests go on
                log.exception("the llm's vision thread caught an error")

    def _round(self) -> None:
        made: list[tuple[VisionJob, torch.Tensor]] = []
        tiles = 0
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), stream:
            while tiles < self.max_tiles:
                job = self._take(wait=not made)
                if job is None:
                    break
                if not made:
                    start = time.perf_counter()
                try:
                    units = self.runner.tiles(job.pixels, job.grids)
                except Exception as exc:  # noqa: BLE001 - this job's error
                    job.release()
                    self._fail(job, exc)
                    continue
                made.append((job, units))
                tiles += int(units.shape[0])
            if not made:
                return
            try:
                embeds, sizes = self.runner.encode([u for _, u in made], [j.tgt_sizes for j, _ in made])
                if self._stream is not None:
                    self._stream.synchronize()
                elif self.runner.device.type == "cuda":  # the copies of pinned pixels are done before `release`
                    torch.cuda.current_stream(self.runner.device).synchronize()
            except Exception as exc:  # noqa: BLE001 - fails the round's jobs, the thread goes on
                for job, _ in made:
                    job.release()
                    self._fail(job, exc)
                return
        elapsed = time.perf_counter() - start
        self.timing.add("round", elapsed)
        self.timing.add(f"round_of_{len(made)}_requests_{tiles}_tiles", elapsed)
        for (job, _), part in zip(made, torch.split(embeds, sizes)):
            if job.release():
                self._hand_over(job, part.reshape(-1, part.shape[-1]))
            else:
                self._fail(job, RuntimeError(EXPIRED))

    def _hand_over(self, job: VisionJob, table: torch.Tensor) -> None:
        error = None
        with self._cond:
            if job.job_id not in self._tracked:
                return  # cancelled meanwhile
            self._tracked.discard(job.job_id)
            try:
                job.ready(table)
            except Exception as exc:  # noqa: BLE001 - e.g. the engine refused the request
                error = exc
        if error is not None:
            job.failed(error)

    def _fail(self, job: VisionJob, exc: BaseException) -> None:
        with self._cond:
            if job.job_id not in self._tracked:
                return
            self._tracked.discard(job.job_id)
        job.failed(exc)
