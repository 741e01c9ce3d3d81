"""The stub's environment: libpython reachable without putting the interpreter's whole LIBDIR (and the system
libraries in it, such as an older cuDNN) ahead of torch's own libraries."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from vlm_triton.server.triton_install import TritonInstall, libpython_dir


def test_libpython_dir_holds_only_libpython(tmp_path: Path) -> None:
    directory = libpython_dir(tmp_path)
    assert directory is not None  # CI's Python is a shared build
    (link,) = directory.iterdir()
    assert link.name == sysconfig.get_config_var("INSTSONAME")
    assert link.resolve().is_file()


def test_environment_puts_the_private_dir_first_and_not_libdir(tmp_path: Path) -> None:
    install = TritonInstall(Path("/x/bin/tritonserver"), Path("/x/backends"), "nvidia-pytriton", (Path("/wheel/libs"),))
    private = libpython_dir(tmp_path)
    env = install.environment({"PATH": "/bin", "LD_LIBRARY_PATH": "/usr/local/nvidia/lib64"}, libpython_dir=private)
    parts = env["LD_LIBRARY_PATH"].split(":")
    assert parts == [str(private), "/wheel/libs", "/usr/local/nvidia/lib64"]
    assert sysconfig.get_config_var("LIBDIR") not in parts


def test_free_ports_are_distinct() -> None:
    from vlm_triton.server.triton_process import TritonPorts, free_ports

    for _ in range(20000):  # closing each socket before the next bind repeats a port in ~1 of 4,000 triples here
        assert len(set(free_ports(3))) == 3
    ports = TritonPorts.any_free()
    assert len({ports.http, ports.grpc, ports.metrics}) == 3
