"""Bicubic resizes split over threads, bit-identical to one `Image.resize(size, BICUBIC)` call.

Pillow resizes in two separable passes (libImaging/Resample.c, `ImagingResampleInner`): a horizontal pass maps
every row to a row of the output width, a vertical pass maps every column to a column of the output height; a pass
is skipped when its axis keeps its length. The coefficients of a pass depend only on (input length, box start, box
end, output length) along its own axis (C doubles, then 22-bit fixed point), and each output row of the horizontal
pass (column of the vertical pass) reads only the same row (column) of its input. So for W x H -> w x h, in
Pillow's pass order:

- the horizontal pass, split by rows: `rows.resize((w, r1 - r0))` of rows r0..r1 keeps the height, so Pillow runs
  only the horizontal pass, with the single call's coefficients (same W, box 0..W, w);
- the vertical pass, split by columns: `cols.resize((c1 - c0, h))` of columns c0..c1 runs only the vertical pass,
  with the single call's coefficients (same H, box 0..H, h).

Every output byte is the same integer arithmetic on the same input bytes, whatever the split: no approximation. A
pass's strips stay separate; each strip of the next pass pastes together the region it reads from them (one copy).
The last pass's strips go to a sink (the InternVL tile writer puts them straight into the uint8 tiles) or are
pasted into the result. Pillow's resize, crop and paste release the GIL, so the strips run in parallel.

NOT exact: splitting the output rows with `resize(size, box=(0, y0, W, y1))`. Pillow takes the box as C floats and
computes each strip's coefficients from `y0 + (i + 0.5) * (y1 - y0) / rows`, which rounds differently from the
single call's `(i + 0.5) * H / h`; most sizes then differ in some rows (tests/unit/test_resample.py).

The pass order is Pillow's own choice: before 13.0 always horizontal first; from 13.0 vertical first when the height
shrinks by more than twice as many pixels as the width (`horizontal_first` in Resample.c), and the two orders give
different bytes. Which rule the installed Pillow follows is found once per process on small probes run through
this module's own split (`pass_order_rule`); when no known rule reproduces Pillow, nothing is split (every job is
one `resize` call: the same bytes, one thread per job).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC
SPLIT_MODES = ("RGB", "L")  # Pillow's plain 8-bit resampling (RGBA/LA premultiply in Python; P and 1 use NEAREST)
MIN_STRIP = 16  # rows or columns per strip, at least
MIN_SPLIT_WORK = 448 * 448 * 8  # jobs cheaper than this (`ResizeJob.work`) run as one task

Size = tuple[int, int]
Piece = tuple[int, int, Image.Image]  # (x0, y0, image): a rectangle of a larger image
Sink = Callable[[int, int, Image.Image], None]  # receives rectangles (x0, y0, image) of a job's output


def default_image_threads(instances: int = 1) -> int:
    """Threads for one preprocess instance's image work when the deployment says 0 (auto): the CPUs this process may
    run on, halved (the vision encoder, llm, BLS and frontend processes need cores too) and shared by the `instances`
    preprocess processes, between 1 and 4. Measured on a 16-core H100 host (docs/benchmarks.md, item 20): W1's
    prepare takes 74 ms on 1 thread, 30 on 2, 28 on 4 and 33 on 8, so more than 4 only adds contention."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus // (2 * max(1, instances))))


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def image_pool(threads: int) -> ThreadPoolExecutor:
    """The process's shared pool for image work, with at least `threads` workers. A caller asking for more than the
    pool has gets a new, larger pool; the old one is not shut down (batches in flight still submit to it) and its
    idle threads stay (a server asks for one thread count only)."""
    global _pool, _pool_threads
    with _pool_lock:
        if _pool is None or _pool_threads < threads:
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vlm-image")
            _pool_threads = threads
        return _pool


class _Inline:
    """An executor that runs each task at once in the calling thread (threads <= 1, the probes, `split_resize`)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller, as a pool would
            future.set_exception(exc)
        return future


# --- jobs ---------------------------------------------------------------------------------------------------------
def _taps(length_in: int, length_out: int) -> int:
    """Coefficients per output pixel of a bicubic pass (Pillow's ksize)."""
    return 2 * math.ceil(2 * max(1.0, length_in / length_out)) + 1


@dataclass
class ResizeJob:
    """`image.resize(size, BICUBIC)`, delivered to `sink` in rectangles or, without a sink, kept in `result`."""

    image: Image.Image
    size: Size
    sink: Sink | None = None
    result: Image.Image | None = None

    def work(self) -> int:
        """A cost estimate (multiply-adds and copies per channel) for sharing the threads between jobs."""
        (w, h), (ow, oh) = self.image.size, self.size
        cost = ow * oh * 2  # delivering the output
        if w != ow:
            cost += h * ow * _taps(w, ow)
        if h != oh:
            cost += oh * ow * _taps(h, oh)
        return cost


def _deliver(job: ResizeJob, x0: int, y0: int, img: Image.Image) -> None:
    if job.sink is not None:
        job.sink(x0, y0, img)
    else:
        assert job.result is not None
        job.result.paste(img, (x0, y0))


def _whole(job: ResizeJob) -> None:
    """The job as one `resize` call (none when the size is unchanged)."""
    out = job.image if job.image.size == job.size else job.image.resize(job.size, BICUBIC)
    if job.sink is not None:
        job.sink(0, 0, out)
    else:
        job.result = out.copy() if out is job.image else out


# --- the split ----------------------------------------------------------------------------------------------------
def _horizontal_first_13(in_size: Size, out_size: Size) -> bool:
    """Pillow >= 13.0: the vertical pass first when the height shrinks by more than twice the width's pixels."""
    dh = in_size[1] - out_size[1]
    return not (dh > 0 and dh > (in_size[0] - out_size[0]) * 2)


def _horizontal_first_always(in_size: Size, out_size: Size) -> bool:
    """Pillow < 13.0."""
    return True


PASS_ORDERS: dict[str, Callable[[Size, Size], bool]] = {
    "pillow13": _horizontal_first_13,
    "horizontal_first": _horizontal_first_always,
}


def _passes(in_size: Size, out_size: Size, horizontal_first: Callable[[Size, Size], bool]) -> list[str]:
    """The passes Pillow runs, in its order: "h" (horizontal) and/or "v" (vertical)."""
    order = "hv" if horizontal_first(in_size, out_size) else "vh"
    return [p for p in order if in_size[p == "v"] != out_size[p == "v"]]


def _bounds(extent: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, extent // MIN_STRIP))
    edges = [extent * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _region(pieces: Sequence[Piece], mode: str, box: tuple[int, int, int, int]) -> Image.Image:
    """The box of the image that `pieces` tile, as one image (a crop when there is one piece)."""
    x0, y0, x1, y1 = box
    if len(pieces) == 1:
        px, py, img = pieces[0]
        return img.crop((x0 - px, y0 - py, x1 - px, y1 - py))
    out = Image.new(mode, (x1 - x0, y1 - y0), None)
    for px, py, img in pieces:
        if px < x1 and py < y1 and px + img.width > x0 and py + img.height > y0:
            out.paste(img, (px - x0, py - y0))
    return out


@dataclass
class _Run:
    """A split job in flight: its passes to come, the current pass's input (pieces of an image of `size`)."""

    job: ResizeJob
    passes: list[str]
    pieces: list[Piece]
    size: Size
    parts: int
    kind: str = ""  # the current pass: "h", "v", or "copy" (no pass: the source goes to the sink in strips)
    last: bool = True  # the current pass delivers to the job
    done: list[Piece] = field(default_factory=list)  # strips of the current pass, when another pass follows
    left: int = 0  # tasks of the current pass still running


def _strip(run: _Run, kind: str, lo: int, hi: int, last: bool) -> Piece | None:
    """One task: rows (kind "h"; "copy" when no pass is needed) or columns ("v") lo..hi of the current pass."""
    (w, h), (ow, oh), mode = run.size, run.job.size, run.job.image.mode
    if kind == "v":
        x0, y0, img = lo, 0, _region(run.pieces, mode, (lo, 0, hi, h)).resize((hi - lo, oh), BICUBIC)
    else:
        img = _region(run.pieces, mode, (0, lo, w, hi))
        x0, y0 = 0, lo
        if kind == "h":
            img = img.resize((ow, hi - lo), BICUBIC)
    if last:
        _deliver(run.job, x0, y0, img)
        return None
    return x0, y0, img


class ResizeBatch:
    """Jobs running on a pool: `start` submits them and returns at once; `wait` blocks until every job has
    delivered (and raises the first task error). Each pass's strips are submitted when the previous pass of the job
    is complete, by the task that completes it (no thread of the caller drives the work)."""

    def __init__(self, jobs: Sequence[ResizeJob], pool: Any, parts: Callable[[ResizeJob], int],
                 horizontal_first: Callable[[Size, Size], bool] | None) -> None:
        self._pool, self._lock, self._finished = pool, threading.Lock(), threading.Event()
        self._error: BaseException | None = None
        self._runs: list[_Run] = []
        self._whole: list[ResizeJob] = []
        for job in jobs:
            run = _Run(job, [], [(0, 0, job.image)], job.image.size, parts(job))
            if horizontal_first is None or job.image.mode not in SPLIT_MODES or run.parts < 2:
                self._whole.append(job)
                continue
            run.passes = _passes(job.image.size, job.size, horizontal_first)
            if job.sink is None:
                if not run.passes:  # the same size: a copy, as Pillow's resize returns
                    job.result = job.image.copy()
                    continue
                job.result = Image.new(job.image.mode, job.size, None)
            self._runs.append(run)
        self._jobs_left = len(self._runs) + len(self._whole)

    def start(self) -> "ResizeBatch":
        if self._jobs_left == 0:
            self._finished.set()
        for job in self._whole:
            self._pool.submit(_whole, job).add_done_callback(lambda f: self._ended(None, f))
        for run in self._runs:
            self._start_pass(run)
        return self

    def wait(self) -> None:
        self._finished.wait()
        if self._error is not None:
            raise self._error

    def _start_pass(self, run: _Run) -> None:
        run.kind = run.passes.pop(0) if run.passes else "copy"
        run.last = not run.passes
        run.done = []
        strips = _bounds(run.size[0] if run.kind == "v" else run.size[1], run.parts)
        run.left = len(strips)  # before any task can end (an inline executor ends them inside submit)
        for lo, hi in strips:
            self._pool.submit(_strip, run, run.kind, lo, hi, run.last).add_done_callback(
                lambda f, run=run: self._ended(run, f))

    def _ended(self, run: _Run | None, future: Future) -> None:
        """A task ended (called in the thread that ran it): start the job's next pass, or count the job finished.
        Nothing may escape from here (the pool would only log it and `wait` would never return)."""
        try:
            error = future.exception()
            with self._lock:
                self._error = self._error or error
                if run is not None:
                    run.left -= 1
                    piece = None if error is not None else future.result()
                    if piece is not None:
                        run.done.append(piece)
                    if run.left:
                        return
                next_pass = run is not None and not run.last and self._error is None
                if next_pass:  # the pass is complete: its strips are the next pass's input
                    (w, h), (ow, oh) = run.size, run.job.size
                    run.size = (ow, h) if run.kind == "h" else (w, oh)
                    run.pieces = run.done
                else:
                    self._job_finished()
            if next_pass:
                self._start_pass(run)
        except BaseException as exc:  # noqa: BLE001 - e.g. no memory for the next pass
            with self._lock:
                self._error = self._error or exc
                self._job_finished()

    def _job_finished(self) -> None:  # with the lock held
        self._jobs_left -= 1
        if self._jobs_left == 0:
            self._finished.set()


def start_resizes(jobs: Sequence[ResizeJob], *, threads: int) -> ResizeBatch:
    """Start the jobs on `threads` threads of the shared pool and return at once (`.wait()` for them); each job
    delivers exactly the bytes of `job.image.resize(job.size, BICUBIC)`. A job large enough for a share of the
    threads is split into strips (module docstring); the others run as one `resize` call each, concurrently.
    threads <= 1: every job runs now, one after the other, in the calling thread."""
    if threads <= 1:
        return ResizeBatch(jobs, _Inline(), lambda _: 1, None).start()
    rule = pass_order_rule()
    total = sum(job.work() for job in jobs) or 1

    def parts(job: ResizeJob) -> int:
        work = job.work()
        return 1 if work < MIN_SPLIT_WORK else math.ceil(2 * threads * work / total)

    return ResizeBatch(jobs, image_pool(threads), parts, PASS_ORDERS[rule] if rule else None).start()


def resize_images(requests: Sequence[tuple[Image.Image, Size]], *, threads: int = 1) -> list[Image.Image]:
    """`image.resize(size, BICUBIC)` of each (image, size), the same bytes, sharing up to `threads` threads."""
    jobs = [ResizeJob(img, (int(size[0]), int(size[1]))) for img, size in requests]
    start_resizes(jobs, threads=threads).wait()
    return [job.result for job in jobs if job.result is not None]


def split_resize(img: Image.Image, size: Size, *, parts: int, horizontal_first: Callable[[Size, Size], bool]
                 ) -> Image.Image:
    """The split resize run in the calling thread with a given pass order, every pass in `parts` strips (at most;
    strips keep MIN_STRIP rows/columns). For the probes and tests."""
    job = ResizeJob(img, size)
    ResizeBatch([job], _Inline(), lambda _: parts, horizontal_first).start().wait()
    assert job.result is not None
    return job.result


_PROBES: tuple[tuple[Size, Size], ...] = (  # (input, output); the first two are ordered differently by the rules
    ((40, 120), (36, 30)),
    ((48, 200), (36, 61)),
    ((120, 40), (30, 36)),
    ((33, 47), (95, 130)),
    ((97, 61), (40, 25)),
    ((64, 64), (64, 17)),
    ((64, 64), (23, 64)),
)


@lru_cache(maxsize=1)
def pass_order_rule() -> str | None:
    """The `PASS_ORDERS` rule the installed Pillow follows (probed once), or None when none reproduces it."""
    rng = np.random.default_rng(0)
    probes = [(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), out) for (w, h), out in _PROBES]
    for name, rule in PASS_ORDERS.items():
        if all(np.array_equal(np.asarray(img.resize(out, BICUBIC)),
                              np.asarray(split_resize(img, out, parts=3, horizontal_first=rule)))
               for img, out in probes):
            return name
    return None
