"""engine/fused_linear.py: q/k/v and gate/up as one GEMM each, with the same outputs, names and weights; the engine
with it gives `generate`'s greedy tokens (float32, CPU; the CUDA graphs run the same modules)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.unit.engine_helpers import _tiny, hf_greedy, join_plan, make_engine, run_plan, tokens
from vlm_triton.engine.fused_linear import FusedMember, fuse_projections


def test_outputs_names_and_weights_are_kept() -> None:
    model = _tiny("qwen2")
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.model(ids).last_hidden_state
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    counts = fuse_projections(model.model)
    layers = model.config.num_hidden_layers
    assert counts == {"qkv": layers, "gate_up": layers}
    assert isinstance(model.model.layers[0].self_attn.k_proj, FusedMember)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert sum(p.numel() for p in model.parameters()) == params
    for layer in model.model.layers:  # every member's weight lives in its group's fused tensor: nothing doubled
        for member in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.up_proj):
            assert member.weight.untyped_storage().data_ptr() == member.group.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        got = model.model(ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="cannot be moved"):
        model.to(torch.float64)  # would leave the fused weights behind


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_transformers_layers_take_the_fused_path(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """In the installed transformers' attention and MLP the members are called in order on one tensor: a layer
    makes 4 GEMMs (qkv, o, gate_up, down), not 7, and lets every fused output go."""
    model = _tiny(kind)
    fuse_projections(model.model)
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(a[1].shape) or linear(*a, **k))
    with torch.no_grad():
        model.model(torch.randint(0, 300, (1, 6)))
    assert len(calls) == 4 * model.config.num_hidden_layers, calls
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.group.output is None and layer.mlp.gate_proj.group.output is None


def test_members_called_out_of_order_compute_their_own_slice_and_the_output_is_released() -> None:
    attn = nn.Module()
    torch.manual_seed(0)
    attn.q_proj, attn.k_proj, attn.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
    layer = nn.Module()
    layer.self_attn = attn
    x, other = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        want = {n: getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")}
        want_other = attn.v_proj(other)
        assert fuse_projections(layer) == {"qkv": 1, "gate_up": 0}
        group = attn.q_proj.group
        assert torch.equal(attn.k_proj(x), want["k_proj"])  # before q_proj: unfused, still right
        got = {n: getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")}
        assert group.output is None and group.input is None  # the last member let the fused output go
        attn.q_proj(x)
        assert torch.allclose(attn.v_proj(other), want_other, atol=1e-6)  # another input: its own slice
        assert group.output is not None  # k and v of x not taken yet
    for n, w in want.items():
        assert torch.allclose(got[n], w, atol=1e-6), n


def test_groups_that_do_not_fit_are_left_alone() -> None:
    layer = nn.Module()
    layer.mlp = nn.Module()
    layer.mlp.gate_proj, layer.mlp.up_proj = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=True)
    layer.self_attn = nn.Module()
    layer.self_attn.q_proj, layer.self_attn.k_proj = nn.Linear(8, 8), nn.Linear(8, 4)
    layer.self_attn.v_proj = nn.Identity()
    assert fuse_projections(layer) == {"qkv": 0, "gate_up": 0}
    assert type(layer.mlp.gate_proj) is nn.Linear and type(layer.self_attn.q_proj) is nn.Linear


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen2-eager"])
def test_engine_with_fused_projections_matches_generate(kind: str) -> None:
    model = _tiny(kind)
    plan = join_plan(30)
    requests = [r for rs in plan.values() for r in rs]
    refs = {r.request_id: hf_greedy(model, list(r.input_ids), r.max_new_tokens) for r in requests}
    engine = make_engine(model, max_slots=4, fuse_projections=True)
    assert engine.fused == {"qkv": model.config.num_hidden_layers, "gate_up": model.config.num_hidden_layers}
    events = run_plan(engine, plan)
    for r in requests:
        assert tokens(events[r.request_id]) == refs[r.request_id], r.request_id
