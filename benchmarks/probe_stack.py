"""Diagnose a stack that starts but does not answer: run tritonserver with a tiny checkpoint on this machine's
device and call each stage directly (preprocess, llm, postprocess, then bls), each with a timeout. Every stage
dumps its Python threads to the server log every few seconds (VLM_TRITON_DUMP_THREADS).

    python -m benchmarks.probe_stack --out probe-out [--device cuda] [--no-cuda-graphs]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from vlm_triton.checkpoints.tiny import make_tiny_checkpoint
from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.deploy.render import render_repository
from vlm_triton.server.triton_process import TritonPorts, TritonServer


def tensor(name: str, value: np.ndarray, dtype: str) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(value.shape), dtype)
    t.set_data_from_numpy(value)
    return t


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
POOLS = ("--cuda-memory-pool-byte-size=0:2147483648", "--pinned-memory-pool-byte-size=1073741824")


def dump_stubs(out: Path) -> None:
    """SIGUSR1 to every Python-backend stub (each dumps its Python threads to the server log) and a listing of
    their threads' kernel wait states, for a request that hangs."""
    lines = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "triton_python_backend_stub" not in cmdline:
            continue
        lines.append(f"== pid {proc.name}: {cmdline[:160]}")
        for task in sorted((proc / "task").iterdir()):
            try:
                comm = (task / "comm").read_text().strip()
                wchan = (task / "wchan").read_text().strip()
                state = (task / "stat").read_text().split(") ")[1].split()[0]
                syscall = (task / "syscall").read_text().split()[0]
            except (OSError, IndexError):
                continue
            lines.append(f"   tid {task.name} {comm:16s} state {state} wchan {wchan} syscall {syscall}")
        try:
            os.kill(int(proc.name), signal.SIGUSR1)
        except OSError:
            pass
    (out / "stubs.txt").write_text("\n".join(lines) + "\n")
    time.sleep(2)


def stream(url: str, model: str, inputs: list[grpcclient.InferInput], timeout_s: float, on_timeout=None) -> str:
    """One streaming request; 'ok: ...', 'error ...' or 'TIMEOUT ...' (then `on_timeout()` runs first)."""
    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    t0 = time.monotonic()
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    got = []
    timed_out = False
    try:
        while True:
            result, error = answers.get(timeout=timeout_s)
            if error is not None:
                return f"error after {len(got)} responses: {error}"
            response = result.get_response()
            got.append({o.name: result.as_numpy(o.name).tolist() for o in response.outputs})
            if response.parameters["triton_final_response"].bool_param:
                return f"ok: {len(got)} responses in {1e3 * (time.monotonic() - t0):.0f} ms, last {str(got[-1])[:200]}"
    except queue.Empty:
        timed_out = True
        if on_timeout is not None:
            on_timeout()
        return f"TIMEOUT after {timeout_s:.0f} s with {len(got)} responses"
    finally:
        client.stop_stream(cancel_requests=timed_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("probe-out"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--timeout", type=float, default=45.0)
    parser.add_argument("--log-verbose", action="store_true", help="tritonserver --log-verbose=1")
    parser.add_argument("--bls-instances", type=int, default=1)
    parser.add_argument("--image", action="store_true", help="also BLS requests with an image (GPU prompt tables)")
    parser.add_argument("--pools", action="store_true", help="the benchmark's CUDA / pinned memory-pool flags")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(f"/tmp/probe-work-{args.device}")
    ckpt = make_tiny_checkpoint("internvl3", work / "ckpt", seed=0)
    cfg = DeploymentConfig.from_dict({
        "model": {"checkpoint": str(ckpt)},
        "engine": {"device": args.device, "cuda_graphs": not args.no_cuda_graphs, "max_slots": 4, "max_seq_len": 4096},
        "triton": {"preprocess_instances": 1, "postprocess_instances": 1, "bls_instances": args.bls_instances},
        "limits": {"allowed_local_media_dirs": [str(EXAMPLES)]},
    })
    repo = render_repository(cfg, work / "repo")
    os.environ.setdefault("VLM_TRITON_DUMP_THREADS", "15")
    (args.out / "trace").mkdir(exist_ok=True)
    os.environ.setdefault("VLM_TRITON_TRACE_DIR", str((args.out / "trace").resolve()))
    server = TritonServer(repo, ports=TritonPorts.any_free(),
                          log_file=args.out / f"tritonserver-{args.device}.log",
                          extra_args=(("--log-verbose=1",) if args.log_verbose else ()) + (POOLS if args.pools else ()))
    t0 = time.monotonic()
    with server:
        print(f"ready after {time.monotonic() - t0:.0f} s on device {cfg.device}", flush=True)
        url = server.grpc_url
        client = grpcclient.InferenceServerClient(url)
        messages = json.dumps([{"role": "user", "content": "Hello there"}]).encode()
        pre = client.infer("preprocess", [tensor("messages", np.array([messages], dtype=object), "BYTES")],
                           client_timeout=args.timeout)
        ids = pre.as_numpy("input_ids").reshape(1, -1).astype(np.int32)
        print(f"preprocess: ok, {ids.shape[1]} ids", flush=True)
        llm_inputs = [
            tensor("input_ids", ids, "INT32"),
            tensor("input_lengths", np.array([[ids.shape[1]]], np.int32), "INT32"),
            tensor("request_output_len", np.array([[4]], np.int32), "INT32"),
            tensor("streaming", np.array([[True]]), "BOOL"),
        ]
        print("llm streaming:", stream(url, "llm", llm_inputs, args.timeout), flush=True)
        llm_inputs[3] = tensor("streaming", np.array([[False]]), "BOOL")
        print("llm non-streaming:", stream(url, "llm", llm_inputs, args.timeout), flush=True)
        # Exactly what the BLS sends (text-only): bisects an llm-side fault from a BLS-side one.
        scalar = lambda name, v, dt, npdt: tensor(name, np.array([[v]], dtype=npdt), dt)  # noqa: E731
        bls_like = [
            tensor("input_ids", ids, "INT32"), scalar("input_lengths", ids.shape[1], "INT32", np.int32),
            scalar("request_output_len", 4, "INT32", np.int32), scalar("end_id", int(pre.as_numpy("end_id").reshape(-1)[0]), "INT32", np.int32),
            scalar("pad_id", int(pre.as_numpy("pad_id").reshape(-1)[0]), "INT32", np.int32),
            scalar("temperature", 0.0, "FP32", np.float32), scalar("runtime_top_k", 0, "INT32", np.int32),
            scalar("runtime_top_p", 1.0, "FP32", np.float32), scalar("repetition_penalty", 1.0, "FP32", np.float32),
            scalar("presence_penalty", 0.0, "FP32", np.float32), scalar("frequency_penalty", 0.0, "FP32", np.float32),
            scalar("streaming", True, "BOOL", np.bool_), scalar("exclude_input_in_output", True, "BOOL", np.bool_),
            scalar("return_num_input_tokens", True, "BOOL", np.bool_),
            tensor("stop_words_list", pre.as_numpy("stop_words_list").reshape(1, 2, -1).astype(np.int32), "INT32"),
            tensor("prompt_table_extra_ids", pre.as_numpy("prompt_table_extra_ids").reshape(1, -1).astype(np.uint64),
                   "UINT64"),
        ]
        print("llm with the BLS's inputs:", stream(url, "llm", bls_like, args.timeout), flush=True)
        post = client.infer("postprocess", [tensor("token_ids", np.array([[[72, 105]]], np.int32), "INT32")],
                            client_timeout=args.timeout)
        print("postprocess:", post.as_numpy("text").tolist(), flush=True)
        bls_inputs = [tensor("messages", np.array([messages], dtype=object), "BYTES"),
                      tensor("max_tokens", np.array([4], np.int32), "INT32")]
        print("bls:", stream(url, "bls", bls_inputs, args.timeout, lambda: dump_stubs(args.out)), flush=True)
        if args.image:
            image = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": (EXAMPLES / "house.png").as_uri()}},
                {"type": "text", "text": "Describe it."}]}]
            inputs = [tensor("messages", np.array([json.dumps(image).encode()], dtype=object), "BYTES"),
                      tensor("max_tokens", np.array([8], np.int32), "INT32")]
            for i in range(3):
                print(f"bls with an image #{i}:", stream(url, "bls", inputs, args.timeout, lambda: dump_stubs(args.out)),
                      flush=True)


if __name__ == "__main__":
    main()
