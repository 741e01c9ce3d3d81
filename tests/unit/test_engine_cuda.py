"""GPU only: the CUDA-graph decode path and the compiled pointwise ops against `generate` (skipped without CUDA;
run on the lent H100 with the bundle's pytest)."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_engine import MAX_SEQ, VOCAB, _tiny, join_plan, run_plan, tokens
from vlm_triton.engine import LLMEngine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_generate() -> None:
    model = _tiny("qwen2").to("cuda")
    engine = LLMEngine(
        model,
        max_slots=4,
        max_seq_len=MAX_SEQ,
        device="cuda",
        dtype=torch.float32,
        vocab_size=VOCAB,
        use_cuda_graphs=True,
        min_kv_bucket=16,  # several KV-length buckets within MAX_SEQ: steps move between graphs
    )
    assert engine.kv_buckets == [16, 32, 64, MAX_SEQ]
    assert engine._graphs is not None
    assert sorted(engine._graphs.graphs) == [(b, k) for b in engine.buckets for k in engine.kv_buckets]
    plan = join_plan(90)
    events = run_plan(engine, plan)
    for r in [r for rs in plan.values() for r in rs]:
        ids = list(r.input_ids)
        ref = model.generate(torch.tensor([ids], device="cuda"), do_sample=False, max_new_tokens=r.max_new_tokens)
        assert tokens(events[r.request_id]) == ref[0, len(ids) :].tolist(), r.request_id


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_compiled_pointwise_decode_matches_generate(kind: str) -> None:
    """engine.compile_pointwise: norms, RoPE and SiLU*up as compiled kernels under the CUDA graphs; float32, so
    greedy tokens must equal eager `generate` (computed before the engine patches the model)."""
    from vlm_triton.engine.pointwise import restore_rotary

    model = _tiny(kind).to("cuda")
    plan = join_plan(40)
    requests = [r for rs in plan.values() for r in rs]
    refs = {}
    for r in requests:
        ids = list(r.input_ids)
        out = model.generate(torch.tensor([ids], device="cuda"), do_sample=False, max_new_tokens=r.max_new_tokens)
        refs[r.request_id] = out[0, len(ids) :].tolist()
    try:
        engine = LLMEngine(model, max_slots=4, max_seq_len=MAX_SEQ, device="cuda", dtype=torch.float32,
                           vocab_size=VOCAB, use_cuda_graphs=True, min_kv_bucket=16, compile_pointwise=True)
        n_layers = model.config.num_hidden_layers
        assert engine.pointwise == {"norms": 2 * n_layers + 1, "mlps": n_layers, "rope_modules": 1}
        events = run_plan(engine, plan)
    finally:
        restore_rotary()
    for r in requests:
        assert tokens(events[r.request_id]) == refs[r.request_id], r.request_id
