"""CLI: `python -m openai_frontend --triton-url localhost:8001 --model-name <served name> --bls-model bls`.

Startup problems are printed as one line that says what to do (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from openai_frontend.serving import bind_workers, configure_logging, serve, server_implementations
from openai_frontend.settings import API_KEY_ENV, DEFAULT_MAX_BODY_BYTES, DEFAULT_PORT, HTTP_PARSERS, LOOPS, Settings
from openai_frontend.workers import supervise
from vlm_triton.errors import SetupError


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
    p.add_argument("--workers", type=int, default=1,
                   help="processes serving the port; they share --max-inflight and /metrics (default: %(default)s)")
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
            workers=a.workers,
        )
    except ValueError as exc:
        p.error(str(exc))
        raise  # unreachable: p.error exits


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    configure_logging(settings)
    try:
        implementations = server_implementations(settings)
        sockets = bind_workers(settings.host, settings.port, settings.workers)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1:
        return supervise(settings, sockets, implementations)
    serve(settings, sockets[0], implementations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
