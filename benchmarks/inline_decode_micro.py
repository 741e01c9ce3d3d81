"""Does the llm's own vision encoder (`engine.vision_in_llm`) slow the engine's decode steps? One process, one engine:
decode-step times of one request before the encoder exists, after it is built, after it encoded (on its thread and
stream, `multimodal/inline_vision.py`), for a request whose prompt table came from it, and once more without.

    python -m benchmarks.inline_decode_micro --preset internvl3-1b      # GPU, about a minute

Prints a table: the captured decode graph alone (CUDA events, GPU time) and the whole `engine.step()` (host time to
the sampled token), each at the request's KV length. The stack showed decode_run_and_wait 1.65 ms without the switch
and 1.82 ms with it at concurrency 1 (docs/benchmarks.md item 40); this separates the GPU from the host.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.baselines import build_engine, sync
from benchmarks.engine_profile import step_ms
from benchmarks.models import make_model
from vlm_triton.engine.types import GenerationRequest
from vlm_triton.multimodal.inline_vision import InlineVision, VisionJob
from vlm_triton.multimodal.vision_runner import VisionRunner


def decode_times(engine, label: str, ids: np.ndarray, table: torch.Tensor | None, steps: int) -> dict:
    rid = f"{label}-{time.monotonic_ns()}"
    engine.add_request(GenerationRequest(request_id=rid, input_ids=ids, max_new_tokens=steps + 20,
                                         prompt_embedding_table=table, temperature=0.0, end_id=-1))
    while len(engine.admission):
        engine.step()
    ms = step_ms(engine, steps)
    kv = next(k for k in engine.kv_buckets if k > len(ids) + steps)  # the bucket the last steps replayed
    graph = engine._graphs.time_replay(1, kv, 100) if engine._graphs is not None else float("nan")
    engine.cancel(rid)
    while engine.has_work():
        engine.step()
    return {"phase": label, "step_ms": ms, "graph_ms": graph}


def encode_once(vision: InlineVision, tiles: torch.Tensor) -> torch.Tensor:
    done = threading.Event()
    got: dict = {}
    vision.submit(VisionJob(job_id=f"j{time.monotonic_ns()}", pixels=tiles, grids=None, tgt_sizes=None,
                            ready=lambda t: (got.__setitem__("t", t), done.set()),
                            failed=lambda e: (got.__setitem__("e", e), done.set())))
    if not done.wait(120):
        raise TimeoutError("the vision thread did not answer")
    if "e" in got:
        raise got["e"]
    return got["t"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="internvl3-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiles", type=int, default=13)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--max-slots", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ckpt = make_model(args.preset, Path("/tmp/inline-micro") / args.preset)
    family, engine, encoder = build_engine(ckpt, device, dtype, args.max_slots, args.max_seq_len)
    del encoder  # the stack's llm has no other encoder
    size, rows_per_tile = family.image_size, family.tokens_per_tile
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, 1000, (rows_per_tile * args.tiles + 60,), dtype=torch.int32, generator=gen).numpy()
    rows = []
    rows.append(decode_times(engine, "engine alone", text, None, args.steps))
    runner = VisionRunner(family, dtype, device, out_dtype=dtype, max_tiles=64)
    vision = InlineVision(runner, max_tiles=64)
    rows.append(decode_times(engine, "encoder built, thread idle", text, None, args.steps))
    tiles = torch.randint(0, 256, (args.tiles, 3, size, size), dtype=torch.uint8, generator=gen)
    for _ in range(3):
        table = encode_once(vision, tiles)
    sync(device)
    rows.append(decode_times(engine, "after 3 encodes", text, None, args.steps))
    ids = np.concatenate([np.arange(family.vocab_size, family.vocab_size + table.shape[0], dtype=np.int32),
                          text[: len(text) - table.shape[0]]])
    rows.append(decode_times(engine, "request with its table", ids, table, args.steps))
    del table
    vision.close()
    rows.append(decode_times(engine, "thread closed", text, None, args.steps))
    print(f"\n{args.preset} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"one request of {len(text)} prompt tokens, {args.steps} decode steps")
    print("| phase | engine.step() ms | decode graph ms |\n|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['step_ms']:.3f} | {r['graph_ms']:.3f} |")


if __name__ == "__main__":
    main()
