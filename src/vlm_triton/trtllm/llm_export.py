"""Write a checkpoint's LLM as a plain Hugging Face LLM folder: the input of TensorRT-LLM's convert_checkpoint.py.

The family says where its LLM lives (`ModelFamily.llm_part`: architecture, config, weight prefix); the weights are
copied shard by shard with the prefix stripped (never all in memory), and the folder gets the LLM's config.json,
the tokenizer files and, for remote-code architectures (InternLM2), the modeling files and their auto_map.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vlm_triton.checkpoints.checkpoint import _weight_map
from vlm_triton.errors import SetupError
from vlm_triton.families import ModelFamily
from vlm_triton.trtllm.plan import llm_converter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "tokenization_internlm2.py",
                   "tokenization_internlm2_fast.py", "generation_config.json")
# llm_config keys that belong to the original training code, not to the plain LLM
_DROP_KEYS = frozenset({"_name_or_path", "auto_map", "attn_implementation", "_attn_implementation",
                        "_attn_implementation_autoset", "use_flash_attn"})


def export_llm_folder(family: ModelFamily, out: str | Path, *, progress: bool = True) -> Path:
    """Write `family`'s LLM into `out` (created; must be empty or absent). Returns `out`."""
    part = family.llm_part()
    convert = llm_converter(part.architecture)
    src = family.checkpoint.path
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SetupError(f"{out} is not empty; pass a new folder for the exported LLM")
    missing = [f for f in convert.remote_code if not (src / f).is_file()]
    if missing:
        raise SetupError(f"{part.architecture} needs {missing} from the checkpoint folder {src}, which lacks them")
    out.mkdir(parents=True, exist_ok=True)

    by_file: dict[str, list[str]] = {}
    for name, file in _weight_map(src).items():
        if name.startswith(part.weight_prefix):
            by_file.setdefault(file, []).append(name)
    if not by_file:
        raise SetupError(f"{src} has no tensors under {part.weight_prefix!r}")
    index: dict[str, str] = {}
    total = sum(len(v) for v in by_file.values())
    with tqdm(total=total, desc="LLM tensors", unit="tensor", disable=not progress) as bar:
        for i, (file, names) in enumerate(sorted(by_file.items())):
            shard = f"model-{i + 1:05d}-of-{len(by_file):05d}.safetensors" if len(by_file) > 1 else "model.safetensors"
            tensors = {}
            with safe_open(str(src / file), framework="pt") as f:
                for name in names:
                    tensors[name[len(part.weight_prefix):]] = f.get_tensor(name)
                    bar.update(1)
            save_file(tensors, str(out / shard), metadata={"format": "pt"})
            index.update({name: shard for name in tensors})
            del tensors
    if len(by_file) > 1:
        _dump(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": dict(sorted(index.items()))})

    config = {k: v for k, v in part.config.items() if k not in _DROP_KEYS}
    config["architectures"] = [part.architecture]
    config["tie_word_embeddings"] = False  # InternVL keeps its own lm_head (as the torch loader assumes)
    if convert.auto_map:
        config["auto_map"] = dict(convert.auto_map)
    _dump(out / "config.json", config)
    for name in (*TOKENIZER_FILES, *convert.remote_code):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return out


def _dump(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
