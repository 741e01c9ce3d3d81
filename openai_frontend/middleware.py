"""One pure-ASGI guard in front of the routes: API key, body size, in-flight limit and request metrics.

Pure ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and the in-flight slot of a
streaming request is held until its last byte is sent.
"""

from __future__ import annotations

import hmac
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openai_frontend.errors import RequestTooLarge, error_response
from openai_frontend.inflight import InflightLimit
from openai_frontend.metrics import Metrics
from openai_frontend.settings import Settings
from vlm_triton import timeline

ARRIVED_NS = "vlm_arrived_ns"  # scope key: when the guard first saw the request (only with a timeline)
GENERATION_ENDPOINTS: dict[str, str] = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


class FrontendGuard:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, inflight: InflightLimit) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.inflight = inflight
        self._bearer = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if timeline.enabled():  # the request's first moment in the app, marked once its id exists (Generation)
            scope[ARRIVED_NS] = time.monotonic_ns()
        path: str = scope["path"]
        headers = Headers(scope=scope)
        if self._bearer is not None and (path == "/v1" or path.startswith("/v1/")) and not self._key_ok(headers):
            response = error_response(
                "invalid or missing API key; send the header 'Authorization: Bearer <key>'", 401, code="invalid_api_key"
            )
            await response(scope, receive, send)
            return
        limit = self.settings.max_body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            too_large = RequestTooLarge(limit)
            await error_response(str(too_large.detail), 413, code="request_too_large")(scope, receive, send)
            return
        receive = _limit_body(receive, limit)
        endpoint = GENERATION_ENDPOINTS.get(path) if scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        await self._generation(endpoint, scope, receive, send)

    def _key_ok(self, headers: Headers) -> bool:
        given = headers.get("authorization", "").encode()
        assert self._bearer is not None
        return hmac.compare_digest(given, self._bearer)

    async def _generation(self, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.inflight.try_acquire():
            self.metrics.requests.labels(endpoint, "429").inc()
            retry = str(self.settings.retry_after_s)
            response = error_response(
                f"the server is serving its limit of {self.settings.max_inflight} requests; retry after {retry} s",
                429,
                code="too_many_requests",
                headers={"Retry-After": retry},
            )
            await response(scope, receive, send)
            return
        self.metrics.inflight.inc()
        status = 500
        started = time.perf_counter()

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.inflight.release()
            self.metrics.inflight.dec()
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def _limit_body(receive: Receive, limit: int) -> Receive:
    """Count body bytes as they arrive (chunked uploads have no Content-Length) and stop past the limit."""
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise RequestTooLarge(limit)
        return message

    return limited
