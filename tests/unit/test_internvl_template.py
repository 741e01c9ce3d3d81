"""InternVL prompt rendering: golden strings (spec 4.1/4.2), placeholder rules and expansion."""

from __future__ import annotations

import pytest

from vlm_triton.errors import InvalidRequest, SetupError
from vlm_triton.prompt.internvl_template import (
    INTERNLM2_CHAT_SYSTEM,
    INTERNVL2_5_SYSTEM,
    TEMPLATES,
    expand_image_placeholders,
    get_template,
    prompt_media,
    render_internvl_prompt,
)
from vlm_triton.prompt.messages import ImagePart, VideoPart, parse_messages

SYS25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SYSLM2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


def _img(url: str = "data:image/png;base64,AAAA") -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _render(raw: list[dict], template: str = "internvl2_5", **kwargs) -> str:
    return render_internvl_prompt(parse_messages(raw), template=template, **kwargs)


SINGLE = [{"role": "user", "content": [_img(), _text("Describe the image.")]}]
TWO = [{"role": "user", "content": [_img("a"), _img("b"), _text("What differs?")]}]
TEXT_ONLY = [{"role": "user", "content": "Hello!"}]
MULTI_TURN = [
    {"role": "user", "content": [_img(), _text("What is this?")]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "What color is it?"},
]
CUSTOM_SYSTEM = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": [_img(), _text("Hi")]}]


# --------------------------------------------------------------------------------------------------- constants
def test_template_constants_match_spec():
    assert INTERNVL2_5_SYSTEM == SYS25 and INTERNLM2_CHAT_SYSTEM == SYSLM2
    t = get_template("internvl2_5")
    assert (t.system_template, t.roles, t.sep) == (
        "<|im_start|>system\n{system_message}",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "<|im_end|>\n",
    )
    assert get_template("internlm2-chat").sep == "<|im_end|>" and get_template("internlm2-chat").system_message == SYSLM2
    assert get_template("Hermes-2").stop_strings == ("<|im_end|>", "<|endoftext|>")
    assert set(TEMPLATES) == {"internvl2_5", "internlm2-chat", "Hermes-2"}
    with pytest.raises(SetupError, match="supported: internvl2_5, internlm2-chat, Hermes-2"):
        get_template("vicuna")


# --------------------------------------------------------------------------------------------------- golden: 2.5
def test_internvl2_5_single_image():
    assert _render(SINGLE) == (
        f"<|im_start|>system\n{SYS25}<|im_end|>\n"
        "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_internvl2_5_two_images():
    assert _render(TWO) == (
        f"<|im_start|>system\n{SYS25}<|im_end|>\n"
        "<|im_start|>user\nImage-1: <image>\nImage-2: <image>\nWhat differs?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_internvl2_5_text_only():
    assert _render(TEXT_ONLY) == (
        f"<|im_start|>system\n{SYS25}<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )


def test_internvl2_5_multi_turn():
    assert _render(MULTI_TURN) == (
        f"<|im_start|>system\n{SYS25}<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nWhat color is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_internvl2_5_custom_system():
    assert _render(CUSTOM_SYSTEM) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n<image>\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# --------------------------------------------------------------------------------------------------- golden: internlm2
def test_internlm2_chat_single_image():
    assert _render(SINGLE, "internlm2-chat") == (
        f"<|im_start|>system\n{SYSLM2}<|im_end|>"
        "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_internlm2_chat_two_images():
    assert _render(TWO, "internlm2-chat") == (
        f"<|im_start|>system\n{SYSLM2}<|im_end|>"
        "<|im_start|>user\nImage-1: <image>\nImage-2: <image>\nWhat differs?<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_internlm2_chat_text_only():
    assert _render(TEXT_ONLY, "internlm2-chat") == (
        f"<|im_start|>system\n{SYSLM2}<|im_end|><|im_start|>user\nHello!<|im_end|><|im_start|>assistant\n"
    )


def test_internlm2_chat_multi_turn():
    assert _render(MULTI_TURN, "internlm2-chat") == (
        f"<|im_start|>system\n{SYSLM2}<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|>"
        "<|im_start|>user\nWhat color is it?<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_internlm2_chat_custom_system():
    assert _render(CUSTOM_SYSTEM, "internlm2-chat") == (
        "<|im_start|>system\nYou are terse.<|im_end|><|im_start|>user\n<image>\nHi<|im_end|><|im_start|>assistant\n"
    )


def test_hermes_2_renders_like_internlm2_chat():
    for case in (SINGLE, TWO, TEXT_ONLY, MULTI_TURN, CUSTOM_SYSTEM):
        assert _render(case, "Hermes-2") == _render(case, "internlm2-chat")


# --------------------------------------------------------------------------------------------------- parity
def _reference_chat_prompt(tpl_name: str, system: str, history: list[tuple[str, str]], question: str, n_img: int):
    """What the reference chat() builds (spec 4.1/4.2), written out independently: MPT rendering, `<image>\\n`
    prepended only on the first turn when images are attached and the text has none."""
    t = TEMPLATES[tpl_name]
    if not history and n_img and "<image>" not in question:
        question = "<image>\n" + question
    out = t.system_template.format(system_message=system) + t.sep
    for q, a in history:
        out += t.roles[0] + q + t.sep + t.roles[1] + a + t.sep
    return out + t.roles[0] + question + t.sep + t.roles[1]


@pytest.mark.parametrize("tpl", ["internvl2_5", "internlm2-chat"])
def test_matches_reference_chat_flow(tpl):
    sys_ = TEMPLATES[tpl].system_message
    assert _render(SINGLE, tpl) == _reference_chat_prompt(tpl, sys_, [], "Describe the image.", 1)
    assert _render(MULTI_TURN, tpl) == _reference_chat_prompt(
        tpl, sys_, [("<image>\nWhat is this?", "A cat.")], "What color is it?", 0
    )
    written = [{"role": "user", "content": [_img(), _img(), _text("Image-1: <image>\nImage-2: <image>\nCompare.")]}]
    assert _render(written, tpl) == _reference_chat_prompt(tpl, sys_, [], "Image-1: <image>\nImage-2: <image>\nCompare.", 2)


# --------------------------------------------------------------------------------------------------- rules
def test_config_system_message_and_openai_override():
    assert _render(TEXT_ONLY, system_message="From config.").startswith("<|im_start|>system\nFrom config.<|im_end|>\n")
    assert _render(CUSTOM_SYSTEM, system_message="From config.").startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    two_systems = [{"role": "system", "content": "A."}, {"role": "system", "content": "B."}] + TEXT_ONLY
    assert _render(two_systems).startswith("<|im_start|>system\nA.\nB.<|im_end|>\n")


def test_user_written_placeholders_are_kept():
    raw = [{"role": "user", "content": [_text("Left <image> right <image>?"), _img(), _img()]}]
    assert "<|im_start|>user\nLeft <image> right <image>?<|im_end|>\n" in _render(raw)


@pytest.mark.parametrize(
    "content",
    [
        [_text("<image> and <image>"), _img()],  # 2 written, 1 attached
        [_text("<image>\nWhat is it?")],  # written, nothing attached
        [_text("Image-1: <image>\nWhat?"), _img(), _img()],  # 1 written, 2 attached
    ],
)
def test_placeholder_count_mismatch(content):
    with pytest.raises(InvalidRequest, match=r"placeholder\(s\) but \d image\(s\) are attached"):
        _render([{"role": "user", "content": content}])


@pytest.mark.parametrize("marker", ["<IMG_CONTEXT>", "<img>", "</img>"])
def test_reserved_markers_refused(marker):
    with pytest.raises(InvalidRequest, match="reserved marker"):
        _render([{"role": "user", "content": f"say {marker}"}])
    with pytest.raises(InvalidRequest, match="reserved marker"):
        _render([{"role": "assistant", "content": marker}, {"role": "user", "content": "x"}])


def test_image_placeholder_outside_user_messages_refused():
    with pytest.raises(InvalidRequest, match="only allowed in user messages"):
        _render([{"role": "system", "content": "<image>"}, {"role": "user", "content": "x"}])
    with pytest.raises(InvalidRequest, match="only allowed in user messages"):
        _render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<image>"}, {"role": "user", "content": "b"}])


def test_last_message_must_be_user():
    assert render_internvl_prompt(parse_messages(TEXT_ONLY), template="internvl2_5").endswith("<|im_start|>assistant\n")
    with pytest.raises(InvalidRequest, match="last message"):
        render_internvl_prompt(parse_messages(MULTI_TURN)[:2], template="internvl2_5")


def test_image_in_later_turn_gets_its_own_placeholder_and_order():
    raw = [
        {"role": "user", "content": [_img("first"), _text("What is this?")]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [_text("And these?"), _img("second"), _img("third")]},
    ]
    prompt = _render(raw)
    assert prompt == (
        f"<|im_start|>system\n{SYS25}<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nImage-1: <image>\nImage-2: <image>\nAnd these?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert [p.url for p in prompt_media(parse_messages(raw))] == ["first", "second", "third"]
    expanded = expand_image_placeholders(prompt, [1, 2, 3])
    assert expanded.count("<IMG_CONTEXT>") == 6 and "<image>" not in expanded
    assert "user\n<img><IMG_CONTEXT></img>\nWhat is this?" in expanded
    assert "Image-1: <img>" + "<IMG_CONTEXT>" * 2 + "</img>\nImage-2: <img>" + "<IMG_CONTEXT>" * 3 + "</img>\n" in expanded


def test_empty_assistant_turn_keeps_separator():
    raw = [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}, {"role": "user", "content": "b"}]
    assert "<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\nb" in _render(raw)


def test_video_frames():
    raw = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v.mp4"}}, _text("What happens?")]}]
    prompt = _render(raw, video_frames=[3])
    assert "<|im_start|>user\nFrame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat happens?<|im_end|>\n" in prompt
    assert isinstance(prompt_media(parse_messages(raw))[0], VideoPart)
    with pytest.raises(ValueError, match="video_frames"):
        _render(raw)
    with pytest.raises(ValueError, match="more entries"):
        _render(TEXT_ONLY, video_frames=[4])
    mixed = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v.mp4"}}, _img(), _text("?")]}]
    with pytest.raises(InvalidRequest, match="one video, or images"):
        _render(mixed, video_frames=[2])


# --------------------------------------------------------------------------------------------------- expansion
def test_expand_single():
    prompt = _render(SINGLE)
    expanded = expand_image_placeholders(prompt, [256 * 13])
    assert expanded == prompt.replace("<image>", "<img>" + "<IMG_CONTEXT>" * 3328 + "</img>")


def test_expand_matches_sequential_replace():
    prompt = _render(TWO)
    ref = prompt
    for n in (5, 7):  # the reference: query.replace('<image>', tokens, 1) per image, in order
        ref = ref.replace("<image>", "<img>" + "<IMG_CONTEXT>" * n + "</img>", 1)
    assert expand_image_placeholders(prompt, [5, 7]) == ref


def test_expand_count_mismatch_is_a_server_error():
    with pytest.raises(ValueError, match="2 '<image>' placeholders but 1"):
        expand_image_placeholders(_render(TWO), [256])
    assert expand_image_placeholders("no images", []) == "no images"


def test_parts_are_typed():
    assert isinstance(prompt_media(parse_messages(SINGLE))[0], ImagePart)
