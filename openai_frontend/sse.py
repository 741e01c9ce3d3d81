"""Server-sent events: pre-rendered chunk templates, and a response that stops when the client goes away.

Each SSE chunk is built from the delta only: everything around the text (id, model, created, choice envelope)
is rendered to bytes once per request, so the work per token does not grow with the text already sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable
from contextlib import suppress
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from openai_frontend.errors import ClientDisconnected

DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class ChunkEncoder:
    """SSE chunks of one completion stream; subclasses say how a text delta sits inside the choice."""

    object_name = ""
    choice_key = ""

    def __init__(self, request_id: str, created: int, model: str, *, include_usage: bool = False) -> None:
        self.include_usage = include_usage
        envelope = (
            f'{{"id":{_json(request_id)},"object":"{self.object_name}","created":{created},"model":{_json(model)}'
        )
        usage_null = ',"usage":null' if include_usage else ""
        self._head = f'data: {envelope},"choices":[{{"index":0,"{self.choice_key}":'.encode()
        self._tail = f',"logprobs":null,"finish_reason":null}}]{usage_null}}}\n\n'.encode()
        self._finish_head = b',"logprobs":null,"finish_reason":'
        self._finish_tail = f"}}]{usage_null}}}\n\n".encode()
        self._usage_head = f'data: {envelope},"choices":[],"usage":'.encode()

    def _payload(self, text: str) -> bytes:
        raise NotImplementedError

    def first(self) -> bytes | None:
        """A chunk sent before any text (the chat role), or None."""
        return None

    def delta(self, text: str) -> bytes:
        return self._head + self._payload(text) + self._tail

    def finish(self, reason: str) -> bytes:
        return self._head + self._empty_payload() + self._finish_head + _json(reason).encode() + self._finish_tail

    def _empty_payload(self) -> bytes:
        return self._payload("")

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        total = prompt_tokens + completion_tokens
        body = f'{{"prompt_tokens":{prompt_tokens},"completion_tokens":{completion_tokens},"total_tokens":{total}}}}}'
        return self._usage_head + body.encode() + b"\n\n"

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return f"data: {_json(body)}\n\n".encode()


class ChatChunkEncoder(ChunkEncoder):
    object_name = "chat.completion.chunk"
    choice_key = "delta"

    def _payload(self, text: str) -> bytes:
        return b'{"content":' + _json(text).encode() + b"}"

    def _empty_payload(self) -> bytes:
        return b"{}"

    def first(self) -> bytes:
        return self._head + b'{"role":"assistant","content":""}' + self._tail


class CompletionChunkEncoder(ChunkEncoder):
    object_name = "text_completion"
    choice_key = "text"

    def _payload(self, text: str) -> bytes:
        return _json(text).encode()


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (call only after the request body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


class EventStreamResponse(StreamingResponse):
    """Streams SSE bytes while watching for the client to leave; closes the event generator either way.

    Starlette's own StreamingResponse (ASGI spec >= 2.4) notices a gone client only on the next send and leaves
    the generator to the garbage collector; here the generation is cancelled at once.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        watching = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watching):
                task.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
            await self._events.aclose()
        if not streaming.cancelled() and (exc := streaming.exception()) is not None and not isinstance(exc, OSError):
            raise exc
