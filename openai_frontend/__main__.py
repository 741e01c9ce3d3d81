"""CLI: `python -m openai_frontend --triton-url localhost:8001 --model-name <served name> --bls-model bls`.

Startup problems are printed as one line that says what to do (exit status 2).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import socket
import sys
from collections.abc import Sequence

import uvicorn

from openai_frontend import loop_lag
from openai_frontend.app import create_app
from openai_frontend.engine.triton_grpc import TritonGrpcEngine
from openai_frontend.settings import API_KEY_ENV, DEFAULT_MAX_BODY_BYTES, DEFAULT_PORT, HTTP_PARSERS, LOOPS, Settings
from vlm_triton.errors import SetupError
from vlm_triton.gc_heap import freeze_heap
from vlm_triton.step_stats import log_timing


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m openai_frontend", description="OpenAI-compatible API over Triton")
    p.add_argument("--triton-url", default="localhost:8001", help="Triton gRPC address (default: %(default)s)")
    p.add_argument("--model-name", required=True, help="model id clients send in `model` and see in /v1/models")
    p.add_argument("--bls-model", default="bls", help="Triton name of the BLS model (default: %(default)s)")
    p.add_argument("--host", default="0.0.0.0", help="listen address (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="listen port (default: %(default)s)")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer <key>' on /v1 routes (default: ${API_KEY_ENV})",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow this browser origin ('*' for any); repeatable",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=256,
        help="generation requests served at once; more get 429 (default: %(default)s)",
    )
    p.add_argument(
        "--retry-after", type=int, default=1, metavar="SECONDS", help="Retry-After sent with 429 (default: %(default)s)"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body (default: %(default)s)"
    )
    p.add_argument(
        "--triton-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="deadline of one Triton request (default: none)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--loop", default="auto", choices=LOOPS,
                   help="event loop (default: %(default)s = uvloop when installed, else asyncio)")
    p.add_argument("--http", default="auto", choices=HTTP_PARSERS,
                   help="HTTP/1.1 parser (default: %(default)s = httptools when installed, else h11)")
    p.add_argument("--freeze-heap", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze the start-up heap out of Python's garbage collection (default: on)")
    a = p.parse_args(argv)
    try:
        return Settings(
            host=a.host,
            port=a.port,
            triton_url=a.triton_url,
            model_name=a.model_name,
            bls_model=a.bls_model,
            triton_timeout_s=a.triton_timeout,
            api_key=a.api_key,
            cors_origins=tuple(a.cors_origin),
            max_inflight=a.max_inflight,
            retry_after_s=a.retry_after,
            max_body_bytes=a.max_body_bytes,
            log_level=a.log_level,
            loop=a.loop,
            http=a.http,
            freeze_heap=a.freeze_heap,
        )
    except ValueError as exc:
        p.error(str(exc))
        raise  # unreachable: p.error exits


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


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a busy port is reported in one line before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SetupError(f"port {port} is in use; pass --port") from None
        raise SetupError(f"cannot listen on {host}:{port}: {exc.strerror}; pass --host/--port") from None
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        loop, http = server_implementations(settings)
        sock = bind(settings.host, settings.port)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = TritonGrpcEngine(
        settings.triton_url, settings.model_name, settings.bls_model, stream_timeout_s=settings.triton_timeout_s
    )
    config = uvicorn.Config(create_app(engine, settings), log_level=settings.log_level, timeout_graceful_shutdown=5,
                            loop=loop, http=http)
    logging.getLogger("openai_frontend").info(
        "serving %s on http://%s:%d (Triton %s, BLS model %s; %s loop, %s parser)",
        settings.model_name,
        settings.host,
        settings.port,
        settings.triton_url,
        settings.bls_model,
        loop,
        http,
    )
    if settings.freeze_heap:
        freeze_heap()  # what start-up made lives as long as the process
    log_timing({"": loop_lag.TIMING}, "frontend")  # VLM_TRITON_STEP_STATS: garbage collections, the loop's lag
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
