"""Helpers shared by the stage adapters: deployment loading, tensor conversion, error mapping."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time
import logging
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.errors import InvalidRequest, StageStalled
from vlm_triton.gc_heap import freeze_heap
from vlm_triton.step_stats import log_timing, step_stats_period
from vlm_triton.triton.malloc import keep_freed_memory

if TYPE_CHECKING:
    from vlm_triton.families import ModelFamily

log = logging.getLogger("vlm_triton")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRITON_TO_TORCH = {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}


_DUMP_FILES: list[Any] = []  # open for the life of the stub: faulthandler writes to them on SIGUSR1


def enable_thread_dumps(model_name: str) -> None:
    """Diagnosing a stage that hangs (the Triton stub gives no other view of its threads):
    VLM_TRITON_DUMP_DIR=D makes SIGUSR1 dump every Python thread of this stub to D/stacks-<model>-<pid>.txt;
    VLM_TRITON_DUMP_THREADS=N dumps them to the server log every N seconds and on SIGUSR1. A fatal signal always
    dumps them to the server log."""
    if _has_fileno(sys.stderr):  # a crash (SIGSEGV, SIGABRT, ...) leaves every thread's Python stack in the log
        faulthandler.enable(file=sys.stderr, all_threads=True)
    directory = os.environ.get("VLM_TRITON_DUMP_DIR")
    if directory:
        _DUMP_FILES.append(open(os.path.join(directory, f"stacks-{model_name}-{os.getpid()}.txt"), "w"))  # noqa: SIM115
        faulthandler.register(signal.SIGUSR1, file=_DUMP_FILES[-1], all_threads=True)
    period = os.environ.get("VLM_TRITON_DUMP_THREADS")
    if period:
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        faulthandler.dump_traceback_later(float(period), repeat=True, file=sys.stderr)


# request.is_cancelled() is a synchronous round trip to tritonserver (13% of the BLS stub's samples under load when
# polled per chunk). The bls and the llm poll it at most this often per request: a client that left is noticed this late
CANCEL_POLL_S = 0.5
STALL_DUMP_EVERY_S = 60.0  # one stalled llm stalls every request on it: one thread dump per minute is enough
_last_stall_dump: float | None = None  # time.monotonic() of this stub's last dump


def report_stall(request_id: str, exc: StageStalled) -> None:
    """Log a stalled request at ERROR with every Python thread of this stub (faulthandler, at most once per
    STALL_DUMP_EVERY_S). Written straight to stderr, which the server log keeps: Triton's log API is IPC, and IPC
    may be what hangs."""
    global _last_stall_dump
    now = time.monotonic()
    dump = _last_stall_dump is None or now - _last_stall_dump >= STALL_DUMP_EVERY_S
    shown = repr(request_id) if request_id else "(no id)"
    log.error("request %s failed: %s%s", shown, exc, "; threads of this stub follow" if dump else "")
    if dump:
        _last_stall_dump = now
        stream = sys.stderr if _has_fileno(sys.stderr) else sys.__stderr__
        stream.flush()
        faulthandler.dump_traceback(file=stream, all_threads=True)


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. a test's captured stderr
        return False
    return True


def apply_switch_interval() -> None:
    """VLM_TRITON_SWITCH_INTERVAL=S sets this stub's `sys.setswitchinterval(S)` (Python's default is 0.005 s: how
    long a thread waiting for the GIL lets the holder run before asking it to let go)."""
    value = os.environ.get("VLM_TRITON_SWITCH_INTERVAL")
    if value:
        sys.setswitchinterval(float(value))


def stage_ready(cfg: DeploymentConfig, model_name: str, timing: dict[str, Any] | None = None) -> None:
    """The end of every stage's initialize(): the stub's start-up heap frozen (`triton.stub_freeze_heap`, gc_heap.py)
    and, with VLM_TRITON_STEP_STATS, its timing lines started (`timing`: prefix -> StepTiming, and the GC's pauses)."""
    if cfg.triton.stub_freeze_heap:
        frozen = freeze_heap()
        if step_stats_period() is not None:
            print(f"[{model_name}] {frozen} start-up objects frozen out of garbage collection", file=sys.stderr,
                  flush=True)
    log_timing(timing or {}, model_name)


def warm_up(model_name: str, what: str, run: Callable[[], Any]) -> None:
    """A stage's start-up warm-up (multimodal/warmup.py), before `stage_ready`, its time in the server log. A failure
    is logged and start-up goes on: the first request then pays the one-time costs itself."""
    start = time.perf_counter()
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - an optimisation; the stage serves without it
        print(f"[{model_name}] warm-up of {what} failed ({exc!r}); the first request pays its one-time costs",
              file=sys.stderr, flush=True)
        return
    print(f"[{model_name}] warm-up of {what}: {(time.perf_counter() - start) * 1000:.0f} ms", file=sys.stderr,
          flush=True)


_TRACE_DIR = os.environ.get("VLM_TRITON_TRACE_DIR")


def trace(message: str) -> None:
    """With VLM_TRITON_TRACE_DIR set, append a timestamped line to <dir>/<pid>.trace: plain file writes, so a
    stage can be followed even when Triton's IPC (and with it pb_utils logging) is what hangs."""
    if _TRACE_DIR:
        with open(os.path.join(_TRACE_DIR, f"{os.getpid()}.trace"), "a") as f:
            f.write(f"{time.time():.6f} {threading.current_thread().name} {message}\n")


def load_deployment(args: dict[str, Any]) -> DeploymentConfig:
    enable_thread_dumps(args["model_name"])  # every stage loads its deployment first
    apply_switch_interval()
    model_config = json.loads(args["model_config"])
    cfg = DeploymentConfig.load(model_config["parameters"]["deployment_file"]["string_value"])
    if cfg.triton.stub_keep_freed_memory:
        keep_freed_memory()
    return cfg


def rendered_parameter(args: dict[str, Any], name: str) -> str | None:
    """A value the renderer derived for this model and wrote into its config's parameters (None: absent)."""
    return json.loads(args["model_config"]).get("parameters", {}).get(name, {}).get("string_value") or None


def vision_chunk(args: dict[str, Any], cfg: DeploymentConfig) -> int:
    """Items per vision_encoder request, as rendered into this model's config (`render.vision_batch`)."""
    value = rendered_parameter(args, "vision_chunk")
    return int(value) if value else cfg.vision_chunk


def load_family(cfg: DeploymentConfig) -> "ModelFamily":
    from vlm_triton.families import open_family  # imported here: the bls stage never needs model code

    return open_family(cfg.model.checkpoint)


def torch_device_dtype(cfg: DeploymentConfig) -> tuple[torch.device, torch.dtype]:
    return torch.device(cfg.device), TORCH_DTYPES[cfg.torch_dtype_name]


def set_torch_threads(cfg: DeploymentConfig) -> int:
    """Apply engine.torch_threads (`DeploymentConfig.torch_threads`) to this stub; the threads torch now uses."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    return torch.get_num_threads()


def input_tensors(request: Any) -> dict[str, Any]:
    """A request's input tensors by name, for the get_* helpers below: one walk of `request.inputs()`, where each
    `pb_utils.get_input_tensor_by_name` walks (and wraps) all of them again, ~10 us a lookup for the llm's ~20."""
    return {t.name(): t for t in request.inputs()}


def _input(source: Any, name: str) -> Any:
    """An input tensor of a request, or of its `input_tensors` dict; None when absent."""
    return source.get(name) if isinstance(source, dict) else pb_utils.get_input_tensor_by_name(source, name)


def get_array(request: Any, name: str) -> np.ndarray | None:
    tensor = _input(request, name)
    return None if tensor is None else tensor.as_numpy()


def get_scalar(request: Any, name: str, default: Any) -> Any:
    """A per-request scalar sent as [1] or [1, 1]; `default` when absent."""
    value = get_array(request, name)
    return default if value is None or value.size == 0 else value.reshape(-1)[0].item()


def get_text(request: Any, name: str) -> str | None:
    value = get_array(request, name)
    if value is None or value.size == 0:
        return None
    item = value.reshape(-1)[0]
    return item.decode("utf-8") if isinstance(item, bytes) else str(item)


def get_texts(request: Any, name: str) -> list[str]:
    value = get_array(request, name)
    if value is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]


def get_torch(request: Any, name: str) -> torch.Tensor | None:
    tensor = _input(request, name)
    return None if tensor is None else from_dlpack(tensor.to_dlpack())


def torch_output(name: str, value: torch.Tensor) -> Any:
    """A Triton tensor sharing memory with `value` (any dtype, BF16 included; CPU or GPU)."""
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))


def requested_outputs(request: Any) -> frozenset[str]:
    """The outputs `request` asked for (Triton names all of them when the client named none)."""
    return frozenset(request.requested_output_names())


def response_of(requested: frozenset[str], builders: dict[str, Callable[[], Any]]) -> Any:
    """A response with only the requested tensors (each built by its builder, so unrequested ones cost nothing per
    token; every one when the request named none). Decoupled models must send nothing else: Triton's Python stub
    (r24.10, still so upstream) drops unrequested tensors inside ResponseSender.send after releasing the GIL, and
    freeing their numpy arrays there crashes the stub on Python 3.12 (a BLS asking the llm for output_ids alone
    killed the llm on the GPU host; benchmarks/probe_bls.py reproduces it with a toy model)."""
    return pb_utils.InferenceResponse(
        output_tensors=[build() for name, build in builders.items() if not requested or name in requested]
    )


def text_output(name: str, values: list[str] | str) -> Any:
    items = [values] if isinstance(values, str) else values
    return pb_utils.Tensor(name, np.array([v.encode("utf-8") for v in items], dtype=np.object_))


# Triton's Python backend resets the error code of responses received over BLS to INTERNAL
# (triton-inference-server/server#7804), so client faults also carry this prefix, which the BLS maps back.
INVALID_PREFIX = "invalid request: "


def triton_error(exc: BaseException) -> Any:
    """InvalidRequest -> INVALID_ARGUMENT with its message; a StageStalled -> INTERNAL with its message (reported
    by the caller: report_stall); anything else -> INTERNAL (and logged)."""
    if isinstance(exc, StageStalled):
        return pb_utils.TritonError(str(exc), pb_utils.TritonError.INTERNAL)
    if isinstance(exc, InvalidRequest):
        message = str(exc)
        return pb_utils.TritonError(
            message if message.startswith(INVALID_PREFIX) else INVALID_PREFIX + message,
            pb_utils.TritonError.INVALID_ARG,
        )
    log.error("internal error: %s", "".join(traceback.format_exception(exc)))
    return pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)


def error_response(exc: BaseException) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=triton_error(exc))


def check_response(response: Any, stage: str) -> Any:
    """A BLS response, or its error raised: client faults (code or INVALID_PREFIX) as InvalidRequest."""
    if response.has_error():
        error = response.error()
        message = error.message()
        if error.code() == pb_utils.TritonError.INVALID_ARG or message.startswith(INVALID_PREFIX):
            raise InvalidRequest(message)
        raise RuntimeError(f"{stage} failed: {message}")
    return response
