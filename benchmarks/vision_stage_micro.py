"""One `vision_encoder` execute, host tiles against decoded images cut on the device, phase by phase.

    python -m benchmarks.vision_stage_micro --preset internvl3-1b --images 1,2,4 [--size 1792x1344]

For k W1 images (one JPEG-sized random image, the same for each), times on one device what the vision_encoder stage
does with the requests of one Triton batch (median ms, synchronised): `host` the uint8 tiles copied to the device,
normalised and encoded (preprocess.image_resize = "host"); `device` the decoded planes copied, cut into the same
tiles there (`ModelFamily.tiles_from_images`), normalised and encoded ("device"), and `cut` that path's copy and
cut alone. Checks that both give the same tiles.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from benchmarks.vision_micro import build_encoder, encoder_arguments


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for k in range(repeats + 2):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        if k >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = encoder_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--images", default="1,2,4")
    ap.add_argument("--size", default="1792x1344")
    args = ap.parse_args()
    from vlm_triton.multimodal.pixels import image_planes
    from vlm_triton.multimodal.tiling import image_grid, image_tiles

    device = torch.device(args.device)
    family, encoder, dtype = build_encoder(args.preset, args.work, device)
    lut = torch.from_numpy(family.pixel_lut()).to(device, dtype)
    w, h = (int(v) for v in args.size.lower().split("x"))
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h))
    tiles = torch.from_numpy(image_tiles(img))
    planes = torch.from_numpy(image_planes([img]))
    grids = torch.tensor([image_grid(w, h)], dtype=torch.int32)
    assert torch.equal(family.tiles_from_images(planes.to(device), grids).cpu(), tiles)
    print(f"{args.preset} vision_encoder stage, {w}x{h} ({tiles.shape[0]} tiles per image), {device}, {dtype}")
    print("| images | tiles | host ms | device ms | cut ms |")
    print("|---|---|---|---|---|")
    for k in (int(v) for v in args.images.split(",")):
        def host() -> torch.Tensor:
            raw = torch.cat([tiles] * k).to(device, non_blocking=True)
            return encoder(family.normalize_pixels(raw, lut))

        def cut() -> torch.Tensor:
            return torch.cat([family.tiles_from_images(planes.to(device, non_blocking=True), grids)
                              for _ in range(k)])

        def on_device() -> torch.Tensor:
            return encoder(family.normalize_pixels(cut(), lut))

        with torch.inference_mode():
            row = [median_ms(f, device, args.repeats) for f in (host, on_device, cut)]
        print(f"| {k} | {k * tiles.shape[0]} | " + " | ".join(f"{v:.2f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
