"""Where the stack's per-token time goes for long and image prompts: the same prompts through the `llm` model
directly (gRPC streaming, no BLS) and through the `bls`, one request at a time, on the benchmark's model.

    python -m benchmarks.probe_tpot --preset internvl3-1b --out probe-out [--bls-detokenize inline]

Cases: llm with W2's ids (512), with a text prompt as long as W1's (3,401 ids), with W1's ids and a random prompt
table sent by the client (host memory); bls with W2, the long text, W1 (13 tiles) and W3. Prints, per case, TTFT and
the time per token after the first (from response arrival times), median of the requests.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from benchmarks.models import make_model
from benchmarks.probe_stack import tensor
from benchmarks.stack import Stack, deployment
from benchmarks.workloads import Workload, make_workloads, prepare_workloads
from vlm_triton.families import open_family


def timed_stream(url: str, model: str, inputs: list[grpcclient.InferInput], count_output: str,
                 timeout_s: float = 120.0) -> dict[str, Any]:
    """One streaming request: TTFT and ms per token after the first, counting tokens in `count_output`."""
    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((time.perf_counter(), result, error)))
    t0 = time.perf_counter()
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    arrivals: list[tuple[float, int]] = []
    try:
        while True:
            t, result, error = answers.get(timeout=timeout_s)
            if error is not None:
                return {"error": str(error)}
            response = result.get_response()
            out = result.as_numpy(count_output)
            n = 0 if out is None else (int(out.size) if count_output == "output_ids" else int(out.reshape(-1)[0]))
            if n:
                arrivals.append((t, n))
            if response.parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    if count_output == "completion_tokens":  # cumulative counts -> per response
        arrivals = [(t, n - (arrivals[i - 1][1] if i else 0)) for i, (t, n) in enumerate(arrivals)]
    tokens = sum(n for _, n in arrivals)
    ttft = (arrivals[0][0] - t0) * 1e3
    tpot = (arrivals[-1][0] - arrivals[0][0]) * 1e3 / max(tokens - arrivals[0][1], 1)
    return {"ttft_ms": ttft, "tpot_ms": tpot, "tokens": tokens, "responses": len(arrivals)}


def llm_inputs(ids: np.ndarray, out_tokens: int, table: np.ndarray | None, table_dtype: str = "BF16"
               ) -> list[grpcclient.InferInput]:
    scalar = lambda name, v, dt, npdt: tensor(name, np.array([[v]], dtype=npdt), dt)
    inputs = [
        tensor("input_ids", ids.reshape(1, -1).astype(np.int32), "INT32"),
        scalar("input_lengths", ids.shape[0], "INT32", np.int32),
        scalar("request_output_len", out_tokens, "INT32", np.int32),
        scalar("end_id", -1, "INT32", np.int32),
        scalar("streaming", True, "BOOL", np.bool_),
    ]
    if table is not None:
        inputs.append(tensor("prompt_embedding_table", table.astype(np.float16 if table_dtype == "FP16" else np.float32),
                             table_dtype))
        inputs.append(scalar("prompt_vocab_size", table.shape[1], "INT32", np.int32))
    return inputs


def bls_inputs(messages: list[dict[str, Any]], out_tokens: int) -> list[grpcclient.InferInput]:
    return [
        tensor("messages", np.array([json.dumps(messages).encode()], dtype=object), "BYTES"),
        tensor("max_tokens", np.array([out_tokens], np.int32), "INT32"),
        tensor("stream", np.array([True]), "BOOL"),
        tensor("ignore_eos", np.array([True]), "BOOL"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="internvl3-1b")
    ap.add_argument("--out", type=Path, default=Path("probe-out"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/probe-tpot"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--out-tokens", type=int, default=128)
    ap.add_argument("--bls-detokenize", default="postprocess")
    ap.add_argument("--bls-instances", type=int, default=1)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = make_model(args.preset, args.work / f"ckpt-{args.preset}")
    media = args.work / "media"
    ws = make_workloads(media)
    prepare_workloads(ckpt, ws, media, w2_prompt_tokens=512)
    ws["T1"] = Workload("T1", "text as long as W1", [{"role": "user", "content": ""}], args.out_tokens)
    prepare_workloads(ckpt, {"T1": ws["T1"]}, media, text_tokens={"T1": ws["W1"].prompt_tokens})
    family = open_family(ckpt)
    cfg = deployment(ckpt, media, max_slots=64, max_seq_len=4096, device=args.device, instances=4)
    cfg = cfg.replace(triton={"bls_detokenize": args.bls_detokenize, "bls_instances": args.bls_instances})
    stack = Stack.start(cfg, args.work / "stack", args.device.startswith("cuda"), log_dir=args.out)
    rows: list[dict[str, Any]] = []
    try:
        stack.server.wait_ready(600)
        url = stack.server.grpc_url
        w1 = ws["W1"]
        rng = np.random.default_rng(0)
        image_rows = int((w1.input_ids >= family.vocab_size).sum())
        hidden = family.hidden_size
        table = (rng.standard_normal((1, image_rows, hidden)) * 0.02).astype(np.float32)
        cases = [
            ("llm", "W2 (512 text)", llm_inputs(ws["W2"].input_ids, args.out_tokens, None), "output_ids"),
            ("llm", f"T1 ({ws['T1'].prompt_tokens} text)", llm_inputs(ws["T1"].input_ids, args.out_tokens, None),
             "output_ids"),
            ("llm", "W1 ids + client table", llm_inputs(w1.input_ids, args.out_tokens, table, cfg.tensor_dtypes["EMBED"]), "output_ids"),
            ("bls", "W2", bls_inputs(ws["W2"].messages, args.out_tokens), "completion_tokens"),
            ("bls", "T1", bls_inputs(ws["T1"].messages, args.out_tokens), "completion_tokens"),
            ("bls", "W1", bls_inputs(w1.messages, args.out_tokens), "completion_tokens"),
            ("bls", "W3", bls_inputs(ws["W3"].messages, args.out_tokens), "completion_tokens"),
            ("llm", "W2 (512 text) again", llm_inputs(ws["W2"].input_ids, args.out_tokens, None), "output_ids"),
        ]
        print(f"config: bls_detokenize={args.bls_detokenize} bls_instances={args.bls_instances}", flush=True)
        print("\n| model | prompt | TTFT ms | ms/token after the first | responses/request |\n|---|---|---|---|---|",
              flush=True)
        for model, label, inputs, count in cases:
            runs = [timed_stream(url, model, inputs, count) for _ in range(args.requests + 1)][1:]  # first: warm-up
            errors = [r["error"] for r in runs if "error" in r]
            if errors:
                row = {"model": model, "prompt": label, "error": errors[0]}
                print(f"| {model} | {label} | error: {errors[0][:200]} | | |", flush=True)
            else:
                row = {"model": model, "prompt": label,
                       **{k: statistics.median(r[k] for r in runs) for k in ("ttft_ms", "tpot_ms", "responses")}}
                print(f"| {model} | {label} | {row['ttft_ms']:.1f} | {row['tpot_ms']:.2f} | {row['responses']:.0f} |",
                      flush=True)
            rows.append(row)
    finally:
        (args.out / "probe_tpot.json").write_text(json.dumps(rows, indent=1))
        stack.stop()


if __name__ == "__main__":
    main()
