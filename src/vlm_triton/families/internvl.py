"""InternVL2.5 / InternVL3 / InternVL-Chat-V1.5: InternViT + pixel shuffle + mlp1 + a Qwen2.5 or InternLM2 LLM,
original `InternVLChatModel` format. Everything that differs between them is read from config.json (ViT shape,
ps_version, tile limits, template, LLM architecture).

Media: images are tiled (`max_dynamic_patch` tiles + thumbnail); a `video_url` part is decoded and sampled
(`multimodal.video`, at most `video_policy.max_frames` frames) and each frame becomes one tile behind a
`Frame{k}: <image>` line, as in the model cards' video example.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from transformers import AutoTokenizer

from vlm_triton.errors import InvalidRequest, SetupError
from vlm_triton.families import register
from vlm_triton.families.base import LLMPart, ModelFamily, PreparedPrompt, PreprocessLimits, VisualBudget
from vlm_triton.models.hico import is_hico_config
from vlm_triton.models.internvit import InternViTConfig, InternVLVisionEncoder
from vlm_triton.models.language_model import LLM_LOADERS, llm_architecture, load_language_model
from vlm_triton.multimodal.media import MediaFetcher
from vlm_triton.multimodal.pending_image import PendingImage, open_images
from vlm_triton.multimodal.pixels import pack_planes, plane_array
from vlm_triton.multimodal.tiling import (
    PendingTiles,
    device_cuttable,
    device_tiles,
    grid_tiles,
    image_grid,
    imagenet_lut,
    num_tiles,
    start_images_tiles,
)
from vlm_triton.multimodal.video import VideoPolicy, sample_video
from vlm_triton.prompt.internvl_template import (
    IMG_CONTEXT,
    expand_image_placeholders,
    prompt_media,
    render_internvl_prompt,
)
from vlm_triton.prompt.messages import ImagePart, Message, VideoPart

# Tokens that end generation, looked up by string; the ones a tokenizer lacks are skipped. The first found is the
# end_id. `<|endoftext|>` exists in Qwen2 vocabularies; the action tokens in InternLM2 ones (lmdeploy stops on them).
STOP_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "<|action_end|>", "<|action_start|>")


@register
class InternVLFamily(ModelFamily):
    name = "internvl"
    description = ("InternVL3 / InternVL2.5 / InternVL-Chat-V1.5 (architectures InternVLChatModel; LLM "
                   + ", ".join(sorted(LLM_LOADERS)) + ")")
    accepts_images: ClassVar[bool] = True
    device_tiles: ClassVar[bool] = True  # requests with images only (video frames are tiled on the host)
    video_policy: ClassVar[VideoPolicy | None] = VideoPolicy(max_frames=8)  # None: no video_url parts
    vision_encoder_class: ClassVar[type[InternVLVisionEncoder]] = InternVLVisionEncoder

    @classmethod
    def matches(cls, config: Mapping[str, Any]) -> bool:
        return (
            "InternVLChatModel" in (config.get("architectures") or [])
            and llm_architecture(config) in LLM_LOADERS
            and not is_hico_config(config)  # InternVideo2.5 (families/internvideo.py)
        )

    @cached_property
    def vision_config(self) -> InternViTConfig:
        return InternViTConfig.from_internvl_config(self.config)

    @property
    def image_size(self) -> int:
        return int(self.config.get("force_image_size") or self.config["vision_config"]["image_size"])

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens per image tile or video frame."""
        return self.vision_config.tokens_per_tile

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
        ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
        return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))

    def _check_media(self, parts: list[ImagePart | VideoPart], limits: PreprocessLimits) -> None:
        images = sum(isinstance(p, ImagePart) for p in parts)
        if images and not self.accepts_images:
            raise InvalidRequest(f"{self.name} checkpoints take video_url parts, not image_url parts")
        if len(parts) > images and self.video_policy is None:
            raise InvalidRequest(f"{self.name} checkpoints take images, not video_url parts")
        if len(parts) > limits.max_images:  # a video counts as one media item
            raise InvalidRequest(f"{len(parts)} images/videos were sent; this deployment allows at most "
                                 f"{limits.max_images}")

    def video_policy_for(self, limits: PreprocessLimits) -> VideoPolicy | None:
        """The family's video policy with the deployment's frame cap, if it sets one."""
        if self.video_policy is None or not limits.max_video_frames:
            return self.video_policy
        if limits.max_video_frames < self.video_policy.frame_multiple:
            raise SetupError(f"limits.max_video_frames must be >= {self.video_policy.frame_multiple} for {self.name}")
        return replace(self.video_policy, max_frames=limits.max_video_frames)

    def _video_tiles(self, part: VideoPart, media: MediaFetcher, limits: PreprocessLimits) -> list[np.ndarray]:
        policy = self.video_policy_for(limits)
        assert policy is not None
        url = part.url.strip()
        source = "video in data: URL" if url[:5].lower() == "data:" else f"video {url[:80]!r}"
        video = sample_video(media.fetch_bytes(url), policy, source=source)
        return start_images_tiles(video.frames, min_num=1, max_num=1, image_size=self.image_size, use_thumbnail=False,
                                  threads=limits.image_threads).result()

    def prepare(self, messages: list[Message], media: MediaFetcher, limits: PreprocessLimits) -> PreparedPrompt:
        parts = prompt_media(messages)
        self._check_media(parts, limits)
        max_tiles = limits.max_tiles_per_image or int(self.config.get("max_dynamic_patch", 12))
        # the vision encoder cuts the tiles from the decoded images (same bytes), for requests with images only
        on_device = limits.device_tiles and all(isinstance(p, ImagePart) for p in parts)
        # with threads, the images are fetched and decoded (and their planes made) while the prompt is built
        images = iter(open_images(media, [p.url for p in parts if isinstance(p, ImagePart)],
                                  threads=limits.image_threads, finish=plane_array if on_device else None))
        tiling = {"min_num": int(self.config.get("min_dynamic_patch", 1)), "max_num": max_tiles,
                  "image_size": self.image_size, "use_thumbnail": bool(self.config.get("use_thumbnail", True))}
        units: list[np.ndarray | PendingTiles] = []  # the tiles behind each `<image>` (an image's may still be made)
        counts: list[int] = []  # how many tiles each `<image>` has
        frames: list[int] = []
        decoded: list[PendingImage] = []
        grids: list[tuple[int, ...]] = []
        for part in parts:
            if isinstance(part, VideoPart):
                video = self._video_tiles(part, media, limits)
                frames.append(len(video))
                units.extend(video)
                counts.extend(t.shape[0] for t in video)
                continue
            image = next(images)
            if on_device:
                grids.append(image_grid(*image.size, **tiling))
                decoded.append(image)
                counts.append(grid_tiles(grids[-1]))
                continue
            units.append(start_images_tiles([image.result()], threads=limits.image_threads, **tiling))
            counts.append(num_tiles(*image.size, **tiling))
        if decoded and not device_cuttable(grids, image_size=self.image_size):  # the same tiles, made here
            units = [start_images_tiles([image.result()], threads=limits.image_threads, **tiling) for image in decoded]
            decoded = []
        # with threads the tiles are made while the prompt is rendered and tokenized (which releases the GIL)
        prompt = render_internvl_prompt(
            messages, template=self.config.get("template") or "internvl2_5",
            system_message=self.config.get("system_message"), video_frames=frames,
        )
        expanded = expand_image_placeholders(prompt, [n * self.tokens_per_tile for n in counts])
        ids = np.asarray(self.tokenizer.encode(expanded), dtype=np.int64)
        if ids.shape[0] > limits.max_prompt_tokens:
            raise InvalidRequest(
                f"the prompt has {ids.shape[0]} tokens (images included); this deployment allows "
                f"{limits.max_prompt_tokens}: send fewer or smaller images, or shorter text"
            )
        slots = ids == self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        num_image_tokens = int(slots.sum())
        ids[slots] = self.vocab_size + np.arange(num_image_tokens)  # unique fake id per image token
        if decoded:
            planes = pack_planes([image.finished() for image in decoded])
            return PreparedPrompt(ids.astype(np.int32), planes, num_image_tokens, prompt,
                                  image_grids=np.asarray(grids, dtype=np.int32))
        tiles = [unit.result()[0] if isinstance(unit, PendingTiles) else unit for unit in units]
        if [t.shape[0] for t in tiles] != counts:
            raise RuntimeError(f"tiles per image {[t.shape[0] for t in tiles]} differ from the prompt's {counts}")
        if len(tiles) == 1:
            pixel_values = tiles[0]
        elif tiles:
            pixel_values = np.concatenate(tiles)
        else:
            pixel_values = np.zeros((0, 3, self.image_size, self.image_size), np.uint8)
        return PreparedPrompt(ids.astype(np.int32), pixel_values, num_image_tokens, prompt)

    def pixel_lut(self) -> np.ndarray:
        return imagenet_lut()

    def tiles_from_images(self, images: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        rows = grids.reshape(-1, 5).tolist()
        if len(rows) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(rows)} image grids")
        tiles = [device_tiles(image, grid, image_size=self.image_size) for image, grid in zip(images, rows)]
        return torch.cat(tiles) if tiles else images.new_zeros((0, 3, self.image_size, self.image_size))

    def max_tiles_per_image(self, limits: PreprocessLimits) -> int:
        """Tiles one image can become: max_num tiles, plus the thumbnail when there is more than one."""
        max_num = limits.max_tiles_per_image or int(self.config.get("max_dynamic_patch", 12))
        thumbnail = bool(self.config.get("use_thumbnail", True)) and max_num > 1
        return max_num + int(thumbnail)

    def visual_budget(self, limits: PreprocessLimits) -> VisualBudget:
        video = self.video_policy_for(limits)
        per_item = max(self.max_tiles_per_image(limits) if self.accepts_images else 0,
                       video.max_frames if video else 0)
        return VisualBudget(
            max_units=limits.max_images * per_item,
            tokens_per_unit=self.tokens_per_tile,
            unit_shape=(3, self.image_size, self.image_size),
        )

    # --- vision_encoder / llm -----------------------------------------------------------------------------------
    def build_vision_encoder(self, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        return self.vision_encoder_class.from_checkpoint(self.checkpoint, dtype=dtype, device=device)

    def llm_part(self) -> LLMPart:
        return LLMPart(llm_architecture(self.config), dict(self.config["llm_config"]), "language_model.")

    def build_language_model(
        self, dtype: torch.dtype, device: torch.device, *, max_seq_len: int | None = None
    ) -> torch.nn.Module:
        return load_language_model(self.checkpoint, dtype=dtype, device=device, max_seq_len=max_seq_len)
