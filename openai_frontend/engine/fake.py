"""A deterministic in-process engine for router tests (no Triton).

It answers `echo: <text of the last user message>` one word per chunk, with the stream semantics of the BLS:
running token counts, finish_reason only on the last chunk, "length" when max_tokens cut it short, "stop" when a
stop string or the end was reached. An image URL starting with `bad://` fails the way Triton reports a bad image
(InvalidInput); `error=` makes every request fail, or with `fail_after=k` fail after k chunks; `delay_s` slows
each word so tests can disconnect mid-way; `cancelled` (a threading.Event, as tests run the server in another
thread) is set when a request is abandoned.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

from openai_frontend.engine.base import (
    Engine,
    EngineError,
    GenerationChunk,
    GenerationRequest,
    InvalidInput,
    ModelInfo,
)

IMAGE_TOKENS = 16  # prompt tokens the fake charges per image or video


class FakeEngine(Engine):
    def __init__(
        self,
        model_name: str = "fake-vlm",
        *,
        delay_s: float = 0.0,
        error: EngineError | None = None,
        fail_after: int | None = None,
        is_ready: bool = True,
    ) -> None:
        self.model_name = model_name
        self.delay_s = delay_s
        self.error = error
        self.fail_after = fail_after  # raise `error` (or an EngineError) after this many chunks
        self.is_ready = is_ready
        self.requests: list[GenerationRequest] = []
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.closed = False

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self.model_name, created=1_700_000_000, owned_by="fake")]

    async def ready(self) -> bool:
        return self.is_ready

    async def close(self) -> None:
        self.closed = True

    async def chat(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        self.started.set()
        if self.error is not None and self.fail_after is None:
            raise self.error
        for url in _media_urls(request.messages):
            if url.startswith("bad://"):
                raise InvalidInput(f"could not load image {url!r}: unsupported URL scheme 'bad'; use http(s) or data:")
        prompt_tokens = sum(len(_text(m).split()) for m in request.messages) + IMAGE_TOKENS * len(
            list(_media_urls(request.messages))
        )
        words, finish = reply_words(request)
        done = False
        try:
            pieces = (
                [" ".join(words)] if not request.stream else [w if i == 0 else " " + w for i, w in enumerate(words)]
            )
            for i, piece in enumerate(pieces):
                if i == self.fail_after:
                    done = True
                    raise self.error or EngineError("the fake engine failed mid-stream")
                if self.delay_s:  # per word, also when the whole text comes in one chunk
                    await asyncio.sleep(self.delay_s * (1 if request.stream else max(len(words), 1)))
                count = len(words) if not request.stream else i + 1
                last = i == len(pieces) - 1
                yield GenerationChunk(piece, finish if last else None, prompt_tokens, count)
            if not pieces:
                yield GenerationChunk("", finish, prompt_tokens, 0)
            done = True
        finally:
            if not done:
                self.cancelled.set()


def reply_words(request: GenerationRequest) -> tuple[list[str], str]:
    """The words the fake answers with and the finish reason, after stop strings and max_tokens."""
    last_user = next((m for m in reversed(request.messages) if m.get("role") == "user"), None)
    text = "echo: " + (_text(last_user) if last_user is not None else "")
    finish = "stop"
    for stop in request.sampling.stop:
        if stop in text:
            text = text[: text.index(stop)]
    words = text.split()
    limit = request.sampling.max_tokens
    if limit is not None and request.sampling.ignore_eos:  # benchmarks: always generate exactly max_tokens
        words = (words * (limit // max(len(words), 1) + 1))[:limit]
    if limit is not None and (len(words) > limit or request.sampling.ignore_eos):
        words, finish = words[:limit], "length"
    return words, finish


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _media_urls(messages: tuple[Mapping[str, Any], ...]) -> list[str]:
    urls: list[str] = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            for key in ("image_url", "video_url"):
                value = part.get(key) if isinstance(part, dict) else None
                if isinstance(value, dict) and isinstance(value.get("url"), str):
                    urls.append(value["url"])
    return urls
