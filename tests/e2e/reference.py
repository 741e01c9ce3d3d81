"""Reference generations with transformers' own `InternVLForConditionalGeneration` on the converted checkpoint."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm_triton.families import open_family
from vlm_triton.families.base import PreprocessLimits
from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
from vlm_triton.prompt.messages import parse_messages


@lru_cache(maxsize=2)
def reference_model(hf_dir: str) -> Any:
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()


def reference_generate(
    checkpoint: Path, hf_dir: Path, media_dir: Path, messages: list[dict[str, Any]], max_new_tokens: int
) -> tuple[list[int], int]:
    """Greedy tokens of the reference model for `messages`, and the prompt length.

    The prompt string and tiles come from our preprocessing, which the unit tiers prove equal to the reference
    template (golden strings) and image processor (pixels within 1e-6); here the image-token placement, vision
    encoder, embedding merge and LLM are the reference's own.
    """
    family = open_family(checkpoint)
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(media_dir,)))
    prepared = family.prepare(parse_messages(messages), media, PreprocessLimits(max_prompt_tokens=8191))
    tokenizer = family.load_tokenizer()
    ids = prepared.input_ids.astype(np.int64)
    ids[ids >= family.vocab_size] = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    model = reference_model(str(hf_dir))
    kwargs: dict[str, Any] = {}
    if prepared.pixel_values.shape[0]:
        kwargs["pixel_values"] = torch.from_numpy(family.float_pixels(prepared))
    input_ids = torch.from_numpy(ids)[None]
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=family.stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
    return out[0, input_ids.shape[1]:].tolist(), int(input_ids.shape[1])
