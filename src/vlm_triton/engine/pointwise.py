"""Fewer kernels per step: the pointwise parts of Qwen2/Llama-style decoders (RMSNorm, RoPE, SiLU-and-multiply)
compiled with torch.compile into one Triton kernel each, GEMMs and attention left as they are, for decode steps (one
token per row) and, with `prefill`, for prefill forwards too.

At batch 1 a decode step of InternVL3-1B's LLM is ~600 small kernels (benchmarks/engine_profile.py); eager RMSNorm
alone is seven. Measured on an H100 (docs/benchmarks.md): the captured step 2.77 -> 1.73 ms at batch 1, KV 256. In
prefill the eager pointwise ops are memory passes over [tokens, hidden] and [tokens, intermediate] in float32 and
bf16, as much GPU time as the GEMMs at 8k tokens; compiled (under the prefill graphs), a 3.4k-token prefill took
15.2 -> 12.6 ms (item 38; before the prefill graphs, in eager prefill, they had made it ~16 ms slower).

The same maths as the model's modules, with eager's bf16 roundings kept (`emulate_precision_casts`); reductions
may still sum in another order, so bf16 logits differ in the last bits and greedy tokens of random-weight models
(near-tied logits) can diverge after some steps. CUDA only (Triton kernels); patches the given model's norm and MLP
instances and, for RoPE, the global `apply_rotary_pos_emb` of its modeling module (Qwen2, Llama), which then
applies to every model of that family in the process: meant for a serving process that holds one model.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ROPE_MODULES = ("transformers.models.qwen2.modeling_qwen2", "transformers.models.llama.modeling_llama")
_ORIGINAL_ROPE: dict[str, Any] = {}  # module name -> its apply_rotary_pos_emb before patching


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2RMSNorm / LlamaRMSNorm."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb` (rotate-half RoPE)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    half = q.shape[-1] // 2

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__ in ("Qwen2RMSNorm", "LlamaRMSNorm") and hasattr(module, "variance_epsilon")


def _is_silu_mlp(module: nn.Module) -> bool:
    return (type(module).__name__ in ("Qwen2MLP", "LlamaMLP")
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU"))


def compile_pointwise(backbone: nn.Module, device: torch.device, prefill: bool = False) -> dict[str, int]:
    """Patch `backbone` (on `device`, CUDA) to run its norms, MLP activation and RoPE as compiled kernels, in decode
    steps only, or with `prefill` in every forward. Returns how many of each were patched; patches nothing (and logs
    why) when compiling fails on this host."""
    import torch._inductor.config as inductor_config

    inductor_config.emulate_precision_casts = True  # keep eager's bf16 roundings inside fused kernels
    norm_fn = torch.compile(rms_norm, dynamic=True)
    rope_fn = torch.compile(rotary, dynamic=True)
    act_fn = torch.compile(silu_mul, dynamic=True)
    dtype = next(backbone.parameters()).dtype
    try:  # compile now, on this device, so that a host without a working Triton falls back before serving
        x = torch.randn(2, 3, 64, device=device, dtype=dtype)
        norm_fn(x, torch.ones(64, device=device, dtype=dtype), 1e-6)
        act_fn(x, x)
        q = torch.randn(2, 4, 3, 64, device=device, dtype=dtype)
        rope_fn(q, q, x, x)
    except Exception:
        logger.exception("compiling the pointwise ops failed; decoding with the eager modules")
        return {"norms": 0, "mlps": 0, "rope_modules": 0}
    counts = {"norms": 0, "mlps": 0, "rope_modules": 0}
    models = set()
    most = None if prefill else 1  # the most tokens per row that take the compiled kernels (None: any)
    for module in backbone.modules():
        if _is_rms_norm(module):
            eps, eager = float(module.variance_epsilon), type(module).forward
            module.forward = types.MethodType(
                lambda self, x, _eps=eps, _eager=eager: norm_fn(x, self.weight, _eps)
                if most is None or x.shape[-2] <= most else _eager(self, x), module)
            counts["norms"] += 1
        elif _is_silu_mlp(module):
            eager = type(module).forward
            module.forward = types.MethodType(
                lambda self, x, _eager=eager: self.down_proj(act_fn(self.gate_proj(x), self.up_proj(x)))
                if most is None or x.shape[-2] <= most else _eager(self, x), module)
            counts["mlps"] += 1
        models.add(type(module).__module__)
    for name in ROPE_MODULES:
        mod: Any = sys.modules.get(name)
        if name in models and mod is not None and hasattr(mod, "apply_rotary_pos_emb"):
            original = _ORIGINAL_ROPE.setdefault(name, mod.apply_rotary_pos_emb)
            mod.apply_rotary_pos_emb = rope_fn if prefill else _decode_only(rope_fn, original)
            counts["rope_modules"] += 1
    return counts


def _decode_only(compiled: Any, eager: Any) -> Any:
    def apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> Any:
        if q.shape[-2] == 1:
            return compiled(q, k, cos, sin, unsqueeze_dim)
        return eager(q, k, cos, sin, unsqueeze_dim)

    return apply


def restore_rotary() -> None:
    """Undo the RoPE patch of `compile_pointwise` (patched module instances stay patched)."""
    for name, fn in _ORIGINAL_ROPE.items():
        sys.modules[name].apply_rotary_pos_emb = fn
    _ORIGINAL_ROPE.clear()
