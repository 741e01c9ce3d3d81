"""Fixtures shared by the engine tests (tests/unit/engine_helpers.py): `model` (tiny Qwen2, Llama and eager-attention
Qwen2) and `qwen`."""

from tests.unit.engine_helpers import model, qwen  # noqa: F401 - fixtures
