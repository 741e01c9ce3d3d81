"""Smoke test of the benchmark harness (benchmarks/) on CPU with a tiny model: not timed, a few tokens.

Covers the real-shaped checkpoint writer (vocab padded past the tokenizer), the workloads through the family's
preprocess, the bare-engine driver, HF `generate`, the FLOP/roofline arithmetic and the report table.
The stack path (tritonserver + frontend) is exercised by `python -m benchmarks.run --smoke` and the e2e suite.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import baselines, report
from benchmarks.models import VIT_300M, make_model, weight_bytes
from benchmarks.workloads import chat_body, make_workloads, prepare_workloads


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    root = tmp_path_factory.mktemp("bench")
    ckpt = make_model("tiny", root / "ckpt")
    media = root / "media"
    ws = make_workloads(media, {"W1": 3, "W2": 3, "W3": 3})
    prepare_workloads(ckpt, ws, media, w2_prompt_tokens=70)
    return ckpt, ws, media


def test_checkpoint_vocab_and_tokenizer(tiny: tuple[Path, dict, Path]) -> None:
    ckpt, _, _ = tiny
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["llm_config"]["vocab_size"] == 2048  # the preset's vocab, beyond the tiny tokenizer's ~670 ids
    from vlm_triton.families import open_family

    family = open_family(ckpt)
    tok = family.load_tokenizer()
    assert len(tok) == 2048
    end = family.stop_token_ids(tok)[0]
    assert end == tok.convert_tokens_to_ids("<|im_end|>") == 2048 - 12 + 2
    assert tok.decode([1500]).strip()  # a filler id decodes to text: every generated token streams a delta
    assert weight_bytes(ckpt)["llm_embed"] == 2048 * 64 * 2


def test_workloads(tiny: tuple[Path, dict, Path]) -> None:
    _, ws, _ = tiny
    assert ws["W1"].tiles == 13 and ws["W3"].tiles == 4 and ws["W2"].tiles == 0
    assert ws["W2"].prompt_tokens == 70
    body = chat_body(ws["W1"], "m", True)
    assert body["ignore_eos"] and body["stream_options"] == {"include_usage": True}


def test_engine_and_hf_paths(tiny: tuple[Path, dict, Path]) -> None:
    ckpt, ws, _ = tiny
    cpu = torch.device("cpu")
    _, engine, encoder = baselines.build_engine(ckpt, cpu, torch.float32, max_slots=4, max_seq_len=4096)
    for name in ("W2", "W3"):
        r = baselines.drive_engine(engine, encoder, ws[name], 2, 3, 60.0, cpu, torch.float32)
        assert r["requests"] == 3 and r["output_tokens"] == 9 and r["errors"] == 0
        assert r["ttft_ms"]["p50"] > 0 and r["tpot_ms"]["p50"] > 0
        assert 1 <= r["peak_running"] <= 2
    probed: list[int] = []

    def probe() -> Any:
        probed.append(engine.prefill_requests)
        return lambda: {"prefilled": engine.prefill_requests - probed[-1]}

    rows = baselines.sweep_engine(engine, encoder, ws, [("W2", 1, 1), ("W2", 2, 4), ("W3", 1, 2)], 60.0, cpu,
                                  torch.float32, probe=probe, log=lambda line: None, deadline=time.time() + 600)
    assert [(r["workload"], r["concurrency"], r["requests"], r["prefilled"]) for r in rows] == [
        ("W2", 1, 1, 1), ("W2", 2, 4, 4), ("W3", 1, 2, 2)]  # warm-ups (one per workload) are not in the rows
    row = baselines.hf_bench(ckpt, ws["W2"], cpu, torch.float32, "eager", 1)
    assert row["new_tokens"] == 3 and row["ttft_ms"] > 0


def test_flops_and_report() -> None:
    # InternViT-300M on one 448px tile: ~0.6-0.8 TFLOP (2 x 0.3 B params x 1025 tokens + attention)
    flops = baselines.vit_flops(VIT_300M, 896, 1)
    assert 0.6e12 < flops < 0.8e12
    results = {
        "preset": "x", "shape": {"llm": {"hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
                                         "num_hidden_layers": 24}},
        "weight_bytes": {"llm_step": 10**9}, "ceilings": {"copy_bw_Bps": 2e12, "matmul_flops": 8e14},
        "workloads": {"W2": {"prompt_tokens": 512, "output_tokens": 256}},
        "engine": {"runs": {"W2": [baselines.summarize({"a": 0.0}, {"a": [0.01, 0.012, 0.014]}, 0.02, 1)]}},
        "hf": [{"mode": "static", "batch": 1, "wall_s": 1.0, "output_tok_s": 256, "step_ms": 4.0}],
    }
    assert report.roofline_ms(results, "W2", 1) == pytest.approx((1e9 + 640 * 12288) / 2e12 * 1e3)
    text = report.table(results)
    assert "| W2 | 1 | engine |" in text and "HF static b1" in text
