"""Experiment: fewer kernels per decode step by compiling the pointwise parts of a Qwen2-style decoder (RMSNorm,
RoPE, SiLU-and-multiply) with torch.compile (dynamic shapes, one Triton kernel each), leaving GEMMs and attention
as they are. Used by `engine_profile --variants` to measure whether it is worth building into the engine.

Patches instances (norms, MLPs) and, for RoPE, the modeling module's global `apply_rotary_pos_emb`: call it
only in a process that serves nothing else.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
          ) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    half = q.shape[-1] // 2

    def rot(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def compile_pointwise(backbone: nn.Module) -> dict[str, int]:
    import torch._inductor.config as inductor_config

    inductor_config.emulate_precision_casts = True  # keep eager's bf16 roundings inside fused kernels
    rms = torch.compile(_rms, dynamic=True)
    rope = torch.compile(_rope, dynamic=True)
    silu_mul = torch.compile(_silu_mul, dynamic=True)
    counts = {"norms": 0, "mlps": 0, "rope_modules": 0}
    for module in backbone.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            eps = float(module.variance_epsilon)
            module.forward = types.MethodType(lambda self, x, _e=eps: rms(x, self.weight, _e), module)
            counts["norms"] += 1
        elif name.endswith("MLP") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
            if getattr(module.act_fn, "__class__", type(None)).__name__ not in ("SiLU", "SiLUActivation"):
                continue
            module.forward = types.MethodType(
                lambda self, x: self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x))), module)
            counts["mlps"] += 1
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("transformers.models.") and hasattr(mod, "apply_rotary_pos_emb") and \
                hasattr(mod, "rotate_half") and mod_name.endswith(("modeling_qwen2", "modeling_llama")):
            mod.apply_rotary_pos_emb = rope
            counts["rope_modules"] += 1
    return counts


def max_abs_diff(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).abs().max())
