"""MiniCPM-V-2.6 conversations: OpenAI messages -> the reference `chat()` messages -> ChatML prompt (spec 4.3).

`chat()` turns every message's content list into one string: items joined with "\\n", each image becoming
`(<image>./</image>)`, in content order; an optional system prompt goes first as a system message. The result is
rendered with the checkpoint tokenizer's chat template (Qwen2 ChatML, `add_generation_prompt=True`), and the
processor then replaces the i-th `(<image>./</image>)` with that image's placeholder (`image_placeholder`).

Mapping from OpenAI messages (what we add to the reference):
- System messages (several are joined with "\\n") become the system prompt, placed first wherever they were.
- Images of any user message, first turn or later, keep their position in that message's content: an OpenAI
  request carries the whole conversation, so every image of the history is encoded again on each request.
- A video part with F sampled frames becomes F consecutive `(<image>./</image>)` items (the model card passes the
  frames as images); the frames of a request follow `video_slicing()` (no image ids, at most 2 slices).
- The markers (`<image>`, `</image>`, `<slice>`, `</slice>`, `<image_id>`, `</image_id>`, `<unk>`) and the literal
  image tag are refused in message text: they would desynchronise the image slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_triton.errors import InvalidRequest, SetupError
from vlm_triton.multimodal.minicpmv_slicing import PlaceholderTokens
from vlm_triton.prompt.messages import ImagePart, Message, TextPart, VideoPart

IMAGE_TAG = "(<image>./</image>)"
VIDEO_MAX_SLICE_NUMS = 2  # the model card's encode_video example (1 when short of memory)


@dataclass(frozen=True)
class SlicingOptions:
    """Request-wide processor options (the reference passes them to one `chat()` call)."""

    max_slice_nums: int
    use_image_id: bool


def video_slicing(options: SlicingOptions) -> SlicingOptions:
    """The card's settings for a request that carries video frames."""
    return SlicingOptions(max_slice_nums=min(options.max_slice_nums, VIDEO_MAX_SLICE_NUMS), use_image_id=False)


def prompt_media(messages: Sequence[Message]) -> list[ImagePart | VideoPart]:
    """Image and video parts in prompt order."""
    return [p for m in messages for p in m.parts if isinstance(p, (ImagePart, VideoPart))]


def _check_text(text: str, where: str, tokens: PlaceholderTokens) -> None:
    for marker in (IMAGE_TAG, *tokens.all()):
        if marker in text:
            raise InvalidRequest(
                f"{where} contains the reserved marker {marker!r}; attach images as image_url parts instead"
            )


def chat_messages(
    messages: Sequence[Message],
    *,
    frames_per_video: Sequence[int] = (),
    tokens: PlaceholderTokens = PlaceholderTokens(),
) -> list[dict[str, str]]:
    """The role/content list `chat()` hands to `apply_chat_template` (system prompt first, if any)."""
    if not messages:
        raise InvalidRequest("messages must be a non-empty list")
    if messages[-1].role != "user":
        raise InvalidRequest("the last message must have role 'user'")
    frames = [int(n) for n in frames_per_video]
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        items: list[str] = []
        for part in message.parts:
            if isinstance(part, TextPart):
                _check_text(part.text, where, tokens)
                items.append(part.text)
            elif message.role != "user":
                raise InvalidRequest(f"{where}: images and videos are only accepted in user messages")
            elif isinstance(part, ImagePart):
                items.append(IMAGE_TAG)
            else:
                if not frames:
                    raise ValueError(f"{where}: no frame count given for its video (pass frames_per_video)")
                count = frames.pop(0)
                if count < 1:
                    raise ValueError(f"{where}: a video needs at least one frame, got {count}")
                items.extend([IMAGE_TAG] * count)
        content = "\n".join(items)
        if message.role == "system":
            system.append(content)
        else:
            turns.append({"role": message.role, "content": content})
    if frames:
        raise ValueError(f"frames_per_video has {len(frames)} more entries than the messages have videos")
    system_prompt = "\n".join(system)  # the reference adds a system message only for a non-empty prompt
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + turns


def render_prompt(chat: list[dict[str, str]], *, tokenizer: Any) -> str:
    """The checkpoint's chat template over `chat`, ending with the open assistant turn (the reference path)."""
    if not getattr(tokenizer, "chat_template", None):
        raise SetupError("the checkpoint's tokenizer has no chat_template; MiniCPM-V needs its ChatML template")
    return str(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))


def expand_image_tags(prompt: str, placeholders: Sequence[str]) -> str:
    """Replace the k-th `(<image>./</image>)` (left to right) with placeholders[k]; a count mismatch is a bug."""
    pieces = prompt.split(IMAGE_TAG)
    if len(pieces) - 1 != len(placeholders):
        raise ValueError(f"the prompt has {len(pieces) - 1} image tags but {len(placeholders)} placeholders were given")
    out = [pieces[0]]
    for placeholder, piece in zip(placeholders, pieces[1:]):
        out.append(placeholder + piece)
    return "".join(out)
