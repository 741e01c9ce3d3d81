"""Several frontend processes serving one port (`--workers N`).

One process's event loop takes requests in one at a time (on an H100 host ~0.7 ms each: the body, its validation,
the gRPC stream), so the last of a burst of 64 arrivals waits 45-80 ms before reaching Triton (docs/benchmarks.md,
item 46). With N workers the kernel spreads new connections over them (one SO_REUSEPORT socket each, by a hash of the
connection's addresses; a shared socket would let the worker that woke last take most of them), and a burst that
arrives over those connections is taken in N ways at once.

What the workers share:
- the port: the supervisor binds every worker's socket (a busy port is reported before any worker starts);
- the in-flight limit: one counter in shared memory, so `--max-inflight` caps the server, not each worker;
- the metrics: prometheus_client's multiprocess mode (a fresh PROMETHEUS_MULTIPROC_DIR per server, or the one the
  deployment sets, emptied of earlier runs' files), so /metrics on any worker reports the whole server.

The supervisor only watches: SIGTERM or SIGINT stops every worker (each finishes its streams, as one process does),
and a worker that dies stops the server with exit status 1, so that a process manager restarts it whole.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from multiprocessing.connection import wait
from typing import Any

from openai_frontend.metrics import MULTIPROC_ENV, multiprocess_dir
from openai_frontend.serving import configure_logging, serve
from openai_frontend.settings import Settings

logger = logging.getLogger("openai_frontend")


def _die_with_supervisor() -> None:
    """SIGTERM this worker when the supervisor dies, even by SIGKILL (Linux: prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the supervisor's own stop is all there is
        pass


def _worker(settings: Settings, sock: socket.socket, implementations: tuple[str, str], shared_inflight: Any,
            index: int, supervisor: int) -> None:
    """A worker process (spawned: a fresh interpreter, so gRPC and the event loop start clean)."""
    _die_with_supervisor()
    if os.getppid() != supervisor:  # it died before the line above
        return
    configure_logging(settings)
    try:
        serve(settings, sock, implementations, shared_inflight, worker=f"worker {index + 1}/{settings.workers}: ")
    except Exception:
        logger.exception("frontend worker %d failed", index + 1)
        sys.exit(1)


METRICS_DIR_PREFIX = "vlm-frontend-metrics-"  # + the supervisor's pid + "-": a fresh folder per server


def remove_stale_metrics_dirs(parent: str) -> None:
    """Remove the metrics folders of supervisors that are gone (killed outright, they could not remove their own)."""
    for path in glob.glob(os.path.join(parent, f"{METRICS_DIR_PREFIX}*-*")):
        pid = os.path.basename(path)[len(METRICS_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(path, ignore_errors=True)


def metrics_dir_for_this_run() -> tuple[str, bool]:
    """(the workers' PROMETHEUS_MULTIPROC_DIR, whether this supervisor made it). A folder set by the deployment is
    emptied of earlier runs' files, which prometheus_client would otherwise add to this run's values."""
    given = multiprocess_dir()
    if given is not None:
        for stale in glob.glob(os.path.join(given, "*.db")):
            os.remove(stale)
        return given, False
    remove_stale_metrics_dirs(tempfile.gettempdir())
    return tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-"), True


def supervise(settings: Settings, sockets: list[socket.socket], implementations: tuple[str, str]) -> int:
    """Start one worker per socket (bound to one port with SO_REUSEPORT) and wait for them; the exit status.
    `implementations`: the (event loop, HTTP parser) each worker runs (`serving.server_implementations`)."""
    from prometheus_client import multiprocess

    metrics_dir, made_dir = metrics_dir_for_this_run()
    os.environ[MULTIPROC_ENV] = metrics_dir  # the workers inherit the environment: their metrics go to files there
    ctx = multiprocessing.get_context("spawn")
    shared_inflight = ctx.Value("i", 0)
    workers = [ctx.Process(target=_worker, args=(settings, sock, implementations, shared_inflight, i, os.getpid()),
                           name=f"frontend-worker-{i + 1}") for i, sock in enumerate(sockets)]
    stopping = False

    def stop(signum: int | None = None, frame: Any = None) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            if w.pid is not None and w.exitcode is None:
                w.terminate()  # SIGTERM: the worker's uvicorn finishes its streams and exits

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        for w in workers:
            if stopping:  # a stop signal while starting: start no more, and stop the ones started (below)
                break
            w.start()
        for sock in sockets:
            sock.close()  # the workers hold them now
        if stopping:
            stop()  # a worker started after the signal was handled did not get it
        else:
            logger.info("frontend: %d workers on port %d (pids %s)", len(workers), settings.port,
                        ", ".join(str(w.pid) for w in workers))
        running = [w for w in workers if w.pid is not None]
        while running:
            done = wait([w.sentinel for w in running])
            for w in [w for w in running if w.sentinel in done]:
                w.join()
                running.remove(w)
                multiprocess.mark_process_dead(w.pid, metrics_dir)
                if not stopping:
                    logger.error("frontend %s (pid %s) exited with code %s; stopping the other workers", w.name,
                                 w.pid, w.exitcode)
                    status = 1
                    stop()
    finally:
        stop()
        for w in workers:
            if w.pid is not None:
                w.join(10)
                if w.exitcode is None:
                    w.kill()
                    w.join(5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if made_dir:
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return status
