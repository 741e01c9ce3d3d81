"""GPU only: the CUDA-graph decode path and the compiled pointwise ops against `generate` (skipped without CUDA;
run on the lent H100 with the bundle's pytest)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.unit.engine_helpers import (
    MAX_SEQ,
    VOCAB,
    _tiny,
    drain,
    hf_greedy,
    join_plan,
    prompt,
    run_plan,
    tokens,
)
from vlm_triton.engine import GenerationRequest, LLMEngine


def _cuda_engine(model: Any, dtype: torch.dtype = torch.float32, **options: Any) -> LLMEngine:
    """The engine of most tests here: 4 slots on CUDA graphs, KV-length buckets from 16 (several within MAX_SEQ)."""
    options = {"max_slots": 4, "max_seq_len": MAX_SEQ, "min_kv_bucket": 16, **options}
    return LLMEngine(model, device="cuda", dtype=dtype, vocab_size=VOCAB, use_cuda_graphs=True, **options)


def _generate_tokens(model: Any, plan: dict[Any, list[GenerationRequest]]) -> dict[str, list[int]]:
    """`generate`'s greedy tokens for every request of `plan` (before any engine patches the model)."""
    return {r.request_id: hf_greedy(model, list(r.input_ids), r.max_new_tokens) for rs in plan.values() for r in rs}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prefill_tokens", [8192, 5])  # 5: most prompts are prefilled in chunks between the graphs
@pytest.mark.parametrize("kv_cache_tokens", [0, 3 * MAX_SEQ // 4])  # the default pool, and one where requests wait
def test_cuda_graph_decode_matches_generate(prefill_tokens: int, kv_cache_tokens: int) -> None:
    model = _tiny("qwen2").to("cuda")
    engine = LLMEngine(
        model,
        max_slots=4,
        max_seq_len=3 * MAX_SEQ // 4 if kv_cache_tokens else MAX_SEQ,
        kv_cache_tokens=kv_cache_tokens,
        device="cuda",
        dtype=torch.float32,
        vocab_size=VOCAB,
        use_cuda_graphs=True,
        min_kv_bucket=16,  # several KV-length buckets within MAX_SEQ: steps move between graphs
        prefill_tokens=prefill_tokens,
    )
    assert engine.kv_buckets == [16, 32, 64, engine.max_seq_len]
    assert engine._graphs is not None
    assert sorted(engine._graphs.graphs) == [(b, k) for b in engine.buckets for k in engine.kv_buckets]
    plan = join_plan(90)
    events = run_plan(engine, plan)
    for r in [r for rs in plan.values() for r in rs]:
        assert tokens(events[r.request_id]) == hf_greedy(model, list(r.input_ids), r.max_new_tokens), r.request_id
    assert (engine.prefill_chunks > 0) == (prefill_tokens < max(len(r.input_ids) for rs in plan.values() for r in rs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("prefill", [False, True])
def test_compiled_pointwise_matches_generate(kind: str, prefill: bool) -> None:
    """engine.compile_pointwise: norms, RoPE and SiLU*up as compiled kernels under the CUDA graphs, in decode steps
    and with `prefill` in the prefill too (patched directly: the engine compiles prefill only under its graphs,
    which need FA2's fp16/bf16, and the bf16 graphed prefill is the next test); float32, so greedy tokens must equal
    eager `generate` (computed before the engine patches the model)."""
    from vlm_triton.engine.pointwise import compile_pointwise, restore_rotary

    model = _tiny(kind).to("cuda")
    plan = join_plan(40)
    refs = _generate_tokens(model, plan)
    try:
        engine = _cuda_engine(model, compile_pointwise=True)
        n_layers = model.config.num_hidden_layers
        assert engine.pointwise == {"norms": 2 * n_layers + 1, "mlps": n_layers, "rope_modules": 1}
        if prefill:
            compile_pointwise(engine.backbone, engine.device, prefill=True)
        events = run_plan(engine, plan)
    finally:
        restore_rotary()
    assert {k: tokens(v) for k, v in events.items()} == refs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_pointwise_in_graphed_prefill_keeps_bf16_tokens() -> None:
    """bf16, prefill replayed from CUDA graphs captured with the compiled pointwise kernels (`prefill_pointwise`):
    the same greedy tokens as the engine whose prefill keeps the eager modules (the tiny model's logits are well
    separated; the kernels differ only in summation order)."""
    from vlm_triton.engine.pointwise import restore_rotary

    model = _tiny("qwen2").to("cuda", torch.bfloat16)
    results = []
    try:
        for prefill in (False, True):
            engine = _cuda_engine(model, torch.bfloat16, compile_pointwise=True, prefill_pointwise=prefill)
            assert getattr(engine.prefill, "graphs", None) is not None and engine.prefill_pointwise is prefill
            results.append(run_plan(engine, join_plan(50)))
            restore_rotary()  # the RoPE patch is the modeling module's: the next engine patches it afresh
    finally:
        restore_rotary()
    eager, compiled = results
    assert {k: tokens(v) for k, v in compiled.items()} == {k: tokens(v) for k, v in eager.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pointwise", [False, True])  # True: with the compiled kernels, decode and prefill, which
def test_fused_projections_keep_bf16_tokens(pointwise: bool) -> None:  # then take the fused outputs' strided slices
    """bf16 under the decode and prefill graphs: each layer's q/k/v and gate/up as one GEMM (`fuse_projections`)
    give the same greedy tokens as the separate GEMMs (two copies of the same tiny model: fusing patches it; the
    tiny model's logits are well separated)."""
    from vlm_triton.engine.pointwise import restore_rotary

    results = []
    try:
        for fused in (False, True):
            model = _tiny("qwen2").to("cuda", torch.bfloat16)
            engine = _cuda_engine(model, torch.bfloat16, fuse_projections=fused, compile_pointwise=pointwise,
                                  prefill_pointwise=pointwise)
            layers = model.config.num_hidden_layers
            assert engine.fused == ({"qkv": layers, "gate_up": layers} if fused else {})
            assert engine._graphs is not None and getattr(engine.prefill, "graphs", None) is not None
            results.append(run_plan(engine, join_plan(60)))
            restore_rotary()
    finally:
        restore_rotary()
    separate, fused_run = results
    assert {k: tokens(v) for k, v in fused_run.items()} == {k: tokens(v) for k, v in separate.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_projections_match_generate_in_float32() -> None:
    """float32 (decode graphs, compiled pointwise): the engine with fused projections gives `generate`'s greedy
    tokens, computed before fusing."""
    from vlm_triton.engine.pointwise import restore_rotary

    model = _tiny("qwen2").to("cuda")
    plan = join_plan(70)
    refs = _generate_tokens(model, plan)
    try:
        engine = _cuda_engine(model, compile_pointwise=True, fuse_projections=True)
        assert engine.fused["qkv"] == model.config.num_hidden_layers and engine._graphs is not None
        events = run_plan(engine, plan)
    finally:
        restore_rotary()
    assert {k: tokens(v) for k, v in events.items()} == refs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_decode_matches_masked_sdpa(dtype: torch.dtype) -> None:
    """The varlen decode kernel over the KV pool's rows (each row's span from its own offset, in any order) equals
    the masked SDPA of the same rows gathered as padded K/V (fp32 reference)."""
    import torch.nn.functional as F

    from vlm_triton.engine import attention
    from vlm_triton.engine.kv_cache import PooledKVCache, span_rows

    gen = torch.Generator(device="cuda").manual_seed(3)
    capacity, heads, kv_heads, dim = 4096, 14, 2, 64
    cache = PooledKVCache(num_layers=1, capacity=capacity, kv_heads=kv_heads, head_dim=dim, dtype=dtype,
                          device=torch.device("cuda"))
    layer = cache.pool_layers[0]
    layer.keys.copy_(torch.randn(layer.keys.shape, generator=gen, device="cuda"))
    layer.values.copy_(torch.randn(layer.values.shape, generator=gen, device="cuda"))
    for bucket, kv_len in [(1, 256), (4, 512), (8, 256)]:
        pos = torch.randint(0, kv_len, (bucket,), generator=gen, device="cuda")
        starts = torch.randperm(capacity // kv_len, generator=gen, device="cuda")[:bucket] * kv_len
        states = torch.randn(bucket, kv_heads, 1, dim, generator=gen, device="cuda", dtype=dtype)
        cache.set_mode("decode", starts + pos, None, kv_len=kv_len)
        key, value = layer.update(states, states * 2)
        cache.set_idle()
        assert key.shape == (capacity + 1, kv_heads, dim)  # the pool itself
        query = torch.randn(bucket, heads, 1, dim, generator=gen, device="cuda", dtype=dtype)
        rows = attention.DecodeRows((pos + 1).to(torch.int32),
                                    torch.cat([starts, starts.new_zeros(1)]).to(torch.int32),
                                    torch.arange(bucket + 1, dtype=torch.int32, device="cuda"), kv_len)
        allowed = torch.arange(kv_len, device="cuda").view(1, 1, 1, -1) <= pos.view(-1, 1, 1, 1)
        out, _ = attention.slot_attention(torch.nn.Module(), query, key, value, allowed, slot_decode=rows)
        gather = span_rows(starts, kv_len, pos)
        k_pad, v_pad = (t[gather].transpose(1, 2).float() for t in (key, value))
        ref = F.scaled_dot_product_attention(query.float(), k_pad, v_pad, attn_mask=allowed,
                                             enable_gqa=True).transpose(1, 2)
        assert out.shape == (bucket, 1, heads, dim)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        assert torch.equal(key[starts + pos], states[:, :, 0])  # the new K went to each row's own run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("small_pool", [False, True])
def test_flash_decode_engine_bf16_matches_sdpa_engine(small_pool: bool) -> None:
    """bf16 engines with CUDA graphs, one decoding with the varlen kernel over the pool's rows ('auto') and one
    with masked SDPA over K/V gathered from them: same greedy tokens on a tiny model with well separated logits.
    small_pool: 40 rows for requests needing 92 together, so requests wait for rows and reuse freed runs."""
    from vlm_triton.engine.attention import set_decode_backend

    model = _tiny("qwen2").to("cuda", torch.bfloat16)
    results = []
    for backend in ("auto", "sdpa"):
        set_decode_backend(backend)
        try:
            engine = LLMEngine(model, max_slots=4, max_seq_len=40 if small_pool else MAX_SEQ, device="cuda",
                               dtype=torch.bfloat16, vocab_size=VOCAB, use_cuda_graphs=True, min_kv_bucket=16,
                               kv_cache_tokens=40 if small_pool else 0)
            results.append(run_plan(engine, join_plan(50)))
            assert (engine.admission.kv_waits > 0) == small_pool
        finally:
            set_decode_backend("auto")
    flash, sdpa = results
    assert {k: tokens(v) for k, v in flash.items()} == {k: tokens(v) for k, v in sdpa.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prefill_tokens", [8192, 5])  # 5: chunks that continue a cached prefix
def test_prefill_graphs_match_eager_prefill(prefill_tokens: int) -> None:
    """bf16: the packed prefill replayed from its CUDA graphs (padded to a token bucket, its inputs loaded into
    static buffers) gives the same greedy tokens as the same packed forward run eagerly."""
    model = _tiny("qwen2").to("cuda", torch.bfloat16)
    results = []
    for graphs in (True, False):
        engine = LLMEngine(model, max_slots=4, max_seq_len=MAX_SEQ, device="cuda", dtype=torch.bfloat16,
                           vocab_size=VOCAB, use_cuda_graphs=True, min_kv_bucket=16, prefill_tokens=prefill_tokens,
                           prefill_graphs=graphs)
        prefill_graphs = getattr(engine.prefill, "graphs", None)
        assert (prefill_graphs is not None) == graphs
        if graphs:
            assert sorted(prefill_graphs.graphs) == engine.prefill.buckets  # type: ignore[union-attr]
        results.append(run_plan(engine, join_plan(50)))
        assert (engine.prefill_chunks > 0) == (prefill_tokens == 5)
    replayed, eager = results
    assert {k: tokens(v) for k, v in replayed.items()} == {k: tokens(v) for k, v in eager.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_packed_prefill_matches_per_sequence_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16: the packed prefill's FA2 varlen call (sequences side by side, chunks bottom-right aligned over their
    cached prefix) against one masked SDPA per sequence (the path of CPU and fp32): same greedy tokens."""
    from vlm_triton.engine import attention

    model = _tiny("qwen2").to("cuda", torch.bfloat16)
    results = []
    for flash in (True, False):
        if not flash:
            monkeypatch.setattr(attention, "flash_supported", lambda *a: False)
        engine = LLMEngine(model, max_slots=4, max_seq_len=MAX_SEQ, device="cuda", dtype=torch.bfloat16,
                           vocab_size=VOCAB, use_cuda_graphs=False, prefill_tokens=7)
        results.append(run_plan(engine, join_plan(50)))
    flash_run, sdpa_run = results
    assert {k: tokens(v) for k, v in flash_run.items()} == {k: tokens(v) for k, v in sdpa_run.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunks_with_nothing_decoding_wait_for_their_input_copy() -> None:
    """A long prompt prefilled chunk by chunk while no request decodes: no step samples until the last chunk, so
    nothing else waits for the GPU between chunks. With the GPU kept busy before every replay, each chunk's inputs
    must still be the ones copied from its own load (the pinned host buffer is refilled only after the previous
    copy ran): the same tokens as with a full sync after every chunk."""
    model = _tiny("qwen2").to("cuda", torch.bfloat16)
    results = []
    for mode in ("sync", "busy"):
        engine = LLMEngine(model, max_slots=4, max_seq_len=MAX_SEQ, device="cuda", dtype=torch.bfloat16,
                           vocab_size=VOCAB, use_cuda_graphs=True, min_kv_bucket=16, prefill_tokens=5)
        graphs = engine.prefill.graphs  # type: ignore[union-attr]
        assert graphs is not None
        replay = graphs.replay

        def wrapped(bucket: int, _replay: Any = replay, _mode: str = mode) -> torch.Tensor:
            if _mode == "busy":
                torch.cuda._sleep(50_000_000)  # tens of ms of GPU time queued ahead of this chunk's forward
            out = _replay(bucket)
            if _mode == "sync":
                torch.cuda.synchronize()
            return out

        graphs.replay = wrapped
        request = GenerationRequest("long", prompt(77, 47), max_new_tokens=6, temperature=0.0)
        engine.add_request(request)
        events = drain(engine)
        assert engine.prefill_chunks == 10  # 47 tokens in chunks of 5, nothing else running
        results.append(tokens(events["long"]))
    assert results[0] == results[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_wait_for_sampled_tokens_lets_other_threads_run() -> None:
    """`StepWait.tokens` while `release_gil_when()` (the engine's wait while the llm's vision thread has work, item
    44) waits for the device on an event with the GIL released (item 41): a Python thread counting during a long GPU
    wait gets through at least half the counts it makes alone in that time."""
    import threading
    import time

    from vlm_triton.engine.step_wait import StepWait

    counted, stop = [0], threading.Event()

    def count() -> None:
        while not stop.is_set():
            counted[0] += 1

    thread = threading.Thread(target=count)
    thread.start()
    time.sleep(0.2)  # alone (this thread sleeps): the counting rate
    c0 = counted[0]
    time.sleep(0.2)
    rate = (counted[0] - c0) / 0.2
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(200):  # seconds of queued matmuls, then tokens that depend on them
        a = (a @ a).clamp_(-1, 1)
    t0, c0 = time.perf_counter(), counted[0]
    wait = StepWait()
    wait.release_gil_when = lambda: True
    out = wait.tokens(torch.arange(8, device="cuda") + (a[0, 0] * 0).long())
    waited, during = time.perf_counter() - t0, counted[0] - c0
    stop.set()
    thread.join()
    assert out == list(range(8))
    assert waited > 0.05, f"the GPU wait took only {waited * 1e3:.1f} ms: too short to tell"
    assert during > 0.5 * rate * waited, f"counted {during} in a {waited * 1e3:.0f} ms wait; {rate:.0f}/s alone"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_steps_run_ahead_under_cuda_graphs() -> None:
    """engine/run_ahead.py on the device: steps launched ahead of their predecessor's tokens (pinned read-back,
    sampling parameters copied without a sync) give the events of one step at a time, greedy and seeded."""
    from tests.unit.test_run_ahead import plan_of, run_events

    model = _tiny("qwen2").to("cuda")
    free = hf_greedy(model, prompt(80, 7), 20)
    ahead, stepwise = _cuda_engine(model), _cuda_engine(model, run_ahead=False)
    got, want = run_events(ahead, plan_of(free)), run_events(stepwise, plan_of(free))
    assert got == want and ahead.decoding.launched_ahead > 10 and stepwise.decoding.launched_ahead == 0
    assert [t for t, *_ in got["long"]] == hf_greedy(model, prompt(81, 9), 30)
