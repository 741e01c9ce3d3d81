"""Issue #7 on the real tritonserver: MiniCPM-V-2.6 greedy tokens through preprocess -> vision_encoder -> llm ->
postprocess equal the reference composition of the unit tier (transformers' Qwen2 over reference inputs_embeds).
The slices' patch grids travel as `tgt_sizes` next to `pixel_values` (vlm_triton.contracts)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.bls_client import bls_generate
from tests.e2e.conftest import Stack, running_stack
from vlm_triton.checkpoints.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.e2e
MAX_NEW = 12

@pytest.fixture(scope="module")
def minicpmv_stack(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ckpt = make_tiny_checkpoint("minicpmv2_6", tmp_path_factory.mktemp("ckpt") / "tiny-minicpmv", seed=0)
    with running_stack(ckpt, media_dir, tmp_path_factory.mktemp("stack-minicpmv"), "tiny-minicpmv") as stack:
        yield stack


@pytest.mark.parametrize("case", ["text_only", "single_image_9_slices", "two_images", "multi_turn"])
def test_greedy_tokens_equal_reference_composition(minicpmv_stack: Stack, case: str) -> None:
    import torch

    from tests.unit.test_minicpmv_family import (
        SIZES,
        _cases,
        _reference_llm,
        _reference_tokens,
    )
    from tests.unit.test_minicpmv_vision import _image
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from vlm_triton.families import open_family

    media = minicpmv_stack.media_dir / "minicpmv"
    media.mkdir(exist_ok=True)
    for seed, (name, (w, h)) in enumerate(SIZES.items()):
        if not (media / name).exists():
            _image(w, h, seed).save(media / name)
    family = open_family(minicpmv_stack.checkpoint)
    v = family.config["vision_config"]
    siglip = SiglipVisionModel(SiglipVisionConfig(
        **{k: v[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                             "image_size", "patch_size", "hidden_act", "layer_norm_eps")}, vision_use_head=False)).eval()
    siglip.load_state_dict({k: t.float() for k, t in family.checkpoint.load_tensors("vpm.").items()}, strict=False)
    messages = _cases(media)[case]
    expected = _reference_tokens(family, media, messages, siglip, _reference_llm(family.checkpoint))
    text = family.tokenizer.decode(expected, skip_special_tokens=True)
    with torch.inference_mode():
        for stream in (True, False):
            got = bls_generate(minicpmv_stack.grpc_url, messages, max_tokens=MAX_NEW, stream=stream)
            assert got.error is None, got.error.message()
            assert got.completion_tokens == len(expected)
            assert got.text == text


def test_minicpmv_through_the_openai_frontend(minicpmv_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The seeds' MiniCPM-V curl example (an image, adapted to a local file) through the OpenAI frontend, with the
    openai SDK; a bad image is a 400."""
    import openai

    from tests.e2e.conftest import running_frontend

    with running_frontend(minicpmv_stack, "tiny-minicpmv", tmp_path_factory.mktemp("fe-minicpmv")) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        image = f"file://{minicpmv_stack.media_dir}/wide.png"
        r = client.chat.completions.create(model="tiny-minicpmv", max_tokens=6, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is in the image?"}]}])
        assert r.usage.prompt_tokens > 64 and r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny-minicpmv", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
