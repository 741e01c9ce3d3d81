"""The preprocess stage's CPU time per image, phase by phase (median ms over N repetitions).

    python -m benchmarks.preprocess_micro [--reps 30] [--threads 1,2,8] [--sizes w1,4032x3024,1000x700,448x448]

Images are made the way `benchmarks/workloads.py` makes them (a seeded random 1/16-scale image, bilinear upscale,
JPEG quality 90); `w1` is W1's own 1792x1344 file. Phases, in the order the InternVL family runs them:

    fetch      file:// read through MediaFetcher (the policy checks included)
    decode     decode_image: Pillow open + load (+ convert('RGB') when the file is not RGB)
    tiles      image_tiles(threads=N): grid choice, the resize to the grid, the thumbnail, uint8 [N, 3, S, S]
    tiles CPU  the same calls' CPU time (all threads of the process): the work the threads share
      resize     reference step: img.resize((S*cols, S*rows), BICUBIC) (Pillow returns a copy when equal)
      crops      reference step: the cols*rows PIL crops of the resized image
      thumbnail  reference step: img.resize((S, S), BICUBIC) of the original
      stack      reference step: stack_tiles (np.asarray + CHW transpose per tile)
    prompt     template, placeholder expansion, tokenizer.encode, image-token ids (tiny tokenizer of benchmarks/models)
    prepare    family.prepare end to end with PreprocessLimits(image_threads=N) (fetch, decode, tiles, prompt)
    prep dev   the same with device_tiles=True (preprocess.image_resize = "device"): decoded planes and grids, no tiles
    dev tiles  the other half of that path: the planes copied to --device and cut into the same tiles there
               (`tiles_from_images`, checked equal to the host tiles), synchronised; "-" in a checkout without it

`tiles` and `prepare` are what the server runs, per thread count (threads=1: the single-threaded path; N > 1:
`multimodal.resample`, checked here to give the same bytes); resize/crops/thumbnail/stack time the single-threaded
reference path step by step (their sum is close to `tiles` at threads=1). Other processes on the machine skew
multi-threaded numbers most: compare runs taken back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.workloads import _image

S = 448


def median_ms(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_median_ms(calls: dict[Any, Callable[[], Any]], reps: int, warmup: int = 2
                          ) -> dict[Any, tuple[float, float]]:
    """(median wall ms, median CPU ms of the process, all threads) of each call, the calls taking turns rep by rep
    (so that all see the same machine load)."""
    wall: dict[Any, list[float]] = {key: [] for key in calls}
    cpu: dict[Any, list[float]] = {key: [] for key in calls}
    for rep in range(warmup + reps):
        for key, fn in calls.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if rep >= warmup:
                wall[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
    return {key: (statistics.median(wall[key]) * 1e3, statistics.median(cpu[key]) * 1e3) for key in calls}


def parse_size(text: str) -> tuple[int, int]:
    if text == "w1":
        return (1792, 1344)
    w, h = text.lower().split("x")
    return int(w), int(h)


def make_images(root: Path, sizes: list[str]) -> dict[str, Path]:
    out = {}
    for k, name in enumerate(sizes):
        w, h = parse_size(name)
        path = root / ("w1_1792x1344.jpg" if name == "w1" else f"micro_{w}x{h}.jpg")
        out[name] = _image(path, (w, h), 1 if name == "w1" else 100 + k)
    return out


def reference_steps(img: Image.Image, reps: int) -> dict[str, float]:
    """The single-threaded reference path of `tile_image` + `stack_tiles`, one step at a time."""
    from vlm_triton.multimodal.pixels import stack_tiles
    from vlm_triton.multimodal.tiling import choose_grid

    cols, rows = choose_grid(*img.size)
    bicubic = Image.Resampling.BICUBIC
    resized = img.resize((S * cols, S * rows), bicubic)
    boxes = [(c * S, r * S, (c + 1) * S, (r + 1) * S) for r in range(rows) for c in range(cols)]
    tiles = [resized.crop(b) for b in boxes]
    if len(tiles) > 1:
        tiles.append(img.resize((S, S), bicubic))
    return {
        "resize": median_ms(lambda: img.resize((S * cols, S * rows), bicubic), reps),
        "crops": median_ms(lambda: [resized.crop(b) for b in boxes], reps),
        "thumbnail": median_ms(lambda: img.resize((S, S), bicubic), reps) if len(boxes) > 1 else 0.0,
        "stack": median_ms(lambda: stack_tiles(tiles, image_size=S), reps),
    }


def supports_threads() -> bool:
    """Whether this checkout has the image-threads knob (`image_tiles(threads=)`, `PreprocessLimits.image_threads`)."""
    from vlm_triton.families.base import PreprocessLimits

    return "image_threads" in PreprocessLimits.__dataclass_fields__


def tiles_call(threads: int) -> Callable[[Image.Image], np.ndarray]:
    from vlm_triton.multimodal import tiling

    return (lambda img: tiling.image_tiles(img, threads=threads)) if supports_threads() else tiling.image_tiles


def make_family(root: Path) -> Any:
    from benchmarks.models import make_model
    from vlm_triton.families import open_family

    return open_family(make_model("tiny", root / "ckpt"))


def supports_device_tiles() -> bool:
    from vlm_triton.families.base import PreprocessLimits

    return "device_tiles" in PreprocessLimits.__dataclass_fields__


def device_tiles_ms(family: Any, messages: Any, media: Any, limits: Any, reference: np.ndarray, device: str,
                    reps: int) -> float:
    """Median ms to copy a device-path request's planes to `device` and cut its tiles there (synchronised)."""
    import torch

    prepared = family.prepare(messages, media, replace(limits, device_tiles=True))
    dev = torch.device(device)
    grids = torch.from_numpy(prepared.image_grids)

    def cut() -> torch.Tensor:
        tiles = family.tiles_from_images(torch.from_numpy(prepared.pixel_values).to(dev), grids)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return tiles

    if not np.array_equal(cut().cpu().numpy(), reference):
        raise AssertionError(f"the tiles cut on {device} differ from the host's")
    return median_ms(cut, reps)


def run(sizes: list[str], thread_counts: list[int], reps: int, root: Path, device: str = "cpu"
        ) -> list[dict[str, Any]]:
    from vlm_triton.families.base import PreprocessLimits
    from vlm_triton.multimodal.media import MediaFetcher, MediaPolicy, decode_image
    from vlm_triton.multimodal.tiling import num_tiles
    from vlm_triton.prompt.internvl_template import expand_image_placeholders, render_internvl_prompt
    from vlm_triton.prompt.messages import parse_messages

    images = make_images(root, sizes)
    family = make_family(root)
    media = MediaFetcher(MediaPolicy(allowed_local_dirs=(root,)))
    limits = PreprocessLimits(max_images=8, max_prompt_tokens=32768)
    rows: list[dict[str, Any]] = []
    for name, path in images.items():
        url = path.as_uri()
        data = media.fetch_bytes(url)
        img = decode_image(data)
        messages = parse_messages(json.dumps([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Describe this image in detail."}]}]))
        tokens = num_tiles(*img.size) * family.tokens_per_tile

        def prompt() -> np.ndarray:
            text = render_internvl_prompt(messages, template=family.config.get("template") or "internvl2_5")
            ids = np.asarray(family.tokenizer.encode(expand_image_placeholders(text, [tokens])), dtype=np.int64)
            slots = ids == family.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
            ids[slots] = family.vocab_size + np.arange(int(slots.sum()))
            return ids

        common = {
            "image": f"W1 {img.size[0]}x{img.size[1]}" if name == "w1" else name, "tiles": num_tiles(*img.size),
            "fetch": median_ms(lambda: media.fetch_bytes(url), reps),
            "decode": median_ms(lambda: decode_image(data), reps),
            **reference_steps(img, reps),
            "prompt": median_ms(prompt, reps),
        }
        reference = tiles_call(1)(img)
        counts = [t for t in thread_counts if t == 1 or supports_threads()]
        if len(counts) < len(thread_counts):
            print("thread counts > 1 skipped: this checkout has no image-threads knob")
        calls = {}
        for threads in counts:
            call = tiles_call(threads)
            if not np.array_equal(call(img), reference):
                raise AssertionError(f"{name}: the tiles with {threads} threads differ from the single-threaded ones")
            lim = replace(limits, image_threads=threads) if supports_threads() else limits
            calls[("tiles_ms", threads)] = partial(call, img)
            calls[("prepare", threads)] = partial(family.prepare, messages, media, lim)
            if supports_device_tiles():
                calls[("prep_dev", threads)] = partial(family.prepare, messages, media, replace(lim, device_tiles=True))
        timed = interleaved_median_ms(calls, reps)
        dev_ms = device_tiles_ms(family, messages, media, limits, reference, device, reps) \
            if supports_device_tiles() else "-"
        rows += [{**common, "threads": t, "tiles_ms": timed[("tiles_ms", t)][0], "tiles_cpu": timed[("tiles_ms", t)][1],
                  "prepare": timed[("prepare", t)][0], "prep_dev": timed.get(("prep_dev", t), ("-",))[0],
                  "dev_tiles": dev_ms} for t in counts]
    return rows


COLUMNS = ("image", "tiles", "threads", "fetch", "decode", "tiles_ms", "tiles_cpu", "resize", "crops", "thumbnail",
           "stack", "prompt", "prepare", "prep_dev", "dev_tiles")
HEADINGS = {"tiles_ms": "tiles (ms)", "tiles_cpu": "tiles CPU", "prep_dev": "prep dev", "dev_tiles": "dev tiles"}


def table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(HEADINGS.get(c, c) for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r[c] if isinstance(r[c], (str, int)) else f"{r[c]:.1f}" for c in COLUMNS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", default="1", help="comma-separated thread counts for the tiles/prepare phases")
    ap.add_argument("--sizes", default="w1,4032x3024,1000x700,448x448")
    ap.add_argument("--workdir", type=Path, default=None, help="where images and the tiny checkpoint go")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--device", default=None, help="where `dev tiles` cuts tiles (default: cuda when there is one)")
    args = ap.parse_args()
    root = args.workdir or Path(tempfile.gettempdir()) / "vlm_triton_preprocess_micro"
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    threads = [int(t) for t in args.threads.split(",")]
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(args.sizes.split(","), threads, args.reps, root, device)
    print(f"median ms over {args.reps} reps, os.cpu_count()={os.cpu_count()}, Pillow {Image.__version__}, "
          f"dev tiles on {device}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
