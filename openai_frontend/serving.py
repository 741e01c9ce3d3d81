"""One frontend process serving a bound socket: the event loop and HTTP parser uvicorn runs, the Triton engine, the app.

`python -m openai_frontend` calls `serve` itself with one worker, or starts `--workers` processes that each call it
(openai_frontend/workers.py)."""

from __future__ import annotations

import errno
import importlib
import logging
import socket
from typing import Any

import uvicorn

from openai_frontend import loop_lag
from openai_frontend.app import create_app
from openai_frontend.engine.triton_grpc import TritonGrpcEngine
from openai_frontend.settings import Settings
from vlm_triton.errors import SetupError
from vlm_triton.gc_heap import freeze_heap
from vlm_triton.step_stats import log_timing

logger = logging.getLogger("openai_frontend")


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def server_implementations(settings: Settings) -> tuple[str, str]:
    """(event loop, HTTP parser) for uvicorn: 'auto' resolved the way uvicorn resolves it (the C implementation when
    it imports), so the log names what runs. Asking for one that does not import is a SetupError."""
    installed = {name: _imports(name) for name in ("uvloop", "httptools")}
    loop = settings.loop if settings.loop != "auto" else ("uvloop" if installed["uvloop"] else "asyncio")
    http = settings.http if settings.http != "auto" else ("httptools" if installed["httptools"] else "h11")
    for name in (loop, http):
        if name in installed and not installed[name]:
            raise SetupError(f"{name} is not installed: pip install {name}, or pass --loop asyncio / --http h11")
    return loop, http


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The listening socket, bound here so a busy port is reported in one line before anything starts. `reuse_port`:
    one of several sockets on the port (SO_REUSEPORT), among which the kernel spreads new connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SetupError(f"port {port} is in use; pass --port") from None
        raise SetupError(f"cannot listen on {host}:{port}: {exc.strerror}; pass --host/--port") from None
    sock.set_inheritable(True)
    return sock


def bind_workers(host: str, port: int, workers: int) -> list[socket.socket]:
    """One listening socket per worker. With several, a plain bind first: SO_REUSEPORT sockets share a port with any
    other SO_REUSEPORT socket of the same user, so without it a second server started on a port in use would take a
    share of its connections instead of failing."""
    if workers == 1:
        return [bind(host, port)]
    bind(host, port).close()
    return [bind(host, port, reuse_port=True) for _ in range(workers)]


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(settings: Settings, sock: socket.socket, implementations: tuple[str, str], shared_inflight: Any = None,
          worker: str = "") -> None:
    """Serve on `sock` until told to stop (SIGINT / SIGTERM), with the (event loop, HTTP parser) that
    `server_implementations` resolved. `shared_inflight` and `worker` ("worker 2/4 ") come from the supervisor of
    several workers."""
    loop, http = implementations
    engine = TritonGrpcEngine(
        settings.triton_url, settings.model_name, settings.bls_model, stream_timeout_s=settings.triton_timeout_s
    )
    config = uvicorn.Config(create_app(engine, settings, shared_inflight), log_level=settings.log_level,
                            timeout_graceful_shutdown=5, loop=loop, http=http)
    logger.info("%sserving %s on http://%s:%d (Triton %s, BLS model %s; %s loop, %s parser)", worker,
                settings.model_name, settings.host, settings.port, settings.triton_url, settings.bls_model, loop, http)
    if settings.freeze_heap:
        freeze_heap()  # what start-up made lives as long as the process
    log_timing({"": loop_lag.TIMING}, "frontend")  # VLM_TRITON_STEP_STATS: garbage collections, the loop's lag
    uvicorn.Server(config).run(sockets=[sock])
