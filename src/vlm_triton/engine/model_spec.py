"""What the engine needs to know about a transformers causal LM, checked once when an engine is built.

`ModelSpec.of` resolves the decoder stack (`backbone`) and `lm_head`, reads the cache's shape from the config,
refuses what the engine cannot serve (sliding-window layers, attention other than sdpa / eager, fewer embedding
rows than the vocabulary) and switches sdpa models to the engine's `vlm_slot` attention (engine/attention.py),
whose prefill is packed (engine/packed.py); eager-attention models keep additive float masks and the padded prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from vlm_triton.engine.attention import NAME as SLOT_ATTENTION
from vlm_triton.engine.attention import use_slot_attention
from vlm_triton.errors import SetupError


@dataclass(frozen=True)
class ModelSpec:
    backbone: nn.Module
    lm_head: nn.Module
    hidden_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    bool_mask: bool  # the attention takes bool masks (True = attend); False: eager's additive float masks
    packed: bool  # the attention is vlm_slot: prefill packed, not padded

    @classmethod
    def of(cls, model: nn.Module, *, vocab_size: int, backbone: nn.Module | None = None,
           lm_head: nn.Module | None = None) -> ModelSpec:
        """`backbone` / `lm_head` default to `model.model` / `model.get_output_embeddings()` (pass them for wrappers
        such as a VLM whose language model sits elsewhere). Switches an sdpa model's attention to vlm_slot."""
        stack: nn.Module = backbone if backbone is not None else cast(nn.Module, model.model)
        head = lm_head if lm_head is not None else cast(Any, model).get_output_embeddings()
        if not isinstance(head, nn.Module):
            raise SetupError("the model has no output embeddings (lm_head); pass lm_head=")
        config: Any = stack.config
        embed: nn.Module = cast(Any, stack).get_input_embeddings()
        rows, hidden = (int(d) for d in cast(torch.Tensor, embed.weight).shape)
        if vocab_size > rows:
            raise SetupError(f"vocab_size {vocab_size} exceeds the {rows} embedding rows")
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise SetupError(f"only full-attention models are supported, this one has {sorted(layer_types)}")
        attn = getattr(config, "_attn_implementation", "sdpa")
        if attn not in ("sdpa", "eager", SLOT_ATTENTION):
            raise SetupError(f"attn_implementation must be 'sdpa' or 'eager', got {attn!r}")
        use_slot_attention(config)  # sdpa -> the same maths without repeating K/V per query head
        heads = int(config.num_attention_heads)
        return cls(
            backbone=stack,
            lm_head=head,
            hidden_size=hidden,
            num_layers=int(config.num_hidden_layers),
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            bool_mask=attn != "eager",
            packed=config._attn_implementation == SLOT_ATTENTION,
        )
