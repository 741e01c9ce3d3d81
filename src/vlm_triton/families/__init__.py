"""Model families: one class per family, registered by name and matched on the checkpoint's config.json."""

from __future__ import annotations

from pathlib import Path

from vlm_triton.checkpoints.checkpoint import Checkpoint
from vlm_triton.errors import SetupError
from vlm_triton.families.base import ModelFamily, PreparedPrompt, PreprocessLimits
from vlm_triton.registry import Registry

FAMILIES: Registry[type[ModelFamily]] = Registry("model family")


def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    FAMILIES.register(cls.name)(cls)
    return cls


def family_class_for(config: dict) -> type[ModelFamily]:
    matches = [cls for _, cls in FAMILIES.items() if cls.matches(config)]
    if len(matches) == 1:
        return matches[0]
    arch = config.get("architectures")
    if not matches:
        supported = "; ".join(f"{name}: {cls.description}" for name, cls in FAMILIES.items())
        raise SetupError(f"unsupported checkpoint (architectures={arch}); supported families: {supported}")
    raise SetupError(f"checkpoint (architectures={arch}) matches several families: {[c.name for c in matches]}")


def open_family(path: str | Path) -> ModelFamily:
    checkpoint = Checkpoint.open(path)
    return family_class_for(checkpoint.config)(checkpoint)


# Importing the family modules registers them.
from vlm_triton.families import internvl  # noqa: E402,F401
from vlm_triton.families import minicpmv  # noqa: E402,F401
from vlm_triton.families import internvideo  # noqa: E402,F401

__all__ = ["FAMILIES", "ModelFamily", "PreparedPrompt", "PreprocessLimits", "open_family", "register"]
