"""MiniCPM-V-2.6: SigLIP-navit + perceiver resampler + Qwen2 (`architectures: ["MiniCPMV"]`, version 2.6).

Preprocess: OpenAI messages -> the reference `chat()` messages -> the tokenizer's ChatML template -> each
`(<image>./</image>)` replaced by its placeholder (source image + slice rows) -> ids, whose `<unk>` slots become
fake ids `vocab_size + k`. Every item (source image or slice) yields 64 prompt-table rows, in processor order.

Vision-encoder transport (the stage contract): every item's RGB bytes are laid out by patch ([3, 14, n*14]) and
zero-padded to a fixed `max_patches_per_item` patches, so items of all requests have one shape and Triton's dynamic
batcher can merge them; `tgt_sizes` [N, 2] int32 (patch rows, cols) travels with them. `normalize_pixels` turns the
bytes into the reference's (x/255 - 0.5)/0.5 floats and gives the padding back its zeros. The torch encoder trims the
padding to the batch's longest item. An image whose source or slices need more patches than the layout holds (an
aspect ratio beyond about 100:1) is refused.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer

from vlm_triton.errors import InvalidRequest
from vlm_triton.families import register
from vlm_triton.families.base import LLMPart, ModelFamily, PreparedPrompt, PreprocessLimits, VisualBudget
from vlm_triton.models.minicpmv_llm import load_minicpmv_language_model, minicpmv_llm_config
from vlm_triton.models.minicpmv_vision import MiniCPMVVisionConfig, MiniCPMVVisionEncoder
from vlm_triton.multimodal.media import MediaFetcher
from vlm_triton.multimodal.pending_image import open_images
from vlm_triton.multimodal.minicpmv_slicing import (
    PlaceholderTokens,
    image_placeholder,
    minicpmv_lut,
    pad_items,
    patch_layout_bytes,
    slice_image,
    sliced_grid,
)
from vlm_triton.multimodal.pixels import clear_padding, normalize_on_device
from vlm_triton.prompt.messages import ImagePart, Message, VideoPart
from vlm_triton.prompt.minicpmv_template import (
    SlicingOptions,
    chat_messages,
    expand_image_tags,
    prompt_media,
    render_prompt,
    video_slicing,
)

MAX_PATCHES_PER_ITEM = 1200  # >= every item of images up to ~100:1 aspect ratio (1168 patches at most)
MAX_VIDEO_FRAMES = 64  # the card's MAX_NUM_FRAMES




@register
class MiniCPMVFamily(ModelFamily):
    name = "minicpmv"
    description = "MiniCPM-V-2.6 (architectures MiniCPMV, version 2.6: SigLIP + resampler + Qwen2)"

    @classmethod
    def matches(cls, config: Mapping[str, Any]) -> bool:
        try:
            version = float(config.get("version", 0))
        except (TypeError, ValueError):
            return False
        return "MiniCPMV" in (config.get("architectures") or []) and abs(version - 2.6) < 1e-6

    @cached_property
    def vision_config(self) -> MiniCPMVVisionConfig:
        return MiniCPMVVisionConfig.from_minicpmv_config(self.config)

    @cached_property
    def processor_config(self) -> Mapping[str, Any]:
        """preprocessor_config.json, falling back to config.json's slice_config (the reference asserts they agree)."""
        path = self.checkpoint.path / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def patch_size(self) -> int:
        return int(self.processor_config.get("patch_size", self.config.get("patch_size", 14)))

    @property
    def scale_resolution(self) -> int:
        slice_cfg = self.config.get("slice_config") or {}
        return int(self.processor_config.get("scale_resolution", slice_cfg.get("scale_resolution", 448)))

    @property
    def query_num(self) -> int:
        return int(self.config.get("query_num", 64))

    @cached_property
    def tokens(self) -> PlaceholderTokens:
        p = self.processor_config
        default = PlaceholderTokens()
        return PlaceholderTokens(**{field: str(p.get(key, getattr(default, field))) for field, key in (
            ("im_start", "im_start"), ("im_end", "im_end"), ("slice_start", "slice_start"),
            ("slice_end", "slice_end"), ("unk", "unk"), ("im_id_start", "im_id_start"), ("im_id_end", "im_id_end"))})

    def slicing(self, limits: PreprocessLimits) -> SlicingOptions:
        slice_cfg = self.config.get("slice_config") or {}
        max_slices = int(self.processor_config.get("max_slice_nums", slice_cfg.get("max_slice_nums", 9)))
        if limits.max_tiles_per_image:
            max_slices = min(max_slices, limits.max_tiles_per_image)
        use_id = bool(self.processor_config.get("use_image_id", self.config.get("use_image_id", True)))
        return SlicingOptions(max_slice_nums=max_slices, use_image_id=use_id)

    # --- preprocess ------------------------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> Any:
        return AutoTokenizer.from_pretrained(str(self.checkpoint.path), trust_remote_code=True)

    def load_tokenizer(self) -> Any:
        return self.tokenizer

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        return [i for i in ids if i is not None and i != tokenizer.unk_token_id]

    def video_frames(self, part: VideoPart, media: MediaFetcher) -> list[Image.Image]:
        """The sampled frames of a video part (decoded by `multimodal.video`, at most 64 frames).

        The card samples 1 frame per second (`card_frame_indices`); `sample_video` still picks the middle frames of
        equal segments, until it takes an index rule."""
        from vlm_triton.multimodal.video import VideoPolicy, sample_video

        data = media.fetch_bytes(part.url)
        return sample_video(data, VideoPolicy(max_frames=MAX_VIDEO_FRAMES), source=f"video {part.url[:80]!r}").frames

    def prepare(self, messages: list[Message], media: MediaFetcher, limits: PreprocessLimits) -> PreparedPrompt:
        parts = prompt_media(messages)
        images = [p for p in parts if isinstance(p, ImagePart)]
        if len(images) > limits.max_images:
            raise InvalidRequest(f"{len(images)} images were sent; this deployment allows at most {limits.max_images}")
        options = self.slicing(limits)
        pictures: list[Image.Image] = []
        frames_per_video: list[int] = []
        loaded = iter(open_images(media, [p.url for p in images], threads=limits.image_threads))
        for part in parts:
            if isinstance(part, ImagePart):
                pictures.append(next(loaded).result())
            else:
                frames = self.video_frames(part, media)
                frames_per_video.append(len(frames))
                pictures.extend(frames)
        if frames_per_video:
            options = video_slicing(options)
        chat = chat_messages(messages, frames_per_video=frames_per_video, tokens=self.tokens)
        prompt = render_prompt(chat, tokenizer=self.tokenizer)
        items: list[np.ndarray] = []
        tgt_sizes: list[tuple[int, int]] = []
        placeholders: list[str] = []
        for index, picture in enumerate(pictures):
            for item in slice_image(picture, max_slice_nums=options.max_slice_nums, scale_resolution=self.scale_resolution,
                                    patch_size=self.patch_size, threads=limits.image_threads):
                patches, grid = patch_layout_bytes(item, patch_size=self.patch_size)
                if grid[0] * grid[1] > MAX_PATCHES_PER_ITEM:
                    raise InvalidRequest(
                        f"image {index + 1} ({picture.width}x{picture.height}) has too extreme an aspect ratio: one "
                        f"of its slices needs {grid[0] * grid[1]} patches, the limit is {MAX_PATCHES_PER_ITEM}")
                items.append(patches)
                tgt_sizes.append(grid)
            placeholders.append(image_placeholder(
                grid=sliced_grid(size=picture.size, max_slice_nums=options.max_slice_nums,
                                 scale_resolution=self.scale_resolution),
                image_index=index, use_image_id=options.use_image_id, query_num=self.query_num, tokens=self.tokens))
        ids = np.asarray(self.tokenizer.encode(expand_image_tags(prompt, placeholders)), dtype=np.int64)
        if ids.shape[0] > limits.max_prompt_tokens:
            raise InvalidRequest(
                f"the prompt has {ids.shape[0]} tokens (images included); this deployment allows "
                f"{limits.max_prompt_tokens}: send fewer or smaller images, or shorter text")
        slots = ids == self.tokenizer.convert_tokens_to_ids(self.tokens.unk)
        num_image_tokens = int(slots.sum())
        if num_image_tokens != self.query_num * len(items):
            raise RuntimeError(f"{num_image_tokens} image slots for {len(items)} items of {self.query_num} tokens")
        ids[slots] = self.vocab_size + np.arange(num_image_tokens)
        pixel_values = pad_items(items, max_patches=MAX_PATCHES_PER_ITEM, patch_size=self.patch_size, dtype=np.uint8)
        return PreparedPrompt(ids.astype(np.int32), pixel_values, num_image_tokens, prompt,
                              tgt_sizes=np.asarray(tgt_sizes, dtype=np.int32).reshape(-1, 2))

    def pixel_lut(self) -> np.ndarray:
        return minicpmv_lut()

    def normalize_pixels(
        self, pixels: torch.Tensor, lut: torch.Tensor, tgt_sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        if tgt_sizes is None:
            raise ValueError("MiniCPM-V pixels need their tgt_sizes (patch rows, cols per item)")
        widths = tgt_sizes.reshape(-1, 2).prod(dim=-1) * self.patch_size  # columns of each item before the padding
        return clear_padding(normalize_on_device(pixels, lut), widths)

    def visual_budget(self, limits: PreprocessLimits) -> VisualBudget:
        return VisualBudget(
            max_units=min(limits.max_prompt_tokens // self.query_num,
                          limits.max_images * (1 + self.slicing(limits).max_slice_nums)
                          + MAX_VIDEO_FRAMES * (1 + video_slicing(self.slicing(limits)).max_slice_nums)),
            tokens_per_unit=self.query_num,
            unit_shape=(3, self.patch_size, MAX_PATCHES_PER_ITEM * self.patch_size),
        )

    # --- vision_encoder / llm -----------------------------------------------------------------------------------
    def build_vision_encoder(self, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        """(pixel_values [N, 3, 14, 1200*14], tgt_sizes int [N, 2]) -> [N, 64, hidden]."""
        return MiniCPMVVisionEncoder.from_checkpoint(self.checkpoint, dtype=dtype, device=device)

    def llm_part(self) -> LLMPart:
        config = minicpmv_llm_config(self.config).to_dict()
        config["architectures"] = ["Qwen2ForCausalLM"]
        return LLMPart("Qwen2ForCausalLM", config, "llm.")

    def build_language_model(
        self, dtype: torch.dtype, device: torch.device, *, max_seq_len: int | None = None
    ) -> torch.nn.Module:
        return load_minicpmv_language_model(self.checkpoint, dtype=dtype, device=device, max_seq_len=max_seq_len)
