"""`python -m openai_frontend --workers N` against a fake Triton gRPC server: several processes on one port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from benchmarks.observe import frontend_workers
from tests.unit.fake_triton_grpc import FakeTriton, with_fake_triton

MESSAGES = ({"role": "user", "content": "hello"},)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_workers(url: str, port: int, *flags: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "openai_frontend", "--triton-url", url, "--model-name", "served", "--port",
               str(port), "--host", "127.0.0.1", "--workers", "2", "--log-level", "warning", *flags]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 60
    while True:  # both workers answer: each has its own pid, and /health is answered by either
        assert process.poll() is None, f"the frontend exited with {process.returncode}"
        if len(frontend_workers(process.pid)) >= 2:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return process
            except httpx.HTTPError:
                pass
        assert time.monotonic() < deadline, "the workers did not answer"
        time.sleep(0.2)


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_workers_share_the_inflight_limit_and_the_metrics_and_stop_together() -> None:
    """`--workers 2`: two processes serve the port; --max-inflight caps both together (a request held by one worker
    makes every other get 429, whichever worker takes it); /metrics on any worker counts every worker's requests;
    SIGTERM stops both, and a worker that dies stops the other with exit status 1; a supervisor killed outright takes
    its workers with it."""

    async def scenario(fake: FakeTriton, url: str) -> None:
        def run() -> None:
            port = _free_port()
            process = _start_workers(url, port, "--bls-model", "ok", "--max-inflight", "1")
            base = f"http://127.0.0.1:{port}"
            body = {"model": "served", "messages": list(MESSAGES), "max_tokens": 4}
            try:
                workers = frontend_workers(process.pid)
                assert len(workers) == 2
                for _ in range(16):  # fresh connections: the kernel spreads them over the workers
                    done = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10)
                    assert done.status_code == 200 and done.json()["choices"][0]["message"]["content"] == "Hello"
                for _ in range(4):  # every scrape, whichever worker answers it, sees all 16
                    scraped = httpx.get(f"{base}/metrics", timeout=10).text
                    assert _metric(scraped, 'vlm_frontend_requests_total{endpoint="chat",status="200"}') == 16
                    assert _metric(scraped, "vlm_frontend_inflight_requests") == 0
            finally:
                process.terminate()
                assert process.wait(20) == 0
            assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)

            port = _free_port()
            process = _start_workers(url, port, "--bls-model", "slow", "--max-inflight", "1")
            base = f"http://127.0.0.1:{port}"
            try:
                with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                                  timeout=30) as held:  # "slow" holds its stream open
                    lines = held.iter_lines()  # kept: a dropped iterator closes the stream
                    assert next(lines).startswith("data: ")
                    statuses = [httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10).status_code
                                for _ in range(8)]
                    assert statuses == [429] * 8
                    scraped = httpx.get(f"{base}/metrics", timeout=10).text
                    assert _metric(scraped, "vlm_frontend_inflight_requests") == 1
                victim = min(frontend_workers(process.pid))
                os.kill(victim, signal.SIGKILL)
                assert process.wait(30) == 1
            finally:
                if process.poll() is None:
                    process.kill()

            port = _free_port()  # a supervisor killed outright takes its workers with it
            process = _start_workers(url, port, "--bls-model", "ok")
            workers = frontend_workers(process.pid)
            process.kill()
            process.wait(10)
            deadline = time.monotonic() + 20
            while any(os.path.exists(f"/proc/{pid}") for pid in workers):
                assert time.monotonic() < deadline, "workers outlived their supervisor"
                time.sleep(0.1)

        await asyncio.to_thread(run)

    with_fake_triton(scenario, timeout_s=120)
