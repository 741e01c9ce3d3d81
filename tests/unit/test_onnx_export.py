"""The vision encoder's ONNX export (what trtexec builds the TensorRT plan from) runs in onnxruntime and equals
the torch encoder within float32 tolerance for 1, 7 and 13 tiles, through one graph with a dynamic tile batch;
the production graph (FP16 pixels in, BF16 embeddings out) has the contract's I/O dtypes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from vlm_triton.families import open_family  # noqa: E402
from vlm_triton.families.base import PreprocessLimits  # noqa: E402
from vlm_triton.trtllm.vision_onnx import export_vision_onnx, onnx_io, run_onnx  # noqa: E402


@pytest.fixture(scope="module")
def encoder_and_budget(tiny_internvl3: Path) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    family = open_family(tiny_internvl3)
    budget = family.visual_budget(PreprocessLimits(max_images=2))
    return family.build_vision_encoder(torch.float32, torch.device("cpu")), budget.unit_shape


@pytest.fixture(scope="module")
def fp32_onnx(encoder_and_budget: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    encoder, shape = encoder_and_budget
    return export_vision_onnx(encoder, tmp_path_factory.mktemp("onnx") / "vision.onnx", unit_shape=shape, max_units=26)


@pytest.mark.parametrize("tiles", [1, 7, 13])
def test_onnx_matches_torch(tiles: int, fp32_onnx: Path, encoder_and_budget: tuple) -> None:
    encoder, shape = encoder_and_budget
    pixels = torch.randn(tiles, *shape, generator=torch.Generator().manual_seed(tiles))
    with torch.no_grad():
        want = encoder(pixels).numpy()
    got = run_onnx(fp32_onnx, pixels.numpy())
    assert got.shape == want.shape == (tiles, 256, encoder.config.llm_hidden_size)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_graph_io_follows_the_vision_contract(fp32_onnx: Path, encoder_and_budget: tuple, tmp_path: Path) -> None:
    assert onnx_io(fp32_onnx) == {"pixel_values": ("FLOAT", 4), "image_embeds": ("FLOAT", 3)}
    encoder, shape = encoder_and_budget
    typed = export_vision_onnx(encoder, tmp_path / "typed.onnx", unit_shape=shape, max_units=26,
                               pixel_dtype=torch.float16, embed_dtype=torch.bfloat16)
    assert onnx_io(typed) == {"pixel_values": ("FLOAT16", 4), "image_embeds": ("BFLOAT16", 3)}
    pixels = torch.randn(3, *shape).half()
    with torch.no_grad():
        want = encoder(pixels.float()).numpy()
    got = run_onnx(typed, pixels.numpy())  # bf16 output read back through a float32 cast
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
