"""Shared fixtures: tiny random-weight checkpoints, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm_triton.checkpoints.tiny import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_internvl3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Original-format (InternVLChatModel) tiny InternVL3 checkpoint, bf16, seed 0."""
    return make_tiny_checkpoint("internvl3", tmp_path_factory.mktemp("ckpt") / "tiny-internvl3", seed=0)


@pytest.fixture(scope="session")
def tiny_internvl3_hf(tiny_internvl3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_internvl3` converted to the transformers-native layout (the reference in parity tests)."""
    from vlm_triton.checkpoints.to_hf import convert_to_hf

    return convert_to_hf(tiny_internvl3, tmp_path_factory.mktemp("ckpt-hf") / "tiny-internvl3-hf")
