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


@dataclass(frozen=True)
class ModelSection:
    checkpoint: str
    served_name: str = ""  # the OpenAI `model` id; default: the checkpoint folder's name
    profile: Profile = "torch"


@dataclass(frozen=True)
class EngineSection:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | float16 | bfloat16
    max_slots: int = 16  # requests decoded together (KV-cache rows)
    max_seq_len: int = 8192  # prompt + output tokens per request
    cuda_graphs: bool = True
    # trtllm profile
    engine_dir: str = ""
    vision_engine: str = ""
    kv_cache_free_gpu_mem_fraction: float = 0.9
    enable_kv_cache_reuse: bool = False


@dataclass(frozen=True)
class LimitsSection:
    max_images: int = 8
    max_tiles_per_image: int = 0  # 0: the checkpoint's max_dynamic_patch
    max_media_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 8192 * 8192
    media_timeout_s: float = 10.0
    allowed_local_media_dirs: tuple[str, ...] = ()
    allow_private_networks: bool = False
    default_max_tokens: int = 512


@dataclass(frozen=True)
class TritonSection:
    vision_max_batch_size: int = 32  # tiles batched across requests by Triton's dynamic batcher
    vision_max_queue_delay_us: int = 2000
    preprocess_instances: int = 2
    postprocess_instances: int = 2
    bls_instances: int = 1


@dataclass(frozen=True)
class DeploymentConfig:
    model: ModelSection
    engine: EngineSection = field(default_factory=EngineSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
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
    def torch_dtype_name(self) -> str:
        if self.engine.dtype != "auto":
            return self.engine.dtype
        return "float32" if self.device == "cpu" else "bfloat16"

    @property
    def tensor_dtypes(self) -> dict[str, str]:
        """Triton dtypes of the placeholder tensors (see contracts.EMBED / contracts.PIXEL)."""
        if self.model.profile == "trtllm":
            return {"EMBED": "FP16", "PIXEL": "FP16"}
        embed = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}[self.torch_dtype_name]
        return {"EMBED": embed, "PIXEL": "FP32"}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeploymentConfig":
        sections = {"model": ModelSection, "engine": EngineSection, "limits": LimitsSection, "triton": TritonSection}
        unknown = set(data) - set(sections)
        if unknown:
            raise SetupError(f"unknown deployment sections {sorted(unknown)}; known: {sorted(sections)}")
        if "model" not in data or "checkpoint" not in data["model"]:
            raise SetupError("the deployment needs model.checkpoint (the checkpoint folder)")
        kwargs = {name: _section(kind, data.get(name, {}), name) for name, kind in sections.items()}
        return cls(**kwargs)

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
