"""OpenAI request and response models (the subset this server honours).

Requests accept unknown fields (`extra="allow"`); `ignored_fields` names them so the routers can log them.
Message roles and content shapes are checked here, so malformed requests fail with a 400 before reaching
Triton; what only the model can judge (image URLs, prompt length, last message role) comes back from the BLS
as INVALID_ARGUMENT and is passed through as a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from openai_frontend.engine.base import GenerationRequest, SamplingOptions

UINT64_MAX = 2**64 - 1


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class MediaURL(_Open):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


def _url_object(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value  # some clients send "image_url": "https://..."


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: MediaURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _accept_bare_url(cls, value: Any) -> Any:
        return _url_object(value)


class VideoPart(_Open):
    type: Literal["video_url"]
    video_url: MediaURL

    @field_validator("video_url", mode="before")
    @classmethod
    def _accept_bare_url(cls, value: Any) -> Any:
        return _url_object(value)


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _check_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content' (a string or a list of content parts)")
        media = isinstance(self.content, list) and any(not isinstance(part, TextPart) for part in self.content)
        if media and self.role != "user":
            raise ValueError("images and videos are only accepted in user messages")
        return self


class StreamOptions(_Open):
    include_usage: bool = False


class SamplingFields(_Open):
    """Fields shared by chat and text completions; `model` may be left out (the served model is used)."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, description="extension; 0 or -1 disables top-k")
    seed: int | None = Field(default=None, ge=0, le=UINT64_MAX)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, description="extension")
    ignore_eos: bool | None = Field(default=None, description="extension for benchmarks")
    n: int | None = None
    user: str | None = None

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream(cls, stream: Any) -> Any:
        return False if stream is None else stream

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError(f"n={n} is not supported; this server returns exactly one choice per request (n=1)")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop is not None and any(s == "" for s in ([stop] if isinstance(stop, str) else stop)):
            raise ValueError("stop strings must not be empty")
        return stop

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int | None = None) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=max_tokens if max_tokens is not None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0 if self.top_k == -1 else self.top_k,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            ignore_eos=self.ignore_eos,
        )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def generation_request(self, request_id: str) -> GenerationRequest:
        messages = tuple(m.model_dump(mode="json", exclude_none=True) for m in self.messages)
        return GenerationRequest(request_id, messages, self.sampling(self.max_completion_tokens), self.stream)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError(f"exactly one prompt per request is supported, got {len(prompt)}")
        return prompt

    def generation_request(self, request_id: str) -> GenerationRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        messages = ({"role": "user", "content": prompt},)  # the chat template is applied (documented)
        return GenerationRequest(request_id, messages, self.sampling(), self.stream)


def ignored_fields(request: BaseModel) -> list[str]:
    """Names of the unknown fields of a request (top level and per message) that this server ignores."""
    names = list(request.model_extra or {})
    if isinstance(request, SamplingFields) and request.stream_options is not None:
        names += [f"stream_options.{k}" for k in request.stream_options.model_extra or {}]
    for i, message in enumerate(getattr(request, "messages", None) or ()):
        names += [f"messages[{i}].{k}" for k in message.model_extra or {}]
    return names


# --- responses ------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
