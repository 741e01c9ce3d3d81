"""The real stack for benchmarks: tritonserver with the rendered repository (torch profile) + the OpenAI frontend,
the same code path as `vlm-triton serve` (render_repository, TritonServer, `python -m openai_frontend`)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.deploy.render import render_repository
from vlm_triton.server.triton_process import TritonPorts, TritonServer, free_port

SERVED_NAME = "bench"


def deployment(ckpt: Path, media_dir: Path, *, max_slots: int, max_seq_len: int, device: str = "auto",
               instances: int = 4) -> DeploymentConfig:
    return DeploymentConfig.from_dict({
        "model": {"checkpoint": str(Path(ckpt).resolve()), "served_name": SERVED_NAME},
        "engine": {"max_slots": max_slots, "max_seq_len": max_seq_len, "device": device, "cuda_graphs": True},
        "limits": {"allowed_local_media_dirs": [str(Path(media_dir).resolve())], "max_images": 4,
                   "default_max_tokens": 256},
        "triton": {"preprocess_instances": instances, "postprocess_instances": instances,
                   "vision_max_batch_size": 64},
    })


@dataclass
class Stack:
    server: TritonServer
    work: Path
    cfg: DeploymentConfig
    frontend: subprocess.Popen[bytes] | None = None
    base_url: str = ""

    @classmethod
    def start(cls, cfg: DeploymentConfig, work: Path, gpu: bool) -> "Stack":
        """Start tritonserver (not waiting for it): loading overlaps whatever the caller does next."""
        work.mkdir(parents=True, exist_ok=True)
        repo = render_repository(cfg, work / "model_repository")
        extra: tuple[str, ...] = ()
        if gpu:  # GPU tensors between Python-backend models travel through Triton's CUDA memory pool
            extra = ("--cuda-memory-pool-byte-size=0:2147483648", "--pinned-memory-pool-byte-size=1073741824")
        server = TritonServer(repo, ports=TritonPorts(free_port(), free_port(), free_port()),
                              log_file=work / "tritonserver.log", extra_args=extra)
        server.start()
        return cls(server, work, cfg)

    def wait(self, timeout_s: float) -> float:
        t = time.perf_counter()
        self.server.wait_ready(timeout_s)
        port = free_port()
        log = open(self.work / "frontend.log", "wb")  # noqa: SIM115
        self.frontend = subprocess.Popen(
            [sys.executable, "-m", "openai_frontend", "--triton-url", self.server.grpc_url, "--model-name",
             SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--max-inflight", "512"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if self.frontend.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("frontend did not start:\n" + (self.work / "frontend.log").read_text())
                time.sleep(0.3)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return time.perf_counter() - t

    def metrics(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.server.ports.metrics}/metrics", timeout=5) as r:
                return r.read().decode()
        except OSError as exc:
            return f"(metrics unavailable: {exc})"

    def stop(self) -> None:
        if self.frontend is not None and self.frontend.poll() is None:
            self.frontend.terminate()
            try:
                self.frontend.wait(10)
            except subprocess.TimeoutExpired:
                self.frontend.kill()
        self.server.stop(timeout_s=15)

    def logs(self, lines: int = 60) -> dict[str, Any]:
        out = {"tritonserver": self.server.log_tail(lines)}
        f = self.work / "frontend.log"
        if f.is_file():
            out["frontend"] = "\n".join(f.read_text(errors="replace").splitlines()[-lines:])
        return out
