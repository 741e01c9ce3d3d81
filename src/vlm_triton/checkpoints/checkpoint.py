"""A checkpoint directory on disk: its config.json and its safetensors weights (one file or index + shards)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vlm_triton.errors import SetupError


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]
    _weight_map: dict[str, str] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path).expanduser()
        if not path.is_dir():
            raise SetupError(f"checkpoint directory {path} does not exist; pass the folder that holds config.json")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise SetupError(f"{path} has no config.json; pass a Hugging Face checkpoint folder")
        config = json.loads(config_file.read_text())
        return cls(path=path, config=config, _weight_map=_weight_map(path))

    def tensor_names(self) -> list[str]:
        return sorted(self._weight_map)

    def load_tensors(self, prefix: str = "", *, strip_prefix: bool = True) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with `prefix` (prefix removed when strip_prefix)."""
        by_file: dict[str, list[str]] = {}
        for name, file in self._weight_map.items():
            if name.startswith(prefix):
                by_file.setdefault(file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, names in sorted(by_file.items()):
            with safe_open(str(self.path / file), framework="pt") as f:
                for name in names:
                    out[name[len(prefix):] if strip_prefix else name] = f.get_tensor(name)
        return out


def load_module_weights(
    ckpt: Checkpoint,
    model: torch.nn.Module,
    prefixes: tuple[str, ...],
    *,
    layers: tuple[str, int] | None = None,
    ignore: tuple[str, ...] = (),
    what: str = "weights",
) -> None:
    """Load the tensors under `prefixes` into `model` (names kept), strictly.

    `layers` = (layer prefix, n) drops checkpoint layers >= n that the model does not build (a feature layer before
    the last); `ignore` names tensors the model recomputes. Any other mismatch raises SetupError listing it."""
    weights: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        weights.update(ckpt.load_tensors(prefix, strip_prefix=False))
    if layers is not None:
        pattern = re.compile(re.escape(layers[0]) + r"(\d+)\.")
        weights = {k: v for k, v in weights.items()
                   if not ((m := pattern.match(k)) and int(m.group(1)) >= layers[1])}
    for name in ignore:
        weights.pop(name, None)
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SetupError(f"{what} in {ckpt.path} do not match the config: missing "
                         f"{result.missing_keys}, unexpected {result.unexpected_keys}")


def _weight_map(path: Path) -> dict[str, str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single.name for name in f.keys()}
    raise SetupError(f"{path} has no model.safetensors or model.safetensors.index.json")
