"""Every config.pbtxt is rendered from the deployment through Triton's protobuf and agrees with the contracts."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from vlm_triton import contracts
from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.deploy.render import PYTHON_ROLES, render_repository
from vlm_triton.errors import SetupError
from vlm_triton.families.base import PreprocessLimits
from vlm_triton.multimodal.resample import default_image_threads

CONTRACTS = {c.role: c for c in contracts.ALL_CONTRACTS}


def _cfg(**sections: dict) -> DeploymentConfig:
    return DeploymentConfig.from_dict({"model": {"checkpoint": "/models/x"}, **sections})


def _parse(path: Path) -> pb.ModelConfig:
    return text_format.Parse(path.read_text(), pb.ModelConfig())


@pytest.mark.parametrize("dtype, embed", [("float32", "TYPE_FP32"), ("bfloat16", "TYPE_BF16")])
def test_rendered_configs_match_the_contracts(tmp_path: Path, dtype: str, embed: str) -> None:
    cfg = _cfg(engine={"dtype": dtype, "device": "cpu", "max_slots": 6},
               triton={"vision_max_batch_size": 26, "bls_stall_timeout_s": 42.5})
    repo = render_repository(cfg, tmp_path / "repo")
    for role in PYTHON_ROLES:
        config = _parse(repo / role / "config.pbtxt")
        contract = CONTRACTS[role]
        assert config.name == role and config.backend == "python"
        assert (repo / role / "1" / "model.py").read_text().count(f"vlm_triton.triton.{role}_model") == 1
        assert (config.max_batch_size > 0) == contract.batched
        got = {(t.name, pb.DataType.Name(t.data_type), tuple(t.dims), t.optional) for t in config.input}
        want = {
            (s.name, f"TYPE_{s.resolved(cfg.tensor_dtypes).dtype}".replace("BYTES", "STRING"), s.dims, s.optional)
            for s in contract.inputs
        }
        assert got == want
        assert [t.name for t in config.output] == [s.name for s in contract.outputs]
        assert config.parameters["deployment_file"].string_value == str(repo / "deployment.json")
    llm = _parse(repo / "llm" / "config.pbtxt")
    assert llm.max_batch_size == 6 and llm.model_transaction_policy.decoupled
    table = next(t for t in llm.input if t.name == "prompt_embedding_table")
    assert pb.DataType.Name(table.data_type) == embed
    vision = _parse(repo / "vision_encoder" / "config.pbtxt")
    assert vision.max_batch_size == 26 and vision.HasField("dynamic_batching")
    assert _parse(repo / "bls" / "config.pbtxt").model_transaction_policy.decoupled
    assert DeploymentConfig.load(repo / "deployment.json") == cfg
    assert DeploymentConfig.load(repo / "deployment.json").triton.bls_stall_timeout_s == 42.5  # what the bls reads


def test_llm_contract_is_the_tensorrt_llm_subset() -> None:
    """Names, dtypes, dims and reshape of the tensorrt_llm config (specs/triton_contracts.md) for what we use."""
    trt = {
        "input_ids": ("INT32", (-1,), None), "input_lengths": ("INT32", (1,), ()),
        "request_output_len": ("INT32", (1,), ()), "end_id": ("INT32", (1,), ()), "pad_id": ("INT32", (1,), ()),
        "stop_words_list": ("INT32", (2, -1), None), "temperature": ("FP32", (1,), ()),
        "runtime_top_k": ("INT32", (1,), ()), "runtime_top_p": ("FP32", (1,), ()),
        "repetition_penalty": ("FP32", (1,), ()), "presence_penalty": ("FP32", (1,), ()),
        "frequency_penalty": ("FP32", (1,), ()), "seed": ("UINT64", (1,), ()),
        "exclude_input_in_output": ("BOOL", (1,), ()), "stop": ("BOOL", (1,), ()), "streaming": ("BOOL", (1,), ()),
        "prompt_embedding_table": ("EMBED", (-1, -1), None), "prompt_vocab_size": ("INT32", (1,), ()),
        "prompt_table_extra_ids": ("UINT64", (-1,), None), "return_num_input_tokens": ("BOOL", (1,), ()),
    }
    ours = {s.name: (s.dtype, s.dims, s.reshape) for s in contracts.LLM.inputs}
    assert ours == trt
    assert {s.name: (s.dtype, s.dims) for s in contracts.LLM.outputs} == {
        "output_ids": ("INT32", (-1, -1)), "sequence_length": ("INT32", (-1,)), "num_input_tokens": ("INT32", (1,))}


def test_deployment_file_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match=r"unknown keys in \[engine\]: \['max_slot'\]"):
        DeploymentConfig.from_dict({"model": {"checkpoint": "x"}, "engine": {"max_slot": 3}})
    with pytest.raises(SetupError, match=r"triton.bls_stall_timeout_s must be >= 0 \(0: no deadline\)"):
        DeploymentConfig.from_dict({"model": {"checkpoint": "x"}, "triton": {"bls_stall_timeout_s": -1}})
    assert _cfg().triton.bls_stall_timeout_s == 180.0  # the default: far above any healthy wait
    with pytest.raises(SetupError, match="needs model.checkpoint"):
        DeploymentConfig.from_dict({"engine": {}})
    toml = tmp_path / "d.toml"
    toml.write_text('[model]\ncheckpoint = "/m"\n[limits]\nallowed_local_media_dirs = ["/a"]\n')
    assert DeploymentConfig.load(toml).limits.allowed_local_media_dirs == ("/a",)
    with pytest.raises(SetupError, match=r"preprocess.image_threads must be >= 0"):
        DeploymentConfig.from_dict({"model": {"checkpoint": "x"}, "preprocess": {"image_threads": -1}})
    known = r"known: \['image_resize', 'image_threads', 'plane_pool_mib'\]"
    with pytest.raises(SetupError, match=r"unknown keys in \[preprocess\]: \['threads'\]; " + known):
        DeploymentConfig.from_dict({"model": {"checkpoint": "x"}, "preprocess": {"threads": 2}})


def test_preprocess_image_threads_reach_the_limits() -> None:
    assert _cfg().preprocess.image_threads == 0  # auto by default (item 20)
    auto = _cfg(triton={"preprocess_instances": 3})
    assert PreprocessLimits.from_deployment(auto).image_threads == default_image_threads(3)
    for n in (1, 3, 16):
        assert PreprocessLimits.from_deployment(_cfg(preprocess={"image_threads": n})).image_threads == n
    assert PreprocessLimits().image_threads == 1  # library callers get the single-threaded path unless they ask


@pytest.mark.parametrize(("cpus", "instances", "threads"), [(16, 4, 2), (2, 2, 1), (1, 1, 1), (64, 1, 4), (8, 1, 4),
                                                              (16, 1, 4), (32, 4, 4), (3, 1, 1)])
def test_auto_image_threads_leave_half_the_cores_to_the_other_stages(
    monkeypatch: pytest.MonkeyPatch, cpus: int, instances: int, threads: int
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
    assert default_image_threads(instances) == threads


def test_torch_threads_one_on_cuda_torch_default_on_cpu() -> None:
    """engine.torch_threads auto: 1 for stubs whose models run on CUDA (idle OpenMP workers spin there), untouched
    (0) on CPU, where the model's own matmuls use them; an explicit value wins either way."""
    assert _cfg(engine={"device": "cuda"}).torch_threads == 1
    assert _cfg(engine={"device": "cuda:1"}).torch_threads == 1
    assert _cfg(engine={"device": "cpu"}).torch_threads == 0
    assert _cfg(engine={"device": "cuda", "torch_threads": 8}).torch_threads == 8
    assert _cfg(engine={"device": "cpu", "torch_threads": 2}).torch_threads == 2
    with pytest.raises(SetupError, match=r"engine.torch_threads must be >= 0"):
        _cfg(engine={"torch_threads": -1})


def test_kv_page_tokens_range() -> None:
    """engine.kv_page_tokens: 16 by default, 0 (contiguous runs) up to max_seq_len."""
    assert _cfg().engine.kv_page_tokens == 16
    assert _cfg(engine={"kv_page_tokens": 0}).engine.kv_page_tokens == 0
    for bad in (-1, 9000):
        with pytest.raises(SetupError, match=r"engine.kv_page_tokens must be in \[0, max_seq_len=8192\]"):
            _cfg(engine={"kv_page_tokens": bad})


def test_kv_cache_tokens_at_least_one_request() -> None:
    """engine.kv_cache_tokens: 0 (max_slots * max_seq_len) or a pool that holds at least one longest request."""
    assert _cfg(engine={"kv_cache_tokens": 8192, "max_seq_len": 8192}).engine.kv_cache_tokens == 8192
    with pytest.raises(SetupError, match=r"engine.kv_cache_tokens must be 0 \(max_slots \* max_seq_len\) or >= "):
        _cfg(engine={"kv_cache_tokens": 4096, "max_seq_len": 8192})


def test_default_step_budget_is_the_prompt_limit_but_at_least_8192() -> None:
    from vlm_triton.deploy.config import DEFAULT_STEP_TOKENS, DeploymentConfig

    def cfg(**engine: int) -> DeploymentConfig:
        return DeploymentConfig.from_dict({"model": {"checkpoint": "/x"}, "engine": engine})

    assert DEFAULT_STEP_TOKENS == 8192
    assert cfg(max_seq_len=4096).max_step_tokens == 8192
    assert cfg(max_seq_len=32768).max_step_tokens == 32767
    assert cfg(max_seq_len=4096, max_num_tokens=2048).max_step_tokens == 2048
