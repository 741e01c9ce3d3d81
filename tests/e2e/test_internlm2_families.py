"""Issue #6 on the real tritonserver: InternVL2.5 with an InternLM2.5 LLM, InternVL-Chat-V1.5 and
InternVideo2.5. Greedy tokens through the whole stack equal a reference model on the same weights:

- InternVL2.5-InternLM2: transformers' `InternVLForConditionalGeneration` (llama text_config, wqkv split by the
  -hf converter), for image, multi-image, multi-turn and video chats.
- V1.5 (pixel shuffle v1, which the -hf format cannot express): the straightforward InternViT-6B/shuffle-v1/mlp1
  of tests/unit/test_intervit6b.py + transformers' `LlamaForCausalLM` on the converter's weights.
- InternVideo2.5: transformers' InternVL vision tower, pixel shuffle and projector around the plain ToMe merge of
  tests/unit/test_video.py + the transformers LLM.
One module-scoped stack per family; bad video input is refused with INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import io
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch

from tests.e2e.bls_client import bls_generate
from tests.e2e.conftest import Stack, running_stack
from tests.e2e.reference import reference_generate
from tests.unit.test_intervit6b import _reference as v15_vision_reference
from tests.unit.test_video import _plain_tome, make_video
from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.checkpoints.tiny import make_tiny_checkpoint
from vlm_triton.checkpoints.to_hf import TEXT_CONVERTERS, convert_to_hf
from vlm_triton.families import open_family
from vlm_triton.families.base import PreprocessLimits
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
from vlm_triton.postprocess.detokenizer import DetokenizerState
from vlm_triton.prompt.messages import parse_messages

pytestmark = pytest.mark.e2e
MAX_NEW = 8


def _user(*parts: dict[str, Any], text: str) -> dict[str, Any]:
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _img(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _vid(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


@pytest.fixture(scope="module")
def videos(media_dir: Path) -> Path:
    (media_dir / "clip.mp4").write_bytes(make_video(10, fps=5))  # 10 frames -> 8 sampled
    (media_dir / "long.mp4").write_bytes(make_video(12, fps=Fraction(1, 400)))  # 4800 s > the 3600 s limit
    return media_dir


def _check_equal(stack: Stack, messages: list[dict[str, Any]], ref: tuple[list[int], int]) -> None:
    tokens, prompt_len = ref
    family = open_family(stack.checkpoint)
    tokenizer = family.load_tokenizer()
    got = bls_generate(stack.grpc_url, messages, max_tokens=MAX_NEW)
    assert got.error is None, got.error.message()
    assert (got.prompt_tokens, got.completion_tokens) == (prompt_len, len(tokens))
    # The stack detokenizes token by token, however many tokens an llm response carries. With byte-fallback pieces
    # that can differ from a one-shot decode: ids <0x37><0x87><0xE5> stream as "7\ufffd\ufffd" but decode at once
    # as three U+FFFD.
    state = DetokenizerState()
    expected = "".join(state.push(tokenizer, [t], final=k == len(tokens) - 1) for k, t in enumerate(tokens))
    assert got.text == expected


def _embeds_reference(checkpoint: Path, media_dir: Path, messages: list[dict[str, Any]], lm: Any,
                      vision: Callable[[torch.Tensor], torch.Tensor]) -> tuple[list[int], int]:
    """Greedy tokens of `lm` on our prompt ids with the image rows from an independent `vision`."""
    family = open_family(checkpoint)
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(media_dir,)))
    prepared = family.prepare(parse_messages(messages), media, PreprocessLimits(max_prompt_tokens=8191))
    ids = torch.from_numpy(prepared.input_ids.astype(np.int64))
    slots = ids >= family.vocab_size
    with torch.inference_mode():
        embeds = lm.get_input_embeddings()(torch.where(slots, 0, ids)).clone()
        if prepared.num_image_tokens:
            rows = vision(torch.from_numpy(family.float_pixels(prepared)))
            embeds[slots] = rows.reshape(-1, rows.shape[-1]).to(embeds.dtype)
        out = lm.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, ids.shape[0], dtype=torch.long),
                          max_new_tokens=MAX_NEW, do_sample=False,
                          eos_token_id=family.stop_token_ids(family.load_tokenizer()), pad_token_id=2)
    return out[0].tolist(), int(ids.shape[0])


def _llama_from_hf(hf_dir: Path) -> Any:
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()


# --- InternVL2.5 with InternLM2.5 -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def internvl25(tmp_path_factory: pytest.TempPathFactory, media_dir: Path, videos: Path) -> Iterator[tuple[Stack, Path]]:
    root = tmp_path_factory.mktemp("internvl25-internlm2")
    ckpt = make_tiny_checkpoint("internvl2_5_internlm2", root / "ckpt", seed=1)
    hf = convert_to_hf(ckpt, root / "hf")
    with running_stack(ckpt, media_dir, root, "tiny-internvl25-internlm2") as stack:
        yield stack, hf


def internvl25_cases(media: Path) -> dict[str, list[dict[str, Any]]]:
    wide, tall = f"file://{media}/wide.png", f"file://{media}/tall.png"
    return {
        "image": [_user(_img(wide), text="What is in the picture?")],
        "two_images": [_user(_img(wide), _img(tall), text="Compare the two images.")],
        "multi_turn": [
            _user(_img(tall), text="Describe it."),
            {"role": "assistant", "content": "A tall picture."},
            {"role": "user", "content": "Which colour dominates?"},
        ],
        "video": [_user(_vid(f"file://{media}/clip.mp4"), text="What happens in the video?")],
    }


@pytest.mark.parametrize("case", ["image", "two_images", "multi_turn", "video"])
def test_internvl25_internlm2_equals_transformers(internvl25: tuple[Stack, Path], case: str) -> None:
    stack, hf = internvl25
    messages = internvl25_cases(stack.media_dir)[case]
    _check_equal(stack, messages, reference_generate(stack.checkpoint, hf, stack.media_dir, messages, MAX_NEW))


# --- InternVL-Chat-V1.5 ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v15(tmp_path_factory: pytest.TempPathFactory, media_dir: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("v15")
    ckpt = make_tiny_checkpoint("internvl_chat_v1_5", root / "ckpt", seed=2)
    with running_stack(ckpt, media_dir, root, "tiny-internvl-chat-v1-5") as stack:
        yield stack


def _v15_reference(stack: Stack, messages: list[dict[str, Any]]) -> tuple[list[int], int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    ckpt = Checkpoint.open(stack.checkpoint)
    weights = {k: v.float() for k, v in ckpt.load_tensors("", strip_prefix=False).items()}
    llm = ckpt.config["llm_config"]
    config = LlamaConfig(
        vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"], intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_hidden_layers"], num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm["num_key_value_heads"], rms_norm_eps=llm["rms_norm_eps"],
        rope_theta=llm["rope_theta"], rope_scaling=llm["rope_scaling"],
        max_position_embeddings=llm["max_position_embeddings"], tie_word_embeddings=False,
    )
    lm = LlamaForCausalLM(config).eval()
    converted = TEXT_CONVERTERS["InternLM2ForCausalLM"].convert(  # the -hf converter's independent wqkv split
        {k: v for k, v in weights.items() if k.startswith("language_model.")}, llm)
    lm.load_state_dict({k.replace("model.language_model.", "model."): v for k, v in converted.items()}, strict=True)
    return _embeds_reference(stack.checkpoint, stack.media_dir, messages, lm,
                             lambda px: v15_vision_reference(weights, ckpt.config, px))


@pytest.mark.parametrize("case", ["image", "multi_turn"])
def test_v15_equals_reference(v15: Stack, case: str) -> None:
    messages = internvl25_cases(v15.media_dir)[case]
    _check_equal(v15, messages, _v15_reference(v15, messages))


# --- InternVideo2.5 ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def internvideo(tmp_path_factory: pytest.TempPathFactory, media_dir: Path, videos: Path
                ) -> Iterator[tuple[Stack, Path]]:
    root = tmp_path_factory.mktemp("internvideo")
    ckpt = make_tiny_checkpoint("internvideo2_5", root / "ckpt", seed=4)
    hf = convert_to_hf(ckpt, root / "hf")
    with running_stack(ckpt, media_dir, root, "tiny-internvideo", limits={"max_media_bytes": 200_000}) as stack:
        yield stack, hf


def _hico_vision(model: Any, heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def encode(px: torch.Tensor) -> torch.Tensor:
        feats = model.model.vision_tower(pixel_values=px).last_hidden_state[:, 1:]
        side = int(feats.shape[1] ** 0.5)
        shuffled = model.model.pixel_shuffle(feats.reshape(px.shape[0], side, side, -1), scale_factor=0.5)
        groups = shuffled.reshape(px.shape[0] // 4, -1, shuffled.shape[-1])
        merged = _plain_tome(groups, 64, heads).reshape(px.shape[0], 16, -1)
        return model.model.multi_modal_projector(merged)
    return encode


def test_internvideo_equals_reference(internvideo: tuple[Stack, Path], http_media: str) -> None:
    stack, hf = internvideo
    model = _llama_from_hf(hf)
    heads = Checkpoint.open(stack.checkpoint).config["llm_config"]["num_attention_heads"]
    messages = [_user(_vid(f"file://{stack.media_dir}/clip.mp4"), text="Describe the video.")]
    ref = _embeds_reference(stack.checkpoint, stack.media_dir, messages, model, _hico_vision(model, heads))
    assert ref[1] > 8 * 16
    _check_equal(stack, messages, ref)
    data = base64.b64encode((stack.media_dir / "clip.mp4").read_bytes()).decode()
    for url in (f"{http_media}/clip.mp4", f"data:video/mp4;base64,{data}"):  # same video from other sources
        _check_equal(stack, [_user(_vid(url), text="Describe the video.")], ref)


def _noise_video() -> bytes:
    import av

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with av.open(buf, mode="w", format="matroska") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for _ in range(20):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("name", ["undecodable", "truncated", "zero bytes", "over byte limit", "over duration",
                                  "image to a video-only family"])
def test_bad_video_is_invalid_argument(internvideo: tuple[Stack, Path], name: str) -> None:
    stack, _ = internvideo
    clip = (stack.media_dir / "clip.mp4").read_bytes()
    part = {
        "undecodable": _vid(_b64(b"not a video" * 50)),
        "truncated": _vid(_b64(clip[: len(clip) // 2])),
        "zero bytes": _vid(f"file://{stack.media_dir}/empty.mp4"),
        "over byte limit": _vid(_b64(_noise_video())),
        "over duration": _vid(f"file://{stack.media_dir}/long.mp4"),
        "image to a video-only family": _img(f"file://{stack.media_dir}/small.png"),
    }[name]
    (stack.media_dir / "empty.mp4").write_bytes(b"")
    got = bls_generate(stack.grpc_url, [_user(part, text="What happens?")], max_tokens=2)
    assert got.error is not None, f"{name} was accepted"
    assert got.error.status() == "StatusCode.INVALID_ARGUMENT", (got.error.status(), got.error.message())
    ok = bls_generate(stack.grpc_url, [{"role": "user", "content": "still there?"}], max_tokens=2)
    assert ok.error is None and ok.completion_tokens >= 1


def test_internvideo_through_the_openai_frontend(internvideo: tuple[Stack, Path],
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """The seeds' InternVideo2.5 curl example (video_url, adapted to a local file) through the OpenAI frontend."""
    import httpx

    from tests.e2e.conftest import running_frontend

    stack, _ = internvideo
    with running_frontend(stack, "tiny-internvideo", tmp_path_factory.mktemp("fe-video")) as url:
        body = {"model": "tiny-internvideo", "max_tokens": 6, "messages": [
            _user(_vid(f"file://{stack.media_dir}/clip.mp4"), text="Describe this video in detail.")]}
        r = httpx.post(f"{url}/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] > 8 * 16 and usage["completion_tokens"] >= 1
        bad = {**body, "messages": [_user(_img(f"file://{stack.media_dir}/small.png"), text="What is it?")]}
        r = httpx.post(f"{url}/chat/completions", json=bad, timeout=60)
        assert r.status_code == 400 and "video" in r.json()["error"]["message"]
