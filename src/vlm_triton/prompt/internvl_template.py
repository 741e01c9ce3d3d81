"""InternVL conversation templates and `<image>` placeholders (model_specs.md 4.1, 4.2).

Rendering ("MPT" style, as the reference `conversation.py`):

    system_template.format(system) + sep
    + for each earlier user/assistant message: role + text + sep
    + roles[1]                                   # the open assistant turn

System text: the OpenAI system message(s) (several are joined with "\\n") override `system_message`
(the checkpoint's `config.system_message`, when the caller passes one), which overrides the template default.

Image placeholders, per user message (text parts joined with "\\n", as `Message.text`):

- The user wrote `<image>` in the text: the count must equal the number of images attached to that message
  (`InvalidRequest` otherwise); the text is kept as written. Videos cannot be combined with written placeholders.
- No `<image>` written and exactly one image: `"<image>\\n" + text` (what the reference `chat()` does on the
  first turn).
- No `<image>` written and several images: `"Image-1: <image>\\nImage-2: <image>\\n" + text` (the model cards'
  multi-image form).
- One video with F sampled frames: `"Frame1: <image>\\n...FrameF: <image>\\n" + text` (the cards' video form).
  At most one video per message, and not together with images.

Images attached to earlier turns. The reference `chat()` adds `<image>\\n` only when the history is empty, and
keeps later images only through placeholders already present in the history text. An OpenAI request carries the
whole conversation every time, so we do what LMDeploy and vLLM do: **every user message gets its own
placeholders by the rules above, whichever turn it is**, and they stay in place in the history. For a first-turn
image this is byte-identical to the reference; an image sent in a later turn (which the reference would leave
without a placeholder) is placed in that later message. All images of the conversation are therefore encoded
again on each request.

Order: the k-th `<image>` of the rendered prompt (left to right, history included) belongs to the k-th visual
unit when walking messages in order, their image/video parts in order, and each video's frames in order
(`prompt_media` lists the parts). `expand_image_placeholders` then replaces them with
`<img>` + `<IMG_CONTEXT>` * n_k + `</img>`.

Safety: `<img>`, `</img>` and `<IMG_CONTEXT>` are refused in any message text (they would desynchronise the image
features), and `<image>` is refused in system and assistant messages. Other special strings (e.g. `<|im_end|>`)
pass through unchanged, as in the reference.

One deliberate difference: the reference MPT renderer drops the separator after an *empty* message (`if message:`);
we always render `role + text + sep`, so an empty assistant turn in the history does not glue two roles together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vlm_triton.errors import InvalidRequest, SetupError
from vlm_triton.prompt.messages import ImagePart, Message, VideoPart

IMAGE_PLACEHOLDER = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
_RESERVED = (IMG_START, IMG_END, IMG_CONTEXT)

INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
INTERNLM2_CHAT_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


@dataclass(frozen=True)
class InternVLTemplate:
    """One conversation template ("MPT" separator style)."""

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]  # (user, assistant) prefixes
    sep: str
    stop_strings: tuple[str, ...]  # strings that end generation (the reference cuts at sep.strip())

    def system_prompt(self, system_message: str) -> str:
        return self.system_template.format(system_message=system_message)


_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
_CHATML_SYSTEM = "<|im_start|>system\n{system_message}"

TEMPLATES: dict[str, InternVLTemplate] = {
    t.name: t
    for t in (
        # InternVL2.5 / InternVL3
        InternVLTemplate(
            name="internvl2_5",
            system_template=_CHATML_SYSTEM,
            system_message=INTERNVL2_5_SYSTEM,
            roles=_CHATML_ROLES,
            sep="<|im_end|>\n",
            stop_strings=("<|im_end|>",),
        ),
        # InternVL-Chat-V1.5 / InternVL2 (InternLM2 LLMs): no newline after <|im_end|>
        InternVLTemplate(
            name="internlm2-chat",
            system_template=_CHATML_SYSTEM,
            system_message=INTERNLM2_CHAT_SYSTEM,
            roles=_CHATML_ROLES,
            sep="<|im_end|>",
            stop_strings=("<|im_end|>",),
        ),
        # Same prompt as internlm2-chat at inference (it differs only in training-time BOS handling)
        InternVLTemplate(
            name="Hermes-2",
            system_template=_CHATML_SYSTEM,
            system_message=INTERNLM2_CHAT_SYSTEM,
            roles=_CHATML_ROLES,
            sep="<|im_end|>",
            stop_strings=("<|im_end|>", "<|endoftext|>"),
        ),
    )
}


def get_template(name: str) -> InternVLTemplate:
    """The template named by a checkpoint's `config.template`."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise SetupError(
            f"unsupported InternVL conversation template {name!r}; supported: {', '.join(TEMPLATES)}"
        ) from None


def prompt_media(messages: Sequence[Message]) -> list[ImagePart | VideoPart]:
    """The image/video parts in the order their placeholders appear in the rendered prompt."""
    return [p for m in messages for p in m.parts if isinstance(p, (ImagePart, VideoPart))]


def _check_reserved(text: str, where: str) -> None:
    for marker in _RESERVED:
        if marker in text:
            raise InvalidRequest(
                f"{where} contains the reserved marker {marker!r}; "
                f"attach images as image_url parts (or write {IMAGE_PLACEHOLDER!r} in a user message)"
            )


def _user_text(message: Message, where: str, frames: list[int]) -> str:
    """The user text with its `<image>` placeholders (see the module docstring); consumes `frames`."""
    text = message.text
    images = message.images
    videos = message.videos
    written = text.count(IMAGE_PLACEHOLDER)
    if videos and (images or len(videos) > 1):
        raise InvalidRequest(
            f"{where}: a message may carry one video, or images, but not both nor several videos; "
            "send them in separate user messages"
        )
    if written:
        if videos:
            raise InvalidRequest(f"{where}: {IMAGE_PLACEHOLDER!r} placeholders cannot be combined with a video")
        if written != len(images):
            raise InvalidRequest(
                f"{where}: the text has {written} {IMAGE_PLACEHOLDER!r} placeholder(s) but {len(images)} image(s) "
                f"are attached; write one {IMAGE_PLACEHOLDER!r} per attached image, or none to place them "
                "automatically"
            )
        return text
    if videos:
        if not frames:
            raise ValueError(f"{where}: no frame count given for its video (pass video_frames)")
        count = frames.pop(0)
        if count < 1:
            raise ValueError(f"{where}: a video needs at least one frame, got {count}")
        return "".join(f"Frame{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, count + 1)) + text
    if len(images) == 1:
        return f"{IMAGE_PLACEHOLDER}\n" + text
    if images:
        return "".join(f"Image-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, len(images) + 1)) + text
    return text


def render_internvl_prompt(
    messages: Sequence[Message],
    *,
    template: InternVLTemplate | str,
    system_message: str | None = None,
    video_frames: Sequence[int] = (),
) -> str:
    """The reference prompt string for an OpenAI conversation, ending with the open assistant turn.

    `system_message`: the checkpoint's `config.system_message` (None = the template default); an OpenAI system
    message overrides both. `video_frames`: the number of sampled frames of each video part, in prompt order.
    """
    tpl = get_template(template) if isinstance(template, str) else template
    if not messages:
        raise InvalidRequest("messages must be a non-empty list")
    if messages[-1].role != "user":
        raise InvalidRequest("the last message must have role 'user'")
    frames = [int(n) for n in video_frames]
    system_texts: list[str] = []
    turns: list[str] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        text = message.text
        _check_reserved(text, where)
        if message.role == "user":
            turns.append(tpl.roles[0] + _user_text(message, where, frames) + tpl.sep)
            continue
        if message.images or message.videos:
            raise InvalidRequest(f"{where}: images and videos are only accepted in user messages")
        if IMAGE_PLACEHOLDER in text:
            raise InvalidRequest(
                f"{where}: {IMAGE_PLACEHOLDER!r} is only allowed in user messages that carry images"
            )
        if message.role == "system":
            system_texts.append(text)
        elif message.role == "assistant":
            turns.append(tpl.roles[1] + text + tpl.sep)
        else:  # pragma: no cover - Message.role is validated by parse_message
            raise InvalidRequest(f"{where}.role {message.role!r} is not supported; use system, user or assistant")
    if frames:
        raise ValueError(f"video_frames has {len(frames)} more entries than the messages have videos")
    if system_texts:
        system = "\n".join(system_texts)
    else:
        system = tpl.system_message if system_message is None else system_message
    return tpl.system_prompt(system) + tpl.sep + "".join(turns) + tpl.roles[1]


def expand_image_placeholders(
    prompt: str,
    tokens_per_image: Sequence[int],
    *,
    placeholder: str = IMAGE_PLACEHOLDER,
    img_start: str = IMG_START,
    img_end: str = IMG_END,
    img_context: str = IMG_CONTEXT,
) -> str:
    """Replace the k-th `<image>` (left to right) with `<img>` + `<IMG_CONTEXT>` * tokens_per_image[k] + `</img>`.

    tokens_per_image[k] = num_image_token (256, or 16 for InternVideo2.5) * tiles of the k-th image. A count
    mismatch is a server-side bug (the prompt was validated when rendered), so it raises ValueError.
    """
    pieces = prompt.split(placeholder)
    if len(pieces) - 1 != len(tokens_per_image):
        raise ValueError(
            f"the prompt has {len(pieces) - 1} {placeholder!r} placeholders but {len(tokens_per_image)} "
            "token counts were given"
        )
    out = [pieces[0]]
    for n, piece in zip(tokens_per_image, pieces[1:]):
        if n < 1:
            raise ValueError(f"an image needs at least one context token, got {n}")
        out.append(img_start + img_context * n + img_end + piece)
    return "".join(out)
