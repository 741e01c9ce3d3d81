"""Where the bls stage asks for the vision encoder's embeddings. By default in host memory (Triton's
`preferred_memory`), so that no CUDA tensor reaches the bls stub: the first one makes Triton share its CUDA memory pool
with that stub, a handshake that can leave the thread delivering decoupled llm responses stuck in Python backends
before r26.07 (python_backend#439; item 7 in docs/benchmarks.md). `bls_gpu_prompt_table = true` keeps the CUDA tensor.
Runs on a small fake of `triton_python_backend_utils`."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from tests.unit.fake_triton import (
    FakeResponse,
    FakeTensor,
    adapters_with,
    fake_pb_utils,
)
from vlm_triton.pipeline.orchestrator import Prepared


class FakeRequest:
    made: ClassVar[list[FakeRequest]] = []

    def __init__(self, model_name: str, requested_output_names: list[str], inputs: list[FakeTensor],
                 **options: Any) -> None:
        self.model_name, self.inputs, self.options = model_name, inputs, options
        FakeRequest.made.append(self)

    async def async_exec(self) -> FakeResponse:
        assert self.model_name == "vision_encoder"
        tiles = self.inputs[0].value
        return FakeResponse([FakeTensor("image_embeds", tiles.reshape(tiles.shape[0], 2, -1)[:, :, :4])])


@pytest.fixture
def bls(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    fake = fake_pb_utils(InferenceRequest=FakeRequest)
    for (module,) in adapters_with(monkeypatch, fake, "vlm_triton.triton.bls_model"):
        yield module


def prepared(tiles: int) -> Prepared:
    pixels = torch.arange(tiles * 3 * 4 * 4, dtype=torch.float32).reshape(tiles, 3, 4, 4)
    return Prepared(input_ids=np.arange(5, dtype=np.int32), pixel_values=FakeTensor("pixel_values", pixels),
                    num_tiles=tiles, end_id=2, pad_id=0, stop_words_list=np.array([[9], [1]], dtype=np.int32),
                    prompt_vocab_size=0)


@pytest.mark.parametrize("gpu_prompt_table", [False, True])
def test_the_bls_asks_for_host_embeddings_unless_configured_otherwise(bls: types.ModuleType,
                                                                     gpu_prompt_table: bool) -> None:
    FakeRequest.made = []
    stages = bls.TritonStages(embed_dtype=torch.bfloat16, vision_chunk=2, gpu_prompt_table=gpu_prompt_table)
    (table,) = asyncio.run(stages.encode_images(prepared(5)))  # the one llm input: the prompt table
    assert [r.model_name for r in FakeRequest.made] == ["vision_encoder"] * 3  # chunks of 2, 2, 1 tiles
    for request in FakeRequest.made:
        if gpu_prompt_table:
            assert "preferred_memory" not in request.options
        else:
            memory = request.options["preferred_memory"]
            assert (memory.memory_type, memory.device_id) == ("TRITONSERVER_MEMORY_CPU", 0)
    assert table.name() == "prompt_embedding_table"
    assert table.value.dtype == torch.bfloat16 and table.shape() == [1, 10, 4]


def test_with_vision_in_llm_the_bls_hands_the_units_to_the_llm(bls: types.ModuleType) -> None:
    """No vision_encoder call: pixel_values and each unit extra go on with the llm's batch dim in front."""
    FakeRequest.made = []
    stages = bls.TritonStages(embed_dtype=torch.bfloat16, vision_chunk=2, vision_in_llm=True)
    grids = torch.tensor([[4, 4, 1, 1, 0]] * 5, dtype=torch.int32)
    units = asyncio.run(stages.encode_images(replace(prepared(5), unit_extras=(FakeTensor("image_grids", grids),))))
    assert FakeRequest.made == []
    assert [(t.name(), t.shape()) for t in units] == [("pixel_values", [1, 5, 3, 4, 4]), ("image_grids", [1, 5, 5])]
    assert torch.equal(units[0].value[0], prepared(5).pixel_values.value)
