"""The llm's vision path at c=1, phase by phase, and the vision encoder replayed from a CUDA graph.

    python -m benchmarks.inline_vision_micro --preset internvl3-1b [--repeats 20] [--compiled]

For W1 (one 1792x1344 image: 12 tiles + the thumbnail) and W3 (four 448x448 images, one tile each), as the llm gets
them with `engine.vision_in_llm` (decoded planes in host memory and their image grids), times in one process
(median ms, synchronised):

    tiles    `VisionRunner.tiles` per image: the planes copied to the device and cut there
    encode   `VisionRunner.encode` of those tiles (normalise + the eager encoder)
    forward  the encoder alone on the normalised tiles (eager)
    graph    the same forward replayed from a CUDA graph captured for that tile count (and its largest difference
             from eager: 0 when the graph runs the same kernels)
    round    one `InlineVision` job end to end: submitted, encoded on the vision thread's stream, table handed over
    inside   the vision thread's own time for that round (`InlineVision.timing` "round": first job taken to stream
             synchronised), so round - inside is the hand-offs between threads
    side     cut + encode on this thread inside a side CUDA stream (the stream alone, no thread)
    engine   the round with VLM_TRITON_VISION_STREAM=engine (the vision thread on the current stream)
    compiled with --compiled: the forward through `torch.compile(encoder)` (inductor, one compile per tile count, not
             timed), and its largest difference from eager (fused pointwise ops round differently)

Item 50 (docs/benchmarks.md) put W3's "llm.execute -> llm.encoded" at 12.6 ms in the stack on an H100, against
7.5-8.1 ms for a 4-tile eager forward alone: this splits the difference, and tells whether the eager forward is
bound by the host's kernel launches (graph well below forward) at the tile counts W1 and W3 send.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from benchmarks.vision_micro import build_encoder, encoder_arguments
from benchmarks.vision_stage_micro import median_ms


def workload_units(sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(planes uint8 [N, 3, Hmax, Wmax], grids int32 [N, 5]) as preprocess sends them with device tiles."""
    from vlm_triton.multimodal.pixels import image_planes
    from vlm_triton.multimodal.tiling import image_grid

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h))
              for w, h in sizes]
    return torch.from_numpy(image_planes(images)), torch.tensor([image_grid(w, h) for w, h in sizes],
                                                                dtype=torch.int32)


def graphed(encoder: torch.nn.Module, example: torch.Tensor) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """A CUDA graph of `encoder(example)`: (replay, its static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            encoder(example)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = encoder(example)
    return graph.replay, out


def main() -> None:
    ap = encoder_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--compiled", action="store_true", help="also time the forward under torch.compile")
    args = ap.parse_args()
    from vlm_triton.multimodal.inline_vision import InlineVision, VisionJob
    from vlm_triton.multimodal.vision_runner import VisionRunner

    device = torch.device(args.device)
    family, encoder, dtype = build_encoder(args.preset, args.work, device)
    runner = VisionRunner(family, dtype, device, out_dtype=dtype, max_tiles=64, encoder=encoder)
    inline = InlineVision(runner, max_tiles=64)
    os.environ["VLM_TRITON_VISION_STREAM"] = "engine"  # read when an InlineVision is made
    inline_engine = InlineVision(runner, max_tiles=64)
    os.environ.pop("VLM_TRITON_VISION_STREAM")
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    workloads = {"W1": [(1792, 1344)], "W3": [(448, 448)] * 4}
    print(f"{args.preset} vision in the llm, {device}, {dtype}, median of {args.repeats}")
    compiled = torch.compile(encoder) if args.compiled else None
    print("| workload | tiles | tiles ms | encode ms | forward ms | graph ms | graph max diff | round ms | inside ms "
          "| side ms | engine ms | compiled ms | compiled max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, sizes in workloads.items():
            planes, grids = workload_units(sizes)
            units = runner.tiles(planes, grids)
            pixels = family.normalize_pixels(units, runner.lut)
            tiles_ms = median_ms(lambda: runner.tiles(planes, grids), device, args.repeats)
            encode_ms = median_ms(lambda: runner.encode([units]), device, args.repeats)
            forward_ms = median_ms(lambda: encoder(pixels), device, args.repeats)
            graph_ms, diff = "-", "-"
            if device.type == "cuda":
                replay, out = graphed(encoder, pixels)
                graph_ms = f"{median_ms(replay, device, args.repeats):.2f}"
                diff = f"{(out.float() - encoder(pixels).float()).abs().max().item():.3g}"

            def round_trip(vision: InlineVision = inline) -> None:
                done = threading.Event()
                vision.submit(VisionJob(f"job-{time.monotonic_ns()}", planes, grids, None,
                                        lambda table: done.set(), lambda exc: done.set()))
                done.wait()

            def on_side_stream() -> None:
                with torch.cuda.stream(side):
                    runner.encode([runner.tiles(planes, grids)])
                side.synchronize()

            inline.timing.take()
            round_ms = median_ms(round_trip, device, args.repeats)
            inside_ms = inline.timing.take()["round"]["mean_ms"]
            side_ms = f"{median_ms(on_side_stream, device, args.repeats):.2f}" if side is not None else "-"
            engine_ms = median_ms(lambda: round_trip(inline_engine), device, args.repeats)
            compiled_ms, compiled_diff = "-", "-"
            if compiled is not None:
                compiled_diff = f"{(compiled(pixels).float() - encoder(pixels).float()).abs().max().item():.3g}"
                compiled_ms = f"{median_ms(lambda: compiled(pixels), device, args.repeats):.2f}"
            print(f"| {name} | {units.shape[0]} | {tiles_ms:.2f} | {encode_ms:.2f} | {forward_ms:.2f} | {graph_ms} | "
                  f"{diff} | {round_ms:.2f} | {inside_ms:.2f} | {side_ms} | {engine_ms:.2f} | {compiled_ms} | "
                  f"{compiled_diff} |")
    inline.close()
    inline_engine.close()


if __name__ == "__main__":
    main()
