"""Our torch InternViT + pixel shuffle + mlp1 projector, loaded straight from the original InternVL format.

`InternVLVisionEncoder.from_checkpoint(ckpt, dtype=..., device=...)` maps tiles [N, 3, S, S] to the LLM input
rows [N, tokens_per_tile, llm_hidden] (spec 3.1-3.3). Module names mirror the checkpoint keys
(`vision_model.*`, `mlp1.*`), so weights load with a strict `load_state_dict`. Works for InternViT-300M
(layer_norm, qkv bias) and InternViT-6B (rms_norm, qk-normalization over the full hidden vector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vlm_triton.checkpoints.checkpoint import Checkpoint, load_module_weights
from vlm_triton.errors import SetupError


@dataclass(frozen=True)
class InternViTConfig:
    """The vision-side fields of an original-format InternVL config.json (defaults = InternVisionConfig's)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    llm_hidden_size: int
    qkv_bias: bool = False
    qk_normalization: bool = True
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    image_size: int = 448  # force_image_size, else vision_config.image_size
    pos_image_size: int = 448  # vision_config.image_size: the grid the position table was trained at
    patch_size: int = 14
    select_layer: int = -1
    downsample_ratio: float = 0.5
    ps_version: str = "v1"

    @classmethod
    def from_internvl_config(cls, cfg: Mapping[str, Any]) -> "InternViTConfig":
        v = cfg["vision_config"]
        pos_size = int(v.get("image_size", 224))
        cfg_ = cls(
            hidden_size=int(v["hidden_size"]), num_layers=int(v["num_hidden_layers"]),
            num_heads=int(v["num_attention_heads"]), intermediate_size=int(v["intermediate_size"]),
            llm_hidden_size=int(cfg["llm_config"]["hidden_size"]),
            qkv_bias=bool(v.get("qkv_bias", False)), qk_normalization=bool(v.get("qk_normalization", True)),
            norm_type=str(v.get("norm_type", "rms_norm")), layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
            image_size=int(cfg.get("force_image_size") or pos_size), pos_image_size=pos_size,
            patch_size=int(v.get("patch_size", 14)), select_layer=int(cfg.get("select_layer", -1)),
            downsample_ratio=float(cfg.get("downsample_ratio", 0.5)), ps_version=str(cfg.get("ps_version", "v1")),
        )
        cfg_.validate()
        return cfg_

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise SetupError(f"vision hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise SetupError(f"vision norm_type must be layer_norm or rms_norm, got {self.norm_type!r}")
        if self.ps_version not in ("v1", "v2"):
            raise SetupError(f"ps_version must be 'v1' or 'v2', got {self.ps_version!r}")
        if not 0 <= self.layers_to_run <= self.num_layers:
            raise SetupError(f"select_layer {self.select_layer} is out of range for {self.num_layers} ViT layers")
        k = self.shuffle_factor
        if abs(k * self.downsample_ratio - 1) > 1e-6 or self.grid % k:
            raise SetupError(f"downsample_ratio {self.downsample_ratio} must be 1/k with k dividing the "
                             f"{self.grid}x{self.grid} patch grid")

    @property
    def layers_to_run(self) -> int:
        """hidden_states = (embeddings, out_1..out_N); select_layer s picks index s (Python indexing)."""
        return self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def shuffle_factor(self) -> int:
        return int(round(1 / self.downsample_ratio))

    @property
    def tokens_per_tile(self) -> int:
        return (self.grid // self.shuffle_factor) ** 2


class RMSNorm(nn.Module):
    """InternRMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _norm(cfg: InternViTConfig) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class _Attention(nn.Module):
    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = RMSNorm(c, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(c, cfg.layer_norm_eps)
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # rows [0,C) = Q, [C,2C) = K, [2C,3C) = V
        if self.qk_normalization:  # over the full C vector, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        heads = [t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _MLP(nn.Module):
    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = _Attention(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.norm2 = _norm(cfg)
        self.mlp = _MLP(cfg)
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.scales_folded = False

    def fold_layer_scales(self) -> None:
        """ls1 / ls2 multiply the outputs of attn.proj / mlp.fc2, so they can live in those layers' weights and
        biases (scaled once, in the dtype they are loaded in): two elementwise passes over [N, T, C] less per layer
        (on an H100, 1.8 of 24 ms for W1's 13 tiles)."""
        if self.scales_folded:
            return
        with torch.no_grad():
            for scale, linear in ((self.ls1, self.attn.proj), (self.ls2, self.mlp.fc2)):
                linear.weight.mul_(scale[:, None])
                linear.bias.mul_(scale)
                scale.fill_(1.0)
        self.scales_folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales_folded:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        c, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + (cfg.pos_image_size // p) ** 2, c))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, C, h, w]
        b, c, h, w = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(tokens.dtype).expand(b, -1, -1)
        return torch.cat([cls, tokens], dim=1) + self._positions(h, w, tokens.dtype)

    def _positions(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        table = self.position_embedding
        side = int(round((table.shape[1] - 1) ** 0.5))
        if (h, w) == (side, side):
            return table.to(dtype)
        grid = table[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.flatten(2).transpose(1, 2).to(dtype)
        return torch.cat([table[:, :1].to(dtype), grid], dim=1)


class _Encoder(nn.Module):
    def __init__(self, cfg: InternViTConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(num_layers))


class _VisionModel(nn.Module):
    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg, cfg.layers_to_run)


def pixel_shuffle(x: torch.Tensor, *, factor: int = 2, version: str = "v2") -> torch.Tensor:
    """Spec 3.2. x: [n, R, C, ch] (patch row, patch col) -> [n, R/k, C/k, k*k*ch].

    v2: Y[n, i, j, k*ch*s + ch*t + c] = X[n, k*i+s, k*j+t, c]. v1: the same with the token grid transposed
    (Y[n, j, i, ...]), i.e. token index (C/k)*j + i after flattening.
    """
    n, rows, cols, ch = x.shape
    y = x.reshape(n, rows // factor, factor, cols // factor, factor, ch)  # n, i, s, j, t, c
    order = (0, 1, 3, 2, 4, 5) if version == "v2" else (0, 3, 1, 2, 4, 5)
    y = y.permute(*order)
    return y.reshape(y.shape[0], y.shape[1], y.shape[2], factor * factor * ch)


class InternVLVisionEncoder(nn.Module):
    """InternViT (first `layers_to_run` layers) -> drop CLS -> pixel shuffle -> mlp1."""

    def __init__(self, cfg: InternViTConfig) -> None:
        super().__init__()
        self.config = cfg
        wide = cfg.hidden_size * cfg.shuffle_factor**2
        self.vision_model = _VisionModel(cfg)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(wide, eps=1e-5), nn.Linear(wide, cfg.llm_hidden_size), nn.GELU(),
            nn.Linear(cfg.llm_hidden_size, cfg.llm_hidden_size),
        )

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", fold_scales: bool = True) -> "InternVLVisionEncoder":
        cfg = InternViTConfig.from_internvl_config(ckpt.config)
        model = cls(cfg)
        load_module_weights(ckpt, model, ("vision_model.", "mlp1."),
                            layers=("vision_model.encoder.layers.", cfg.layers_to_run), what="vision weights")
        if fold_scales:  # fold_scales=False: the layer scales as separate multiplies (benchmarks/vision_micro.py)
            for layer in model.vision_model.encoder.layers:  # in float32, before the cast: one rounding per weight
                layer.fold_layer_scales()
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @property
    def tokens_per_tile(self) -> int:
        return self.config.tokens_per_tile

    def vit_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> selected ViT layer output without CLS, [N, grid*grid, C]."""
        x = self.vision_model.embeddings(pixel_values)
        for layer in self.vision_model.encoder.layers:
            x = layer(x)
        return x[:, 1:]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.vit_features(pixel_values)
        n, tokens, c = feats.shape
        side = int(round(tokens**0.5))
        shuffled = pixel_shuffle(feats.reshape(n, side, side, c), factor=self.config.shuffle_factor,
                                 version=self.config.ps_version)
        return self.mlp1(shuffled.reshape(n, -1, shuffled.shape[-1]))
