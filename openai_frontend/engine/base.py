"""The engine interface the HTTP routers talk to, and the typed values that cross it.

Routers turn OpenAI requests into a `GenerationRequest` and OpenAI responses out of `GenerationChunk`s; an engine
knows nothing about HTTP. `TritonGrpcEngine` is the real one, `FakeEngine` serves the router tests.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from openai_frontend.errors import APIError
from vlm_triton.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingOptions:
    """Generation options; each field is named after the BLS input it fills. None leaves the model's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: OpenAI `messages` (JSON-ready dicts, already shape-checked) plus sampling options."""

    request_id: str
    messages: tuple[Mapping[str, Any], ...]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stream: bool = True  # False lets the engine send the whole text in one chunk


@dataclass(frozen=True)
class GenerationChunk:
    """A text delta; token counts are running totals; finish_reason is set ("stop"/"length") on the last chunk."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "vlm-triton"


class EngineError(APIError):
    """The engine failed (HTTP 500 unless a subclass says otherwise); the message is shown to the client."""

    status_code = 500
    error_type = "server_error"
    code = "engine_error"


class InvalidInput(EngineError, InvalidRequest):
    """The request is wrong (bad image URL, prompt too long, ...): HTTP 400 with the engine's message."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_input"


class EngineUnavailable(EngineError):
    """The engine cannot take requests now (Triton down, model not loaded, queue full): HTTP 503."""

    status_code = 503
    code = "engine_unavailable"
    headers: ClassVar[dict[str, str] | None] = {"Retry-After": "1"}


class Engine(ABC):
    """What the routers need from an inference engine."""

    @abstractmethod
    def chat(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Generate for `request`: an async generator (`async def chat(...)` with `yield`).

        Raises `EngineError` (or a subclass) before or between chunks. Closing the generator early (the client
        went away) must cancel the underlying request.
        """

    @abstractmethod
    def models(self) -> list[ModelInfo]:
        """The served models; the first is the default when a request names none."""

    @abstractmethod
    async def ready(self) -> bool:
        """True when a request would be served now (server up and models loaded)."""

    async def close(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Release connections; called once when the app shuts down."""
