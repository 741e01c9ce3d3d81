"""Build the transformers LLM of an original-format InternVL checkpoint and load its `language_model.*` weights.

The loader is picked by `llm_config.architectures[0]` from `LLM_LOADERS`. Qwen2 maps 1:1 onto
`Qwen2ForCausalLM`. InternLM2 / InternLM2.5 (`InternLM2ForCausalLM`, remote code only) is the Llama architecture
with renamed weights and a fused `attention.wqkv`, so it loads into `LlamaForCausalLM` (spec 5.2):

- wqkv rows are grouped per KV head: [kv, G + 2, D, H] holds G query heads, one key head, one value head per
  group (G = heads / kv); see `split_internlm2_wqkv`.
- RoPE is NeoX-style over the full head_dim in both, so no row permutation is needed.
- `rope_scaling {"type": "dynamic", "factor": f}` maps to transformers' `rope_type: "dynamic"`. Both use
  base' = theta * (f * L / M - (f - 1)) ** (D / (D - 2)) once the length L exceeds M = max_position_embeddings,
  and plain theta up to M, so they are **identical for sequences up to M** (32768 in the released configs).
  Beyond M they differ: the remote code never shrinks its cache back (a later short request keeps the enlarged
  base), transformers resets below M and, in a batch, scales by the longest row. Keep `max_seq_len <= M`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedConfig, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

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
    convert_config: Callable[[dict[str, Any]], dict[str, Any]] = dict  # llm_config fields -> config_class kwargs


def _identity_weights(tensors: dict[str, torch.Tensor], config: PreTrainedConfig) -> dict[str, torch.Tensor]:
    return tensors  # Qwen2: `language_model.` stripped, the rest is already transformers' naming


# --- InternLM2 -> Llama ------------------------------------------------------------------------------------------
_INTERNLM2_RENAMES: tuple[tuple[str, str], ...] = (  # substring renames, applied after `output.` -> `lm_head.`
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)
_INTERNLM2_CONFIG_KEYS = frozenset({
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "rope_theta", "vocab_size", "torch_dtype", "head_dim",
})


def split_internlm2_wqkv(wqkv: torch.Tensor, *, num_heads: int, num_kv_heads: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused InternLM2 `wqkv` (weight [(heads + 2 kv) D, H] or bias [(heads + 2 kv) D]) -> (q, k, v) row blocks.

    Row ((g (G + 2) + slot) D + d): slot < G is query head g G + slot, slot G key head g, slot G + 1 value head g.
    """
    if num_heads % num_kv_heads:
        raise SetupError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    rows = wqkv.shape[0]
    head_dim, rest = divmod(rows, num_heads + 2 * num_kv_heads)
    if rest:
        raise SetupError(f"wqkv has {rows} rows, not a multiple of heads + 2 kv = {num_heads + 2 * num_kv_heads}")
    blocks = wqkv.reshape(num_kv_heads, group + 2, head_dim, *wqkv.shape[1:])
    q = blocks[:, :group].reshape(num_heads * head_dim, *wqkv.shape[1:])
    k = blocks[:, group].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    v = blocks[:, group + 1].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def _internlm2_weights(tensors: dict[str, torch.Tensor], config: PreTrainedConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if ".attention.wqkv." in name:
            q, k, v = split_internlm2_wqkv(t, num_heads=config.num_attention_heads,
                                           num_kv_heads=config.num_key_value_heads)
            prefix, kind = name.split(".attention.wqkv.")
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{prefix}.self_attn.{proj}.{kind}"] = part
            continue
        if name.startswith("output."):
            name = "lm_head." + name[len("output."):]
        for old, new in _INTERNLM2_RENAMES:
            name = name.replace(old, new)
        out[name] = t
    return out


def _internlm2_config(fields: dict[str, Any]) -> dict[str, Any]:
    """InternLM2 llm_config -> LlamaConfig kwargs (`bias` covers wqkv and wo only; the MLP never has one)."""
    out = {k: v for k, v in fields.items() if k in _INTERNLM2_CONFIG_KEYS}
    bias = bool(fields.get("bias", True))  # the InternLM2Config class default is True
    out.update(attention_bias=bias, mlp_bias=False, tie_word_embeddings=False)
    scaling = fields.get("rope_scaling")
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in ("dynamic", "linear"):
            raise SetupError(f"InternLM2 rope_scaling type {kind!r} is not supported; supported: dynamic, linear")
        out["rope_scaling"] = {"rope_type": kind, "factor": float(scaling["factor"])}
    return out


LLM_LOADERS: dict[str, LLMLoader] = {
    "Qwen2ForCausalLM": LLMLoader(Qwen2Config, Qwen2ForCausalLM, _identity_weights),
    "InternLM2ForCausalLM": LLMLoader(LlamaConfig, LlamaForCausalLM, _internlm2_weights, _internlm2_config),
}


def llm_architecture(config: Mapping[str, Any]) -> str:
    archs = config.get("llm_config", {}).get("architectures") or []
    if not archs:
        raise SetupError("config.json has no llm_config.architectures; is this an original-format InternVL checkpoint?")
    return str(archs[0])


def build_llm_config(config: Mapping[str, Any]) -> PreTrainedConfig:
    """The transformers config for `config["llm_config"]` (tie_word_embeddings forced off, as InternVL does)."""
    loader = _loader(config)
    fields = loader.convert_config({k: v for k, v in config["llm_config"].items() if k not in _DROP_KEYS})
    fields["tie_word_embeddings"] = False
    return loader.config_class(**fields)


def static_rope_within(config: PreTrainedConfig, max_seq_len: int | None) -> None:
    """Use plain RoPE when dynamic-NTK scaling can never trigger.

    Dynamic NTK changes the base only for sequences longer than max_position_embeddings; below that it equals plain
    RoPE exactly. The engine never runs a sequence past `max_seq_len`, so when that is within the limit the plain
    form gives the same numbers and has no data-dependent branch (which breaks CUDA-graph capture of the decode step).
    """
    params = getattr(config, "rope_parameters", None) or {}
    limit = getattr(config, "max_position_embeddings", None)
    if params.get("rope_type") == "dynamic" and max_seq_len is not None and limit and max_seq_len <= limit:
        config.rope_parameters = {"rope_type": "default", "rope_theta": params["rope_theta"]}


def load_language_model(ckpt: Checkpoint, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", max_seq_len: int | None = None) -> PreTrainedModel:
    """The checkpoint's LLM as a transformers causal LM (SDPA attention, eval mode, no grad).

    `max_seq_len`: the longest sequence it will serve (enables `static_rope_within`)."""
    loader = _loader(ckpt.config)
    config = build_llm_config(ckpt.config)
    static_rope_within(config, max_seq_len)
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
