"""OpenAI-style chat messages parsed into typed values (the preprocess stage's input).

The Triton `preprocess` model receives the `messages` array of an OpenAI chat request as JSON; this module
validates it and turns it into `Message` values. Every problem raises `InvalidRequest` naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Union

from vlm_triton.errors import InvalidRequest

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    url: str
    detail: str | None = None


@dataclass(frozen=True)
class VideoPart:
    url: str


Part = Union[TextPart, ImagePart, VideoPart]


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The text parts joined with newlines (media parts left out)."""
        return "\n".join(p.text for p in self.parts if isinstance(p, TextPart))

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(p for p in self.parts if isinstance(p, ImagePart))

    @property
    def videos(self) -> tuple[VideoPart, ...]:
        return tuple(p for p in self.parts if isinstance(p, VideoPart))


def _url_of(part: dict[str, Any], key: str, where: str) -> tuple[str, str | None]:
    value = part.get(key)
    if isinstance(value, str):  # some clients send {"image_url": "https://..."}
        return value, None
    if not isinstance(value, dict) or not isinstance(value.get("url"), str) or not value["url"]:
        raise InvalidRequest(f"{where}: '{key}' must be an object with a non-empty string 'url'")
    detail = value.get("detail")
    if detail is not None and detail not in ("auto", "low", "high"):
        raise InvalidRequest(f"{where}: '{key}.detail' must be one of auto, low, high")
    return value["url"], detail


def _parse_part(part: Any, where: str) -> Part:
    if not isinstance(part, dict):
        raise InvalidRequest(f"{where}: a content part must be an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}: a text part needs a string 'text'")
        return TextPart(text)
    if kind == "image_url":
        url, detail = _url_of(part, "image_url", where)
        return ImagePart(url, detail)
    if kind == "video_url":
        url, _ = _url_of(part, "video_url", where)
        return VideoPart(url)
    raise InvalidRequest(f"{where}: unsupported content part type {kind!r}; supported: text, image_url, video_url")


def parse_message(obj: Any, index: int) -> Message:
    where = f"messages[{index}]"
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{where} must be an object with 'role' and 'content'")
    role = obj.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role {role!r} is not supported; use one of {', '.join(ROLES)}")
    content = obj.get("content")
    if isinstance(content, str):
        parts: tuple[Part, ...] = (TextPart(content),)
    elif isinstance(content, list):
        parts = tuple(_parse_part(p, f"{where}.content[{i}]") for i, p in enumerate(content))
    elif content is None and role == "assistant":
        parts = (TextPart(""),)
    else:
        raise InvalidRequest(f"{where}.content must be a string or a list of content parts")
    if role != "user" and any(not isinstance(p, TextPart) for p in parts):
        raise InvalidRequest(f"{where}: images and videos are only accepted in user messages")
    return Message(role=role, parts=parts)


def parse_messages(obj: Any) -> list[Message]:
    """Validate an OpenAI `messages` array (already JSON-decoded, or a JSON string)."""
    if isinstance(obj, (str, bytes)):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"messages is not valid JSON: {exc}") from None
    if not isinstance(obj, list) or not obj:
        raise InvalidRequest("messages must be a non-empty list")
    messages = [parse_message(m, i) for i, m in enumerate(obj)]
    if messages[-1].role != "user":
        raise InvalidRequest("the last message must have role 'user'")
    return messages
