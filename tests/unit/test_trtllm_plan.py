"""The trtllm profile's engine sizes and command lines, for the seeds' example deployments (no GPU, no TensorRT).

Seeds (grps-trtllm docs, specs/triton_contracts.md): InternVL2.5/3 max_multimodal_len = 4 x 26 x 256 = 26624 with a
1/13/26 ViT profile; InternVideo2.5 2 x 128 x 16 = 4096; MiniCPM-V 64 tokens per slice (8 x 64 x 64 = 32768).
InternVL checkpoints are real config dicts through the real family class; InternVideo2.5 and MiniCPM-V have no
family class yet, so their budgets are built from their config values here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.errors import SetupError
from vlm_triton.families.base import VisualBudget
from vlm_triton.families.internvl import InternVLFamily
from vlm_triton.trtllm.cli import build_script
from vlm_triton.trtllm.plan import (
    EnginePlan,
    build_llm_command,
    convert_checkpoint_command,
    launch_command,
    plan_for_family,
    trtexec_command,
)

VIT_300M = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
            "image_size": 448, "patch_size": 14, "qkv_bias": True, "qk_normalization": False,
            "norm_type": "layer_norm"}


def internvl_config(llm_hidden: int, vocab: int) -> dict[str, Any]:
    return {"architectures": ["InternVLChatModel"], "force_image_size": 448, "downsample_ratio": 0.5,
            "ps_version": "v2", "select_layer": -1, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
            "use_thumbnail": True, "vision_config": VIT_300M,
            "llm_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": llm_hidden, "vocab_size": vocab}}


INTERNVL3_8B = internvl_config(3584, 151674)  # Qwen2.5-7B
INTERNVL25_4B = internvl_config(2048, 151674)  # Qwen2.5-3B


def deployment(**engine: Any) -> dict[str, Any]:
    return {
        "model": {"checkpoint": "/models/x", "profile": "trtllm"},
        "engine": {"dtype": "bfloat16", "engine_dir": "/e/llm", "vision_engine": "/e/vision.plan", **engine},
    }


def cfg_of(data: dict[str, Any], limits: dict[str, Any], vision_batch: int) -> DeploymentConfig:
    return DeploymentConfig.from_dict({**data, "limits": limits, "triton": {"vision_max_batch_size": vision_batch}})


def internvl_plan(config: dict[str, Any], cfg: DeploymentConfig) -> EnginePlan:
    return plan_for_family(cfg, InternVLFamily(Checkpoint(Path("/models/x"), config)))


def flags(cmd: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(cmd, cmd[1:]) if a.startswith("--") and not b.startswith("--")}


SEED_INTERNVL = deployment(max_slots=4, max_seq_len=32768, max_input_len=30720, max_num_tokens=32768)
SEED_LIMITS = {"max_images": 2, "max_tiles_per_image": 12}


def test_internvl3_8b_seed() -> None:
    plan = internvl_plan(INTERNVL3_8B, cfg_of(SEED_INTERNVL, SEED_LIMITS, 26))
    assert plan.budget == VisualBudget(max_units=26, tokens_per_unit=256, unit_shape=(3, 448, 448))
    assert plan.max_multimodal_len == 4 * 26 * 256 == 26624
    build = build_llm_command(plan, checkpoint_dir="/w/ckpt", engine_dir="/e/llm")
    assert build[0] == "trtllm-build"
    assert flags(build) == {
        "--checkpoint_dir": "/w/ckpt", "--output_dir": "/e/llm", "--max_batch_size": "4", "--max_input_len": "30720",
        "--max_seq_len": "32768", "--max_num_tokens": "32768", "--max_multimodal_len": "26624",
        "--max_beam_width": "1", "--gemm_plugin": "auto", "--gpt_attention_plugin": "auto", "--kv_cache_type": "paged",
        "--use_paged_context_fmha": "enable", "--remove_input_padding": "enable", "--workers": "1",
    }
    trt = trtexec_command(plan, onnx="/w/v.onnx", plan_file="/e/vision.plan")
    assert trt == ["trtexec", "--onnx=/w/v.onnx", "--saveEngine=/e/vision.plan",
                   "--minShapes=pixel_values:1x3x448x448", "--optShapes=pixel_values:13x3x448x448",
                   "--maxShapes=pixel_values:26x3x448x448", "--bf16"]
    convert = convert_checkpoint_command(plan, llm_dir="/w/llm", out_dir="/w/ckpt", trtllm_src="/src/TRT-LLM/")
    assert convert == ["python3", "/src/TRT-LLM/examples/models/core/qwen/convert_checkpoint.py", "--model_dir",
                       "/w/llm", "--output_dir", "/w/ckpt", "--dtype", "bfloat16", "--tp_size", "1", "--pp_size", "1"]


def test_internvl25_4b_seed_with_tensor_parallel_and_int4() -> None:
    data = deployment(max_slots=4, max_seq_len=32768, max_input_len=30720, tensor_parallel=2, pipeline_parallel=2,
                      weight_only="int4", dtype="float16", vision_gpu=3)
    plan = internvl_plan(INTERNVL25_4B, cfg_of(data, SEED_LIMITS, 26))
    assert plan.max_multimodal_len == 26624 and plan.world_size == 4
    convert = convert_checkpoint_command(plan, llm_dir="/w/llm", out_dir="/w/ckpt", trtllm_src="/src")
    assert convert[-7:] == ["--tp_size", "2", "--pp_size", "2", "--use_weight_only", "--weight_only_precision", "int4"]
    assert flags(convert)["--dtype"] == "float16"
    build = flags(build_llm_command(plan, checkpoint_dir="c", engine_dir="e"))
    assert build["--workers"] == "4" and build["--max_num_tokens"] == "30720"  # defaults to max_input_len
    assert trtexec_command(plan, onnx="o", plan_file="p")[-1] == "--fp16"
    launch = launch_command(plan, repo="/repo")
    assert launch[:2] == ["mpirun", "--allow-run-as-root"] and launch.count("-n") == 4 and launch.count(":") == 3
    ranks = " ".join(launch).split(" : ")
    assert "--cuda-memory-pool-byte-size=3:" in ranks[0] and "--load-model" not in ranks[0]
    for rank, line in enumerate(ranks):
        assert f"shm-region-prefix-name=prefix{rank}_" in line
        assert ("--model-control-mode=explicit --load-model=llm" in line) == (rank > 0)
    # the pool holds a full batch of prompt tables twice (2 x 4 x 6656 rows x 2048 x 2 bytes), at least 300 MB
    assert plan.cuda_pool_bytes == max(300_000_000, 2 * 4 * 6656 * 2048 * 2) == 300_000_000
    big = internvl_plan(INTERNVL3_8B, cfg_of(SEED_INTERNVL, SEED_LIMITS, 26))
    assert big.cuda_pool_bytes == 2 * 4 * 6656 * 3584 * 2


def test_internvideo25_8b_seed() -> None:
    config = {"llm_config": {"architectures": ["InternLM2ForCausalLM"], "hidden_size": 4096},
              "force_image_size": 448, "num_tome_tokens": 64, "local_num_frames": 4, "max_num_frames": 128}
    budget = VisualBudget(max_units=config["max_num_frames"],
                          tokens_per_unit=config["num_tome_tokens"] // config["local_num_frames"],
                          unit_shape=(3, config["force_image_size"], config["force_image_size"]))
    cfg = cfg_of(deployment(max_slots=2, max_seq_len=8192, max_input_len=6144, weight_only="int8"), {}, 128)
    plan = EnginePlan.create(cfg, budget=budget, llm_architecture="InternLM2ForCausalLM", llm_hidden_size=4096)
    assert plan.max_multimodal_len == 2 * 128 * 16 == 4096
    build = flags(build_llm_command(plan, checkpoint_dir="c", engine_dir="e"))
    assert (build["--max_input_len"], build["--max_seq_len"], build["--max_num_tokens"]) == ("6144", "8192", "6144")
    convert = convert_checkpoint_command(plan, llm_dir="l", out_dir="o", trtllm_src="/src")
    assert convert[1] == "/src/examples/models/core/internlm2/convert_checkpoint.py"
    assert convert[-3:] == ["--use_weight_only", "--weight_only_precision", "int8"]
    assert plan.vision_profile == (1, 64, 128)


def test_minicpmv26_seed() -> None:
    config = {"architectures": ["MiniCPMV"], "query_num": 64, "hidden_size": 3584, "image_size": 448}
    slices_per_request = 64  # grps: at most 64 slices per request (e.g. 8 images x (7 slices + the overview))
    budget = VisualBudget(max_units=slices_per_request, tokens_per_unit=config["query_num"], unit_shape=(3, 448, 448))
    cfg = cfg_of(deployment(max_slots=8, max_seq_len=32768, max_input_len=30720, max_num_tokens=32768,
                            weight_only="int8"), {}, 64)
    plan = EnginePlan.create(cfg, budget=budget, llm_architecture="Qwen2ForCausalLM", llm_hidden_size=3584)
    assert plan.max_multimodal_len == 8 * 64 * 64 == 32768
    assert flags(build_llm_command(plan, checkpoint_dir="c", engine_dir="e"))["--max_multimodal_len"] == "32768"


@pytest.mark.parametrize("engine, limits, vision_batch, message", [
    ({}, SEED_LIMITS, 13, r"raise it to at least 26"),
    ({"max_seq_len": 8192}, {"max_images": 8}, 128, r"no room for text"),
    ({"max_seq_len": 32768, "max_input_len": 30720, "max_num_tokens": 8192}, SEED_LIMITS, 26, r"max_num_tokens"),
])
def test_impossible_sizes_are_refused(engine: dict, limits: dict, vision_batch: int, message: str) -> None:
    with pytest.raises(SetupError, match=message):
        internvl_plan(INTERNVL3_8B, cfg_of(deployment(**engine), limits, vision_batch))


def test_deployment_validation() -> None:
    with pytest.raises(SetupError, match="float16 or bfloat16"):
        DeploymentConfig.from_dict(deployment(dtype="float32"))
    with pytest.raises(SetupError, match="needs the trtllm profile"):
        DeploymentConfig.from_dict({"model": {"checkpoint": "x"}, "engine": {"tensor_parallel": 2}})
    with pytest.raises(SetupError, match="weight_only must be"):
        DeploymentConfig.from_dict(deployment(weight_only="fp8"))
    with pytest.raises(SetupError, match="no TensorRT-LLM conversion for LLM architecture 'Foo'"):
        EnginePlan.create(DeploymentConfig.from_dict(deployment()), budget=VisualBudget(1, 1, (3, 4, 4)),
                          llm_architecture="Foo", llm_hidden_size=8)
    cfg = DeploymentConfig.from_dict(deployment())
    assert cfg.tensor_dtypes == {"EMBED": "BF16", "PIXEL": "FP16"}
    assert DeploymentConfig.from_dict(deployment(dtype="auto")).torch_dtype_name == "bfloat16"


def test_build_script_runs_every_step_in_order() -> None:
    cfg = cfg_of(SEED_INTERNVL, SEED_LIMITS, 26)
    plan = internvl_plan(INTERNVL3_8B, cfg)
    script = build_script(cfg, plan, deployment="d.toml", work_dir="/w/", trtllm_src="/src")
    order = ["export-llm", "convert_checkpoint.py", "trtllm-build", "export-vision", '"${TRTEXEC:-trtexec}" --onnx',
             "vlm-triton render", "launch"]
    positions = [script.index(step) for step in order]
    assert positions == sorted(positions)
    assert "max_multimodal_len = 4 x 26 x 256 = 26624" in script and "1/13/26" in script
    assert launch_command(plan, repo="/r")[0] == "/opt/tritonserver/bin/tritonserver"  # one GPU: no mpirun
