"""Build the transformers LLM of an original-format InternVL checkpoint and load its `language_model.*` weights.

The loader is picked by `llm_config.architectures[0]` from `LLM_LOADERS`. Qwen2 maps 1:1 onto
`Qwen2ForCausalLM`; InternLM2 (fused wqkv -> Llama) is meant to be added as another entry.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from transformers import PreTrainedConfig, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.errors import SetupError

try:  # skips the random init of weights we overwrite anyway
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover - other transformers versions
    no_init_weights = nullcontext  # type: ignore[assignment]

# llm_config keys that describe the original training setup, not the architecture.
_DROP_KEYS = frozenset({"_name_or_path", "auto_map", "attn_implementation", "_attn_implementation",
                        "_attn_implementation_autoset", "use_flash_attn", "transformers_version"})


@dataclass(frozen=True)
class LLMLoader:
    """One LLM architecture: its transformers classes and how checkpoint tensors map onto them."""

    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    convert_weights: Callable[[dict[str, torch.Tensor], PreTrainedConfig], dict[str, torch.Tensor]]


def _identity_weights(tensors: dict[str, torch.Tensor], config: PreTrainedConfig) -> dict[str, torch.Tensor]:
    return tensors  # Qwen2: `language_model.` stripped, the rest is already transformers' naming


LLM_LOADERS: dict[str, LLMLoader] = {
    "Qwen2ForCausalLM": LLMLoader(Qwen2Config, Qwen2ForCausalLM, _identity_weights),
}


def llm_architecture(config: Mapping[str, Any]) -> str:
    archs = config.get("llm_config", {}).get("architectures") or []
    if not archs:
        raise SetupError("config.json has no llm_config.architectures; is this an original-format InternVL checkpoint?")
    return str(archs[0])


def build_llm_config(config: Mapping[str, Any]) -> PreTrainedConfig:
    """The transformers config for `config["llm_config"]` (tie_word_embeddings forced off, as InternVL does)."""
    loader = _loader(config)
    fields = {k: v for k, v in config["llm_config"].items() if k not in _DROP_KEYS}
    fields["tie_word_embeddings"] = False
    return loader.config_class(**fields)


def load_language_model(ckpt: Checkpoint, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> PreTrainedModel:
    """The checkpoint's LLM as a transformers causal LM (SDPA attention, eval mode, no grad)."""
    loader = _loader(ckpt.config)
    config = build_llm_config(ckpt.config)
    with no_init_weights(), torch.device(device):
        model = loader.model_class._from_config(config, attn_implementation="sdpa", dtype=dtype)
    weights = loader.convert_weights(ckpt.load_tensors("language_model."), config)
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SetupError(f"language-model weights in {ckpt.path} do not match llm_config: missing "
                         f"{sorted(result.missing_keys)}, unexpected {sorted(result.unexpected_keys)}")
    return model.eval().requires_grad_(False)


def _loader(config: Mapping[str, Any]) -> LLMLoader:
    arch = llm_architecture(config)
    if arch not in LLM_LOADERS:
        raise SetupError(f"LLM architecture {arch!r} is not supported yet; supported: {', '.join(sorted(LLM_LOADERS))}")
    return LLM_LOADERS[arch]
