"""MiniCPM-V-2.6 family on the tiny checkpoint: golden prompt strings (ChatML + 2.6 placeholders), refusals, and
greedy tokens through family + torch engine equal a reference composition: transformers' `Qwen2ForCausalLM.generate`
over inputs_embeds built here the reference way (`<unk>` ids, image bounds from the marker ids, per-item
embeddings from the independent vision reference of test_minicpmv_vision)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from tests.unit.test_minicpmv_slicing import _reference_reshape_by_patch
from tests.unit.test_minicpmv_vision import _image, reference_item_embeddings
from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.checkpoints.tiny import make_tiny_checkpoint
from vlm_triton.engine import GenerationRequest, LLMEngine
from vlm_triton.errors import InvalidRequest
from vlm_triton.families import open_family
from vlm_triton.families.base import PreprocessLimits
from vlm_triton.families.minicpmv import MiniCPMVFamily
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
from vlm_triton.multimodal.minicpmv_slicing import slice_image
from vlm_triton.prompt.messages import parse_messages

SIZES = {"wide.png": (800, 600), "tall.png": (300, 900), "square.png": (1344, 1344), "small.png": (448, 448)}
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
MAX_NEW = 12


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> MiniCPMVFamily:
    fam = open_family(make_tiny_checkpoint("minicpmv2_6", tmp_path_factory.mktemp("mcpv") / "tiny", seed=0))
    assert isinstance(fam, MiniCPMVFamily)
    return fam


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    for seed, (name, (w, h)) in enumerate(SIZES.items()):
        _image(w, h, seed).save(root / name)
    return root


def _user(*parts: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": p}} if p.startswith("file://") else {"type": "text", "text": p}
               for p in parts]
    return {"role": "user", "content": content}


def _prepare(family: MiniCPMVFamily, media_dir: Path, messages: list[dict[str, Any]]) -> Any:
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(media_dir,)))
    return family.prepare(parse_messages(messages), media, PreprocessLimits(max_prompt_tokens=8191))


def test_golden_prompt_single_image(family, media_dir) -> None:
    prepared = _prepare(family, media_dir, [_user(f"file://{media_dir}/small.png", "What is this?")])
    assert prepared.prompt_text == (SYSTEM + "<|im_start|>user\n(<image>./</image>)\nWhat is this?<|im_end|>\n"
                                    "<|im_start|>assistant\n")
    text = family.tokenizer.decode(np.where(prepared.input_ids >= family.vocab_size,
                                            family.tokenizer.convert_tokens_to_ids("<unk>"), prepared.input_ids))
    assert text == prepared.prompt_text.replace(
        "(<image>./</image>)", "<image_id>0</image_id><image>" + "<unk>" * 64 + "</image>")
    assert prepared.num_image_tokens == 64 and prepared.pixel_values.shape == (1, 3, 14, 1200 * 14)
    assert prepared.tgt_sizes.tolist() == [[32, 32]]


def test_golden_prompt_two_images_and_turns(family, media_dir) -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        _user(f"file://{media_dir}/wide.png", "First?"),
        {"role": "assistant", "content": "A picture."},
        _user("Compare:", f"file://{media_dir}/small.png", f"file://{media_dir}/tall.png"),
    ]
    prepared = _prepare(family, media_dir, messages)
    tag = "(<image>./</image>)"
    assert prepared.prompt_text == (
        "<|im_start|>system\nBe terse.<|im_end|>\n"
        f"<|im_start|>user\n{tag}\nFirst?<|im_end|>\n<|im_start|>assistant\nA picture.<|im_end|>\n"
        f"<|im_start|>user\nCompare:\n{tag}\n{tag}<|im_end|>\n<|im_start|>assistant\n")
    tok = family.tokenizer
    text = tok.decode(np.where(prepared.input_ids >= family.vocab_size, tok.convert_tokens_to_ids("<unk>"),
                               prepared.input_ids))
    unk = "<unk>" * 64
    cell = f"<slice>{unk}</slice>"
    wide = f"<image_id>0</image_id><image>{unk}</image>{cell * 2}\n{cell * 2}"  # 800x600: 2x2
    small = f"<image_id>1</image_id><image>{unk}</image>"
    tall = f"<image_id>2</image_id><image>{unk}</image>{cell}\n{cell}\n{cell}"  # 300x900: 1x3 (exact 1:3)
    assert text == prepared.prompt_text.replace(tag, wide, 1).replace(tag, small, 1).replace(tag, tall, 1)
    assert prepared.num_image_tokens == 64 * (5 + 1 + 4) == int((prepared.input_ids >= family.vocab_size).sum())
    ids = prepared.input_ids[prepared.input_ids >= family.vocab_size]
    assert ids.tolist() == list(range(family.vocab_size, family.vocab_size + prepared.num_image_tokens))


@pytest.mark.parametrize("text", ["<image>", "(<image>./</image>)", "<unk>", "</slice>", "<image_id>"])
def test_markers_in_text_are_refused(family, media_dir, text) -> None:
    with pytest.raises(InvalidRequest, match="reserved marker"):
        _prepare(family, media_dir, [_user(f"hello {text}")])


def test_too_many_images_refused(family, media_dir) -> None:
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(media_dir,)))
    msgs = parse_messages([_user(*[f"file://{media_dir}/small.png"] * 3)])
    with pytest.raises(InvalidRequest, match="at most 2"):
        family.prepare(msgs, media, PreprocessLimits(max_images=2))


def test_extreme_aspect_ratio_refused(family, tmp_path) -> None:
    Image.new("RGB", (8000, 3)).save(tmp_path / "line.png")
    with pytest.raises(InvalidRequest, match="aspect ratio"):
        _prepare(family, tmp_path, [_user(f"file://{tmp_path}/line.png")])


def test_video_frames_use_the_card_settings(family, media_dir, monkeypatch) -> None:
    frames = [_image(800, 600, 10 + k) for k in range(3)]
    monkeypatch.setattr(MiniCPMVFamily, "video_frames", lambda self, part, media: frames)
    prepared = _prepare(family, media_dir, [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}, {"type": "text", "text": "Why?"}]}])
    tag = "(<image>./</image>)"
    assert f"<|im_start|>user\n{tag}\n{tag}\n{tag}\nWhy?<|im_end|>" in prepared.prompt_text
    text = family.tokenizer.decode(prepared.input_ids[prepared.input_ids < family.vocab_size])
    assert "<image_id>" not in text and text.count("<slice>") == 3 * 2  # max_slice_nums 2: 800x600 -> 2x1
    assert prepared.tgt_sizes.shape == (9, 2)


def test_stop_ids_and_llm_part(family) -> None:
    tok = family.tokenizer
    assert family.stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"),
                                          tok.convert_tokens_to_ids("<|endoftext|>")]
    part = family.llm_part()
    assert part.weight_prefix == "llm." and part.config["hidden_size"] == 256 and part.architecture == "Qwen2ForCausalLM"


# --- greedy parity ------------------------------------------------------------------------------------------------
def _reference_llm(ckpt: Checkpoint) -> Qwen2ForCausalLM:
    c = ckpt.config
    cfg = Qwen2Config(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                      num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                      num_key_value_heads=c["num_key_value_heads"], rope_theta=c["rope_theta"],
                      rms_norm_eps=c["rms_norm_eps"], max_position_embeddings=c["max_position_embeddings"],
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    model.load_state_dict({k: t.float() for k, t in ckpt.load_tensors("llm.").items()}, strict=True)
    return model


def _reference_tokens(family: MiniCPMVFamily, media_dir: Path, messages: list[dict[str, Any]], hf_siglip: Any,
                      llm: Qwen2ForCausalLM) -> list[int]:
    prepared = _prepare(family, media_dir, messages)
    tok = family.tokenizer
    ids = np.where(prepared.input_ids >= family.vocab_size, tok.convert_tokens_to_ids("<unk>"), prepared.input_ids)
    ids_t = torch.from_numpy(ids.astype(np.int64))
    starts = torch.where((ids_t == tok.convert_tokens_to_ids("<image>")) | (ids_t == tok.convert_tokens_to_ids("<slice>")))[0] + 1
    ends = torch.where((ids_t == tok.convert_tokens_to_ids("</image>")) | (ids_t == tok.convert_tokens_to_ids("</slice>")))[0]
    images = []
    for m in messages:  # image order = prompt order
        for p in m["content"] if isinstance(m["content"], list) else []:
            if p["type"] == "image_url":
                images.append(Image.open(p["image_url"]["url"][len("file://"):]).convert("RGB"))
    vectors = []
    for img in images:
        for item in slice_image(img):
            patches = _reference_reshape_by_patch(item)
            grid = (item.size[1] // 14, item.size[0] // 14)
            vectors.append(reference_item_embeddings(family.checkpoint, hf_siglip, patches, grid))
    assert len(starts) == len(ends) == len(vectors)
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(ids_t).clone()
        for s, e, v in zip(starts.tolist(), ends.tolist(), vectors):
            assert e - s == 64
            embeds[s:e] = v
        out = llm.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(ids)), do_sample=False,
                           max_new_tokens=MAX_NEW, eos_token_id=family.stop_token_ids(tok),
                           pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    return out[0].tolist()  # inputs_embeds only: generate returns the new tokens


def _our_tokens(family: MiniCPMVFamily, media_dir: Path, messages: list[dict[str, Any]], encoder: Any,
                engine: LLMEngine, rid: str) -> list[int]:
    prepared = _prepare(family, media_dir, messages)
    table = None
    if prepared.num_image_tokens:
        with torch.inference_mode():
            table = encoder(torch.from_numpy(family.float_pixels(prepared)), torch.from_numpy(prepared.tgt_sizes))
        table = table.reshape(-1, table.shape[-1])
    stops = family.stop_token_ids(family.tokenizer)
    engine.add_request(GenerationRequest(rid, prepared.input_ids, MAX_NEW, prompt_embedding_table=table,
                                         end_id=stops[0], stop_words=[[i] for i in stops[1:]], temperature=0.0))
    tokens: list[int] = []
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None:
                tokens.append(ev.token_id)
    return tokens


@pytest.fixture(scope="module")
def parity_models(family) -> tuple[Any, LLMEngine, Any, Qwen2ForCausalLM]:
    v = family.config["vision_config"]
    siglip = SiglipVisionModel(SiglipVisionConfig(
        **{k: v[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                             "image_size", "patch_size", "hidden_act", "layer_norm_eps")}, vision_use_head=False)).eval()
    siglip.load_state_dict({k: t.float() for k, t in family.checkpoint.load_tensors("vpm.").items()}, strict=False)
    encoder = family.build_vision_encoder(torch.float32, torch.device("cpu"))
    engine = LLMEngine(family.build_language_model(torch.float32, torch.device("cpu")), max_slots=2,
                       max_seq_len=4096, device="cpu", dtype=torch.float32, vocab_size=family.vocab_size)
    return encoder, engine, siglip, _reference_llm(family.checkpoint)


def _cases(media: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        "text_only": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
        "single_image_9_slices": [_user(f"file://{media}/square.png", "What is in the picture?")],
        "two_images": [_user(f"file://{media}/wide.png", f"file://{media}/tall.png", "Compare the two images.")],
        "multi_turn": [
            {"role": "system", "content": "You are a terse assistant."},
            _user(f"file://{media}/tall.png", "Describe it."),
            {"role": "assistant", "content": "A tall picture with colours."},
            _user("Which colour dominates? 用中文回答。"),
        ],
    }


@pytest.mark.parametrize("case", ["text_only", "single_image_9_slices", "two_images", "multi_turn"])
def test_greedy_tokens_equal_reference_composition(family, media_dir, parity_models, case) -> None:
    encoder, engine, siglip, llm = parity_models
    messages = _cases(media_dir)[case]
    expected = _reference_tokens(family, media_dir, messages, siglip, llm)
    assert len(expected) >= 4  # not an immediate stop: the comparison has substance
    assert _our_tokens(family, media_dir, messages, encoder, engine, case) == expected
