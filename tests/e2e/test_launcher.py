"""Issue #2: the launcher starts the real tritonserver, serves a Python-backend model, leaves nothing behind;
bad set-up gives a one-line error that says what to do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from vlm_triton.errors import SetupError
from vlm_triton.server import triton_install
from vlm_triton.server.triton_process import TritonPorts, TritonServer, free_port, free_ports

ECHO_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN")
                .as_numpy() * 2)]) for r in requests]
'''
ECHO_CONFIG = '''name: "echo"
backend: "python"
max_batch_size: 0
input [{ name: "IN" data_type: TYPE_FP32 dims: [-1] }]
output [{ name: "OUT" data_type: TYPE_FP32 dims: [-1] }]
instance_group [{ kind: KIND_CPU count: 1 }]
'''


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture()
def echo_repo(tmp_path: Path) -> Path:
    (tmp_path / "echo" / "1").mkdir(parents=True)
    (tmp_path / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    (tmp_path / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    return tmp_path


def test_launcher_serves_a_python_model_and_leaves_no_process(echo_repo: Path) -> None:
    server = TritonServer(echo_repo, ports=TritonPorts.any_free())
    with server:
        pgid = server._process.pid  # the server leads its own process group, backend stubs included
        client = grpcclient.InferenceServerClient(server.grpc_url)
        tensor = grpcclient.InferInput("IN", [3], "FP32")
        tensor.set_data_from_numpy(np.array([1, 2, 3], dtype=np.float32))
        assert client.infer("echo", [tensor]).as_numpy("OUT").tolist() == [2, 4, 6]
        assert _group_alive(pgid)
    assert not _group_alive(pgid)
    assert not server.is_running()


def test_busy_port_is_a_one_line_error(echo_repo: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        server = TritonServer(echo_repo, ports=TritonPorts(busy, *free_ports(2)))
        with pytest.raises(SetupError, match=rf"port {busy} is in use.*--http-port"):
            server.start()


def test_missing_repository_is_a_setup_error(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="does not exist"):
        TritonServer(tmp_path / "nope", ports=TritonPorts.any_free()).start()


def test_no_tritonserver_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLM_TRITON_TRITONSERVER", raising=False)
    monkeypatch.setattr(triton_install, "SYSTEM_ROOTS", ())
    monkeypatch.setattr(triton_install.shutil, "which", lambda name: None)
    monkeypatch.setattr(triton_install, "_pytriton_root", lambda: None)
    with pytest.raises(SetupError, match="no tritonserver found.*VLM_TRITON_TRITONSERVER"):
        triton_install.find_tritonserver()
    monkeypatch.setenv("VLM_TRITON_TRITONSERVER", "/no/such/tritonserver")
    with pytest.raises(SetupError, match="is not a file"):
        triton_install.find_tritonserver()


def test_startup_failure_shows_the_log_tail(tmp_path: Path) -> None:
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nthis is not pbtxt\n')
    server = TritonServer(tmp_path, ports=TritonPorts.any_free())
    server.start()
    with pytest.raises(SetupError, match="(?s)tritonserver exited.*log tail"):
        server.wait_ready(120)
    server.stop()


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--checkpoint", "/no/such/checkpoint"], "checkpoint directory /no/such/checkpoint does not exist"),
        (["render", "--checkpoint", "/tmp", "--out", "/tmp/x"], "has no config.json"),
        (["render", "--deployment", "/no/such.toml"], "deployment file /no/such.toml does not exist"),
    ],
)
def test_cli_setup_errors_are_one_line(args: list[str], message: str) -> None:
    port = str(free_port())
    if args[0] == "serve":
        args = [*args, "--port", port]
    proc = subprocess.run([sys.executable, "-m", "vlm_triton.cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_serve_port_busy_is_one_line() -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "vlm_triton.cli", "serve", "--port", str(port)],
            capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: port {port} is in use; stop the process holding it or pass --port <free port>"
