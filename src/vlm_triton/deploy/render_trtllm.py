"""The trtllm profile's two non-Python models, built as Triton `ModelConfig` protobufs like every other config.

- `llm`: tensorrtllm_backend's `tensorrt_llm` model (backend `tensorrtllm`). Its inputs are `contracts.LLM` (the
  tensors the BLS sends, with tensorrt_llm's names, dtypes, dims and reshape); its outputs are all the backend can
  produce (specs/triton_contracts.md, TensorRT-LLM 1.2 `triton_backend/all_models/inflight_batcher_llm`), so the
  backend never writes an output the config lacks. Parameters are the backend's own keys.
- `vision_encoder`: platform `tensorrt_plan`, the plan linked as `1/model.plan`, pinned to `engine.vision_gpu`.

The preprocess, postprocess and BLS stages are the same Python models as in the torch profile.
"""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as pb

from vlm_triton import contracts
from vlm_triton.contracts import TensorSpec
from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.deploy.render import tensor_config
from vlm_triton.errors import SetupError

BATCHING_STRATEGY = "inflight_fused_batching"
EXECUTOR_WORKER = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"
PLAN_FILE = "model.plan"

# tensorrt_llm outputs beyond those of contracts.LLM (logits in FP32, the backend's default logits dtype)
_MORE_LLM_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("cum_log_probs", "FP32", (-1,)),
    TensorSpec("output_log_probs", "FP32", (-1, -1)),
    TensorSpec("context_logits", "FP32", (-1, -1)),
    TensorSpec("generation_logits", "FP32", (-1, -1, -1)),
    TensorSpec("batch_index", "INT32", (1,)),
    TensorSpec("sequence_index", "INT32", (1,)),
    TensorSpec("context_phase_params", "UINT8", (-1,)),
    TensorSpec("kv_cache_alloc_new_blocks", "INT32", (1,)),
    TensorSpec("kv_cache_reused_blocks", "INT32", (1,)),
    TensorSpec("kv_cache_alloc_total_blocks", "INT32", (1,)),
    TensorSpec("arrival_time_ns", "INT64", (1,)),
    TensorSpec("first_scheduled_time_ns", "INT64", (1,)),
    TensorSpec("first_token_time_ns", "INT64", (1,)),
    TensorSpec("last_token_time_ns", "INT64", (1,)),
    TensorSpec("acceptance_rate", "FP32", (1,)),
    TensorSpec("total_accepted_draft_tokens", "INT32", (1,)),
    TensorSpec("total_draft_tokens", "INT32", (1,)),
    TensorSpec("num_output_tokens", "INT32", (1,)),
)
LLM_OUTPUTS: tuple[TensorSpec, ...] = (*contracts.LLM.outputs, *_MORE_LLM_OUTPUTS)


def _flag(value: bool) -> str:
    return "true" if value else "false"


def llm_parameters(cfg: DeploymentConfig) -> dict[str, str]:
    """The tensorrt_llm model's `parameters` (all strings, as the backend reads them)."""
    e = cfg.engine
    params = {
        "gpt_model_type": BATCHING_STRATEGY,
        "gpt_model_path": e.engine_dir,
        "max_beam_width": "1",
        "batch_scheduler_policy": e.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": str(e.kv_cache_free_gpu_mem_fraction),
        "enable_kv_cache_reuse": _flag(e.enable_kv_cache_reuse),
        "exclude_input_in_output": "true",
        "enable_chunked_context": "false",
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "executor_worker_path": EXECUTOR_WORKER,
    }
    if e.kv_cache_tokens:
        params["max_tokens_in_paged_kv_cache"] = str(e.kv_cache_tokens)
    return params


def require_engines(cfg: DeploymentConfig) -> None:
    missing = [k for k in ("engine_dir", "vision_engine") if not getattr(cfg.engine, k)]
    if missing:
        raise SetupError(f"the trtllm profile needs engine.{' and engine.'.join(missing)} (see docs/trtllm.md)")


def llm_config(cfg: DeploymentConfig) -> pb.ModelConfig:
    config = pb.ModelConfig(name=contracts.LLM.role, backend="tensorrtllm", max_batch_size=cfg.engine.max_slots)
    dtypes = cfg.tensor_dtypes
    config.input.extend(tensor_config(s, dtypes, pb.ModelInput) for s in contracts.LLM.inputs)
    config.output.extend(tensor_config(s, dtypes, pb.ModelOutput) for s in LLM_OUTPUTS)
    config.model_transaction_policy.decoupled = True
    config.dynamic_batching.preferred_batch_size.append(cfg.engine.max_slots)
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=1)
    for key, value in llm_parameters(cfg).items():
        config.parameters[key].string_value = value
    return config


def vision_config(cfg: DeploymentConfig) -> pb.ModelConfig:
    contract = contracts.VISION_ENCODER
    config = pb.ModelConfig(name=contract.role, platform="tensorrt_plan", default_model_filename=PLAN_FILE,
                            max_batch_size=cfg.triton.vision_max_batch_size)
    dtypes = cfg.tensor_dtypes
    # A fixed-size-tile plan takes pixel_values alone; optional inputs serve variable-size-tile encoders (torch).
    config.input.extend(tensor_config(s, dtypes, pb.ModelInput) for s in contract.inputs if not s.optional)
    config.output.extend(tensor_config(s, dtypes, pb.ModelOutput) for s in contract.outputs)
    config.dynamic_batching.max_queue_delay_microseconds = cfg.triton.vision_max_queue_delay_us
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU, count=1, gpus=[cfg.engine.vision_gpu])
    return config


def place_engine_files(cfg: DeploymentConfig, role: str, version_dir: Path) -> None:
    """The version folder of a non-Python model: `llm` reads gpt_model_path; the plan is linked as model.plan."""
    version_dir.mkdir(parents=True, exist_ok=True)
    if role == contracts.VISION_ENCODER.role:
        (version_dir / PLAN_FILE).symlink_to(Path(cfg.engine.vision_engine).expanduser().absolute())

