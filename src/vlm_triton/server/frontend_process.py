"""Start the OpenAI frontend (`python -m openai_frontend`) as a child process and wait until it answers."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from vlm_triton.errors import SetupError


def start_frontend(
    grpc_url: str,
    served_name: str,
    *,
    port: int,
    host: str = "127.0.0.1",
    log_file: Path | None = None,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 60.0,
) -> subprocess.Popen[bytes]:
    """The frontend for the Triton server at `grpc_url`, serving `served_name`; returns once /health answers.

    Without `log_file` its output goes to this process's stdout/stderr."""
    command = [sys.executable, "-m", "openai_frontend", "--triton-url", grpc_url, "--model-name", served_name,
               "--host", host, "--port", str(port), *extra_args]
    if log_file is None:
        process = subprocess.Popen(command)
    else:
        with open(log_file, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s, process)
    except BaseException:
        stop_frontend(process)
        raise
    return process


def wait_http(url: str, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise SetupError(f"the OpenAI frontend exited with code {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SetupError(f"the OpenAI frontend did not answer {url} within {timeout_s:.0f} s") from None
            time.sleep(0.3)


def stop_frontend(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def running_frontend(grpc_url: str, served_name: str, *, port: int, log_file: Path | None = None,
                     extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """A frontend for the duration of the block; yields its base URL (http://127.0.0.1:PORT/v1)."""
    process = start_frontend(grpc_url, served_name, port=port, log_file=log_file, extra_args=extra_args)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_frontend(process)
