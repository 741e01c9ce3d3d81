"""The three workloads, as OpenAI chat messages and as the exact prompt the server's preprocess makes of them.

W1  one image of 13 tiles (a 4:3 image -> 12 tiles + the thumbnail) + a short question, 128 output tokens
W2  text only, 512 prompt tokens (chat template included), 256 output tokens
W3  four 448x448 images (one tile each) + a short question, 128 output tokens
Output lengths are fixed: every request sets ignore_eos and max_tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class Workload:
    name: str
    description: str
    messages: list[dict[str, Any]]
    max_tokens: int
    # filled by prepare(): what the preprocess stage produces
    input_ids: np.ndarray | None = None
    pixel_values: np.ndarray | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0]) if self.input_ids is not None else -1

    @property
    def tiles(self) -> int:
        return int(self.pixel_values.shape[0]) if self.pixel_values is not None else 0

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "prompt_tokens": self.prompt_tokens,
                "tiles": self.tiles, "output_tokens": self.max_tokens}


def _image(path: Path, size: tuple[int, int], seed: int) -> Path:
    if not path.is_file():
        rng = np.random.default_rng(seed)
        w, h = size
        base = rng.integers(0, 255, size=(max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR).save(path, quality=90)
    return path


def make_workloads(media_dir: Path, out_tokens: dict[str, int] | None = None) -> dict[str, Workload]:
    media_dir = Path(media_dir).resolve()
    media_dir.mkdir(parents=True, exist_ok=True)
    n = {"W1": 128, "W2": 256, "W3": 128, **(out_tokens or {})}
    big = _image(media_dir / "w1_1792x1344.jpg", (1792, 1344), 1)
    small = [_image(media_dir / f"w3_{k}_448.jpg", (448, 448), 10 + k) for k in range(4)]
    w1 = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": big.as_uri()}},
        {"type": "text", "text": "Describe this image in detail."}]}]
    w3 = [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": p.as_uri()}} for p in small),
        {"type": "text", "text": "What are the differences between these images?"}]}]
    return {
        "W1": Workload("W1", "1 image, 13 tiles + short question", w1, n["W1"]),
        "W2": Workload("W2", "text only, 512 prompt tokens", [{"role": "user", "content": ""}], n["W2"]),
        "W3": Workload("W3", "4 images x 1 tile + short question", w3, n["W3"]),
    }


def prepare_workloads(ckpt: Path, workloads: dict[str, Workload], media_dir: Path, w2_prompt_tokens: int = 512,
                      text_tokens: dict[str, int] | None = None) -> None:
    """Run the family's preprocess on each workload (the exact ids/tiles the server will see); size the text of the
    workloads in `text_tokens` (default: W2, `w2_prompt_tokens`) so that each prompt is exactly that many tokens."""
    from vlm_triton.families import open_family
    from vlm_triton.families.base import PreprocessLimits
    from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy
    from vlm_triton.prompt.messages import parse_messages

    family = open_family(ckpt)
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(Path(media_dir).resolve(),)))
    limits = PreprocessLimits(max_images=8, max_prompt_tokens=32768)

    def prep(messages: list[dict[str, Any]]) -> Any:
        return family.prepare(parse_messages(json.dumps(messages)), media, limits)

    for name, target in (text_tokens if text_tokens is not None else {"W2": w2_prompt_tokens}).items():
        w, words = workloads[name], 0
        for _ in range(8):
            w.messages = [{"role": "user", "content": "Summarize:" + " the" * words}]
            got = prep(w.messages).input_ids.shape[0]
            if got == target:
                break
            words = max(0, words + target - got)
    for w in workloads.values():
        p = prep(w.messages)
        w.input_ids = np.asarray(p.input_ids, dtype=np.int64)
        w.pixel_values = family.float_pixels(p) if p.pixel_values.shape[0] else None  # normalised float32


def chat_body(w: Workload, model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": w.messages, "max_tokens": w.max_tokens, "temperature": 0.0,
                            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body
