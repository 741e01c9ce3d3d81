"""The interface every model family implements; its methods line up with the pipeline stages."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np
import torch

from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.errors import SetupError
from vlm_triton.multimodal.device_resize import fast_float64, matches_pillow
from vlm_triton.multimodal.media import MediaFetcher
from vlm_triton.multimodal.pixels import normalize_on_device
from vlm_triton.multimodal.resample import default_image_threads
from vlm_triton.prompt.messages import Message

if TYPE_CHECKING:
    from vlm_triton.deploy.config import DeploymentConfig


@dataclass(frozen=True)
class PreprocessLimits:
    """Per-deployment caps the preprocess stage enforces (InvalidRequest beyond them), and its image threads."""

    max_images: int = 8
    max_tiles_per_image: int | None = None  # None: the checkpoint's max_dynamic_patch
    max_video_frames: int | None = None  # None: the family's default
    max_prompt_tokens: int = 8192
    image_threads: int = 1  # threads for a request's image work; the bytes are the same for every value
    # send decoded images and their grids (`PreparedPrompt.image_grids`) for the vision encoder to cut into tiles on
    # its device, instead of the tiles (families with `device_tiles`; requests with images only)
    device_tiles: bool = False

    @classmethod
    def from_deployment(cls, cfg: "DeploymentConfig", family: "ModelFamily | None" = None) -> "PreprocessLimits":
        """The limits of a deployment: what the preprocess enforces and the trtllm engines are sized for. With the
        family, `device_tiles` follows preprocess.image_resize (`device_tiles_for`)."""
        return cls(
            device_tiles=family is not None and device_tiles_for(cfg, family),
            max_images=cfg.limits.max_images,
            max_tiles_per_image=cfg.limits.max_tiles_per_image or None,
            max_video_frames=cfg.limits.max_video_frames or None,
            max_prompt_tokens=cfg.max_prompt_tokens,
            image_threads=cfg.preprocess.image_threads or default_image_threads(cfg.triton.preprocess_instances),
        )


def device_tiles_wanted(cfg: "DeploymentConfig") -> bool:
    """Whether preprocess.image_resize asks the vision encoder to cut the tiles, before the family is known:
    "device", or "auto" with the torch profile on a CUDA GPU with full-rate float64 (`device_resize.fast_float64`)."""
    mode = cfg.preprocess.image_resize
    return mode == "device" or (mode == "auto" and cfg.model.profile == "torch" and cfg.device.startswith("cuda")
                                and fast_float64(cfg.device))


def device_tiles_for(cfg: "DeploymentConfig", family: "ModelFamily") -> bool:
    """Whether the deployment's vision encoder cuts the tiles (preprocess.image_resize): "device" asks for it (an
    error when the family cannot or the device path does not reproduce the installed Pillow), "auto" takes it when
    the encoder runs on CUDA with the torch profile and the family and Pillow allow it, "host" never."""
    if not device_tiles_wanted(cfg):
        return False
    if not family.device_tiles:
        reason = f"the {family.name} family cuts its images on the host"
    elif not matches_pillow():
        reason = "the device resize does not reproduce the installed Pillow's bytes"
    else:
        return True
    if cfg.preprocess.image_resize == "device":
        raise SetupError(f"preprocess.image_resize = \"device\": {reason}")
    return False


@dataclass(frozen=True)
class PreparedPrompt:
    """What the preprocess stage hands on: prompt ids with image slots as fake ids >= vocab_size, and tiles."""

    input_ids: np.ndarray  # int32 [L]; image token k of the request has id vocab_size + k
    pixel_values: np.ndarray  # uint8 [N, 3, ...] raw RGB in the family's layout; N == 0 for text-only prompts
    num_image_tokens: int  # rows of the prompt embedding table this prompt needs
    prompt_text: str  # the rendered prompt before image expansion (for logs and golden tests)
    tgt_sizes: np.ndarray | None = None  # int32 [N, 2] patch grid per tile, for variable-size-tile encoders
    # int32 [N, 5] (width, height, cols, rows, thumbnail) per unit when pixel_values holds decoded images [N, 3,
    # Hmax, Wmax] (zero padded) that the vision encoder cuts into tiles (`ModelFamily.tiles_from_images`)
    image_grids: np.ndarray | None = None


@dataclass(frozen=True)
class VisualBudget:
    """The most visual input one request may carry under a deployment's limits; sizes the TensorRT engines.

    A unit is one vision-encoder batch item (an InternVL tile, an InternVideo2.5 frame, a MiniCPM-V slice).
    """

    max_units: int  # vision-encoder batch items per request
    tokens_per_unit: int  # prompt-table rows (LLM image tokens) per unit
    unit_shape: tuple[int, int, int]  # one unit's pixel_values shape, e.g. (3, 448, 448)

    @property
    def max_tokens(self) -> int:
        """Prompt-table rows of one request (TensorRT-LLM: max_multimodal_len = max_batch_size x this)."""
        return self.max_units * self.tokens_per_unit


@dataclass(frozen=True)
class LLMPart:
    """Where a checkpoint keeps its LLM; the trtllm export writes it out as a plain Hugging Face LLM folder."""

    architecture: str  # the LLM's own architecture, e.g. Qwen2ForCausalLM, InternLM2ForCausalLM
    config: dict[str, Any]  # the LLM's config.json
    weight_prefix: str  # checkpoint tensor-name prefix of the LLM weights, e.g. "language_model."


class ModelFamily(ABC):
    """One model family. Subclasses register in `vlm_triton.families` and are matched on the HF config."""

    name: ClassVar[str]
    description: ClassVar[str]
    device_tiles: ClassVar[bool] = False  # `tiles_from_images` cuts tiles on the encoder's device

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    @property
    def config(self) -> Mapping[str, Any]:
        """The checkpoint's config.json."""
        return self.checkpoint.config

    @classmethod
    @abstractmethod
    def matches(cls, config: Mapping[str, Any]) -> bool:
        """True if a checkpoint with this config.json belongs to the family."""

    # --- preprocess stage ---------------------------------------------------------------------------------------
    @abstractmethod
    def load_tokenizer(self) -> Any:
        """The checkpoint's tokenizer (transformers tokenizer)."""

    @abstractmethod
    def prepare(self, messages: list[Message], media: MediaFetcher, limits: PreprocessLimits) -> PreparedPrompt:
        """Render the chat template, fetch and tile media, tokenize; raise InvalidRequest on bad input."""

    # --- pixels: `prepare` gives raw bytes; their consumer normalises them (multimodal.pixels) --------------------
    @abstractmethod
    def pixel_lut(self) -> np.ndarray:
        """float32 [3, 256]: entry [c, v] is byte v of channel c as the reference preprocessing normalises it."""

    def normalize_pixels(
        self, pixels: torch.Tensor, lut: torch.Tensor, tgt_sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """uint8 `pixel_values` (and `tgt_sizes`) -> the reference's normalised pixels in lut.dtype, on the pixels'
        device; `lut` is `pixel_lut()` as a tensor (cast to the encoder dtype, or float32 for the exact floats)."""
        return normalize_on_device(pixels, lut)

    def tiles_from_images(self, images: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """uint8 decoded images [N, 3, Hmax, Wmax] and their `image_grids` [N, 5] -> the uint8 tiles `prepare` would
        have sent for them, on the images' device (families with `device_tiles`)."""
        raise SetupError(f"the {self.name} family cuts its images on the host (preprocess.image_resize = \"host\")")

    def float_pixels(self, prepared: PreparedPrompt, dtype: type = np.float32) -> np.ndarray:
        """`prepared.pixel_values` normalised on the host: float32 bit-identical to the reference preprocessing, or
        those floats cast to `dtype` (the table is cast, once per entry, instead of every pixel)."""
        tgt_sizes = None if prepared.tgt_sizes is None else torch.from_numpy(prepared.tgt_sizes)
        lut = torch.from_numpy(self.pixel_lut().astype(dtype))
        return self.normalize_pixels(self.unit_tiles(prepared), lut, tgt_sizes).numpy()

    def unit_tiles(self, prepared: PreparedPrompt) -> torch.Tensor:
        """The uint8 tiles of a prepared prompt, cut here when `prepare` left that to the vision encoder."""
        pixels = torch.from_numpy(prepared.pixel_values)
        if prepared.image_grids is None:
            return pixels
        return self.tiles_from_images(pixels, torch.from_numpy(prepared.image_grids))

    # --- vision_encoder stage ------------------------------------------------------------------------------------
    @abstractmethod
    def build_vision_encoder(self, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        """A module mapping normalised pixel tiles [N, 3, S, S] to image embeddings [N, tokens_per_tile, hidden]."""

    def visual_budget(self, limits: PreprocessLimits) -> VisualBudget:
        """The largest visual input `prepare` accepts under `limits` (units, tokens per unit, unit shape)."""
        raise SetupError(f"the {self.name} family does not declare its visual budget (visual_budget), which the "
                         "trtllm profile needs to size its engines")

    # --- llm stage -----------------------------------------------------------------------------------------------
    def llm_part(self) -> LLMPart:
        """The LLM inside the checkpoint (architecture, config, weight prefix), for the trtllm export."""
        raise SetupError(f"the {self.name} family does not declare its LLM part (llm_part), which the trtllm "
                         "profile needs to export the LLM")

    @abstractmethod
    def build_language_model(
        self, dtype: torch.dtype, device: torch.device, *, max_seq_len: int | None = None
    ) -> torch.nn.Module:
        """The LLM as a transformers causal-LM model class with the checkpoint's weights.

        `max_seq_len` is the longest sequence it will serve; loaders may simplify what cannot trigger below it."""

    @abstractmethod
    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Token ids that end generation; the first one is the `end_id`."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Rows of the LLM's embedding table; prompt ids >= this index the prompt embedding table."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the LLM's input embeddings (and of the vision encoder's output)."""
