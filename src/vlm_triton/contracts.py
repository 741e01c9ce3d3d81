"""Every Triton tensor of the pipeline, declared once.

The adapters read and write tensors by these specs, the BLS builds its requests from them, the config renderer
writes config.pbtxt from them and the frontend builds its gRPC requests from them. The `llm` contract is the
subset of tensorrtllm_backend's `tensorrt_llm` contract that the BLS uses (same names, dtypes and dims), so the
real TensorRT-LLM model drops in for the torch one.

`dims` exclude the batch dimension for models with max_batch_size > 0 (Triton's convention). `EMBED` stands for
the deployment's embedding dtype (FP32 on CPU, FP16/BF16 on GPU) and `PIXEL` for its pixel dtype (UINT8 raw bytes for
torch, FP16 normalised for trtllm); both are resolved when a config is rendered.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

EMBED = "EMBED"  # placeholder dtype: the deployment's embedding dtype (image embeddings, prompt table)
# placeholder dtype: the deployment's pixel dtype. torch: UINT8, the raw RGB bytes in the family's layout, which the
# vision_encoder normalises on its device (ModelFamily.normalize_pixels); trtllm: FP16 normalised pixels (TensorRT)
PIXEL = "PIXEL"
PLACEHOLDERS = (EMBED, PIXEL)

# Triton dtype name -> numpy dtype (BF16 travels as a uint16 view, as Triton itself does).
NUMPY_DTYPES: dict[str, type] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT64": np.uint64,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "BF16": np.uint16,
    "BYTES": np.object_,
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton dtype name without TYPE_ (INT32, FP32, BYTES, ...) or EMBED
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None  # Triton `reshape`, e.g. () for scalars sent as [1, 1]
    ragged: bool = False

    def resolved(self, dtypes: dict[str, str]) -> "TensorSpec":
        """Replace a placeholder dtype (EMBED, PIXEL) by the deployment's choice."""
        return replace(self, dtype=dtypes[self.dtype]) if self.dtype in PLACEHOLDERS else self

    @property
    def numpy_dtype(self) -> type:
        if self.dtype in PLACEHOLDERS:
            raise ValueError(f"{self.name}: resolve the {self.dtype} dtype first")
        return NUMPY_DTYPES[self.dtype]


@dataclass(frozen=True)
class ModelContract:
    """The tensors of one Triton model; `batched` means max_batch_size > 0 (leading batch dim implicit)."""

    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batched: bool = False

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, self.role)

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, self.role)


def _find(specs: tuple[TensorSpec, ...], name: str, role: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"{role} has no tensor {name!r}; it has {', '.join(s.name for s in specs)}")


def _scalar(name: str, dtype: str, optional: bool = True) -> TensorSpec:
    """A per-request scalar of a batched model: dims [1] with reshape [] (sent as [1, 1])."""
    return TensorSpec(name, dtype, (1,), optional=optional, reshape=())


# --- sampling / request options shared by the BLS and the ensemble (the user-facing entry points) ---------------
REQUEST_OPTIONS: tuple[TensorSpec, ...] = (
    TensorSpec("max_tokens", "INT32", (1,), optional=True),
    TensorSpec("temperature", "FP32", (1,), optional=True),
    TensorSpec("top_p", "FP32", (1,), optional=True),
    TensorSpec("top_k", "INT32", (1,), optional=True),
    TensorSpec("seed", "UINT64", (1,), optional=True),
    TensorSpec("repetition_penalty", "FP32", (1,), optional=True),
    TensorSpec("presence_penalty", "FP32", (1,), optional=True),
    TensorSpec("frequency_penalty", "FP32", (1,), optional=True),
    TensorSpec("stop", "BYTES", (-1,), optional=True),
    TensorSpec("ignore_eos", "BOOL", (1,), optional=True),
)

# --- preprocess: OpenAI messages JSON -> prompt ids (image slots = fake ids >= vocab_size) + pixel tiles ----------
# What goes on to the batched `llm` carries an explicit leading 1 (the llm's batch dim), so in the ensemble these
# tensors feed the llm unchanged; the BLS reads them the same way.
PREPROCESS = ModelContract(
    role="preprocess",
    inputs=(TensorSpec("messages", "BYTES", (1,)),),
    outputs=(
        TensorSpec("input_ids", "INT32", (1, -1)),
        TensorSpec("input_lengths", "INT32", (1, 1)),
        TensorSpec("pixel_values", PIXEL, (-1, 3, -1, -1)),
        # engine.vision_in_llm, when the caller asks for it: where uint8 pixel_values wait in preprocess's shared-memory
        # pool (multimodal/plane_pool.py; pixel_values is then [N, 3, 0, 0]); [1, 0] when they are sent by value
        TensorSpec("pixel_ref", "INT64", (1, -1)),
        TensorSpec("end_id", "INT32", (1, 1)),
        TensorSpec("pad_id", "INT32", (1, 1)),
        TensorSpec("stop_words_list", "INT32", (1, 2, -1)),
        TensorSpec("prompt_vocab_size", "INT32", (1, 1)),
        # per input token: 0 for text, a 64-bit hash of the image content for image tokens (KV-cache reuse)
        TensorSpec("prompt_table_extra_ids", "UINT64", (1, -1)),
        # (patch rows, patch cols) per tile for encoders that take variable-size tiles (MiniCPM-V); [0, 2] otherwise
        TensorSpec("tgt_sizes", "INT32", (-1, 2)),
        # (width, height, cols, rows, thumbnail) per unit when pixel_values holds decoded images [N, 3, Hmax, Wmax]
        # that the vision encoder cuts into tiles (preprocess.image_resize, torch profile); [0, 5] otherwise
        TensorSpec("image_grids", "INT32", (-1, 5)),
        # always true: asks the llm for num_input_tokens (the ensemble's prompt_tokens; tensorrt_llm needs the flag)
        TensorSpec("return_num_input_tokens", "BOOL", (1, 1)),
    ),
)

# --- vision_encoder: tiles -> one row of image embeddings per image token; Triton batches tiles across requests --
VISION_ENCODER = ModelContract(
    role="vision_encoder",
    inputs=(
        TensorSpec("pixel_values", PIXEL, (3, -1, -1)),
        # only for variable-size tiles (torch profile); fixed-size TensorRT plans have pixel_values alone
        TensorSpec("tgt_sizes", "INT32", (2,), optional=True),
        # only for decoded images cut into tiles by the encoder (torch profile); the output then has one item per
        # tile, not per input item
        TensorSpec("image_grids", "INT32", (5,), optional=True),
    ),
    outputs=(TensorSpec("image_embeds", EMBED, (-1, -1)),),
    batched=True,
)

# --- vision_table (ensemble only): tiles -> the llm's prompt table [1, rows, H]; calls vision_encoder over BLS ----
# Zero tiles (text-only) give a table of zero rows, which the llm treats as no table.
VISION_TABLE = ModelContract(
    role="vision_table",
    inputs=(
        TensorSpec("pixel_values", PIXEL, (-1, 3, -1, -1)),
        TensorSpec("tgt_sizes", "INT32", (-1, 2), optional=True),
        TensorSpec("image_grids", "INT32", (-1, 5), optional=True),
    ),
    outputs=(TensorSpec("prompt_embedding_table", EMBED, (1, -1, -1)),),
)

# --- llm: the tensorrtllm_backend `tensorrt_llm` contract, the subset the BLS uses ------------------------------
LLM = ModelContract(
    role="llm",
    inputs=(
        TensorSpec("input_ids", "INT32", (-1,), optional=True, ragged=True),
        _scalar("input_lengths", "INT32", optional=False),
        _scalar("request_output_len", "INT32", optional=False),
        _scalar("end_id", "INT32"),
        _scalar("pad_id", "INT32"),
        TensorSpec("stop_words_list", "INT32", (2, -1), optional=True, ragged=True),
        _scalar("temperature", "FP32"),
        _scalar("runtime_top_k", "INT32"),
        _scalar("runtime_top_p", "FP32"),
        _scalar("repetition_penalty", "FP32"),
        _scalar("presence_penalty", "FP32"),
        _scalar("frequency_penalty", "FP32"),
        _scalar("seed", "UINT64"),
        _scalar("exclude_input_in_output", "BOOL"),
        _scalar("stop", "BOOL"),
        _scalar("streaming", "BOOL"),
        TensorSpec("prompt_embedding_table", EMBED, (-1, -1), optional=True, ragged=True),
        _scalar("prompt_vocab_size", "INT32"),
        TensorSpec("prompt_table_extra_ids", "UINT64", (-1,), optional=True, ragged=True),
        _scalar("return_num_input_tokens", "BOOL"),
    ),
    outputs=(
        TensorSpec("output_ids", "INT32", (-1, -1)),
        TensorSpec("sequence_length", "INT32", (-1,)),
        TensorSpec("num_input_tokens", "INT32", (1,)),  # the torch llm always sends it; tensorrt_llm on request
    ),
    batched=True,
)

# --- with engine.vision_in_llm (torch profile) the llm also takes a request's vision units and encodes them itself:
# preprocess's pixel_values, tgt_sizes and image_grids of one request, with the llm's batch dim in front ([1, N, ...])
LLM_VISION_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("pixel_values", PIXEL, (-1, 3, -1, -1), optional=True, ragged=True),
    TensorSpec("pixel_ref", "INT64", (-1,), optional=True, ragged=True),  # instead of pixel_values (plane_pool.py)
    TensorSpec("tgt_sizes", "INT32", (-1, 2), optional=True, ragged=True),
    TensorSpec("image_grids", "INT32", (-1, 5), optional=True, ragged=True),
)

# --- postprocess: stateless incremental detokenization; the caller threads the state through -------------------
POSTPROCESS = ModelContract(
    role="postprocess",
    inputs=(
        TensorSpec("token_ids", "INT32", (1, 1, -1)),  # the llm's output_ids of one request: [batch, beam, n]
        TensorSpec("prefix_offset", "INT32", (1,), optional=True),
        TensorSpec("read_offset", "INT32", (1,), optional=True),
        TensorSpec("held_text", "BYTES", (1,), optional=True),
        TensorSpec("stop", "BYTES", (-1,), optional=True),
        TensorSpec("final", "BOOL", (1,), optional=True),  # absent: true (the whole sequence, as in the ensemble)
    ),
    outputs=(
        TensorSpec("text", "BYTES", (1,)),
        TensorSpec("prefix_offset", "INT32", (1,)),
        TensorSpec("read_offset", "INT32", (1,)),
        TensorSpec("held_text", "BYTES", (1,)),
        TensorSpec("stopped", "BOOL", (1,)),
    ),
)

# --- outputs the user-facing models return ---------------------------------------------------------------------
RESULT_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text", "BYTES", (1,)),
    TensorSpec("finish_reason", "BYTES", (1,)),
    TensorSpec("prompt_tokens", "INT32", (1,)),
    TensorSpec("completion_tokens", "INT32", (1,)),
)

# --- bls: the decoupled primary entry point (streams text deltas) ----------------------------------------------
BLS = ModelContract(
    role="bls",
    inputs=(
        TensorSpec("messages", "BYTES", (1,)),
        TensorSpec("stream", "BOOL", (1,), optional=True),
        *REQUEST_OPTIONS,
    ),
    outputs=RESULT_OUTPUTS,
)

# --- ensemble: the same stages without BLS for non-streaming callers (one response, no finish_reason) ------------
# Its request options feed the batched llm, so they are [1, 1] like the llm's scalars; max_tokens is required
# (request_output_len is). Unset sampling options take the llm's defaults. Triton refuses a step (or the ensemble's
# outputs) mixing tensors from the decoupled llm with tensors from elsewhere, so everything after the llm comes
# from the llm alone: no stop strings (postprocess would need them) and prompt_tokens is the llm's num_input_tokens.
ENSEMBLE_LLM_OPTIONS: dict[str, str] = {  # ensemble input -> llm input
    "max_tokens": "request_output_len",
    "temperature": "temperature",
    "top_p": "runtime_top_p",
    "top_k": "runtime_top_k",
    "seed": "seed",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
_OPTIONS = {s.name: s for s in REQUEST_OPTIONS}
ENSEMBLE = ModelContract(
    role="ensemble",
    inputs=(
        TensorSpec("messages", "BYTES", (1,)),
        *(replace(_OPTIONS[n], dims=(1, 1), optional=n != "max_tokens") for n in ENSEMBLE_LLM_OPTIONS),
    ),
    outputs=(
        TensorSpec("text", "BYTES", (1,)),
        TensorSpec("prompt_tokens", "INT32", (1, 1)),
        TensorSpec("completion_tokens", "INT32", (1, 1)),
    ),
)


@dataclass(frozen=True)
class EnsembleStep:
    """One ensemble step: the stage's tensor name -> the ensemble tensor name, for inputs and outputs."""

    role: str
    inputs: dict[str, str]
    outputs: dict[str, str]


_TO_LLM = ("input_ids", "input_lengths", "end_id", "pad_id", "stop_words_list", "prompt_vocab_size",
           "prompt_table_extra_ids", "return_num_input_tokens")
UNIT_EXTRAS = ("tgt_sizes", "image_grids")  # per-unit tensors that travel with pixel_values to the vision encoder
ENSEMBLE_STEPS: tuple[EnsembleStep, ...] = (
    EnsembleStep("preprocess", {"messages": "messages"}, {n: n for n in (*_TO_LLM, "pixel_values", *UNIT_EXTRAS)}),
    EnsembleStep("vision_table", {n: n for n in ("pixel_values", *UNIT_EXTRAS)},
                 {"prompt_embedding_table": "prompt_embedding_table"}),
    EnsembleStep("llm", {
        **{n: n for n in (*_TO_LLM, "prompt_embedding_table")},
        **{llm: option for option, llm in ENSEMBLE_LLM_OPTIONS.items()}},
        {"output_ids": "output_ids", "sequence_length": "completion_tokens", "num_input_tokens": "prompt_tokens"}),
    EnsembleStep("postprocess", {"token_ids": "output_ids"}, {"text": "text"}),
)

ALL_CONTRACTS: tuple[ModelContract, ...] = (PREPROCESS, VISION_ENCODER, VISION_TABLE, LLM, POSTPROCESS, BLS, ENSEMBLE)
