"""InternVideo2.5-Chat-8B: InternVL2.5-8B (InternViT-300M + InternLM2.5-7B) with HiCo token compression.

Matched on config.json: `InternVLChatModel` whose `auto_map` names the HiCo remote code
`modeling_internvl_chat_hico2` (`models.hico.is_hico_config`; the InternVL family refuses such configs). The
checkpoint's extra training-only modules (action/track/temporal/SAM heads, spec 1.6) are never loaded: the
vision encoder reads `vision_model.*` + `mlp1.*` and the LLM `language_model.*` only.

Differences from InternVL, all in this class: 16 tokens per frame (`HiCoVisionEncoder`), video only (the hico2
model merges every 4 tiles, so a lone image cannot be encoded), frames sampled in multiples of 4 (at most 128,
the model card's `num_segments`), one tile per frame, `Frame{k}: <image>` lines.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from vlm_triton.families import register
from vlm_triton.families.internvl import InternVLFamily
from vlm_triton.models.hico import FRAMES_PER_GROUP, MERGED_TOKENS_PER_GROUP, HiCoVisionEncoder, is_hico_config
from vlm_triton.models.internvit import InternVLVisionEncoder
from vlm_triton.models.language_model import LLM_LOADERS, llm_architecture
from vlm_triton.multimodal.video import VideoPolicy


@register
class InternVideoFamily(InternVLFamily):
    name = "internvideo"
    description = "InternVideo2.5-Chat (InternVLChatModel with HiCo remote code modeling_internvl_chat_hico2; video)"
    accepts_images: ClassVar[bool] = False
    device_tiles: ClassVar[bool] = False  # video frames only, tiled on the host
    video_policy: ClassVar[VideoPolicy | None] = VideoPolicy(max_frames=128, frame_multiple=FRAMES_PER_GROUP)
    vision_encoder_class: ClassVar[type[InternVLVisionEncoder]] = HiCoVisionEncoder

    @classmethod
    def matches(cls, config: Mapping[str, Any]) -> bool:
        return (
            "InternVLChatModel" in (config.get("architectures") or [])
            and llm_architecture(config) in LLM_LOADERS
            and is_hico_config(config)
        )

    @property
    def tokens_per_tile(self) -> int:
        return MERGED_TOKENS_PER_GROUP // FRAMES_PER_GROUP
