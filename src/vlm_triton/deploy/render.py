"""Render the Triton model repository for a deployment.

Each config.pbtxt is built as Triton's own `ModelConfig` protobuf from the tensor contracts and the deployment
config, written with protobuf's text format and parsed back, so a malformed config fails here, not in the server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from vlm_triton import contracts
from vlm_triton.contracts import ModelContract, TensorSpec
from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.errors import SetupError

ROLES = ("preprocess", "vision_encoder", "vision_table", "llm", "postprocess", "bls", "ensemble")
PYTHON_ROLES = ("preprocess", "vision_encoder", "vision_table", "llm", "postprocess", "bls")
DEPLOYMENT_FILE = "deployment.json"


def model_sources() -> Path:
    """The project's `model_repository/` folder holding each stage's thin model.py."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "model_repository"
        if (candidate / "bls" / "1" / "model.py").is_file():
            return candidate
    raise SetupError("cannot find the project's model_repository/ folder; install the project from its checkout")


def tensor_config(spec: TensorSpec, dtypes: dict[str, str], kind: type) -> object:
    spec = spec.resolved(dtypes)
    msg = kind(name=spec.name, data_type=pb.DataType.Value(f"TYPE_{spec.dtype.replace('BYTES', 'STRING')}"))
    msg.dims.extend(spec.dims)
    if spec.reshape is not None:
        msg.reshape.shape.extend(spec.reshape)
    if kind is pb.ModelInput:
        msg.optional = spec.optional
        msg.allow_ragged_batch = spec.ragged
    return msg


def _python_model(
    cfg: DeploymentConfig,
    contract: ModelContract,
    *,
    max_batch_size: int = 0,
    instances: int = 1,
    decoupled: bool = False,
    deployment_file: Path,
) -> pb.ModelConfig:
    dtypes = cfg.tensor_dtypes
    config = pb.ModelConfig(name=contract.role, backend="python", max_batch_size=max_batch_size)
    config.input.extend(tensor_config(s, dtypes, pb.ModelInput) for s in contract.inputs)
    config.output.extend(tensor_config(s, dtypes, pb.ModelOutput) for s in contract.outputs)
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=instances)
    config.model_transaction_policy.decoupled = decoupled
    config.parameters["deployment_file"].string_value = str(deployment_file)
    return config


def ensemble_config(cfg: DeploymentConfig) -> pb.ModelConfig:
    """The `ensemble` model: contracts.ENSEMBLE's tensors wired through contracts.ENSEMBLE_STEPS.

    max_batch_size 0 (its stages are not batched), so tensors flow with their full shapes. The llm is decoupled:
    callers use the gRPC streaming API and get one response.
    """
    contract, dtypes = contracts.ENSEMBLE, cfg.tensor_dtypes
    config = pb.ModelConfig(name=contract.role, platform="ensemble", max_batch_size=0)
    config.input.extend(tensor_config(s, dtypes, pb.ModelInput) for s in contract.inputs)
    config.output.extend(tensor_config(s, dtypes, pb.ModelOutput) for s in contract.outputs)
    for step in contracts.ENSEMBLE_STEPS:
        added = config.ensemble_scheduling.step.add(model_name=step.role, model_version=-1)
        added.input_map.update(step.inputs)
        added.output_map.update(step.outputs)
    return config


def device_tile_budget(cfg: DeploymentConfig) -> int:
    """Tiles per image when the vision encoder cuts the tiles from decoded images (preprocess.image_resize, decided
    here once for every stage: preprocess reads it from its config); 0 when preprocess sends tiles."""
    from vlm_triton.families.base import PreprocessLimits, device_tiles_for, device_tiles_wanted

    if cfg.model.profile != "torch" or not device_tiles_wanted(cfg):
        return 0
    from vlm_triton.families import open_family  # reads config.json only

    family = open_family(cfg.model.checkpoint)
    if not device_tiles_for(cfg, family):
        return 0
    limits = PreprocessLimits.from_deployment(cfg)
    return max(1, family.visual_budget(limits).max_units // limits.max_images)


def vision_batch(cfg: DeploymentConfig, per_image: int | None = None) -> tuple[int, int]:
    """(the vision_encoder's max_batch_size, items per vision_encoder request from the bls and vision_table).

    Items are tiles: vision_max_batch_size, and requests of vision_chunk tiles (whole TILE_GROUPs). When the encoder
    cuts tiles from decoded images, an item is a whole image of up to `per_image` tiles (`device_tile_budget`):
    k = vision_max_batch_size // per_image images (at least 1) for both, so that an execute holds about as many
    tiles as with tiles from the host. (Preferred batch sizes do not cap a batch: with them Triton still handed one
    execute 29 W1 images, 377 tiles, every request waiting for the last; docs/benchmarks.md, item 36.) Video frames
    and requests that mix images and video still travel as tiles, then also k per request."""
    per_image = device_tile_budget(cfg) if per_image is None else per_image
    if not per_image:
        return cfg.triton.vision_max_batch_size, cfg.vision_chunk
    images = max(1, cfg.triton.vision_max_batch_size // per_image)
    return images, images


def render_configs(cfg: DeploymentConfig, deployment_file: Path) -> dict[str, pb.ModelConfig]:
    """Every model's config. Profile trtllm swaps `llm` and `vision_encoder` for TensorRT-LLM / TensorRT models."""
    t = cfg.triton
    per_image = device_tile_budget(cfg)
    vision_items, vision_chunk = vision_batch(cfg, per_image)
    configs = {
        "preprocess": _python_model(
            cfg, contracts.PREPROCESS, instances=t.preprocess_instances, deployment_file=deployment_file
        ),
        "vision_encoder": _python_model(
            cfg, contracts.VISION_ENCODER, max_batch_size=vision_items, deployment_file=deployment_file
        ),
        "vision_table": _python_model(cfg, contracts.VISION_TABLE, deployment_file=deployment_file),
        "llm": _python_model(
            cfg, contracts.LLM, max_batch_size=cfg.engine.max_slots, decoupled=True, deployment_file=deployment_file
        ),
        "postprocess": _python_model(
            cfg, contracts.POSTPROCESS, instances=t.postprocess_instances, deployment_file=deployment_file
        ),
        "bls": _python_model(
            cfg, contracts.BLS, instances=t.bls_instances, decoupled=True, deployment_file=deployment_file
        ),
        "ensemble": ensemble_config(cfg),
    }
    if cfg.vision_in_llm:  # the bls sends the vision units to the llm (validate: torch profile only)
        units = contracts.LLM_VISION_INPUTS
        configs["llm"].input.extend(tensor_config(s, cfg.tensor_dtypes, pb.ModelInput) for s in units)
    vision = configs["vision_encoder"]
    vision.dynamic_batching.max_queue_delay_microseconds = t.vision_max_queue_delay_us
    for name in ("bls", "vision_table"):  # their requests to the vision_encoder hold at most this many items
        configs[name].parameters["vision_chunk"].string_value = str(vision_chunk)
    configs["preprocess"].parameters["device_tiles"].string_value = str(int(per_image > 0))
    if cfg.model.profile == "trtllm":
        from vlm_triton.deploy import render_trtllm

        render_trtllm.require_engines(cfg)
        configs["llm"] = render_trtllm.llm_config(cfg)
        configs["vision_encoder"] = render_trtllm.vision_config(cfg)
    return configs


def to_pbtxt(config: pb.ModelConfig) -> str:
    text = text_format.MessageToString(config)
    parsed = text_format.Parse(text, pb.ModelConfig())  # parse back: proves Triton's schema accepts it
    if parsed != config:
        raise AssertionError(f"config for {config.name} did not survive a protobuf round trip")
    return text


def render_repository(cfg: DeploymentConfig, out: str | Path) -> Path:
    """Write a complete model repository for `cfg` into `out` (replacing the stage folders there)."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    deployment_file = out / DEPLOYMENT_FILE
    deployment_file.write_text(cfg.to_json())
    sources = model_sources()
    for role, config in render_configs(cfg, deployment_file).items():
        stage = out / role
        if stage.exists():
            shutil.rmtree(stage)
        if config.backend == "python":
            (stage / "1").mkdir(parents=True)
            shutil.copy2(sources / role / "1" / "model.py", stage / "1" / "model.py")
        elif config.platform == "ensemble":
            (stage / "1").mkdir(parents=True)  # an ensemble has an empty version folder
        else:
            from vlm_triton.deploy.render_trtllm import place_engine_files

            place_engine_files(cfg, role, stage / "1")
        (stage / "config.pbtxt").write_text(to_pbtxt(config))
    return out
