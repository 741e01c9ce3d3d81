"""MiniCPM-V-2.6's Qwen2 LLM: the top-level config.json is a Qwen2Config (plus vision fields); weights are `llm.*`.

The reference builds `Qwen2ForCausalLM(config)` from the whole MiniCPMVConfig, so every Qwen2 field is read from
the top level; the vision/slicing fields are dropped here. `llm.model.*` / `llm.lm_head.weight` map 1:1 onto
transformers' names once `llm.` is stripped.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.errors import SetupError
from vlm_triton.models.language_model import static_rope_within

try:  # skips the random init of weights we overwrite anyway
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover - other transformers versions
    no_init_weights = nullcontext  # type: ignore[assignment]

_QWEN2_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "use_sliding_window",
    "sliding_window", "max_window_layers", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
})


def minicpmv_llm_config(config: Mapping[str, Any]) -> Qwen2Config:
    """The Qwen2 fields of a MiniCPM-V config.json as a transformers Qwen2Config."""
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in config]
    if missing:
        raise SetupError(f"config.json lacks the Qwen2 fields {missing}; is this a MiniCPM-V-2.6 checkpoint?")
    fields = {k: v for k, v in config.items() if k in _QWEN2_FIELDS}
    fields.setdefault("tie_word_embeddings", False)
    return Qwen2Config(**fields)


def load_minicpmv_language_model(ckpt: Checkpoint, *, dtype: torch.dtype = torch.float32,
                                 device: str | torch.device = "cpu", max_seq_len: int | None = None) -> Qwen2ForCausalLM:
    """`Qwen2ForCausalLM` with the checkpoint's `llm.*` weights (SDPA attention, eval mode, no grad)."""
    config = minicpmv_llm_config(ckpt.config)
    static_rope_within(config, max_seq_len)
    with no_init_weights(), torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    weights = ckpt.load_tensors("llm.")
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise SetupError(f"LLM weights (llm.*) in {ckpt.path} do not match config.json: missing {sorted(missing)}, "
                         f"unexpected {sorted(result.unexpected_keys)}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval().requires_grad_(False)
