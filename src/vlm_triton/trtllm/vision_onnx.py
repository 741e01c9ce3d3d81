"""Export the vision encoder (the family's torch module, e.g. InternViT + pixel shuffle + mlp1) to ONNX for TensorRT.

The graph has the `vision_encoder` contract's names: input `pixel_values` [tiles, 3, S, S] with a dynamic tile
batch, output `image_embeds` [tiles, tokens_per_tile, hidden]. Weights stay float32 (trtexec's --fp16/--bf16
picks the kernels); the graph's I/O dtypes are the deployment's (pixels FP16, embeddings in the engine dtype),
so the plan's bindings match the Triton config without I/O-format flags. `run_onnx` executes a file with
onnxruntime (CPU), which is how the export is checked against torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlm_triton import contracts
from vlm_triton.errors import SetupError

INPUT = contracts.VISION_ENCODER.inputs[0].name  # "pixel_values"
OUTPUT = contracts.VISION_ENCODER.outputs[0].name  # "image_embeds"
OPSET = 18
LARGE_MODEL_BYTES = 1 << 30  # above this, weights go to an external data file (protobuf's 2 GiB limit)


class _TypedIO(nn.Module):
    """The encoder in float32 between I/O casts to the deployment's pixel and embedding dtypes."""

    def __init__(self, encoder: nn.Module, embed_dtype: torch.dtype) -> None:
        super().__init__()
        self.encoder = encoder
        self.embed_dtype = embed_dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values.float()).to(self.embed_dtype)


def export_vision_onnx(encoder: nn.Module, out: str | Path, *, unit_shape: tuple[int, int, int], max_units: int,
                       pixel_dtype: torch.dtype = torch.float32, embed_dtype: torch.dtype = torch.float32) -> Path:
    """Write `encoder` (float32, CPU) as ONNX with a dynamic tile batch in [1, max_units]. Returns the file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = _TypedIO(encoder.float(), embed_dtype).eval()
    sample = torch.zeros((min(2, max_units), *unit_shape), dtype=pixel_dtype)
    tiles = torch.export.Dim("tiles", min=1, max=max(2, max_units))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with torch.no_grad():
            torch.onnx.export(
                model, (sample,), str(out), input_names=[INPUT], output_names=[OUTPUT],
                dynamic_shapes={"pixel_values": {0: tiles}}, opset_version=OPSET, dynamo=True,
                external_data=weight_bytes > LARGE_MODEL_BYTES,
            )
    except ImportError as exc:
        raise SetupError(f"ONNX export needs the onnx and onnxscript packages ({exc})") from exc
    return out


def run_onnx(path: str | Path, pixel_values: np.ndarray) -> np.ndarray:
    """Run the exported encoder with onnxruntime on CPU."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise SetupError("checking the ONNX export needs onnxruntime (pip install onnxruntime)") from exc
    session = ort.InferenceSession(_numpy_readable(path), providers=["CPUExecutionProvider"])
    (result,) = session.run([OUTPUT], {INPUT: pixel_values})
    return np.asarray(result)


def _numpy_readable(path: str | Path) -> str | bytes:
    """The model, with a bfloat16 output cast to float32 (numpy, hence onnxruntime's Python API, has no bf16)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = model.graph.output[0]
    if out.type.tensor_type.elem_type != onnx.TensorProto.BFLOAT16:
        return str(path)
    onnx.load_external_data_for_model(model, str(Path(path).parent))
    for node in model.graph.node:
        node.output[:] = [f"{OUTPUT}_bf16" if o == OUTPUT else o for o in node.output]
    model.graph.node.append(onnx.helper.make_node("Cast", [f"{OUTPUT}_bf16"], [OUTPUT], to=onnx.TensorProto.FLOAT))
    out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return model.SerializeToString()


def onnx_io(path: str | Path) -> dict[str, tuple[str, int]]:
    """{tensor name: (ONNX element type name, rank)} of the graph's inputs and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    out = {}
    for value in (*graph.input, *graph.output):
        kind = value.type.tensor_type
        out[value.name] = (onnx.TensorProto.DataType.Name(kind.elem_type), len(kind.shape.dim))
    return out
