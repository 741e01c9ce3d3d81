"""InternVideo2.5 HiCo token compression (model_specs.md 3.4) on top of our InternViT encoder.

InternVideo2.5-Chat-8B (`modeling_internvl_chat_hico2.py`) is InternVL2.5-8B with one change in the vision
path: after pixel shuffle, every 4 consecutive frames (one 448x448 tile each) are pooled into one sequence of
4 x 256 tokens and reduced to 64 tokens by ToMe bipartite soft matching (rounds 1024 -> 512 -> 256 -> 128 -> 64),
then cut back into 4 x 16 rows for the projector. So a frame costs 16 LLM tokens instead of 256, and the tile
count of a request must be a multiple of 4 (frames of one video are contiguous in `pixel_values`, and every
video is sampled to a multiple of 4 frames, so groups never straddle videos or requests).

One matching round with r tokens to remove, on x [b, p, c] with running token sizes s [b, p, 1]:
  metric = mean over `metric_heads` equal chunks of the channels (heads = llm num_attention_heads), L2-normalised;
  A = even tokens, B = odd tokens; each A token's best B (max cosine); the r A tokens with the highest best score
  are merged into their B token as a size-weighted mean; result = [unmerged A in score order] ++ [B in order].
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.errors import SetupError
from vlm_triton.models.internvit import InternVLVisionEncoder, pixel_shuffle

FRAMES_PER_GROUP = 4  # `local_num_frames` in the reference
MERGED_TOKENS_PER_GROUP = 64  # `num_tome_tokens`
HICO_MODELING_MODULE = "modeling_internvl_chat_hico2"


def is_hico_config(config: Mapping[str, Any]) -> bool:
    """True for checkpoints whose remote code is the HiCo model: an `auto_map` entry names the hico2 module.

    The model card loads InternVideo2.5 with `AutoModel.from_pretrained(..., trust_remote_code=True)` and gets
    the 16-tokens-per-frame HiCo model, so its `auto_map.AutoModel` must point at `modeling_internvl_chat_hico2`
    (inferred from the card; the released config.json itself was not read). No config key says "HiCo" otherwise.
    """
    auto_map = config.get("auto_map") or {}
    return any(HICO_MODELING_MODULE in str(v) for v in auto_map.values())


def merge_schedule(tokens: int, target: int) -> list[int]:
    """Tokens removed per round: half of them while that does not overshoot, then the remainder."""
    if tokens <= target:
        raise ValueError(f"cannot merge {tokens} tokens down to {target}")
    rounds = []
    while tokens != target:
        r = tokens - target if tokens - target <= tokens // 2 else tokens // 2
        rounds.append(r)
        tokens -= r
    return rounds


def _merge_round(x: torch.Tensor, size: torch.Tensor, r: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, p, c = x.shape
    metric = x.reshape(b, p, heads, c // heads).mean(dim=2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [b, A, B]
    best, match = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src, kept = order[:, :r], order[:, r:]
    dst = match.gather(1, src)

    def merge(t: torch.Tensor) -> torch.Tensor:
        width = t.shape[-1]
        even, odd = t[:, ::2], t[:, 1::2]
        unmerged = even.gather(1, kept[..., None].expand(-1, -1, width))
        moved = even.gather(1, src[..., None].expand(-1, -1, width))
        return torch.cat([unmerged, odd.scatter_add(1, dst[..., None].expand(-1, -1, width), moved)], dim=1)

    merged_size = merge(size)
    return merge(x * size) / merged_size, merged_size


def hico_merge(x: torch.Tensor, *, target: int, heads: int) -> torch.Tensor:
    """[b, p, c] -> [b, target, c] by size-weighted ToMe rounds (see the module docstring)."""
    if x.shape[-1] % heads:
        raise ValueError(f"channel width {x.shape[-1]} is not divisible by {heads} metric heads")
    size = torch.ones_like(x[..., :1])
    for r in merge_schedule(x.shape[1], target):
        x, size = _merge_round(x, size, min(r, x.shape[1] // 2), heads)
    return x


class HiCoVisionEncoder(InternVLVisionEncoder):
    """InternViT -> drop CLS -> pixel shuffle -> HiCo merge per 4 frames -> mlp1: [N, 3, S, S] -> [N, 16, H]."""

    metric_heads: int = 1

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "HiCoVisionEncoder":
        model = super().from_checkpoint(ckpt, dtype=dtype, device=device)
        assert isinstance(model, HiCoVisionEncoder)
        model.metric_heads = int(ckpt.config["llm_config"]["num_attention_heads"])
        if model.config.tokens_per_tile * FRAMES_PER_GROUP <= MERGED_TOKENS_PER_GROUP:
            raise SetupError(f"HiCo needs more than {MERGED_TOKENS_PER_GROUP} tokens per group of "
                             f"{FRAMES_PER_GROUP} frames; this ViT gives {model.config.tokens_per_tile} per frame")
        return model

    @property
    def tokens_per_tile(self) -> int:
        return MERGED_TOKENS_PER_GROUP // FRAMES_PER_GROUP

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n = pixel_values.shape[0]
        if n % FRAMES_PER_GROUP:
            raise ValueError(f"HiCo encodes frames in groups of {FRAMES_PER_GROUP}; got {n} tiles")
        feats = self.vit_features(pixel_values)
        side = int(round(feats.shape[1] ** 0.5))
        shuffled = pixel_shuffle(feats.reshape(n, side, side, feats.shape[-1]),
                                 factor=self.config.shuffle_factor, version=self.config.ps_version)
        groups = shuffled.reshape(n // FRAMES_PER_GROUP, -1, shuffled.shape[-1])
        merged = hico_merge(groups, target=MERGED_TOKENS_PER_GROUP, heads=self.metric_heads)
        return self.mlp1(merged.reshape(n, self.tokens_per_tile, merged.shape[-1]))
