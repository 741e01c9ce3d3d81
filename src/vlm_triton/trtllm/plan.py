"""Every number and command of the trtllm profile, computed from one deployment and its model family.

`EnginePlan.create` turns the deployment (batch size, lengths, parallelism, limits) and the family's visual budget
into the engine sizes; the `*_command` functions turn a plan into the exact command lines users run inside the
TensorRT-LLM container (convert_checkpoint.py, trtllm-build, trtexec, mpirun + tritonserver). Nothing here needs a
GPU or TensorRT, so all of it is tested on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.errors import SetupError
from vlm_triton.families.base import PreprocessLimits, VisualBudget

if TYPE_CHECKING:
    from vlm_triton.families.base import ModelFamily

TRTLLM_VERSION = "1.2"  # tensorrt_llm==1.2.*: the last release with TensorRT engines + the Triton multimodal path
TRITONSERVER = "/opt/tritonserver/bin/tritonserver"  # inside the NGC tritonserver:<yy.mm>-trtllm-python-py3 image
MIN_CUDA_POOL_BYTES = 300_000_000  # what tensorrtllm_backend's multimodal launch reserves on GPU 0


@dataclass(frozen=True)
class LLMConvert:
    """How TensorRT-LLM converts one LLM architecture (scripts relative to a TensorRT-LLM v1.2 checkout)."""

    convert_script: str
    remote_code: tuple[str, ...] = ()  # files the plain LLM folder needs from the checkpoint (trust_remote_code)
    auto_map: tuple[tuple[str, str], ...] = ()  # config.json auto_map entries pointing at those files


LLM_CONVERTERS: dict[str, LLMConvert] = {
    "Qwen2ForCausalLM": LLMConvert("examples/models/core/qwen/convert_checkpoint.py"),
    "InternLM2ForCausalLM": LLMConvert(
        "examples/models/core/internlm2/convert_checkpoint.py",
        remote_code=("configuration_internlm2.py", "modeling_internlm2.py"),
        auto_map=(
            ("AutoConfig", "configuration_internlm2.InternLM2Config"),
            ("AutoModel", "modeling_internlm2.InternLM2ForCausalLM"),
            ("AutoModelForCausalLM", "modeling_internlm2.InternLM2ForCausalLM"),
        ),
    ),
}


def llm_converter(architecture: str) -> LLMConvert:
    if architecture not in LLM_CONVERTERS:
        raise SetupError(f"no TensorRT-LLM conversion for LLM architecture {architecture!r}; "
                         f"supported: {', '.join(sorted(LLM_CONVERTERS))}")
    return LLM_CONVERTERS[architecture]


@dataclass(frozen=True)
class EnginePlan:
    """The sizes of both TensorRT builds; every derived number is a property, none is typed by hand."""

    llm_architecture: str
    dtype: str  # float16 | bfloat16: the LLM engine dtype = the prompt-table dtype = the vision plan's output
    tensor_parallel: int
    pipeline_parallel: int
    weight_only: str  # "" | int8 | int4
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    budget: VisualBudget
    llm_hidden_size: int
    vision_max_batch: int  # the plan's largest tile batch = the vision_encoder's Triton max_batch_size
    vision_gpu: int

    @classmethod
    def create(cls, cfg: DeploymentConfig, *, budget: VisualBudget, llm_architecture: str,
               llm_hidden_size: int) -> "EnginePlan":
        if cfg.model.profile != "trtllm":
            raise SetupError(f"engine builds need model.profile = 'trtllm' (the deployment says {cfg.model.profile!r})")
        llm_converter(llm_architecture)
        e = cfg.engine
        max_input_len = cfg.max_prompt_tokens
        plan = cls(
            llm_architecture=llm_architecture, dtype=cfg.torch_dtype_name, tensor_parallel=e.tensor_parallel,
            pipeline_parallel=e.pipeline_parallel, weight_only=e.weight_only, max_batch_size=e.max_slots,
            max_input_len=max_input_len, max_seq_len=e.max_seq_len, max_num_tokens=e.max_num_tokens or max_input_len,
            budget=budget, llm_hidden_size=llm_hidden_size, vision_max_batch=cfg.triton.vision_max_batch_size,
            vision_gpu=e.vision_gpu,
        )
        plan.validate()
        return plan

    def validate(self) -> None:
        b = self.budget
        if b.max_units > self.vision_max_batch:
            raise SetupError(f"one request may carry {b.max_units} vision units but triton.vision_max_batch_size is "
                             f"{self.vision_max_batch}; raise it to at least {b.max_units} or lower the image limits")
        if b.max_tokens >= self.max_input_len:
            raise SetupError(f"one request may carry {b.max_tokens} image tokens, which leaves no room for text in "
                             f"max_input_len {self.max_input_len}; raise engine.max_input_len/max_seq_len or lower "
                             "limits.max_images / limits.max_tiles_per_image")
        if self.max_num_tokens < self.max_input_len:
            raise SetupError(f"engine.max_num_tokens {self.max_num_tokens} must be >= max_input_len "
                             f"{self.max_input_len} (a whole prompt is one context step)")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def max_multimodal_len(self) -> int:
        """Rows of the engine's prompt table = max_batch_size x image tokens per request."""
        return self.max_batch_size * self.budget.max_tokens

    @property
    def vision_profile(self) -> tuple[int, int, int]:
        """min / opt / max tile batch of the vision plan."""
        return 1, max(1, self.vision_max_batch // 2), self.vision_max_batch

    @property
    def cuda_pool_bytes(self) -> int:
        """CUDA pool for the Python stages on the vision GPU: the prompt tables of a full batch, twice (in + out)."""
        table = self.budget.max_tokens * self.llm_hidden_size * 2  # fp16 / bf16
        return max(MIN_CUDA_POOL_BYTES, 2 * self.max_batch_size * table)

    @property
    def trt_precision(self) -> str:
        return {"float16": "fp16", "bfloat16": "bf16"}[self.dtype]


def convert_checkpoint_command(plan: EnginePlan, *, llm_dir: str, out_dir: str, trtllm_src: str) -> list[str]:
    """TensorRT-LLM's convert_checkpoint.py for the plain LLM folder written by `export-llm`."""
    script = f"{trtllm_src.rstrip('/')}/{llm_converter(plan.llm_architecture).convert_script}"
    cmd = ["python3", script, "--model_dir", llm_dir, "--output_dir", out_dir, "--dtype", plan.dtype,
           "--tp_size", str(plan.tensor_parallel), "--pp_size", str(plan.pipeline_parallel)]
    if plan.weight_only:
        cmd += ["--use_weight_only", "--weight_only_precision", plan.weight_only]
    return cmd


def build_llm_command(plan: EnginePlan, *, checkpoint_dir: str, engine_dir: str) -> list[str]:
    """trtllm-build with the computed sizes, paged KV cache and paged context FMHA (needed for KV reuse)."""
    return [
        "trtllm-build", "--checkpoint_dir", checkpoint_dir, "--output_dir", engine_dir,
        "--max_batch_size", str(plan.max_batch_size), "--max_input_len", str(plan.max_input_len),
        "--max_seq_len", str(plan.max_seq_len), "--max_num_tokens", str(plan.max_num_tokens),
        "--max_multimodal_len", str(plan.max_multimodal_len), "--max_beam_width", "1",
        "--gemm_plugin", "auto", "--gpt_attention_plugin", "auto", "--kv_cache_type", "paged",
        "--use_paged_context_fmha", "enable", "--remove_input_padding", "enable",
        "--workers", str(plan.world_size),
    ]


def trtexec_command(plan: EnginePlan, *, onnx: str, plan_file: str, trtexec: str = "trtexec") -> list[str]:
    """trtexec for the vision ONNX: one profile over the tile batch; I/O dtypes come from the ONNX itself."""
    shape = "x".join(str(d) for d in plan.budget.unit_shape)
    lo, opt, hi = plan.vision_profile
    return [
        trtexec, f"--onnx={onnx}", f"--saveEngine={plan_file}",
        f"--minShapes=pixel_values:{lo}x{shape}", f"--optShapes=pixel_values:{opt}x{shape}",
        f"--maxShapes=pixel_values:{hi}x{shape}", f"--{plan.trt_precision}",
    ]


def launch_command(plan: EnginePlan, *, repo: str, tritonserver: str = TRITONSERVER, http_port: int = 8000,
                   grpc_port: int = 8001, metrics_port: int = 8002) -> list[str]:
    """One tritonserver per LLM rank under mpirun (tensorrtllm_backend's leader mode, as launch_triton_server.py
    does): rank 0 loads every model; the other ranks load only `llm`."""
    ranks: list[list[str]] = []
    for rank in range(plan.world_size):
        cmd = [tritonserver, f"--model-repository={repo}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
               f"--metrics-port={metrics_port}", "--disable-auto-complete-config",
               f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        if rank == 0:
            cmd.append(f"--cuda-memory-pool-byte-size={plan.vision_gpu}:{plan.cuda_pool_bytes}")
        else:
            cmd += ["--model-control-mode=explicit", "--load-model=llm"]
        ranks.append(cmd)
    if plan.world_size == 1:
        return ranks[0]
    out = ["mpirun", "--allow-run-as-root"]
    for i, cmd in enumerate(ranks):
        out += ["-n", "1", *cmd] + ([":"] if i < len(ranks) - 1 else [])
    return out


def plan_for_family(cfg: DeploymentConfig, family: "ModelFamily") -> EnginePlan:
    """The plan of `cfg` for its checkpoint's family (only the family's config is read, never its weights)."""
    return EnginePlan.create(
        cfg, budget=family.visual_budget(PreprocessLimits.from_deployment(cfg)),
        llm_architecture=family.llm_part().architecture, llm_hidden_size=family.hidden_size,
    )
