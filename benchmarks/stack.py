"""The real stack for benchmarks: tritonserver with the rendered repository (torch profile) + the OpenAI frontend,
the same code path as `vlm-triton serve` (render_repository, TritonServer, `python -m openai_frontend`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.deploy.render import render_repository
from vlm_triton.server.frontend_process import start_frontend, stop_frontend
from vlm_triton.server.triton_process import TritonPorts, TritonServer, free_port

SERVED_NAME = "bench"
# frontend processes on a GPU host (session 20, docs/benchmarks.md item 48: W2 c=64 +5-10% tok/s, TTFT p50 120-146 ->
# 98 ms with 4 against 1); the CPU smoke run keeps one
GPU_FRONTEND_WORKERS = 4


def deployment(ckpt: Path, media_dir: Path, *, max_slots: int, max_seq_len: int, device: str = "auto",
               instances: int = 4) -> DeploymentConfig:
    return DeploymentConfig.from_dict({
        "model": {"checkpoint": str(Path(ckpt).resolve()), "served_name": SERVED_NAME},
        "engine": {"max_slots": max_slots, "max_seq_len": max_seq_len, "device": device, "cuda_graphs": True},
        "limits": {"allowed_local_media_dirs": [str(Path(media_dir).resolve())], "max_images": 4,
                   "default_max_tokens": 256},
        # a stalled stage fails its request (and dumps the bls stub's threads) before the load generator's 90 s
        "triton": {"preprocess_instances": instances, "postprocess_instances": instances,
                   "vision_max_batch_size": 64, "bls_stall_timeout_s": 60},
    })


def native_stacks(stub_pids: list[int], server_pid: int | None) -> list[str]:
    """Every thread of each stub with its C/C++ frames, those without Python too (e.g. the Python backend's
    parent-to-stub monitor thread), via `pystack remote --native-all`; and, where gdb exists, every thread of
    tritonserver itself. Empty when neither tool is installed (pystack comes in the GPU bundle)."""
    from benchmarks.perf_bls import find_tool

    out = []
    pystack, gdb = find_tool("pystack"), find_tool("gdb")
    for pid in stub_pids if pystack else []:
        run = subprocess.run([pystack, "remote", str(pid), "--native-all", "--no-color"], capture_output=True,
                             text=True, timeout=90, check=False)
        out.append(f"===== pystack --native-all {pid}\n{run.stdout}{run.stderr}")
    if gdb and server_pid is not None:
        run = subprocess.run([gdb, "-p", str(server_pid), "-batch", "-ex", "thread apply all bt"],
                             capture_output=True, text=True, timeout=120, check=False)
        out.append(f"===== gdb tritonserver {server_pid}\n{run.stdout[-400_000:]}{run.stderr[-2000:]}")
    elif server_pid is not None:
        out.append("===== tritonserver: no gdb on this host (its C++ threads are not shown)")
    return out


@dataclass
class Stack:
    server: TritonServer
    work: Path
    cfg: DeploymentConfig
    frontend: subprocess.Popen[bytes] | None = None
    base_url: str = ""

    log_dir: Path | None = None
    frontend_args: tuple[str, ...] = ()  # more `python -m openai_frontend` flags (e.g. --loop asyncio)
    frontend_workers: int = 1  # `--workers`: GPU_FRONTEND_WORKERS on a GPU host

    @classmethod
    def start(cls, cfg: DeploymentConfig, work: Path, gpu: bool, *, pools: bool = True, verbose: bool = False,
              log_dir: Path | None = None, server_args: tuple[str, ...] = (),
              frontend_args: tuple[str, ...] = ()) -> Stack:
        """Start tritonserver (not waiting for it): loading overlaps whatever the caller does next.

        Every stub dumps its threads into work/stacks-<model>-<pid>.txt on SIGUSR1 (VLM_TRITON_DUMP_DIR, read by
        the stages' common.enable_thread_dumps), so that a stuck stage can be inspected."""
        work.mkdir(parents=True, exist_ok=True)
        repo = render_repository(cfg, work / "model_repository")
        os.environ["VLM_TRITON_DUMP_DIR"] = str(work.resolve())  # inherited by tritonserver and its stubs
        extra: tuple[str, ...] = ()
        if gpu and pools:  # GPU tensors between Python-backend models travel through Triton's CUDA memory pool
            extra = ("--cuda-memory-pool-byte-size=0:2147483648", "--pinned-memory-pool-byte-size=1073741824")
        if verbose:
            extra += ("--log-verbose=1",)
        extra += server_args  # later flags win
        log_dir = log_dir or work
        log_dir.mkdir(parents=True, exist_ok=True)
        server = TritonServer(repo, ports=TritonPorts.any_free(),
                              log_file=log_dir / "tritonserver.log", extra_args=extra)
        server.start()
        return cls(server, work, cfg, log_dir=log_dir, frontend_args=frontend_args,
                   frontend_workers=GPU_FRONTEND_WORKERS if gpu else 1)

    def set_verbose(self, level: int) -> None:
        req = urllib.request.Request(f"http://{self.server.http_url}/v2/logging", method="POST",
                                     data=json.dumps({"log_verbose_level": level}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=5).read()
        except OSError as exc:
            print(f"could not set the log level: {exc}", flush=True)

    def stub_pids(self, model: str | None = None) -> list[int]:
        """The Python backend stubs of THIS server (its own process group: TritonServer starts it with setsid);
        with `model`, only that model's (the stub's command line names the model's folder)."""
        group = self.server._process.pid if self.server._process is not None else None
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmdline = (proc / "cmdline").read_bytes()
                    if (b"triton_python_backend_stub" in cmdline and group is not None
                            and os.getpgid(int(proc.name)) == group
                            and (model is None or f"/{model}/".encode() in cmdline)):
                        pids.append(int(proc.name))
                except (OSError, ProcessLookupError):
                    pass
        return pids

    def dump_stacks(self) -> str:
        """SIGUSR1 to the Python backend stubs of this server -- they dump their threads through faulthandler;
        returns all dumps."""
        group = self.server._process.pid if self.server._process is not None else None
        pids = self.stub_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGUSR1)
            except OSError:
                pass
        time.sleep(2)
        out = [f"stubs: {pids}"]
        gone = [f.name for f in self.work.glob("stacks-*.txt") if int(f.stem.rsplit("-", 1)[1]) not in pids]
        if gone:
            out.append(f"stubs no longer running (died; a crash leaves its threads in tritonserver.log): {gone}")
        for f in sorted(self.work.glob("stacks-*.txt")):
            out.append(f"===== {f.name}\n{f.read_text(errors='replace')}")
        out += native_stacks(pids, group)
        return "\n".join(out)

    def bls_check(self, messages: list[dict[str, Any]], timeout_s: float, max_tokens: int = 4) -> str:
        """One request straight to the BLS over gRPC (no frontend); returns 'ok ...' or what went wrong."""
        import queue

        import numpy as np
        import tritonclient.grpc as grpcclient

        from vlm_triton.contracts import BLS

        values: dict[str, Any] = {"messages": [json.dumps(messages)], "max_tokens": max_tokens, "stream": True,
                                  "ignore_eos": True}
        inputs = []
        for name, value in values.items():
            spec = BLS.input(name)
            arr = np.array([v.encode() for v in value] if spec.dtype == "BYTES" else [value],
                           dtype=spec.numpy_dtype)
            t = grpcclient.InferInput(name, list(arr.shape), spec.dtype)
            t.set_data_from_numpy(arr)
            inputs.append(t)
        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        responses: queue.Queue[Any] = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        n = 0
        t0 = time.perf_counter()
        try:
            client.async_stream_infer("bls", inputs, enable_empty_final_response=True)
            while True:
                r, e = responses.get(timeout=timeout_s)
                if e is not None:
                    return f"error: {e}"
                n += 1
                if r.get_response().parameters["triton_final_response"].bool_param:
                    return f"ok: {n} responses in {time.perf_counter() - t0:.2f} s"
        except queue.Empty:
            return f"timeout after {timeout_s} s with {n} responses"
        finally:
            try:
                client.stop_stream(cancel_requests=True)
            except TypeError:
                client.stop_stream()
            client.close()

    def wait(self, timeout_s: float) -> float:
        t = time.perf_counter()
        self.server.wait_ready(timeout_s)
        port = free_port()
        self.frontend = start_frontend(self.server.grpc_url, SERVED_NAME, port=port,
                                       log_file=(self.log_dir or self.work) / "frontend.log",
                                       extra_args=("--max-inflight", "512", "--workers", str(self.frontend_workers),
                                                   *self.frontend_args))  # later flags win
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return time.perf_counter() - t

    def metrics(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.server.ports.metrics}/metrics", timeout=5) as r:
                return r.read().decode()
        except OSError as exc:
            return f"(metrics unavailable: {exc})"

    def stop(self) -> None:
        if self.frontend is not None:
            stop_frontend(self.frontend)
        self.server.stop(timeout_s=15)

    def logs(self, lines: int = 60) -> dict[str, Any]:
        out = {"tritonserver": self.server.log_tail(lines)}
        f = (self.log_dir or self.work) / "frontend.log"
        if f.is_file():
            out["frontend"] = "\n".join(f.read_text(errors="replace").splitlines()[-lines:])
        return out
