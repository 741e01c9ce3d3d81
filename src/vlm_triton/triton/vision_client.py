"""The BLS call to `vision_encoder`, shared by `bls` and `vision_table`: tiles -> the llm's prompt table [1, R, H].

The encoder is batched over tiles up to the deployment's vision_max_batch_size; more tiles go as concurrent
requests of whole chunks (`DeploymentConfig.vision_chunk`), in order. The embeddings stay on their device unless the
caller asks for them in host memory (`host=True`: Triton copies them there, so no CUDA tensor reaches the caller's
stub; the `bls` stage needs that, see `bls_model.TritonStages.encode_images`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack

from vlm_triton import timeline
from vlm_triton.triton.common import check_response, torch_output


async def prompt_table(pixel_values: Any, extras: Sequence[Any], chunk: int, dtype: torch.dtype | None, *,
                       host: bool = False) -> torch.Tensor:
    """`pixel_values` [N > 0, 3, ...] and the per-item `extras` (tgt_sizes [N, 2], image_grids [N, 5]: the non-empty
    ones) as Triton tensors -> [1, R, H], R the image rows of all items (N * T for tiles)."""
    inputs = [pixel_values, *extras]
    num_tiles = int(pixel_values.shape()[0])
    if num_tiles <= chunk:
        embeds = await _encode(inputs, host)
    else:
        tensors = [(t.name(), from_dlpack(t.to_dlpack())) for t in inputs]
        parts = [
            [torch_output(name, value[start: start + chunk]) for name, value in tensors]
            for start in range(0, num_tiles, chunk)
        ]
        embeds = torch.cat(await asyncio.gather(*(_encode(p, host) for p in parts)))
    if dtype is not None and embeds.dtype != dtype:
        embeds = embeds.to(dtype)
    return embeds.reshape(1, -1, embeds.shape[-1])


async def _encode(inputs: list[Any], host: bool) -> torch.Tensor:
    where = {"preferred_memory": pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)} if host else {}
    request = pb_utils.InferenceRequest(
        model_name="vision_encoder", requested_output_names=["image_embeds"], inputs=inputs,
        request_id=timeline.current(), **where
    )
    response = check_response(await request.async_exec(), "vision_encoder")
    return from_dlpack(pb_utils.get_output_tensor_by_name(response, "image_embeds").to_dlpack())  # [N, T, H]
