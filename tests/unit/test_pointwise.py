"""engine/pointwise.py: the functions it compiles are transformers' own maths (checked eagerly, bit for bit, on
CPU; the compiled path runs under CUDA graphs in test_engine's CUDA tests)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config
from transformers.models.qwen2 import modeling_qwen2 as qwen2

from vlm_triton.engine.pointwise import (
    _is_rms_norm,
    _is_silu_mlp,
    rms_norm,
    rotary,
    silu_mul,
)


def _config() -> Qwen2Config:
    return Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=1, vocab_size=50)


def test_rms_norm_is_qwen2s() -> None:
    torch.manual_seed(0)
    norm = qwen2.Qwen2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 64).to(dtype)
        n = norm.to(dtype)
        assert torch.equal(rms_norm(x, n.weight, n.variance_epsilon), n(x))
    assert _is_rms_norm(norm)


def test_rotary_is_apply_rotary_pos_emb() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    rope = qwen2.Qwen2RotaryEmbedding(_config())
    cos, sin = rope(q, torch.arange(7).view(1, -1).expand(2, -1))
    got, want = rotary(q, k, cos, sin), qwen2.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_silu_mul_is_the_mlp_activation() -> None:
    torch.manual_seed(0)
    mlp = qwen2.Qwen2MLP(_config())
    x = torch.randn(3, 64)
    want = mlp(x)
    got = mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
    assert torch.equal(got, want)
    assert _is_silu_mlp(mlp)


def test_patched_model_generates_the_same_tokens(monkeypatch) -> None:
    """The patching itself (decode-only dispatch, prefill on the eager modules) on CPU, with torch.compile
    replaced by the identity: `generate` must not change."""
    from vlm_triton.engine import pointwise

    torch.manual_seed(0)
    model = qwen2.Qwen2ForCausalLM(_config()).eval()
    ids = torch.randint(0, 50, (1, 7))
    want = model.generate(ids, do_sample=False, max_new_tokens=6)
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=True: fn)
    try:
        counts = pointwise.compile_pointwise(model.model, torch.device("cpu"))
        got = model.generate(ids, do_sample=False, max_new_tokens=6)
    finally:
        pointwise.restore_rotary()
    assert counts == {"norms": 3, "mlps": 1, "rope_modules": 1}
    assert torch.equal(got, want)


@pytest.mark.parametrize("prefill", [False, True])
def test_prefill_flag_routes_prompt_forwards_to_the_compiled_functions(monkeypatch, prefill: bool) -> None:
    """With torch.compile replaced by a wrapper that records the token dimension of what it is given: decode steps
    (one token) always take the compiled functions, a 7-token prompt only with `prefill`; `generate` unchanged."""
    from vlm_triton.engine import pointwise

    torch.manual_seed(0)
    model = qwen2.Qwen2ForCausalLM(_config()).eval()
    ids = torch.randint(0, 50, (1, 7))
    want = model.generate(ids, do_sample=False, max_new_tokens=3)
    seen: dict[str, set[int]] = {}

    def recording(fn, dynamic=True):
        def run(*args, **kwargs):
            seen.setdefault(fn.__name__, set()).add(int(args[0].shape[-2]))
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", recording)
    try:
        pointwise.compile_pointwise(model.model, torch.device("cpu"), prefill=prefill)
        seen.clear()  # the warm-up calls of compile_pointwise itself
        got = model.generate(ids, do_sample=False, max_new_tokens=3)
    finally:
        pointwise.restore_rotary()
    assert torch.equal(got, want)
    assert seen == {name: ({1, 7} if prefill else {1}) for name in ("rms_norm", "rotary", "silu_mul")}
