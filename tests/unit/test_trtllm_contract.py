"""The trtllm repository parses through Triton's protobuf, and what the BLS really sends fits it.

The BLS side is not a hand copy: `TritonStages` (the real adapter) runs a whole request through `run_pipeline`
against a small fake of `triton_python_backend_utils`, which records every tensor sent to `llm` and
`vision_encoder` (and the tensorrt_llm-style cancellation request). Each must exist in the rendered config with
the same name, dtype and rank (and fixed dims), for both profiles; a drift on either side fails here.
"""

from __future__ import annotations

import asyncio
import json
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from tests.unit import fake_triton
from tests.unit.fake_triton import FakeResponse, FakeTensor, adapters_with
from vlm_triton import contracts
from vlm_triton.contracts import NUMPY_DTYPES
from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.deploy.render import render_repository
from vlm_triton.deploy.render_trtllm import EXECUTOR_WORKER, LLM_OUTPUTS
from vlm_triton.errors import SetupError
from vlm_triton.pipeline.orchestrator import RequestOptions, run_pipeline

VOCAB, TILES, TOKENS, HIDDEN = 1000, 2, 4, 8


class Recorder:
    """Builds each stage's fake response and keeps every request the BLS makes."""

    def __init__(self, cfg: DeploymentConfig) -> None:
        self.cfg, self.requests = cfg, []

    def respond(self, request: FakeRequest) -> Any:
        self.requests.append(request)
        return getattr(self, request.model_name)(request)

    def preprocess(self, request: FakeRequest) -> FakeResponse:
        ids = np.array([1, 2, *range(VOCAB, VOCAB + TILES * TOKENS), 3], dtype=np.int32)
        pixels = np.zeros((TILES, 3, 28, 28), dtype=NUMPY_DTYPES[self.cfg.tensor_dtypes["PIXEL"]])
        values = {
            "input_ids": ids[None], "input_lengths": np.array([[ids.size]], np.int32), "pixel_values": pixels,
            "end_id": np.array([[7]], np.int32), "pad_id": np.array([[0]], np.int32),
            "stop_words_list": np.array([[[9, 0], [1, -1]]], np.int32),
            "prompt_vocab_size": np.array([[TILES * TOKENS]], np.int32),
            "prompt_table_extra_ids": np.where(ids >= VOCAB, 5, 0).astype(np.uint64)[None],
            "tgt_sizes": np.zeros((0, 2), np.int32),  # fixed-size tiles: the encoder needs no patch grid
            "image_grids": np.zeros((0, 5), np.int32),  # tiles cut in preprocess (the trtllm profile always does)
            "pixel_ref": np.zeros((1, 0), np.int64),  # by value (the vision_encoder stage encodes them)
            "return_num_input_tokens": np.ones((1, 1), np.bool_),
        }
        # the fake follows the contract: names and shapes
        assert {k: v.ndim for k, v in values.items()} == {s.name: len(s.dims) for s in contracts.PREPROCESS.outputs}
        for spec in contracts.PREPROCESS.outputs:
            assert all(w in (-1, g) for w, g in zip(spec.dims, values[spec.name].shape)), spec.name
        return FakeResponse([FakeTensor(k, v) for k, v in values.items()])

    def vision_encoder(self, request: FakeRequest) -> FakeResponse:
        dtype = {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}[self.cfg.tensor_dtypes["EMBED"]]
        return FakeResponse([FakeTensor("image_embeds", torch.ones(TILES, TOKENS, HIDDEN, dtype=dtype))])

    def llm(self, request: FakeRequest) -> Iterator[FakeResponse]:
        stop = any(t.name() == "stop" for t in request.inputs)
        ids = [] if stop else [[[11]], [[7]]]
        return iter([FakeResponse([FakeTensor("output_ids", np.array(i, np.int32))]) for i in ids])

    def postprocess(self, request: FakeRequest) -> FakeResponse:
        n = next(t for t in request.inputs if t.name() == "token_ids").as_numpy().size
        text = np.array([b"x"], dtype=np.object_)
        return FakeResponse([FakeTensor("text", text), FakeTensor("prefix_offset", np.array([0], np.int32)),
                             FakeTensor("read_offset", np.array([n], np.int32)),
                             FakeTensor("held_text", np.array([b""], dtype=np.object_)),
                             FakeTensor("stopped", np.array([False]))])


class FakeRequest:
    recorder: Recorder

    def __init__(self, model_name: str, requested_output_names: list[str], inputs: list[FakeTensor],
                 request_id: str = "", preferred_memory: Any = None) -> None:
        self.model_name, self.inputs, self.request_id = model_name, inputs, request_id

    async def async_exec(self, decoupled: bool = False) -> Any:
        return self.recorder.respond(self)


def fake_pb_utils() -> types.ModuleType:
    return fake_triton.fake_pb_utils(InferenceRequest=FakeRequest, InferenceResponse=object)


@pytest.fixture
def bls(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """vlm_triton.triton.bls_model imported against the fake pb_utils (and forgotten afterwards)."""
    for (module,) in adapters_with(monkeypatch, fake_pb_utils(), "vlm_triton.triton.bls_model"):
        yield module


def sent_tensors(bls: types.ModuleType, cfg: DeploymentConfig) -> list[FakeRequest]:
    recorder = Recorder(cfg)
    FakeRequest.recorder = recorder
    embed = {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}[cfg.tensor_dtypes["EMBED"]]
    stages = bls.TritonStages(embed_dtype=embed)

    async def drive() -> None:
        options = RequestOptions(max_tokens=4, seed=3, temperature=0.5, top_k=5, top_p=0.9)
        chunks = [c async for c in run_pipeline(stages, json.dumps([{"role": "user", "content": "hi"}]), options)]
        assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 2
        await stages._cancel("abc")  # the tensorrt_llm cancellation request

    asyncio.run(drive())
    return recorder.requests


def trtllm_cfg(dtype: str) -> DeploymentConfig:
    return DeploymentConfig.from_dict({
        "model": {"checkpoint": "/models/x", "profile": "trtllm"},
        "engine": {"dtype": dtype, "max_slots": 4, "engine_dir": "/e/llm", "vision_engine": "/e/vision/model.plan",
                   "vision_gpu": 1, "enable_kv_cache_reuse": True},
        "triton": {"vision_max_batch_size": 26},
    })


CFGS = {
    "trtllm-bf16": trtllm_cfg("bfloat16"),
    "trtllm-fp16": trtllm_cfg("float16"),
    "torch-cpu": DeploymentConfig.from_dict({"model": {"checkpoint": "/m"}, "engine": {"device": "cpu"}}),
}


def parse(path: Path) -> pb.ModelConfig:
    return text_format.Parse(path.read_text(), pb.ModelConfig())


@pytest.mark.parametrize("name", sorted(CFGS))
def test_every_tensor_the_bls_sends_fits_the_rendered_configs(name: str, bls: types.ModuleType,
                                                              tmp_path: Path) -> None:
    cfg = CFGS[name]
    repo = render_repository(cfg, tmp_path / "repo")
    configs = {role: parse(repo / role / "config.pbtxt")
               for role in ("preprocess", "vision_encoder", "llm", "postprocess")}
    requests = sent_tensors(bls, cfg)
    # preprocess, encode, generate, detokenize per batch of responses (2 responses: 1 or 2 batches) and at the end,
    # then the cancellation
    names = [r.model_name for r in requests]
    assert names[:3] == ["preprocess", "vision_encoder", "llm"] and names[-1] == "llm"
    assert names[3:-1] in (["postprocess"] * 2, ["postprocess"] * 3)
    for request in requests:
        config = configs[request.model_name]
        inputs = {t.name: t for t in config.input}
        for tensor in request.inputs:
            assert tensor.name() in inputs, f"{request.model_name} config lacks {tensor.name()}"
            spec = inputs[tensor.name()]
            assert pb.DataType.Name(spec.data_type) == "TYPE_" + tensor.triton_dtype().replace("BYTES", "STRING")
            batch = 1 if config.max_batch_size > 0 else 0
            assert len(tensor.shape()) == len(spec.dims) + batch, tensor.name()
            fixed = [(want, got) for want, got in zip(spec.dims, tensor.shape()[batch:]) if want != -1]
            assert all(want == got for want, got in fixed), (tensor.name(), fixed)
        sent = {t.name() for t in request.inputs}
        assert {t.name for t in config.input if not t.optional} <= sent
    generate = requests[2]
    assert {"prompt_embedding_table", "prompt_table_extra_ids", "prompt_vocab_size", "seed"} <= {
        t.name() for t in generate.inputs}


def test_trtllm_repository(tmp_path: Path) -> None:
    cfg = CFGS["trtllm-bf16"]
    repo = render_repository(cfg, tmp_path / "repo")
    llm = parse(repo / "llm" / "config.pbtxt")
    assert (llm.backend, llm.platform, llm.max_batch_size) == ("tensorrtllm", "", 4)
    assert llm.model_transaction_policy.decoupled and list(llm.dynamic_batching.preferred_batch_size) == [4]
    params = {k: v.string_value for k, v in llm.parameters.items()}
    assert params == {
        "gpt_model_type": "inflight_fused_batching", "gpt_model_path": "/e/llm", "max_beam_width": "1",
        "batch_scheduler_policy": "guaranteed_no_evict", "kv_cache_free_gpu_mem_fraction": "0.9",
        "enable_kv_cache_reuse": "true", "exclude_input_in_output": "true", "enable_chunked_context": "false",
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no", "executor_worker_path": EXECUTOR_WORKER,
    }
    pooled = render_repository(cfg.replace(engine={"kv_cache_tokens": 65536}), tmp_path / "pooled")
    params = {k: v.string_value for k, v in parse(pooled / "llm" / "config.pbtxt").parameters.items()}
    assert params["max_tokens_in_paged_kv_cache"] == "65536"  # engine.kv_cache_tokens, the pool's size there too
    assert [t.name for t in llm.input] == [s.name for s in contracts.LLM.inputs]
    assert [t.name for t in llm.output] == [s.name for s in LLM_OUTPUTS] and len(LLM_OUTPUTS) == 21
    table = next(t for t in llm.input if t.name == "prompt_embedding_table")
    assert pb.DataType.Name(table.data_type) == "TYPE_BF16"  # the engine dtype
    assert not (repo / "llm" / "1" / "model.py").exists() and (repo / "llm" / "1").is_dir()

    vision = parse(repo / "vision_encoder" / "config.pbtxt")
    assert (vision.platform, vision.backend, vision.max_batch_size) == ("tensorrt_plan", "", 26)
    assert [(g.kind, list(g.gpus)) for g in vision.instance_group] == [(pb.ModelInstanceGroup.KIND_GPU, [1])]
    assert {t.name: pb.DataType.Name(t.data_type) for t in (*vision.input, *vision.output)} == {
        "pixel_values": "TYPE_FP16", "image_embeds": "TYPE_BF16"}
    plan = repo / "vision_encoder" / "1" / "model.plan"
    assert plan.is_symlink() and str(plan.readlink()) == "/e/vision/model.plan"
    for role in ("preprocess", "postprocess", "bls"):
        assert parse(repo / role / "config.pbtxt").backend == "python"
        assert (repo / role / "1" / "model.py").is_file()
    assert DeploymentConfig.load(repo / "deployment.json") == cfg


def test_trtllm_render_needs_engine_paths(tmp_path: Path) -> None:
    cfg = DeploymentConfig.from_dict({"model": {"checkpoint": "/m", "profile": "trtllm"}})
    with pytest.raises(SetupError, match="needs engine.engine_dir and engine.vision_engine"):
        render_repository(cfg, tmp_path / "repo")
