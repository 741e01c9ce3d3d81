"""InternVL2.5 / InternVL3: InternViT + pixel shuffle + mlp1 + a Qwen2.5 LLM, original `InternVLChatModel` format."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Mapping

import numpy as np
import torch
from transformers import AutoTokenizer

from vlm_triton.errors import InvalidRequest
from vlm_triton.families import register
from vlm_triton.families.base import ModelFamily, PreparedPrompt, PreprocessLimits, VisualBudget
from vlm_triton.models.internvit import InternViTConfig, InternVLVisionEncoder
from vlm_triton.models.language_model import LLM_LOADERS, llm_architecture, load_language_model
from vlm_triton.multimodal.media import MediaFetcher
from vlm_triton.multimodal.tiling import preprocess_image
from vlm_triton.prompt.internvl_template import (
    IMG_CONTEXT,
    expand_image_placeholders,
    prompt_media,
    render_internvl_prompt,
)
from vlm_triton.prompt.messages import ImagePart, Message


@register
class InternVLFamily(ModelFamily):
    name = "internvl"
    description = "InternVL3 / InternVL2.5 (architectures InternVLChatModel; LLM " + ", ".join(sorted(LLM_LOADERS)) + ")"

    @classmethod
    def matches(cls, config: Mapping[str, Any]) -> bool:
        return "InternVLChatModel" in (config.get("architectures") or []) and llm_architecture(config) in LLM_LOADERS

    @property
    def config(self) -> Mapping[str, Any]:
        return self.checkpoint.config

    @cached_property
    def vision_config(self) -> InternViTConfig:
        return InternViTConfig.from_internvl_config(self.config)

    @property
    def image_size(self) -> int:
        return int(self.config.get("force_image_size") or self.config["vision_config"]["image_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["llm_config"]["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["llm_config"]["hidden_size"])

    # --- preprocess ------------------------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> Any:
        return AutoTokenizer.from_pretrained(str(self.checkpoint.path), trust_remote_code=True)

    def load_tokenizer(self) -> Any:
        return self.tokenizer

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        return [i for i in ids if i is not None and i != tokenizer.unk_token_id]

    def prepare(self, messages: list[Message], media: MediaFetcher, limits: PreprocessLimits) -> PreparedPrompt:
        parts = prompt_media(messages)
        if any(not isinstance(p, ImagePart) for p in parts):
            raise InvalidRequest(f"{self.name} checkpoints take images, not video_url parts")
        if len(parts) > limits.max_images:
            raise InvalidRequest(f"{len(parts)} images were sent; this deployment allows at most {limits.max_images}")
        prompt = render_internvl_prompt(
            messages, template=self.config.get("template") or "internvl2_5",
            system_message=self.config.get("system_message"),
        )
        max_tiles = limits.max_tiles_per_image or int(self.config.get("max_dynamic_patch", 12))
        tiles = [
            preprocess_image(
                media.load_image(part.url),
                min_num=int(self.config.get("min_dynamic_patch", 1)),
                max_num=max_tiles,
                image_size=self.image_size,
                use_thumbnail=bool(self.config.get("use_thumbnail", True)),
            )
            for part in parts
        ]
        per_tile = self.vision_config.tokens_per_tile
        expanded = expand_image_placeholders(prompt, [t.shape[0] * per_tile for t in tiles])
        ids = np.asarray(self.tokenizer.encode(expanded), dtype=np.int64)
        if ids.shape[0] > limits.max_prompt_tokens:
            raise InvalidRequest(
                f"the prompt has {ids.shape[0]} tokens (images included); this deployment allows "
                f"{limits.max_prompt_tokens}: send fewer or smaller images, or shorter text"
            )
        slots = ids == self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        num_image_tokens = int(slots.sum())
        ids[slots] = self.vocab_size + np.arange(num_image_tokens)  # unique fake id per image token
        pixel_values = (
            np.concatenate(tiles) if tiles else np.zeros((0, 3, self.image_size, self.image_size), np.float32)
        )
        return PreparedPrompt(ids.astype(np.int32), pixel_values, num_image_tokens, prompt)

    def max_tiles_per_image(self, limits: PreprocessLimits) -> int:
        """Tiles one image can become: max_num tiles, plus the thumbnail when there is more than one."""
        max_num = limits.max_tiles_per_image or int(self.config.get("max_dynamic_patch", 12))
        thumbnail = bool(self.config.get("use_thumbnail", True)) and max_num > 1
        return max_num + int(thumbnail)

    def visual_budget(self, limits: PreprocessLimits) -> VisualBudget:
        return VisualBudget(
            max_units=limits.max_images * self.max_tiles_per_image(limits),
            tokens_per_unit=self.vision_config.tokens_per_tile,
            unit_shape=(3, self.image_size, self.image_size),
        )

    # --- vision_encoder / llm -----------------------------------------------------------------------------------
    def build_vision_encoder(self, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        return InternVLVisionEncoder.from_checkpoint(self.checkpoint, dtype=dtype, device=device)

    def build_language_model(self, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        return load_language_model(self.checkpoint, dtype=dtype, device=device)
