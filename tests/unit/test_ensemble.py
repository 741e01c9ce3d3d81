"""The `ensemble` config parses, and every tensor it moves fits the stages it connects (name, dtype, rank).

The check runs on the rendered configs of both profiles, which come from the stage contracts, so a drift of a
stage's tensor (renamed, retyped, re-ranked) fails here. `vision_table` runs against the fake pb_utils.
"""

from __future__ import annotations

import asyncio
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from tests.unit.fake_triton import adapters_with
from tests.unit.test_trtllm_contract import CFGS, FakeTensor, fake_pb_utils
from vlm_triton import contracts
from vlm_triton.deploy.render import render_repository


def _full_shape(tensor: Any, batched: bool) -> tuple[int, ...]:
    """The shape a tensor has inside an ensemble (max_batch_size 0): batched models add a leading batch dim."""
    return ((-1,) if batched else ()) + tuple(tensor.dims)


def _compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", sorted(CFGS))
def test_ensemble_wires_existing_tensors_with_matching_dtype_and_rank(name: str, tmp_path: Path) -> None:
    repo = render_repository(CFGS[name], tmp_path / "repo")
    ensemble = text_format.Parse((repo / "ensemble" / "config.pbtxt").read_text(), pb.ModelConfig())
    assert (ensemble.platform, ensemble.max_batch_size) == ("ensemble", 0) and (repo / "ensemble" / "1").is_dir()
    # ensemble tensor -> (dtype, full shape) of whoever produces it; ensemble inputs first, then each step in order
    produced = {t.name: (t.data_type, _full_shape(t, False)) for t in ensemble.input}
    # Triton's rule: a step's inputs (and the ensemble's outputs) come from one origin, where each decoupled model
    # starts a new origin ("" = the request itself)
    origin = {t.name: "" for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        stage = text_format.Parse((repo / step.model_name / "config.pbtxt").read_text(), pb.ModelConfig())
        batched = stage.max_batch_size > 0
        inputs, outputs = {t.name: t for t in stage.input}, {t.name: t for t in stage.output}
        for stage_name, flowing in step.input_map.items():
            assert stage_name in inputs, f"{step.model_name} has no input {stage_name}"
            assert flowing in produced, f"{flowing} ({step.model_name}.{stage_name}) is produced by no earlier step"
            dtype, shape = produced[flowing]
            want = inputs[stage_name]
            assert dtype == want.data_type, (step.model_name, stage_name)
            assert _compatible(shape, _full_shape(want, batched)), (step.model_name, stage_name, shape)
        origins = {origin[flowing] for flowing in step.input_map.values()}
        assert len(origins) == 1, f"{step.model_name} mixes tensors of origins {origins}"
        step_origin = step.model_name if stage.model_transaction_policy.decoupled else origins.pop()
        origin.update({flowing: step_origin for flowing in step.output_map.values()})
        missing = {n for n, t in inputs.items() if not t.optional} - set(step.input_map)
        assert not missing, f"{step.model_name} needs {missing}"
        for stage_name, flowing in step.output_map.items():
            assert stage_name in outputs, f"{step.model_name} has no output {stage_name}"
            assert flowing not in produced, f"{flowing} is produced twice"
            produced[flowing] = (outputs[stage_name].data_type, _full_shape(outputs[stage_name], batched))
    for out in ensemble.output:
        dtype, shape = produced[out.name]
        assert dtype == out.data_type and _compatible(shape, _full_shape(out, False)), out.name
    assert len({origin[t.name] for t in ensemble.output}) == 1, "the outputs mix origins"
    consumed = {v for step in ensemble.ensemble_scheduling.step for v in step.input_map.values()}
    assert set(produced) <= consumed | {t.name for t in ensemble.output}  # Triton refuses unused tensors


def test_ensemble_options_are_the_bls_options_the_llm_uses() -> None:
    bls = {s.name: s for s in contracts.BLS.inputs}
    for spec in contracts.ENSEMBLE.inputs:
        assert spec.dtype == bls[spec.name].dtype, spec.name
    llm = {s.name for s in contracts.LLM.inputs}
    assert set(contracts.ENSEMBLE_LLM_OPTIONS.values()) <= llm
    assert not contracts.ENSEMBLE.input("max_tokens").optional  # request_output_len is required


class FakeInferenceResponse:
    def __init__(self, output_tensors: list[FakeTensor] | None = None, error: Any = None) -> None:
        self.outputs, self.error = output_tensors or [], error


@pytest.fixture
def vision_table(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    fake = fake_pb_utils()
    fake.InferenceResponse = FakeInferenceResponse
    fake.get_input_tensor_by_name = lambda request, name: request.get(name)
    fake.TritonError = lambda message, code=None: ("error", message)
    for (module,) in adapters_with(monkeypatch, fake, "vlm_triton.triton.vision_table_model"):
        yield module


def test_vision_table_chunks_tiles_and_gives_text_only_an_empty_table(vision_table: types.ModuleType,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    async def encode(inputs: list[Any], host: bool) -> torch.Tensor:
        assert not host  # the ensemble keeps the table on its device (no decoupled BLS in vision_table's stub)
        pixels = inputs[0].to_dlpack()
        calls.append(int(pixels.shape[0]))
        return pixels[:, :1, 0, :3].float().repeat(1, 2, 1)  # [n, 2 tokens, 3] carrying the tile's value

    monkeypatch.setattr(sys.modules["vlm_triton.triton.vision_client"], "_encode", encode)
    model = vision_table.TritonPythonModel.__new__(vision_table.TritonPythonModel)
    model.chunk, model.dtype, model.hidden = 4, torch.bfloat16, 3
    tiles = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1).expand(10, 3, 2, 3).contiguous()
    requests = [
        {"pixel_values": FakeTensor("pixel_values", tiles), "tgt_sizes": FakeTensor("tgt_sizes", np.zeros((0, 2)))},
        {"pixel_values": FakeTensor("pixel_values", np.zeros((0, 3, 2, 3), np.float32))},
    ]
    images, text_only = asyncio.run(model.execute(requests))
    assert calls == [4, 4, 2]  # whole chunks of the encoder's batch limit
    table = images.outputs[0].value
    assert table.dtype == torch.bfloat16 and table.shape == (1, 20, 3)
    assert table[0, ::2, 0].tolist() == list(range(10))  # in tile order
    assert text_only.outputs[0].value.shape == (1, 0, 3)
