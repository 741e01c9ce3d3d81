"""Fewer GEMMs per decoder layer: the q/k/v projections of Qwen2/Llama-style attention as one GEMM, and the MLP's
gate and up projections as one (`engine.fuse_projections`).

A decode step of a small model is a chain of small kernels (benchmarks/engine_profile.py): the three projections
of a layer read the same input and each launch costs about as much as its work at batch 1–64. Here each group's
weights (and biases) are concatenated once into one tensor on the device; the group's modules become
`FusedMember`s whose own `weight` / `bias` are views of it, so memory does not grow and `named_parameters()` and
`state_dict()` keep their names and values. The first member of a group (q_proj, gate_proj: transformers' forwards
call q, k, v and gate, up in this order, on the same tensor) computes the whole group's output in one GEMM; the
others, called next with that same tensor, return their slices of it, and the last one releases it. Called with
any other input a member computes its own slice of the weight: correct in any order, only unfused.

Numerics: each output column is the same dot product as before; a GEMM of another width may pick another kernel
and sum in another order, so bf16 outputs can differ in the last bits (float32 greedy tokens equal `generate`'s in
the tests). Patches module instances of the given model only (any family whose layers have these Linear names).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


class _Group:
    """One fused GEMM: its weight and bias, and its output for the input being served."""

    __slots__ = ("weight", "bias", "input", "output", "left", "size")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, size: int) -> None:
        self.weight, self.bias, self.size = weight, bias, size
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.left = 0


class FusedMember(nn.Module):
    def __init__(self, group: _Group, start: int, stop: int, first: bool) -> None:
        super().__init__()
        self.group, self.start, self.stop, self.first = group, start, stop, first
        self.weight = nn.Parameter(group.weight[start:stop], requires_grad=False)  # views: no copy
        self.bias = None if group.bias is None else nn.Parameter(group.bias[start:stop], requires_grad=False)
        self.in_features, self.out_features = int(group.weight.shape[1]), stop - start

    def _apply(self, fn: Any, recurse: bool = True) -> "FusedMember":
        # .to() / .half() / .cuda() would give this member a new weight and leave the group's fused one behind
        raise RuntimeError("fused projections cannot be moved or cast: move the model before fusing")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        if self.first:
            g.input, g.output, g.left = x, F.linear(x, g.weight, g.bias), g.size
        elif g.output is None or g.input is not x:
            return F.linear(x, self.weight, self.bias)
        assert g.output is not None
        out = g.output[..., self.start : self.stop]
        g.left -= 1
        if g.left == 0:  # every member took its slice: let the output go
            g.input = g.output = None
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fused rows [{self.start}, {self.stop})")


def _fuse(parent: nn.Module, names: tuple[str, ...]) -> bool:
    linears = [getattr(parent, n, None) for n in names]
    if not all(type(m) is nn.Linear for m in linears):
        return False
    mods: list[nn.Linear] = linears  # type: ignore[assignment]
    has_bias = [m.bias is not None for m in mods]
    tensors = [m.weight for m in mods] + [m.bias for m in mods if m.bias is not None]
    if (len({m.in_features for m in mods}) != 1 or len(set(has_bias)) != 1
            or len({(t.dtype, t.device) for t in tensors}) != 1):
        return False
    with torch.no_grad():
        weight = torch.cat([m.weight for m in mods])
        bias = torch.cat([m.bias for m in mods]) if has_bias[0] else None  # type: ignore[misc]
    group = _Group(weight, bias, len(mods))
    start = 0
    for i, (name, m) in enumerate(zip(names, mods)):
        setattr(parent, name, FusedMember(group, start, start + m.out_features, first=i == 0))
        start += m.out_features
    return True


def fuse_projections(backbone: nn.Module) -> dict[str, int]:
    """Fuse every decoder layer's q/k/v and gate/up Linear layers of `backbone` (in place, on its device and
    dtype); how many groups of each kind were fused. Layers whose projections are not plain `nn.Linear`s with one
    input width and the same bias setting are left as they are."""
    counts = {"qkv": 0, "gate_up": 0}
    # the groups first, then fuse: a list of the modules themselves would keep every replaced Linear alive to the
    # end (a second copy of these weights at the peak); this way each layer's originals go as it is fused
    groups = [(parent, attr, names) for module in backbone.modules() for attr, names in GROUPS
              if isinstance(parent := getattr(module, attr, None), nn.Module)]
    for parent, attr, names in groups:
        if _fuse(parent, names):
            counts["qkv" if attr == "self_attn" else "gate_up"] += 1
    return counts
