"""MiniCPM-V-2.6 vision: SigLIP with variable-resolution ("navit") patches + the resampler (model_specs.md 3.5).

`MiniCPMVVisionEncoder.from_checkpoint(ckpt, dtype=..., device=...)` maps a batch of patch-laid-out items
[N, 3, P, Lmax*P] (zero-padded, see `multimodal.minicpmv_slicing`) and their patch grids `tgt_sizes` [N, 2]
(rows, cols) to the LLM input rows [N, query_num, llm_hidden]. Items of different requests batch together: each
item attends only to its own rows*cols patches (padded keys are masked), so the result of an item does not depend
on what it is batched with. The batch is trimmed to its longest item before the encoder runs.

Position ids (the reference's float32 torch ops, reproduced op for op because equal fractions sit on bucket
boundaries): the fractional coordinates arange(0, 1-1e-6, 1/n) of the item's rows and columns are bucketized
against arange(1/S, 1, 1/S) (right=True), S = image_size // patch_size (70), and id = row_bucket * S + col_bucket.
Module names mirror the checkpoint (`vpm.*`, `resampler.*`), so the weights load with a strict state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vlm_triton.checkpoints.checkpoint import Checkpoint, load_module_weights
from vlm_triton.errors import SetupError
from vlm_triton.models.minicpmv_resampler import Resampler

_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class MiniCPMVVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int  # layers that run (vision_config.num_hidden_layers, minus one if drop_vision_last_layer)
    num_heads: int
    llm_hidden_size: int
    query_num: int = 64
    image_size: int = 980
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_batch_size: int = 16

    @classmethod
    def from_minicpmv_config(cls, cfg: Mapping[str, Any]) -> "MiniCPMVVisionConfig":
        v = cfg["vision_config"]
        layers = int(v["num_hidden_layers"]) - (1 if cfg.get("drop_vision_last_layer", True) else 0)
        out = cls(
            hidden_size=int(v["hidden_size"]), intermediate_size=int(v["intermediate_size"]), num_layers=layers,
            num_heads=int(v["num_attention_heads"]), llm_hidden_size=int(cfg["hidden_size"]),
            query_num=int(cfg.get("query_num", 64)), image_size=int(v.get("image_size", 980)),
            patch_size=int(v.get("patch_size", 14)), layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
            hidden_act=str(v.get("hidden_act", "gelu_pytorch_tanh")),
            vision_batch_size=int(cfg.get("vision_batch_size", 16)),
        )
        if out.hidden_size % out.num_heads:
            raise SetupError(f"vision hidden_size {out.hidden_size} is not divisible by {out.num_heads} heads")
        if out.hidden_act not in _ACTIVATIONS:
            raise SetupError(f"vision hidden_act {out.hidden_act!r} is not supported; use {sorted(_ACTIVATIONS)}")
        if out.num_layers < 1:
            raise SetupError("the vision tower has no layers left to run")
        return out

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@lru_cache(maxsize=1024)
def navit_position_ids(*, rows: int, cols: int, patches_per_side: int) -> torch.Tensor:
    """int64 [rows*cols]: the position-table row of every patch of a rows x cols item (cached; do not mutate)."""
    side = patches_per_side
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    n_rows, n_cols = torch.tensor(rows, dtype=torch.int32), torch.tensor(cols, dtype=torch.int32)
    frac_rows = torch.arange(0, 1 - 1e-6, 1 / n_rows)  # float32 step, as the reference computes it
    frac_cols = torch.arange(0, 1 - 1e-6, 1 / n_cols)
    bucket_rows = torch.bucketize(frac_rows, boundaries, right=True)
    bucket_cols = torch.bucketize(frac_cols, boundaries, right=True)
    return (bucket_rows[:, None] * side + bucket_cols).flatten()


class _Attention(nn.Module):
    def __init__(self, cfg: MiniCPMVVisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        heads = [p(x).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
                 for p in (self.q_proj, self.k_proj, self.v_proj)]
        out = F.scaled_dot_product_attention(*heads, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class _MLP(nn.Module):
    def __init__(self, cfg: MiniCPMVVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class _Layer(nn.Module):
    def __init__(self, cfg: MiniCPMVVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = _Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, cfg: MiniCPMVVisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, cfg.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, cfg: MiniCPMVVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_layers))


class SiglipNavit(nn.Module):
    """SigLIP over patch-laid-out items of different sizes; returns post-layernormed features [N, L, C]."""

    def __init__(self, cfg: MiniCPMVVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def position_ids(self, tgt_sizes: list[tuple[int, int]], length: int) -> torch.Tensor:
        out = torch.zeros(len(tgt_sizes), length, dtype=torch.long)
        for i, (rows, cols) in enumerate(tgt_sizes):
            out[i, : rows * cols] = navit_position_ids(rows=rows, cols=cols,
                                                       patches_per_side=self.config.patches_per_side)
        return out

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: list[tuple[int, int]],
                keep: torch.Tensor | None) -> torch.Tensor:
        weight = self.embeddings.patch_embedding.weight
        x = self.embeddings.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)  # [N, L, C]
        ids = self.position_ids(tgt_sizes, x.shape[1]).to(x.device)
        x = x + self.embeddings.position_embedding(ids)
        mask = None if keep is None else keep[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)


class MiniCPMVVisionEncoder(nn.Module):
    """SigLIP-navit -> resampler: ([N, 3, P, Lmax*P], tgt_sizes [N, 2]) -> [N, query_num, llm_hidden]."""

    def __init__(self, cfg: MiniCPMVVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vpm = SiglipNavit(cfg)
        self.resampler = Resampler(num_queries=cfg.query_num, dim=cfg.llm_hidden_size, kv_dim=cfg.hidden_size)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "MiniCPMVVisionEncoder":
        cfg = MiniCPMVVisionConfig.from_minicpmv_config(ckpt.config)
        model = cls(cfg)
        # resampler.pos_embed is a non-persistent buffer in the reference, recomputed here
        load_module_weights(ckpt, model, ("vpm.", "resampler."), layers=("vpm.encoder.layers.", cfg.num_layers),
                            ignore=("resampler.pos_embed",), what="vision weights")
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @property
    def tokens_per_item(self) -> int:
        return self.config.query_num

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, P, W] (W >= longest item's patches * P), tgt_sizes int [N, 2] (rows, cols)."""
        sizes = [(int(r), int(c)) for r, c in tgt_sizes.tolist()]
        if pixel_values.shape[0] != len(sizes):
            raise ValueError(f"{pixel_values.shape[0]} items but {len(sizes)} tgt_sizes")
        p = self.config.patch_size
        outputs = []
        for start in range(0, len(sizes), self.config.vision_batch_size):
            chunk = sizes[start: start + self.config.vision_batch_size]
            lengths = torch.tensor([r * c for r, c in chunk])
            longest = int(lengths.max())
            if longest * p > pixel_values.shape[-1] or int(lengths.min()) < 1:
                raise ValueError(f"tgt_sizes {chunk} do not fit pixel_values of width {pixel_values.shape[-1]}")
            pixels = pixel_values[start: start + len(chunk), :, :, : longest * p]
            keep = None
            if int(lengths.min()) != longest:
                keep = (torch.arange(longest)[None, :] < lengths[:, None]).to(pixels.device)
            feats = self.vpm(pixels, chunk, keep)
            outputs.append(self.resampler(feats, chunk, keep))
        return torch.cat(outputs) if outputs else pixel_values.new_zeros(0, self.config.query_num,
                                                                        self.config.llm_hidden_size)
