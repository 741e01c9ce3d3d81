"""Start, wait for, and stop a tritonserver process (used by the serve command and by test fixtures)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from vlm_triton.errors import SetupError
from vlm_triton.server.triton_install import TritonInstall, find_tritonserver, libpython_dir, prepare_backends

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def any_free(cls) -> TritonPorts:
        return cls(*free_ports(3))

    def check_free(self, host: str = "127.0.0.1") -> None:
        for flag, port in (("--http-port", self.http), ("--grpc-port", self.grpc), ("--metrics-port", self.metrics)):
            if not port_is_free(port, host):
                raise SetupError(f"port {port} is in use; stop the process holding it or pass {flag} <free port>")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all are, so the kernel cannot hand out one port twice
    (tritonserver refuses to start when two of its services share a port)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class TritonServer:
    """A tritonserver child process. Use as a context manager, or call start()/stop()."""

    model_repository: Path
    ports: TritonPorts = field(default_factory=TritonPorts)
    log_file: Path | None = None
    extra_args: tuple[str, ...] = ()
    exit_timeout_s: int = 5
    install: TritonInstall | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _work_dir: Path | None = field(default=None, init=False, repr=False)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports.http}"

    def command(self, backends_dir: Path) -> list[str]:
        install = self.install or find_tritonserver()
        return [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends_dir}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
            *self.extra_args,
        ]

    def start(self) -> "TritonServer":
        if not Path(self.model_repository).is_dir():
            raise SetupError(f"model repository {self.model_repository} does not exist; render one first")
        self.ports.check_free()
        install = self.install or find_tritonserver()
        self.install = install
        self._work_dir = Path(tempfile.mkdtemp(prefix="vlm-triton-"))
        backends = prepare_backends(install, self._work_dir)
        if self.log_file is None:
            self.log_file = self._work_dir / "tritonserver.log"
        log = open(self.log_file, "wb")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            self.command(backends),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=install.environment(libpython_dir=libpython_dir(self._work_dir)),
            preexec_fn=_detach_and_die_with_parent,
        )
        log.close()
        return self

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise SetupError(f"tritonserver exited (code {code}) before it was ready; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise SetupError(f"tritonserver was not ready after {timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_file is None or not Path(self.log_file).exists():
            return "(no log)"
        return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-lines:])

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        proc = self._process
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc.pid, signal.SIGKILL)  # stubs left in the group, if any
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._process = None

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _detach_and_die_with_parent() -> None:
    """Runs in the child: its own process group (so stop() reaches the backend stubs too), and SIGTERM when the
    launching process dies, so a killed test run or CLI leaves no server behind."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
