"""Importing the Triton adapters (`vlm_triton.triton.*`) against a fake `triton_python_backend_utils`, for unit
tests without a Triton stub. Use from a fixture: `yield from adapters_with(monkeypatch, fake, "...bls_model")`."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Iterator

import pytest

# the adapter modules that import pb_utils at import time, besides the ones a test asks for
_SHARED = ("vlm_triton.triton.common", "vlm_triton.triton.vision_client")


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
