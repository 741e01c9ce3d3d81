"""Measurements without a server: device ceilings, the vision encoder, the bare LLMEngine, and HF transformers.

Every function returns plain dicts (JSON-ready). Times are wall-clock around synchronized GPU work.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.workloads import Workload
from vlm_triton.deploy.config import EngineSection
from vlm_triton.gc_heap import freeze_heap


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(values, dtype=np.float64) * scale
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


# --- device ceilings ---------------------------------------------------------------------------------------------
def device_ceilings(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"device": str(device)}
    if device.type != "cuda":
        return out
    props = torch.cuda.get_device_properties(device)
    out.update(name=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
               torch=torch.__version__, cuda=torch.version.cuda)
    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    out["copy_bytes"] = 2 * src.numel() * 2
    out["copy_bw_Bps"] = out["copy_bytes"] / float(np.median(times))  # bytes read + written per second
    del src, dst
    m = 8192
    x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        x @ y
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    out["matmul_flops"] = 2 * m**3 / float(np.median(times))
    name = props.name.upper()
    out["bf16_dense_peak_flops"] = 989e12 if "H100" in name else 790e12 if "H200" in name else None
    return out


# --- vision encoder ----------------------------------------------------------------------------------------------
def vit_flops(vision: dict[str, Any], llm_hidden: int, tiles: int, downsample: float = 0.5) -> float:
    """Matrix FLOPs (2 per multiply-add) of InternViT + pixel shuffle + mlp1 for `tiles` tiles."""
    c, f, p, s = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"], vision["image_size"]
    layers = vision["num_hidden_layers"]
    patches = (s // p) ** 2
    n = patches + 1
    per_layer = 2 * n * c * (3 * c + c + 2 * f) + 4 * n * n * c
    embed = 2 * patches * (3 * p * p) * c
    tokens = int(patches * downsample * downsample)
    wide = int(c / (downsample * downsample))
    mlp1 = 2 * tokens * (wide * llm_hidden + llm_hidden * llm_hidden)
    return float(tiles * (embed + layers * per_layer + mlp1))


def vision_bench(ckpt: Path, device: torch.device, dtype: torch.dtype, batches: list[int], peak_flops: float | None,
                 repeats: int = 10) -> dict[str, Any]:
    from vlm_triton.families import open_family

    family = open_family(ckpt)
    enc = family.build_vision_encoder(dtype, device)
    cfg = family.config
    results = []
    for b in batches:
        x = torch.randn(b, 3, family.image_size, family.image_size, device=device, dtype=dtype)
        with torch.inference_mode():
            for _ in range(2):
                enc(x)
            sync(device)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                enc(x)
                sync(device)
                times.append(time.perf_counter() - t)
        med = float(np.median(times))
        flops = vit_flops(cfg["vision_config"], int(cfg["llm_config"]["hidden_size"]), b,
                          float(cfg.get("downsample_ratio", 0.5)))
        row = {"tiles": b, "ms": med * 1e3, "tflops": flops / 1e12, "achieved_tflops_s": flops / med / 1e12}
        if peak_flops:
            row["floor_ms"] = flops / peak_flops * 1e3
            row["fraction_of_floor"] = flops / peak_flops / med
        results.append(row)
    del enc
    return {"peak_flops_used": peak_flops, "rows": results}


# --- the bare engine ---------------------------------------------------------------------------------------------
def build_engine(ckpt: Path, device: torch.device, dtype: torch.dtype, max_slots: int, max_seq_len: int,
                 cuda_graphs: bool = True, compile_pointwise: bool = True,
                 prefill_pointwise: bool = EngineSection.prefill_pointwise,
                 fuse_projections: bool = EngineSection.fuse_projections, prefill_tokens: int = 8192,
                 prefill_graphs: bool = True, kv_cache_tokens: int = 0,
                 kv_page_tokens: int = EngineSection.kv_page_tokens,
                 run_ahead: bool = EngineSection.run_ahead) -> tuple[Any, Any, Any]:
    from vlm_triton.engine.engine import LLMEngine
    from vlm_triton.families import open_family

    family = open_family(ckpt)
    # only the arguments that differ from the engine's defaults (engines before the pool or item 47 lack them)
    extra: dict[str, Any] = {"kv_cache_tokens": kv_cache_tokens} if kv_cache_tokens else {}
    if not run_ahead:
        extra["run_ahead"] = False
    if kv_page_tokens:
        extra["kv_page_tokens"] = kv_page_tokens
    engine = LLMEngine(family.build_language_model(dtype, device), max_slots=max_slots, max_seq_len=max_seq_len,
                       device=device, dtype=dtype, vocab_size=family.vocab_size, use_cuda_graphs=cuda_graphs,
                       compile_pointwise=compile_pointwise, prefill_pointwise=prefill_pointwise,
                       fuse_projections=fuse_projections,
                       prefill_tokens=prefill_tokens,
                       prefill_graphs=prefill_graphs, **extra)
    encoder = family.build_vision_encoder(dtype, device)
    return family, engine, encoder


def drive_engine(engine: Any, encoder: Any, w: Workload, c: int, n_total: int, time_cap_s: float,
                 device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Closed loop at concurrency c: keep c requests in flight until n_total were sent (or the time cap hits).
    An image request runs the vision encoder on its tiles (already on the device) when it is submitted."""
    from vlm_triton.engine.types import GenerationRequest

    ids = torch.as_tensor(w.input_ids)
    pixels = None if w.pixel_values is None else torch.as_tensor(w.pixel_values).to(device, dtype)
    sent = {}
    times: dict[str, list[float]] = {}
    done = 0
    submitted = 0
    peak = 0  # requests running at once (admitted, prefilled), the most seen after a step
    t0 = time.perf_counter()
    while True:
        while submitted - done < c and submitted < n_total and time.perf_counter() - t0 < time_cap_s:
            rid = f"{w.name}-{c}-{submitted}"
            sent[rid] = time.perf_counter()
            table = None
            if pixels is not None:
                with torch.inference_mode():
                    table = encoder(pixels).reshape(-1, engine.hidden_size)
            engine.add_request(GenerationRequest(rid, ids, w.max_tokens, prompt_embedding_table=table,
                                                 end_id=-1, temperature=0.0, ignore_eos=True))
            submitted += 1
        if done == submitted:
            break
        events = engine.step()
        now = time.perf_counter()
        peak = max(peak, len(engine._active))
        for e in events:
            if e.token_id is not None:
                times.setdefault(e.request_id, []).append(now)
            if e.finished:
                done += 1
    wall = time.perf_counter() - t0
    return {**summarize(sent, times, wall, c), "peak_running": peak}


def sweep_engine(engine: Any, encoder: Any, workloads: dict[str, Workload], points: list[tuple[str, int, int]],
                 time_cap_s: float, device: torch.device, dtype: torch.dtype, label: str = "engine",
                 probe: Callable[[], Callable[[], dict[str, Any]]] | None = None,
                 log: Callable[[str], None] = print, deadline: float | None = None) -> list[dict[str, Any]]:
    """`drive_engine` over (workload, concurrency, requests) points, each workload warmed up with one request
    first; rows carry the workload's name. `probe()` is called before each point and returns what to call after
    it, whose dict joins the row (e.g. the engine's loop timing over the point). A point past `deadline` (epoch
    seconds) is skipped."""
    rows: list[dict[str, Any]] = []
    warmed: set[str] = set()
    for name, c, n in points:
        if deadline is not None and time.time() > deadline:
            log(f"{label} {name} c={c}: skipped (deadline)")
            continue
        if name not in warmed:
            drive_engine(engine, encoder, workloads[name], 1, 1, time_cap_s, device, dtype)
            warmed.add(name)
        after = probe() if probe is not None else None
        r = drive_engine(engine, encoder, workloads[name], c, n, time_cap_s, device, dtype)
        r.update(workload=name, **(after() if after is not None else {}))
        rows.append(r)
        log(f"{label} {name} c={c}: {r['output_tok_s']:.0f} tok/s, TTFT p50 {r['ttft_ms']['p50']:.1f} ms, "
            f"TPOT p50 {r['tpot_ms']['p50']:.2f} ms ({r['requests']} req, {r['wall_s']:.1f} s, peak running "
            f"{r['peak_running']})")
    return rows


def summarize(sent: dict[str, float], times: dict[str, list[float]], wall: float, c: int,
              errors: int = 0, tokens: dict[str, int] | None = None) -> dict[str, Any]:
    """`times`: arrival of each chunk per request; `tokens`: tokens per request when a chunk may carry several
    (streamed responses coalesce under load), else one token per chunk. TPOT = (last - first) / (tokens - 1),
    as vLLM's benchmark_serving computes it; ITL = gaps between chunks."""
    ttft, tpot, itl, ntok = [], [], [], 0
    for rid, t0 in sent.items():
        ts = times.get(rid, [])
        n = tokens[rid] if tokens is not None and rid in tokens else len(ts)
        ntok += n
        if ts:
            ttft.append(ts[0] - t0)
        if len(ts) > 1 and n > 1:
            tpot.append((ts[-1] - ts[0]) / (n - 1))
            itl.extend(np.diff(ts).tolist())
    return {"concurrency": c, "requests": len(sent), "errors": errors, "wall_s": wall, "output_tokens": ntok,
            "output_tok_s": ntok / wall if wall else None, "req_s": len(sent) / wall if wall else None,
            "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot), "itl_ms": percentiles(itl)}


def engine_bench(ckpt: Path, workloads: dict[str, Workload], plan: dict[str, list[tuple[int, int]]],
                 device: torch.device, dtype: torch.dtype, max_slots: int, max_seq_len: int, time_cap_s: float,
                 deadline: float, log: Callable[[str], None] = print, prefill_tokens: int = 8192) -> dict[str, Any]:
    t = time.perf_counter()
    _, engine, encoder = build_engine(ckpt, device, dtype, max_slots, max_seq_len, prefill_tokens=prefill_tokens)
    freeze_heap()  # this process serves the bare engine from here on, as the stack's processes do (item 37)
    out: dict[str, Any] = {"build_s": time.perf_counter() - t, "cuda_graphs": engine._graphs is not None,
                           "max_slots": max_slots, "max_seq_len": max_seq_len, "prefill_tokens": prefill_tokens,
                           "runs": {}}
    points = [(name, c, n) for name, pts in plan.items() for c, n in pts]
    for r in sweep_engine(engine, encoder, workloads, points, time_cap_s, device, dtype, log=log, deadline=deadline):
        out["runs"].setdefault(r["workload"], []).append(r)
    return out


# --- HF transformers -------------------------------------------------------------------------------------------------
class _Stamps:
    """A generate() streamer that only records when each new token arrives (batch 1)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_bench(ckpt: Path, w: Workload, device: torch.device, dtype: torch.dtype, mode: str, batch: int,
             max_new: int | None = None) -> dict[str, Any]:
    """`model.generate` as a user runs it: mode "eager" (dynamic cache) or "static" (static cache, which
    transformers compiles with torch.compile + CUDA graphs). One warm-up call (the compile), then one timed call."""
    from vlm_triton.families import open_family

    family = open_family(ckpt)
    model = family.build_language_model(dtype, device).eval()
    n = max_new or w.max_tokens
    ids = torch.as_tensor(w.input_ids, device=device).view(1, -1).expand(batch, -1).contiguous()
    kwargs: dict[str, Any] = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False,
                              "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    if mode == "static":
        kwargs["cache_implementation"] = "static"
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, **kwargs)
    sync(device)
    warm = time.perf_counter() - t
    stamps = _Stamps() if batch == 1 else None
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, streamer=stamps, **kwargs)
        sync(device)
        wall = time.perf_counter() - t0
    new = int(out.shape[1] - ids.shape[1])
    row: dict[str, Any] = {"mode": mode, "batch": batch, "warmup_s": warm, "wall_s": wall, "new_tokens": new,
                           "output_tok_s": batch * new / wall, "step_ms": wall / new * 1e3}
    if stamps is not None and len(stamps.times) > 1:
        row["ttft_ms"] = (stamps.times[0] - t0) * 1e3
        row["tpot_ms"] = (stamps.times[-1] - stamps.times[0]) / (len(stamps.times) - 1) * 1e3
    return row
