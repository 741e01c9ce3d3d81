"""Vision encoder variants on one device: eager vs torch.compile, per tile count, against the matmul floor.

    python -m benchmarks.vision_micro --preset internvl3-1b --tiles 1,4,13,52 [--modes eager,compile,cudnn,flash]
        [--kernels 13]

Modes: eager (as served: SDPA picks its kernel, layer scales folded into the weights), unfolded (eager with the
layer scales as separate multiplies, as before item 45), compile (torch.compile), and an SDPA backend forced for the
ViT's attention (cudnn, flash, efficient, math). `--kernels N` also prints the top kernels of an eager forward of N tiles.

Builds the preset's checkpoint with random weights (benchmarks/models.py), runs the family's vision encoder (the
module the `vision_encoder` stage serves) on random tiles, and prints a table: median ms, TFLOP/s, fraction of the
measured bf16 matmul floor, and each variant's largest difference from eager on the same input. For a variant
to be worth serving it must be faster at the tile counts W1/W3 send (13 / 4) and agree with eager within bf16
rounding. Measured on an H100 (docs/benchmarks.md): compile saves 8% at 13 tiles and costs a minute of start-up, so
serving stays eager; this script keeps the comparison reproducible.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import baselines, models


def compile_vision_encoder(encoder: torch.nn.Module, *, warm_tiles: list[int], device: torch.device, size: int):
    """torch.compile of the encoder, the tile count dynamic (a batch of one tile compiles once more), warmed up."""
    compiled = torch.compile(encoder, dynamic=False)
    dtype = next(encoder.parameters()).dtype

    def run(pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[0] > 1:
            torch._dynamo.mark_dynamic(pixels, 0)
        return compiled(pixels)

    with torch.inference_mode():
        for n in sorted(set(warm_tiles), reverse=True):  # a batch > 1 first: the dynamic graph
            run(torch.zeros(n, 3, size, size, device=device, dtype=dtype))
    return run


def encoder_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every vision micro-benchmark shares: the preset, its work folder, repeats, the device."""
    ap.add_argument("--preset", default="internvl3-1b", choices=sorted(models.PRESETS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-work"))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def build_encoder(preset: str, work: Path, device: torch.device) -> tuple[Any, torch.nn.Module, torch.dtype]:
    """(family, its vision encoder in eval mode, dtype) of the preset's random-weight checkpoint on `device`:
    bf16 on CUDA, float32 on the CPU."""
    from vlm_triton.families import open_family

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    family = open_family(models.make_model(preset, work / f"ckpt-{preset}"))
    return family, family.build_vision_encoder(dtype, device).eval(), dtype


def _time(fn, x: torch.Tensor, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn(x)
    baselines.sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(x)
        baselines.sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def with_sdpa_backend(encoder: torch.nn.Module, name: str):
    """The encoder with every scaled_dot_product_attention call on one backend (it fails where that one cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name])

    def run(x: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return encoder(x)

    return run


def print_kernels(encoder: torch.nn.Module, x: torch.Tensor, device: torch.device, top: int = 15) -> None:
    """Top kernels of one eager forward (CUDA time), after a warm one."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        encoder(x)
        baselines.sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            encoder(x)
            baselines.sync(device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70))


def main() -> None:
    ap = encoder_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--tiles", default="1,4,13,52")
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--kernels", type=int, default=0, help="top kernels of an eager forward of this many tiles")
    args = ap.parse_args()
    device = torch.device(args.device)
    family, eager, dtype = build_encoder(args.preset, args.work, device)
    cfg = family.config
    peak = baselines.device_ceilings(device).get("matmul_flops") if device.type == "cuda" else None
    tiles = [int(t) for t in args.tiles.split(",")]
    modes = args.modes.split(",")
    runners = {}
    for mode in modes:
        t = time.perf_counter()
        if mode == "eager":
            runners[mode] = eager
        elif mode == "unfolded":
            runners[mode] = family.vision_encoder_class.from_checkpoint(
                family.checkpoint, dtype=dtype, device=device, fold_scales=False).eval()
        elif mode in SDPA_BACKENDS:
            runners[mode] = with_sdpa_backend(eager, mode)
        else:
            runners[mode] = compile_vision_encoder(eager, warm_tiles=tiles, device=device, size=family.image_size)
        print(f"{mode}: ready in {time.perf_counter() - t:.1f} s", flush=True)
    print(f"\n{args.preset} vision encoder, {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}"
          f", {dtype}, matmul peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    print("| tiles | mode | ms | TFLOP/s | floor | max |diff| vs eager |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n in tiles:
        x = torch.randn(n, 3, family.image_size, family.image_size, generator=gen).to(device, dtype)
        flops = baselines.vit_flops(cfg["vision_config"], int(cfg["llm_config"]["hidden_size"]), n,
                                    float(cfg.get("downsample_ratio", 0.5)))
        ref = None
        for mode in modes:
            with torch.inference_mode():
                sec, out = _time(runners[mode], x, device, args.repeats)
            ref = out.float() if ref is None else ref
            diff = float((out.float() - ref).abs().max())
            floor = f"{flops / peak / sec:.0%}" if peak else "-"
            print(f"| {n} | {mode} | {sec * 1e3:.2f} | {flops / sec / 1e12:.0f} | {floor} | {diff:.3g} |", flush=True)
    if args.kernels:
        x = torch.randn(args.kernels, 3, family.image_size, family.image_size, generator=gen).to(device, dtype)
        print(f"\ntop kernels of an eager forward of {args.kernels} tiles")
        print_kernels(eager, x, device)


if __name__ == "__main__":
    main()
