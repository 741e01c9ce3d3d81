"""One engine request as the routers drive it.

- The first chunk is awaited before any response starts, so an engine error there (bad image URL, Triton down)
  becomes a proper HTTP error; later errors are sent in-band as an SSE `{"error": ...}` event.
- If the client disconnects, the engine generator is closed, which cancels the Triton request.
- Time to first token (streaming requests) and token counts go to the metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import Request

from openai_frontend.engine.base import EngineError, GenerationChunk, GenerationRequest
from openai_frontend.errors import APIError, error_body
from openai_frontend.protocol import Usage
from openai_frontend.sse import DONE, ChunkEncoder, until_disconnect
from openai_frontend.middleware import ARRIVED_NS
from openai_frontend.state import FrontendState
from vlm_triton import timeline

logger = logging.getLogger("openai_frontend")


class Generation:
    def __init__(self, request: Request, state: FrontendState, spec: GenerationRequest, endpoint: str) -> None:
        self.request = request
        self.spec = spec
        self.endpoint = endpoint
        self.metrics = state.metrics
        self.started = time.perf_counter()
        if timeline.enabled():
            timeline.mark("frontend.http", spec.request_id, at_ns=request.scope.get(ARRIVED_NS))
            timeline.mark("frontend.receive", spec.request_id)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._engine_chunks: AsyncIterator[GenerationChunk] = state.engine.chat(spec)
        self._first: GenerationChunk | None = None
        self._first_text_seen = False
        self._first_sse = False

    @classmethod
    async def start(cls, request: Request, state: FrontendState, spec: GenerationRequest, endpoint: str) -> Generation:
        generation = cls(request, state, spec, endpoint)
        generation._first = await until_disconnect(request.receive, generation._next_engine_chunk())
        return generation

    async def _next_engine_chunk(self) -> GenerationChunk:
        try:
            return await self._engine_chunks.__anext__()
        except StopAsyncIteration:
            raise EngineError(f"the engine returned no output for {self.spec.request_id}") from None

    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens)

    async def chunks(self) -> AsyncGenerator[GenerationChunk, None]:
        """All chunks (the prefetched first one included), with accounting; closing it closes the engine's."""
        assert self._first is not None, "call Generation.start() first"
        try:
            self._account(self._first)
            yield self._first
            async for chunk in self._engine_chunks:
                self._account(chunk)
                yield chunk
        finally:
            close = getattr(self._engine_chunks, "aclose", None)
            if close is not None:
                await close()
            self.metrics.prompt_tokens.labels(self.endpoint).inc(self.prompt_tokens)
            self.metrics.completion_tokens.labels(self.endpoint).inc(self.completion_tokens)

    def _account(self, chunk: GenerationChunk) -> None:
        if chunk.text and not self._first_text_seen:
            self._first_text_seen = True
            if self.spec.stream:
                self.metrics.ttft.labels(self.endpoint).observe(time.perf_counter() - self.started)
        self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason

    async def collect(self) -> str:
        """The whole text (non-streaming); the engine request is cancelled if the client leaves meanwhile."""
        return await until_disconnect(self.request.receive, self._collect())

    async def _collect(self) -> str:
        parts: list[str] = []
        chunks = self.chunks()
        try:
            async for chunk in chunks:
                parts.append(chunk.text)
        finally:
            await chunks.aclose()
        return "".join(parts)

    async def sse(self, encoder: ChunkEncoder) -> AsyncGenerator[bytes, None]:
        """The SSE byte stream: role chunk, one chunk per delta, finish chunk, optional usage chunk, [DONE]."""
        chunks = self.chunks()
        try:
            first = encoder.first()
            if first is not None:
                yield first
            try:
                async for chunk in chunks:
                    if chunk.text:
                        if not self._first_sse:
                            self._first_sse = True
                            timeline.mark("frontend.sse", self.spec.request_id)
                        yield encoder.delta(chunk.text)
            except Exception as exc:  # the status line is sent already: report the error in-band
                if not isinstance(exc, APIError):
                    logger.exception("stream %s failed", self.spec.request_id)
                    exc = APIError(f"internal error: {type(exc).__name__}: {exc}")
                yield encoder.error(error_body(exc.message, exc.status_code, type=exc.error_type, code=exc.code))
                yield DONE
                return
            yield encoder.finish(self.finish_reason or "stop")
            if encoder.include_usage:
                yield encoder.usage(self.prompt_tokens, self.completion_tokens)
            yield DONE
        finally:
            await chunks.aclose()
