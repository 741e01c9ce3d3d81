"""Dynamic-NTK RoPE equals plain RoPE up to max_position_embeddings, so the loader may use the plain form
(which CUDA graphs can capture) when the deployment never runs longer sequences."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlm_triton.models.language_model import static_rope_within


def _config() -> Qwen2Config:
    return Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 4.0})


def test_plain_rope_only_when_it_cannot_differ() -> None:
    cfg = _config()
    static_rope_within(cfg, max_seq_len=128)  # could exceed the limit: keep dynamic
    assert cfg.rope_parameters["rope_type"] == "dynamic"
    static_rope_within(cfg, max_seq_len=None)
    assert cfg.rope_parameters["rope_type"] == "dynamic"
    static_rope_within(cfg, max_seq_len=64)
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


def test_same_logits_within_the_limit_and_different_beyond() -> None:
    torch.manual_seed(0)
    dynamic = Qwen2ForCausalLM(_config()).eval()
    plain_cfg = _config()
    static_rope_within(plain_cfg, max_seq_len=64)
    plain = Qwen2ForCausalLM(plain_cfg).eval()
    plain.load_state_dict(dynamic.state_dict())
    ids = torch.randint(0, 100, (1, 64))
    with torch.inference_mode():
        assert torch.equal(dynamic(ids).logits, plain(ids).logits)
        longer = torch.randint(0, 100, (1, 96))  # past the limit the dynamic base changes: the check is real
        assert not torch.allclose(dynamic(longer).logits, plain(longer).logits)
