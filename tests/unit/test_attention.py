"""The engine's "vlm_slot" attention equals transformers' sdpa attention (which repeats K/V per query head)."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vlm_triton.engine.attention import slot_attention

B, H, KVH, D = 3, 8, 2, 16


def module() -> types.SimpleNamespace:
    return types.SimpleNamespace(num_key_value_groups=H // KVH, is_causal=True)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out, _ = sdpa_attention_forward(module(), q, k, v, mask, scaling=D**-0.5)
    return out


def test_decode_rows_of_different_lengths() -> None:
    torch.manual_seed(0)
    kv_len = 32
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, KVH, kv_len, D), torch.randn(B, KVH, kv_len, D)
    lengths = torch.tensor([1, 17, 32])
    mask = (torch.arange(kv_len).view(1, 1, 1, -1) < lengths.view(-1, 1, 1, 1))  # bool, True = attend
    out, _ = slot_attention(module(), q, k, v, mask, scaling=D**-0.5)
    assert out.shape == (B, 1, H, D)
    torch.testing.assert_close(out, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    # a masked-out position cannot leak: changing it leaves the first row's output unchanged
    k2 = k.clone()
    k2[0, :, 5] += 100
    out2, _ = slot_attention(module(), q, k2, v, mask, scaling=D**-0.5)
    torch.testing.assert_close(out2[0], out[0])


@pytest.mark.parametrize("q_len, start", [(9, 0), (4, 6)])
def test_prefill_from_zero_and_continued(q_len: int, start: int) -> None:
    torch.manual_seed(1)
    kv_len = start + q_len
    q, k, v = torch.randn(1, H, q_len, D), torch.randn(1, KVH, kv_len, D), torch.randn(1, KVH, kv_len, D)
    rows = torch.arange(start, kv_len).view(-1, 1)
    mask = (torch.arange(kv_len).view(1, -1) <= rows).view(1, 1, q_len, kv_len)
    out, _ = slot_attention(module(), q, k, v, mask, scaling=D**-0.5)
    assert out.shape == (1, q_len, H, D)
    torch.testing.assert_close(out, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_float_masks_are_refused() -> None:
    q, k, v = torch.randn(1, H, 1, D), torch.randn(1, KVH, 4, D), torch.randn(1, KVH, 4, D)
    with pytest.raises(ValueError, match="bool"):
        slot_attention(module(), q, k, v, torch.zeros(1, 1, 1, 4), scaling=D**-0.5)
