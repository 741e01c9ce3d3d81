"""One deployment file -> one frozen config, from which every config.pbtxt is rendered.

The file is TOML (sections mirror the dataclasses below); every key is optional except `model.checkpoint`.
The rendered repository carries the resolved config as `deployment.json`; each Triton model reads it at load time,
so the preprocess, vision encoder, llm, postprocess and BLS all see the same values.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlm_triton.errors import SetupError

Profile = Literal["torch", "trtllm"]
# Vision requests are split in multiples of this many tiles: InternVideo2.5's HiCo merges 4 consecutive frames.
TILE_GROUP = 4
IMAGE_RESIZE = ("auto", "host", "device")  # preprocess.image_resize
# The torch engine's least default prefill budget per step: on an H100, W2 at c=16 ran 13% faster than with the prompt
# limit (4,095) as the budget, by fewer and larger prefill steps between decode steps (docs/benchmarks.md, item 35).
DEFAULT_STEP_TOKENS = 8192


@dataclass(frozen=True)
class ModelSection:
    checkpoint: str
    served_name: str = ""  # the OpenAI `model` id; default: the checkpoint folder's name
    profile: Profile = "torch"


@dataclass(frozen=True)
class EngineSection:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | float16 | bfloat16
    max_slots: int = 16  # requests decoded together (decode batch rows)
    max_seq_len: int = 8192  # prompt + output tokens per request
    # KV-cache tokens (rows per layer) shared by all requests: each reserves prompt + max_tokens - 1 of them while it
    # runs. 0: max_slots * max_seq_len, in fixed runs of max_seq_len (every slot can reach max_seq_len). A smaller
    # pool with a larger max_slots serves more concurrent requests from the same memory when they are shorter than
    # max_seq_len. trtllm profile: the tensorrt_llm model's max_tokens_in_paged_kv_cache (0: unset,
    # kv_cache_free_gpu_mem_fraction sizes it)
    kv_cache_tokens: int = 0
    # torch profile: > 0 makes the KV pool pages of this many tokens (vLLM's block_size, TensorRT-LLM's
    # tokens_per_block): a request takes any free pages instead of one contiguous run, so the pool never
    # fragments; decode attends through a page table with the engine's Triton kernel (engine/paged_attention.py),
    # which on an H200 decodes faster than FA2 over contiguous runs (docs/benchmarks.md, item 60: bare engine W2
    # +11-19% tok/s). 0: contiguous runs (FA2 varlen decode)
    kv_page_tokens: int = 16
    cuda_graphs: bool = True
    prefill_graphs: bool = True  # CUDA, fp16/bf16, with cuda_graphs: prefill forwards replayed from graphs too
    compile_pointwise: bool = True  # CUDA: norms, RoPE, SiLU*up as compiled kernels (engine/pointwise.py)
    # ... in prefill forwards too (with compile_pointwise, when the prefill runs from CUDA graphs): a 3.4k-token
    # prefill 15.2 -> 12.6 ms on an H100 (bare engine; docs/benchmarks.md, items 38 and 44)
    prefill_pointwise: bool = True
    # each layer's q/k/v projections as one GEMM, and gate/up as one (engine/fused_linear.py): fewer, wider kernels
    # per step; the decode graph at batch 1 1.55 -> 1.28 ms on an H100 (docs/benchmarks.md, items 39 and 44)
    fuse_projections: bool = True
    # torch profile: the llm stage runs the vision encoder itself, on its own device (a thread and CUDA stream of its
    # own, batching the images of requests that arrive together), instead of the bls calling the vision_encoder
    # stage: the embeddings never leave the GPU and the request makes two Triton hops fewer. The vision_encoder stage
    # stays for the ensemble and direct callers and loads its own copy of the encoder at their first request.
    # true | false | "auto" (on with the torch profile on CUDA). On an H100, A B A B (docs/benchmarks.md, item 42):
    # +13-19% out tok/s at W1 c=16/64 and +25% at W3 c=64, TPOT at W1 c=64 13-14 -> 8-9 ms; costs: TPOT at c=1
    # +0.2 ms (~10%, every request, cause not found) and TTFT at W3 c=16 +20-40%. Session 16 (item 44): +26% out
    # tok/s at W1 and W3 c=64 over the new defaults, but +0.1-0.2 ms of TPOT at c=1, text included (W2 1.57 -> 1.67
    # ms) and W1 TPOT at c=64 7.5 -> 10.3 ms. Session 18 (item 46), A B A on one H100 with the vision_encoder stage
    # unbatched (no delay) and the layer scales folded: +26% / +19% out tok/s at W1 / W3 c=64, W1 TTFT at c=1 78 ->
    # 74 ms, W1 TPOT at c=64 10.3-11.1 -> 11.2 ms and at c=1 1.53-1.58 -> 1.86 ms (within the 2 ms target): on by
    # default where it can run ("auto"). That c=1 cost was host work of each step, hidden by run_ahead (item 47)
    vision_in_llm: bool | str = "auto"
    # torch profile: launch a decode step before the tokens of the step before reach the host, whenever nothing can
    # change between them (engine/run_ahead.py; vLLM's async scheduling), so the GPU runs the next step while the host
    # accepts this one. Tokens are those of one step at a time
    run_ahead: bool = True
    # CPU threads of torch ops in the llm and vision_encoder stubs. 0: 1 when the model runs on CUDA (their CPU ops
    # are small glue, and idle OpenMP workers spin: on an H100 host the vision stub burnt 4.5 cores and W3 lost 15-19%
    # of its throughput), torch's default on CPU (where the model's matmuls need them)
    torch_threads: int = 0
    # trtllm profile (docs/trtllm.md); max_slots is the engine's max_batch_size there
    engine_dir: str = ""  # the TensorRT-LLM engine folder (trtllm-build --output_dir)
    vision_engine: str = ""  # the TensorRT plan of the vision encoder (linked as vision_encoder/1/model.plan)
    kv_cache_free_gpu_mem_fraction: float = 0.9
    enable_kv_cache_reuse: bool = False
    tensor_parallel: int = 1  # GPUs per LLM layer (one MPI rank each)
    pipeline_parallel: int = 1  # LLM layer stages (world size = tensor_parallel * pipeline_parallel)
    weight_only: str = ""  # "" | int8 | int4: weight-only quantization of the LLM (convert_checkpoint.py)
    max_input_len: int = 0  # prompt tokens per request, images included; 0: max_seq_len - 1
    # tokens per engine step (torch: one prefill batch, count x longest prompt; a longer prompt goes in chunks);
    # 0: max(max_input_len, 8192) on the torch profile, max_input_len on trtllm
    max_num_tokens: int = 0
    batch_scheduler_policy: str = "guaranteed_no_evict"  # | max_utilization
    vision_gpu: int = 0  # the GPU the vision plan runs on


@dataclass(frozen=True)
class LimitsSection:
    max_images: int = 8  # images and videos per request
    max_video_frames: int = 0  # frames sampled per video; 0: the family's default (InternVideo2.5 128, InternVL 8)
    max_tiles_per_image: int = 0  # 0: the checkpoint's max_dynamic_patch
    max_media_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 8192 * 8192
    media_timeout_s: float = 10.0
    allowed_local_media_dirs: tuple[str, ...] = ()
    allow_private_networks: bool = False
    default_max_tokens: int = 512


@dataclass(frozen=True)
class PreprocessSection:
    # threads of one preprocess instance for image work (concurrent fetch/decode of a request's images, resizes
    # split into strips, tiles packed in parallel); the bytes are identical for every value. 0: auto, half the CPUs
    # shared by the preprocess instances, 1 to 4 (2 on a 16-core host with 4 instances, 1 on 2 cores);
    # 1: everything in the request's thread, the single-threaded reference path
    image_threads: int = 0
    # where an image's tiles are cut (resize to the grid, crops, thumbnail), with the same bytes either way:
    # "host" (Pillow, in preprocess), "device" (the vision_encoder, on its device, from the decoded image; torch
    # profile, families that support it: InternVL), "auto" (device when the vision encoder runs on CUDA with the
    # torch profile, the family supports it and the device path reproduces the installed Pillow; host otherwise).
    # On an H100, device cut W1's TTFT by 15-19% at c=1 and c=16 and W3's by a third at c=16 (docs/benchmarks.md,
    # item 36)
    image_resize: str = "auto"
    # engine.vision_in_llm: MiB of /dev/shm per preprocess instance into which it writes each request's images for the
    # llm to read (multimodal/plane_pool.py), instead of sending them through Triton and the bls; 0: by value. Requests
    # that find it full, or a host whose /dev/shm cannot hold it, send them by value
    plane_pool_mib: int = 128


@dataclass(frozen=True)
class TritonSection:
    # tiles batched across requests by Triton's dynamic batcher, and the most a round of the llm's vision thread
    # encodes (engine.vision_in_llm). Smaller rounds hand requests their tables sooner: under W1 load on an H100 16
    # against 64 gave TTFT p50 -45 to -67% and TPOT 9 -> 14-16 ms at even throughput (docs/benchmarks.md, item 52)
    vision_max_batch_size: int = 32
    # how long Triton holds a vision_encoder batch open for more requests while the encoder is idle: each W1 image
    # (13 tiles) waited the whole 2 ms of the old default at c=1; under load requests queue behind the busy encoder
    # and are batched without it (docs/benchmarks.md, item 45)
    vision_max_queue_delay_us: int = 0
    preprocess_instances: int = 2
    postprocess_instances: int = 2
    # BLS processes; one saturated near 4 streams. 2 on an H100 (W2): c=16 3,344 -> 4,805 tok/s, c=64 9,322 -> 12,172
    bls_instances: int = 2
    # "inline": the BLS detokenizes with the postprocess model's code in its own process (one IPC round trip less
    # per chunk: W2 on an H100 +15% tok/s at c=16, +11% at c=64); "postprocess": it calls the postprocess model
    bls_detokenize: str = "inline"
    # False: the BLS takes the vision encoder's embeddings in host memory and hands them on so. True: as its CUDA
    # tensor (no copies), which brings a CUDA tensor into the BLS stub, and with Python backends before r26.07 that
    # can stall every later llm stream after one token (python_backend#439; docs/benchmarks.md, item 7)
    bls_gpu_prompt_table: bool = False
    # Longest the BLS waits on a stage without progress before it fails the request (error naming the stage, thread
    # dump in the log, llm request cancelled): a whole preprocess / vision_encoder / postprocess call, or the gap
    # between llm responses, the first included (queueing under load delays it). 0: wait forever
    bls_stall_timeout_s: float = 180.0
    # Threads sending the llm's responses (each request always on the same one, so its tokens stay in order). A
    # send to a BLS caller is a synchronous round trip through tritonserver and the BLS stub, so one thread caps
    # the responses per second under load
    llm_send_threads: int = 1
    # Least time between two streamed responses of one llm request (vLLM's and TensorRT-LLM's stream_interval, in
    # time): tokens made in between leave together in the next response. Each response costs a tensor, a response
    # object and a send in the llm stub and as much again in the BLS, all under their GIL. 0: every round sends (the
    # outbox already merges what piled up while it was busy). The first token and the last always go at once
    llm_stream_interval_ms: float = 0.0
    # Stubs keep freed memory (glibc mmap/trim thresholds, triton/malloc.py) instead of faulting it in again at the
    # next request: the preprocess stub spent ~16 ms of system time per W1 request on page faults without it
    stub_keep_freed_memory: bool = True
    # Stubs move their start-up objects (torch, transformers, the model code: ~370k) out of Python's garbage
    # collection once initialized (gc.freeze, gc_heap.py): a full collection walked all of them under the GIL, which
    # stopped the llm stub's engine loop for up to ~250 ms under load on an H100
    stub_freeze_heap: bool = True
    # Stages pay their first image request's one-time costs before they report ready (multimodal/warmup.py): the
    # preprocess prepares a synthetic image, the vision encoders encode it on CUDA. A fresh preprocess's first W1
    # request took 40-60 ms more than the next ones, per instance (docs/benchmarks.md, item 43)
    stage_warm_up: bool = True


@dataclass(frozen=True)
class DeploymentConfig:
    model: ModelSection
    engine: EngineSection = field(default_factory=EngineSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    preprocess: PreprocessSection = field(default_factory=PreprocessSection)
    triton: TritonSection = field(default_factory=TritonSection)

    @property
    def served_name(self) -> str:
        return self.model.served_name or Path(self.model.checkpoint).name

    @property
    def device(self) -> str:
        if self.engine.device != "auto":
            return self.engine.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def vision_in_llm(self) -> bool:
        """engine.vision_in_llm decided: "auto" is on with the torch profile on CUDA (every stage on this host reads
        the same answer; render.py adds the llm's vision inputs from it)."""
        if self.engine.vision_in_llm == "auto":
            return self.model.profile == "torch" and self.device.startswith("cuda")
        return self.engine.vision_in_llm is True

    @property
    def torch_threads(self) -> int:
        """Intra-op threads for the stubs that run the models; 0: leave torch's default."""
        if self.engine.torch_threads:
            return self.engine.torch_threads
        return 1 if self.device.startswith("cuda") else 0

    @property
    def torch_dtype_name(self) -> str:
        """The model dtype; for trtllm also the engine dtype (auto: bfloat16, the InternVL checkpoints' dtype)."""
        if self.engine.dtype != "auto":
            return self.engine.dtype
        if self.model.profile == "trtllm":
            return "bfloat16"
        return "float32" if self.device == "cpu" else "bfloat16"

    @property
    def tensor_dtypes(self) -> dict[str, str]:
        """Triton dtypes of the placeholder tensors (see contracts.EMBED / contracts.PIXEL).

        torch: pixels travel as the raw RGB bytes (UINT8), normalised by the vision_encoder on its device. trtllm: the
        prompt table must be in the engine dtype; the TensorRT vision plan takes normalised FP16 pixels (numpy has no
        bfloat16).
        """
        embed = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}[self.torch_dtype_name]
        return {"EMBED": embed, "PIXEL": "FP16" if self.model.profile == "trtllm" else "UINT8"}

    @property
    def max_prompt_tokens(self) -> int:
        """Prompt tokens (images included) one request may have."""
        return self.engine.max_input_len or self.engine.max_seq_len - 1

    @property
    def max_step_tokens(self) -> int:
        """Tokens one torch engine step may prefill: engine.max_num_tokens, by default the prompt limit but at least
        DEFAULT_STEP_TOKENS (docs/benchmarks.md, item 35). The trtllm profile's default is max_input_len (trtllm/plan)."""
        return self.engine.max_num_tokens or max(self.max_prompt_tokens, DEFAULT_STEP_TOKENS)

    @property
    def world_size(self) -> int:
        """LLM ranks (GPUs) of the trtllm profile."""
        return self.engine.tensor_parallel * self.engine.pipeline_parallel

    @property
    def vision_chunk(self) -> int:
        """Tiles per vision_encoder request: the batch limit, in whole groups of TILE_GROUP tiles."""
        return self.triton.vision_max_batch_size // TILE_GROUP * TILE_GROUP

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeploymentConfig":
        sections = {"model": ModelSection, "engine": EngineSection, "limits": LimitsSection,
                    "preprocess": PreprocessSection, "triton": TritonSection}
        unknown = set(data) - set(sections)
        if unknown:
            raise SetupError(f"unknown deployment sections {sorted(unknown)}; known: {sorted(sections)}")
        if "model" not in data or "checkpoint" not in data["model"]:
            raise SetupError("the deployment needs model.checkpoint (the checkpoint folder)")
        kwargs = {name: _section(kind, data.get(name, {}), name) for name, kind in sections.items()}
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Cross-field checks; each message says what is allowed."""
        e = self.engine
        checks = [
            (self.model.profile in ("torch", "trtllm"),
             f"model.profile must be torch or trtllm, got {self.model.profile!r}"),
            (e.dtype in ("auto", "float32", "float16", "bfloat16"),
             f"engine.dtype must be auto, float32, float16 or bfloat16, got {e.dtype!r}"),
            (e.tensor_parallel >= 1 and e.pipeline_parallel >= 1,
             "engine.tensor_parallel and engine.pipeline_parallel must be >= 1"),
            (e.weight_only in ("", "int8", "int4"),
             f"engine.weight_only must be '', int8 or int4, got {e.weight_only!r}"),
            (0 <= e.max_input_len < e.max_seq_len, f"engine.max_input_len must be in [0, max_seq_len={e.max_seq_len})"),
            (e.batch_scheduler_policy in ("guaranteed_no_evict", "max_utilization"),
             "engine.batch_scheduler_policy must be guaranteed_no_evict or max_utilization"),
            (e.vision_gpu >= 0, "engine.vision_gpu must be >= 0"),
            (e.max_num_tokens >= 0, "engine.max_num_tokens must be >= 0 (0: the default, at least max_input_len)"),
            (e.torch_threads >= 0, "engine.torch_threads must be >= 0 (0: auto)"),
            (0 <= e.kv_page_tokens <= e.max_seq_len,
             f"engine.kv_page_tokens must be in [0, max_seq_len={e.max_seq_len}] (0: contiguous runs)"),
            (e.kv_cache_tokens == 0 or e.kv_cache_tokens >= e.max_seq_len,
             f"engine.kv_cache_tokens must be 0 (max_slots * max_seq_len) or >= max_seq_len={e.max_seq_len}"),
            (self.triton.bls_detokenize in ("postprocess", "inline"),
             f"triton.bls_detokenize must be postprocess or inline, got {self.triton.bls_detokenize!r}"),
            (self.triton.llm_send_threads >= 1, "triton.llm_send_threads must be >= 1"),
            (self.triton.llm_stream_interval_ms >= 0, "triton.llm_stream_interval_ms must be >= 0 (0: off)"),
            (self.triton.bls_stall_timeout_s >= 0, "triton.bls_stall_timeout_s must be >= 0 (0: no deadline)"),
            (self.preprocess.image_threads >= 0,
             f"preprocess.image_threads must be >= 0 (0: auto), got {self.preprocess.image_threads}"),
            (self.preprocess.plane_pool_mib >= 0,
             f"preprocess.plane_pool_mib must be >= 0 (0: by value), got {self.preprocess.plane_pool_mib}"),
            (self.preprocess.image_resize in IMAGE_RESIZE,
             f"preprocess.image_resize must be one of {', '.join(IMAGE_RESIZE)}, got {self.preprocess.image_resize!r}"),
            (e.vision_in_llm in (True, False, "auto"),
             f"engine.vision_in_llm must be true, false or \"auto\", got {e.vision_in_llm!r}"),
            (e.vision_in_llm is not True or self.model.profile == "torch",
             "engine.vision_in_llm needs the torch profile (the tensorrt_llm model takes a prompt table)"),
            (self.preprocess.image_resize != "device" or self.model.profile == "torch",
             "preprocess.image_resize = \"device\" needs the torch profile (a TensorRT vision plan takes tiles)"),
            (self.triton.vision_max_batch_size >= TILE_GROUP,
             f"triton.vision_max_batch_size must be >= {TILE_GROUP} (tiles are sent in groups of {TILE_GROUP})"),
        ]
        if self.model.profile == "trtllm":
            checks.append((e.dtype != "float32", "the trtllm profile builds float16 or bfloat16 engines, not float32"))
        else:
            checks.append((self.world_size == 1, "tensor/pipeline parallelism needs the trtllm profile"))
        for ok, message in checks:
            if not ok:
                raise SetupError(message)

    @classmethod
    def load(cls, path: str | Path) -> "DeploymentConfig":
        path = Path(path)
        if not path.is_file():
            raise SetupError(f"deployment file {path} does not exist")
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        return cls.from_dict(data)

    def replace(self, **sections: dict[str, Any]) -> "DeploymentConfig":
        """A copy with some keys of some sections changed, e.g. replace(engine={"max_slots": 4})."""
        data = self.to_dict()
        for name, values in sections.items():
            data[name] = {**data[name], **values}
        return DeploymentConfig.from_dict(data)


def _section(kind: type, values: dict[str, Any], name: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(values) - set(known)
    if unknown:
        raise SetupError(f"unknown keys in [{name}]: {sorted(unknown)}; known: {sorted(known)}")
    coerced = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return kind(**coerced)
