"""InternLM2 / InternLM2.5 in the torch engine: wqkv split, Llama mapping, dynamic-NTK rope range, family wiring."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.checkpoints.tiny import make_tiny_checkpoint
from vlm_triton.checkpoints.to_hf import _wqkv_rows, convert_to_hf
from vlm_triton.families import family_class_for, open_family
from vlm_triton.models.language_model import build_llm_config, load_language_model, split_internlm2_wqkv

Q, K, V = 1000, 2000, 3000


def _coded_wqkv(heads: int, kv: int, d: int, width: int) -> torch.Tensor:
    """wqkv built from the spec 5.2 layout: row (g(G+2)+slot)D + dd holds code(head) + dd/100 in every column."""
    group = heads // kv
    rows = []
    for g in range(kv):
        for slot in range(group + 2):
            code = Q + g * group + slot if slot < group else (K + g if slot == group else V + g)
            rows.extend([code + dd / 100 for dd in range(d)])
    return torch.tensor(rows, dtype=torch.float64)[:, None].expand(-1, width).clone()


def _expected(code: int, n: int, d: int) -> torch.Tensor:
    return torch.tensor([code + h + dd / 100 for h in range(n) for dd in range(d)], dtype=torch.float64)


@pytest.mark.parametrize("heads,kv", [(8, 2), (4, 4), (6, 1), (48, 8)])
def test_wqkv_split_puts_every_head_in_place(heads: int, kv: int) -> None:
    d = 3
    wqkv = _coded_wqkv(heads, kv, d, width=5)
    q, k, v = split_internlm2_wqkv(wqkv, num_heads=heads, num_kv_heads=kv)
    torch.testing.assert_close(q[:, 0], _expected(Q, heads, d))
    torch.testing.assert_close(k[:, 0], _expected(K, kv, d))
    torch.testing.assert_close(v[:, 0], _expected(V, kv, d))
    bias_q, _, bias_v = split_internlm2_wqkv(wqkv[:, 0].contiguous(), num_heads=heads, num_kv_heads=kv)
    torch.testing.assert_close(bias_q, q[:, 0])
    torch.testing.assert_close(bias_v, v[:, 0])
    # the -hf converter's split (the reference side) is written independently; it must agree too
    q_rows, k_rows, v_rows = _wqkv_rows(heads, kv, d)
    torch.testing.assert_close(wqkv[q_rows], q)
    torch.testing.assert_close(wqkv[k_rows], k)
    torch.testing.assert_close(wqkv[v_rows], v)


def test_wqkv_split_rejects_bad_shapes() -> None:
    from vlm_triton.errors import SetupError

    with pytest.raises(SetupError, match="multiple"):
        split_internlm2_wqkv(torch.zeros(13, 4), num_heads=4, num_kv_heads=2)
    with pytest.raises(SetupError, match="num_key_value_heads"):
        split_internlm2_wqkv(torch.zeros(12, 4), num_heads=4, num_kv_heads=3)


@pytest.fixture(scope="module")
def internlm2_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A float32 tiny InternVL2.5-InternLM2 with 8 query heads on 2 kv heads (G = 4) and its -hf conversion."""
    root = tmp_path_factory.mktemp("internlm2")
    src = make_tiny_checkpoint("internvl2_5_internlm2", root / "src", seed=3, dtype="float32",
                               llm={"num_attention_heads": 8, "num_key_value_heads": 2})
    return src, convert_to_hf(src, root / "hf")


def test_loader_logits_equal_transformers_llama(internlm2_pair: tuple[Path, Path]) -> None:
    from transformers import InternVLForConditionalGeneration

    src, hf = internlm2_pair
    ours = load_language_model(Checkpoint.open(src))
    ref = InternVLForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    assert type(ours).__name__ == "LlamaForCausalLM" and ref.config.text_config.model_type == "llama"
    ids = torch.randint(0, 600, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours(input_ids=ids).logits, ref(input_ids=ids).logits
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_llm_config_mapping(internlm2_pair: tuple[Path, Path]) -> None:
    cfg = build_llm_config(Checkpoint.open(internlm2_pair[0]).config)
    assert (cfg.attention_bias, cfg.mlp_bias, cfg.tie_word_embeddings) == (False, False, False)
    assert cfg.rope_parameters["rope_type"] == "dynamic" and cfg.rope_parameters["factor"] == 2.0
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.rms_norm_eps == 1e-5
    assert cfg.num_key_value_heads == 2 and cfg.vocab_size == 609


def _internlm2_remote_inv_freq(theta: float, dim: int, length: int, max_pos: int, factor: float) -> torch.Tensor:
    """The InternLM2 remote-code dynamic NTK rule (spec 5.2), for a fresh model seeing `length` tokens."""
    base = theta
    if length > max_pos:
        base = theta * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


@pytest.mark.parametrize("length", [1, 7, 16, 17, 40])
def test_dynamic_rope_matches_internlm2_rule_for_a_single_pass(length: int) -> None:
    """Identical up to max_position_embeddings (both plain theta) and, for one pass, beyond it too. Across requests
    they differ past M (the remote code never shrinks back), which is why deployments keep max_seq_len <= M."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                      rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0})
    rope = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, length, 16)
    cos, sin = rope(x, torch.arange(length)[None])
    inv = _internlm2_remote_inv_freq(1e6, 16, length, 16, 2.0)
    angles = torch.arange(length).float()[:, None] * inv[None]
    emb = torch.cat([angles, angles], dim=-1)
    torch.testing.assert_close(cos[0], emb.cos(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sin[0], emb.sin(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family,name,template,ps", [
    ("internvl2_5_internlm2", "internvl", "internvl2_5", "v2"),
    ("internvl_chat_v1_5", "internvl", "internlm2-chat", "v1"),
    ("internvideo2_5", "internvideo", "internlm2-chat", "v2"),
])
def test_family_matching(tmp_path: Path, family: str, name: str, template: str, ps: str) -> None:
    ckpt = Checkpoint.open(make_tiny_checkpoint(family, tmp_path / family))
    assert family_class_for(ckpt.config).name == name
    assert (ckpt.config["template"], ckpt.config["ps_version"]) == (template, ps)


def test_stop_tokens_are_looked_up_by_string(internlm2_pair: tuple[Path, Path], tiny_internvl3: Path) -> None:
    fam = open_family(internlm2_pair[0])
    tok = fam.load_tokenizer()
    assert fam.stop_token_ids(tok) == [tok.convert_tokens_to_ids(t)
                                       for t in ("<|im_end|>", "<|action_end|>", "<|action_start|>")]
    qwen = open_family(tiny_internvl3)
    qtok = qwen.load_tokenizer()
    assert qwen.stop_token_ids(qtok) == [qtok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def test_prompt_ids_start_with_bos_and_use_internlm2_chat(tmp_path: Path) -> None:
    from vlm_triton.families.base import PreprocessLimits
    from vlm_triton.multimodal.media import MediaFetcher
    from vlm_triton.prompt.internvl_template import INTERNLM2_CHAT_SYSTEM
    from vlm_triton.prompt.messages import parse_messages

    fam = open_family(make_tiny_checkpoint("internvl_chat_v1_5", tmp_path / "v15"))
    prepared = fam.prepare(parse_messages([{"role": "user", "content": "Hi"}]), MediaFetcher(), PreprocessLimits())
    assert prepared.prompt_text == (f"<|im_start|>system\n{INTERNLM2_CHAT_SYSTEM}<|im_end|><|im_start|>user\nHi"
                                    "<|im_end|><|im_start|>assistant\n")
    tok = fam.load_tokenizer()
    assert prepared.input_ids[0] == tok.convert_tokens_to_ids("<s>") == 1
    assert tok.decode(prepared.input_ids[1:].tolist()) == prepared.prompt_text
