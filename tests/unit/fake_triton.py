"""Importing the Triton adapters (`vlm_triton.triton.*`) against a fake `triton_python_backend_utils`, for unit
tests without a Triton stub. Use from a fixture: `yield from adapters_with(monkeypatch, fake_pb_utils(...), "...bls_model")`."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from vlm_triton.contracts import NUMPY_DTYPES

TORCH_TO_TRITON = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16"}
NUMPY_TO_TRITON = {np.dtype(v): k for k, v in NUMPY_DTYPES.items() if k not in ("BF16", "BYTES")}

# the adapter modules that import pb_utils at import time, besides the ones a test asks for
_SHARED = ("vlm_triton.triton.common", "vlm_triton.triton.vision_client")


class FakeTensor:
    """pb_utils.Tensor over a numpy array (lists become arrays) or a torch tensor (from_dlpack keeps it one)."""

    def __init__(self, name: str, value: Any) -> None:
        self._name = name
        self.value = value if isinstance(value, torch.Tensor) else np.asarray(value)

    @classmethod
    def from_dlpack(cls, name: str, capsule: Any) -> FakeTensor:
        return cls(name, torch.from_dlpack(capsule))

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self.value.numpy() if isinstance(self.value, torch.Tensor) else self.value

    def shape(self) -> list[int]:
        return list(self.value.shape)

    def to_dlpack(self) -> torch.Tensor:
        return self.value if isinstance(self.value, torch.Tensor) else torch.from_numpy(self.value)

    def triton_dtype(self) -> str:
        if isinstance(self.value, torch.Tensor):
            return TORCH_TO_TRITON[self.value.dtype]
        return "BYTES" if self.value.dtype == np.object_ else NUMPY_TO_TRITON[self.value.dtype]


class FakeResponse:
    """pb_utils.InferenceResponse: output tensors by name, or an error."""

    def __init__(self, output_tensors: list[FakeTensor] | None = None, error: Any = None) -> None:
        self.outputs = {t.name(): t for t in output_tensors or []}
        self._error = error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> Any:
        return self._error


class FakeTritonError:
    """pb_utils.TritonError: a message and a status code."""

    INVALID_ARG, CANCELLED, INTERNAL = 3, 1, 13

    def __init__(self, message: str = "", code: int = 13) -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class FakePreferredMemory:
    """pb_utils.PreferredMemory: where a BLS request wants its outputs."""

    def __init__(self, memory_type: str, device_id: int) -> None:
        self.memory_type, self.device_id = memory_type, device_id


def fake_pb_utils(**members: Any) -> types.ModuleType:
    """A fake `triton_python_backend_utils`: the FINAL flag, `TritonError`, `Tensor`, `InferenceResponse`, a gauge
    metric family, `PreferredMemory` with TRITONSERVER_MEMORY_CPU, and tensors looked up by name in a response's `.outputs` / a request's `.inputs`; `members` add or replace attributes (the test's
    Tensor, InferenceRequest, InferenceResponse, ...)."""
    m = types.ModuleType("triton_python_backend_utils")
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    m.TritonError, m.Tensor, m.InferenceResponse = FakeTritonError, FakeTensor, FakeResponse
    m.PreferredMemory, m.TRITONSERVER_MEMORY_CPU = FakePreferredMemory, "TRITONSERVER_MEMORY_CPU"
    m.MetricFamily = type("MetricFamily", (), {"GAUGE": 1})
    m.get_output_tensor_by_name = lambda response, name: response.outputs.get(name)
    m.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    for name, value in members.items():
        setattr(m, name, value)
    return m


def adapters_with(monkeypatch: pytest.MonkeyPatch, fake: types.ModuleType,
                  *modules: str) -> Iterator[list[types.ModuleType]]:
    """Yield `modules` freshly imported against `fake`; afterwards they (and the shared adapter modules) are
    forgotten, so the next import sees whatever pb_utils is installed then."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    names = (*_SHARED, *modules)
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield [importlib.import_module(name) for name in modules]
    for name in names:
        sys.modules.pop(name, None)
