"""engine/observe.py: the loop timing the llm stub logs, and the engine description it logs at start."""

from __future__ import annotations

from tests.unit.engine_helpers import _tiny, greedy, make_engine, prompt
from vlm_triton.engine.observe import StepTiming, describe


def test_step_timing_reports_and_resets() -> None:
    timing = StepTiming()
    for seconds in (0.001, 0.003):
        timing.add("decode", seconds)
    parts = timing.take()
    assert parts["decode"]["count"] == 2
    assert abs(parts["decode"]["mean_ms"] - 2.0) < 1e-9 and abs(parts["decode"]["max_ms"] - 3.0) < 1e-9
    assert timing.take() == {}


def test_step_timing_counts_decode_steps() -> None:
    engine = make_engine(_tiny("qwen2"))
    engine.add_request(greedy("t", prompt(3, 5), 4))
    while engine.has_work():
        engine.step()
    parts = engine.timing.take()
    assert {"decode_prepare", "decode_launch", "decode_wait", "decode_accept"} <= set(parts)
    assert parts["decode_wait"]["count"] == 3  # the first token comes from the prefill


def test_describe_names_attention_and_kernels() -> None:
    line = describe(make_engine(_tiny("qwen2")))
    assert "attention vlm_slot" in line and "pointwise eager" in line
