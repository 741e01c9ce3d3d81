"""The paged KV pool (`engine.kv_page_tokens`): its page allocator, the paged decode attention against a plain
per-request softmax, and the engine serving from pages that are not contiguous, token for token as `generate`."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from collections import defaultdict
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from tests.unit.engine_helpers import (
    check_events,
    drain,
    greedy,
    hf_greedy,
    join_plan,
    make_engine,
    model,  # noqa: F401 - fixture
    prompt,
    qwen,  # noqa: F401 - fixture
    tokens,
)
from vlm_triton.engine.kv_pool import PagePool, RowPool
from vlm_triton.engine.paged_attention import num_splits, page_rows, reference_decode


def test_pages_are_taken_from_anywhere() -> None:
    """Where a run allocator must wait (8 rows free, but in two runs of 4), the page pool admits: any free pages."""
    rows, pages = RowPool(16), PagePool(4, 4)
    a, b, c = rows.reserve(4), rows.reserve(4), rows.reserve(4)
    pa, pb, pc = pages.reserve(4), pages.reserve(4), pages.reserve(4)
    assert (a, b, c) == (0, 4, 8) and (pa, pb, pc) == ([0], [1], [2])
    rows.release(0, 4)
    pages.release([0])
    assert rows.reserve(8) is None  # rows 0..3 and 12..15 are free, not in one run
    assert pages.reserve(8) == [0, 3] and pages.free_rows == 0
    assert pages.reserve(1) is None
    pages.release([0, 3])
    assert pages.reserve(5) is not None and pages.free_rows == 0  # 5 rows take 2 pages


def test_release_checks_the_pages() -> None:
    pool = PagePool(4, 8)
    got = pool.reserve(9)
    assert got == [0, 1] and pool.pages_for(9) == 2
    with pytest.raises(ValueError, match="not all reserved"):
        pool.release([2])
    with pytest.raises(ValueError, match="not all reserved"):
        pool.release([0, 0])
    pool.release(got)
    with pytest.raises(ValueError, match="not all reserved"):
        pool.release(got)  # twice
    with pytest.raises(ValueError):
        pool.reserve(0)


def test_random_reservations_never_share_a_page() -> None:
    rng = random.Random(11)
    pool = PagePool(32, 4)
    owner: dict[int, int] = {}
    live: dict[int, list[int]] = {}
    for step in range(2000):
        if live and rng.random() < 0.45:
            got = live.pop(rng.choice(list(live)))
            pool.release(got)
            for p in got:
                del owner[p]
        else:
            n = rng.randint(1, 40)
            got = pool.reserve(n)
            assert (got is None) == (pool.pages_for(n) > 32 - len(owner))
            if got is not None:
                assert len(got) == pool.pages_for(n) and not set(got) & set(owner)
                owner.update({p: step for p in got})
                live[step] = got
        assert pool.free_rows == (32 - len(owner)) * 4


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
              page: int) -> torch.Tensor:
    """Attention of each query head over its request's positions, one (request, head) at a time."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        pos = torch.arange(int(lengths[b]))
        rows = table[b].long()[pos // page] * page + pos % page
        for h in range(q.shape[1]):
            s = (k[rows, h // group] @ q[b, h]) * q.shape[-1] ** -0.5
            out[b, h] = s.softmax(0) @ v[rows, h // group]
    return out


def _case(seed: int, b: int, h: int, kvh: int, d: int, page: int, max_len: int) -> tuple[torch.Tensor, ...]:
    """Random q, K/V rows and page tables whose pages are scattered through the rows; lengths from 1 to max_len."""
    g = torch.Generator().manual_seed(seed)
    n_pages = -(-max_len // page)
    rows = (b * n_pages + 3) * page
    k, v = torch.randn(rows, kvh, d, generator=g), torch.randn(rows, kvh, d, generator=g)
    table = torch.randperm(b * n_pages + 3, generator=g)[: b * n_pages].view(b, n_pages).to(torch.int32)
    lengths = torch.tensor([max_len, 1, *torch.randint(1, max_len + 1, (b,), generator=g).tolist()][:b],
                           dtype=torch.int32)
    return torch.randn(b, h, d, generator=g), k, v, table, lengths


@pytest.mark.parametrize("shape", [(3, 4, 2, 16, 4, 70), (2, 14, 2, 64, 16, 300), (2, 8, 8, 32, 1, 40)])
def test_reference_decode_is_each_heads_softmax(shape: tuple[int, ...]) -> None:
    q, k, v, table, lengths = _case(0, *shape)
    page, max_len = shape[4], shape[5]
    got = reference_decode(q, k, v, table, lengths, page=page, max_len=max_len, scale=q.shape[-1] ** -0.5)
    torch.testing.assert_close(got, _explicit(q, k, v, table, lengths, page), atol=1e-5, rtol=1e-5)


def test_page_rows_and_splits() -> None:
    table = torch.tensor([[5, 2], [0, 1]], dtype=torch.int32)
    assert page_rows(table, torch.tensor([[0, 3, 4, 7], [0, 1, 4, 5]]), 4).tolist() == [[20, 23, 8, 11],
                                                                                        [0, 1, 4, 5]]
    assert num_splits(1, 2, 4096, 132) == (64, 64)  # batch 1: the positions spread over the SMs
    assert num_splits(64, 2, 4096, 132) == (3, 22 * 64)
    assert num_splits(64, 8, 256, 132) == (1, 256)  # enough programs without splitting
    splits, per = num_splits(3, 2, 70, 8)
    assert splits * per >= 70 and per % 64 == 0


KERNEL_CHECK = """
import torch
from vlm_triton.engine import paged_attention as pa
from tests.unit.test_paged_kv import _case, _explicit
cpu = torch.device("cpu")
assert not pa.kernel_available(cpu, torch.bfloat16, 64)  # the interpreter's bf16 dot is wrong: not offered
for seed, shape in enumerate([(3, 4, 2, 16, 4, 70), (2, 14, 2, 64, 16, 300), (2, 8, 8, 32, 1, 40), (4, 8, 1, 16, 3, 130)]):
    q, k, v, table, lengths = _case(seed, *shape)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        assert pa.kernel_available(q.device, q.dtype, q.shape[-1])
        got = pa.paged_decode(q, k, v, table, lengths, page=shape[4], max_len=shape[5], scale=q.shape[-1] ** -0.5)
        want = _explicit(q.float(), k.float(), v.float(), table, lengths, shape[4])
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
print("kernel ok")
"""


@pytest.mark.parametrize("head_dim, want", [(64, 16), (128, 16), (80, 0), (96, 0)])
def test_runs_where_only_fa2_decodes(head_dim: int, want: int) -> None:
    """On CUDA a head_dim the paged kernel does not take (not a power of two) but FA2 does keeps contiguous runs;
    on the CPU (no fast kernel either way) and for eager-attention models the pages stay."""
    from types import SimpleNamespace

    from vlm_triton.engine import paged_attention
    from vlm_triton.engine.kernels import paged_or_runs

    spec: Any = SimpleNamespace(packed=True, head_dim=head_dim)
    cuda = torch.device("cuda")
    if paged_attention.triton is not None:
        assert paged_or_runs(16, cuda, torch.bfloat16, spec) == want
    else:  # no kernel at all: every head_dim that FA2 takes keeps runs
        assert paged_or_runs(16, cuda, torch.bfloat16, spec) == 0
    assert paged_or_runs(16, torch.device("cpu"), torch.float32, spec) == 16
    assert paged_or_runs(16, cuda, torch.bfloat16, SimpleNamespace(packed=False, head_dim=head_dim)) == 16
    assert paged_or_runs(0, cuda, torch.bfloat16, spec) == 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton (the language) is not installed")
def test_triton_kernel_in_the_interpreter() -> None:
    """The Triton kernel itself, run by Triton's CPU interpreter (a fresh process: TRITON_INTERPRET is read at
    import); on a GPU host test_engine_cuda runs it compiled."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "kernel ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("prefill_tokens", [8192, 8])
def test_paged_engine_matches_generate(model: PreTrainedModel, prefill_tokens: int) -> None:  # noqa: F811
    """Six requests through a pool of 12 pages of 4 rows (48 rows, 4 slots): requests wait for pages, take pages
    others gave back (so a request's pages are not consecutive), never share one, and decode as `generate`
    (prefill_tokens 8: long prompts are prefilled in chunks that attend to the chunks before them)."""
    engine = make_engine(model, max_slots=4, max_seq_len=40, kv_cache_tokens=48, kv_page_tokens=4,
                         prefill_tokens=prefill_tokens)
    pool = engine.admission.pool
    assert isinstance(pool, PagePool) and engine.cache.capacity == 48 and engine.cache.trash_row == 48
    plan = join_plan(30)
    scattered: set[str] = set()
    users: dict[int, set[str]] = defaultdict(set)

    def arrive(step: int) -> None:
        for r in plan.get(step, []):
            engine.add_request(r)
        owners = [*engine._active, *([engine._chunking] if engine._chunking else [])]
        held = [p for s in owners for p in (s.kv_pages or [])]
        assert len(held) == len(set(held)) and pool.free_rows == 48 - 4 * len(held)
        for s in owners:
            assert s.kv_pages is not None and len(s.kv_pages) == -(-s.kv_need // 4)
            if any(b != a + 1 for a, b in zip(s.kv_pages, s.kv_pages[1:])):
                scattered.add(s.request_id)
            for p in s.kv_pages:
                users[p].add(s.request_id)

    events = drain(engine, arrive)
    assert engine.admission.kv_waits > 0 and scattered and any(len(ids) > 1 for ids in users.values())
    assert pool.free_rows == 48
    for r in [r for rs in plan.values() for r in rs]:
        check_events(events[r.request_id])
        assert tokens(events[r.request_id]) == hf_greedy(model, list(r.input_ids), r.max_new_tokens), r.request_id


def test_paged_default_pool_and_cancels(qwen: PreTrainedModel) -> None:  # noqa: F811
    """kv_cache_tokens 0 with pages: max_slots requests of max_seq_len fit (pages rounded up per request); a
    cancelled chunked prompt and a failed prefill give their pages back."""
    engine = make_engine(qwen, max_slots=3, max_seq_len=30, kv_page_tokens=8, prefill_tokens=8)
    pool = engine.admission.pool
    assert isinstance(pool, PagePool) and pool.pages == 3 * 4 and engine.cache.capacity == 96
    engine.add_request(greedy("long", prompt(5, 20), 5))
    engine.step()
    assert engine._chunking is not None and pool.free_rows == 96 - 24
    engine.cancel("long")
    engine.add_request(greedy("run", prompt(6, 6), 3))
    evs = engine.step()
    assert [e.finish_reason for e in evs if e.request_id == "long"] == ["cancelled"]
    drain(engine)
    assert pool.free_rows == 96
    engine.prefill = None  # type: ignore[assignment]  # the next prefill raises: its request fails, pages come back
    engine.add_request(greedy("bad", prompt(7, 4), 3))
    assert [e.finish_reason for e in engine.step()] == ["error"] and pool.free_rows == 96


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 14, 2, 64, 16, 4096), (64, 14, 2, 64, 16, 1024), (5, 28, 4, 128, 64, 700),
                                   (3, 32, 8, 128, 1, 256)])
def test_paged_decode_kernel_on_cuda(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """The compiled kernel (real head layouts: 0.5B's 14/2 x 64, 7B's 28/4 x 128, 32/8) against the fp32 gather."""
    from vlm_triton.engine.paged_attention import kernel_available, paged_decode

    q, k, v, table, lengths = (t.cuda() for t in _case(5, *shape))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    assert kernel_available(q.device, dtype, q.shape[-1])
    page, max_len = shape[4], shape[5]
    got = paged_decode(q, k, v, table, lengths, page=page, max_len=max_len, scale=q.shape[-1] ** -0.5)
    ref = reference_decode(q.float(), k.float(), v.float(), table, lengths, page=page, max_len=max_len,
                           scale=q.shape[-1] ** -0.5)
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prefill_tokens", [8192, 5])
def test_paged_engine_on_cuda_matches_the_run_engine(prefill_tokens: int) -> None:
    """bf16 with decode and prefill CUDA graphs: an engine on a small paged pool (the Triton decode kernel, packed
    prefill gathering its rows, chunks eagerly) gives the greedy tokens of the engine on contiguous runs (FA2); and in
    float32 (decode by gather) those of `generate`."""
    from tests.unit.engine_helpers import VOCAB, _tiny
    from vlm_triton.engine import LLMEngine, TokenEvent

    def engine_for(m: PreTrainedModel, dtype: torch.dtype, **kw: int) -> LLMEngine:
        return LLMEngine(m, max_slots=4, max_seq_len=40, device="cuda", dtype=dtype, vocab_size=VOCAB,
                         use_cuda_graphs=True, min_kv_bucket=16, prefill_tokens=prefill_tokens, **kw)

    def run_plan(engine: LLMEngine, plan: dict[int, list[Any]]) -> dict[str, list[TokenEvent]]:
        return drain(engine, lambda step: [engine.add_request(r) for r in plan.get(step, [])])

    tiny = _tiny("qwen2").to("cuda", torch.bfloat16)
    paged = engine_for(tiny, torch.bfloat16, kv_cache_tokens=48, kv_page_tokens=8)  # 6 pages: requests wait
    assert paged._graphs is not None and getattr(paged.prefill, "graphs", None) is not None
    plan = join_plan(80)
    got = run_plan(paged, plan)
    assert paged.admission.kv_waits > 0 and (paged.prefill_chunks > 0) == (prefill_tokens == 5)
    runs = run_plan(engine_for(tiny, torch.bfloat16), plan)
    assert {k: tokens(v) for k, v in got.items()} == {k: tokens(v) for k, v in runs.items()}
    model32 = _tiny("qwen2").to("cuda")
    got32 = run_plan(engine_for(model32, torch.float32, kv_cache_tokens=48, kv_page_tokens=8), plan)
    for r in [r for rs in plan.values() for r in rs]:
        assert tokens(got32[r.request_id]) == hf_greedy(model32, list(r.input_ids), r.max_new_tokens)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_page_table_decode_inputs_match_generate(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode path of CUDA (the cache returns its rows, attention gets `PagedRows`: lengths and the page table)
    with `reference_decode` standing in for the kernel: `generate`'s tokens, every step through it."""
    from tests.unit.engine_helpers import _tiny
    from vlm_triton.engine import attention, decode

    calls: list[int] = []

    def reference(query: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, table: torch.Tensor,
                  lengths: torch.Tensor, **kw: float) -> torch.Tensor:
        assert k_rows.dim() == 3 and table.shape[0] == query.shape[0] == lengths.shape[0]
        calls.append(query.shape[0])
        return reference_decode(query, k_rows, v_rows, table, lengths, **kw)  # type: ignore[arg-type]

    tiny = _tiny(kind)
    monkeypatch.setattr(decode, "decode_reads_rows", lambda device, dtype, head_dim, **_: True)
    monkeypatch.setattr(attention, "paged_decode", reference)
    plan = join_plan(90)
    engine = make_engine(tiny, max_slots=4, max_seq_len=40, kv_cache_tokens=48, kv_page_tokens=4)
    events = drain(engine, lambda step: [engine.add_request(r) for r in plan.get(step, [])])
    assert calls
    for r in [r for rs in plan.values() for r in rs]:
        assert tokens(events[r.request_id]) == hf_greedy(tiny, list(r.input_ids), r.max_new_tokens), r.request_id
