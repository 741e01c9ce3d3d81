"""The frontend's settings: one frozen value built by the CLI (or by tests) and read by the app."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PORT = 9997
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # base64 images are large
API_KEY_ENV = "VLM_TRITON_API_KEY"
LOOPS = ("auto", "asyncio", "uvloop")  # uvicorn's event loop choices; auto = uvloop when installed
HTTP_PARSERS = ("auto", "h11", "httptools")  # uvicorn's HTTP/1.1 parsers; auto = httptools when installed


@dataclass(frozen=True)
class Settings:
    # where the frontend listens
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    # where Triton is (used by TritonGrpcEngine only)
    triton_url: str = "localhost:8001"
    model_name: str = "vlm"  # the served name clients put in `model`
    bls_model: str = "bls"
    triton_timeout_s: float | None = None  # gRPC stream deadline per request
    # protection
    api_key: str | None = None  # Bearer key required on every /v1 route when set
    cors_origins: tuple[str, ...] = ()
    max_inflight: int = 256  # generation requests at once; more get 429 + Retry-After
    retry_after_s: int = 1
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_level: str = "info"
    # the HTTP server: uvloop and httptools (dependencies of the package) are C implementations of what asyncio and
    # h11 do in Python; each request's parsing and each streamed chunk cost less with them (docs/benchmarks.md)
    loop: str = "auto"
    http: str = "auto"
    # move the start-up objects out of Python's garbage collection once serving (vlm_triton/gc_heap.py): a full
    # collection of them stops every stream of this process for tens of ms
    freeze_heap: bool = True
    # processes serving the one listening socket (openai_frontend/workers.py); they share the in-flight limit and the
    # metrics, and a burst of arrivals is taken in by all of them at once
    workers: int = 1

    def __post_init__(self) -> None:
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {self.loop!r}")
        if self.http not in HTTP_PARSERS:
            raise ValueError(f"http must be one of {', '.join(HTTP_PARSERS)}, got {self.http!r}")
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
