"""Find a tritonserver and prepare its Python backend for the running interpreter.

Order: `$VLM_TRITON_TRITONSERVER` (a path to the binary), a system install (`/opt/tritonserver`, as in NGC
images, or `tritonserver` on PATH), then the server that ships inside the `nvidia-pytriton` wheel. For the wheel's
server the Python backend needs the stub built for this interpreter next to `libtriton_python.so`; we assemble a
private backend directory (links to the wheel's files plus that stub) instead of writing into site-packages.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from vlm_triton.errors import SetupError

SYSTEM_ROOTS = (Path("/opt/tritonserver"),)


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends_dir: Path  # the directory holding python/ (and any other backends)
    source: str  # "env", "system" or "nvidia-pytriton"
    lib_dirs: tuple[Path, ...] = ()  # extra shared-library directories (the wheel's bundled libs)

    def environment(self, base: dict[str, str] | None = None, libpython_dir: Path | None = None) -> dict[str, str]:
        """Environment in which the Python backend stub embeds this interpreter.

        The stub runs `python3` from PATH in isolated mode and needs libpython on LD_LIBRARY_PATH. Putting the
        interpreter's whole LIBDIR there (/usr/lib/x86_64-linux-gnu for a distribution Python) would also put that
        directory's other libraries ahead of the ones torch ships: on a GPU image with a system cuDNN, torch in the
        stub then ran with the older cuDNN and lost its cuDNN attention kernels (2.7x slower decode at a 4k KV).
        So pass `libpython_dir` (see `libpython_dir`): a directory holding only a link to libpython.
        """
        env = dict(os.environ if base is None else base)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
        first = str(libpython_dir) if libpython_dir is not None else sysconfig.get_config_var("LIBDIR") or ""
        parts = [first, *map(str, self.lib_dirs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in parts if p)
        return env


def libpython_dir(work_dir: Path) -> Path | None:
    """`work_dir`/libpython with a link to this interpreter's shared libpython (None when it has none in
    LIBDIR, e.g. a static build: then the caller's LD_LIBRARY_PATH must provide it)."""
    name = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    source = Path(sysconfig.get_config_var("LIBDIR") or "") / name
    if not source.is_file():
        return None
    directory = Path(work_dir) / "libpython"
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / name
    if not link.exists():
        link.symlink_to(source.resolve())
    return directory


def _pytriton_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def find_tritonserver() -> TritonInstall:
    override = os.environ.get("VLM_TRITON_TRITONSERVER")
    if override:
        binary = Path(override)
        if not binary.is_file():
            raise SetupError(f"VLM_TRITON_TRITONSERVER={override} is not a file; point it at the tritonserver binary")
        return TritonInstall(binary, binary.parent.parent / "backends", "env")
    for root in SYSTEM_ROOTS:
        if (root / "bin" / "tritonserver").is_file():
            return TritonInstall(root / "bin" / "tritonserver", root / "backends", "system")
    on_path = shutil.which("tritonserver")
    if on_path:
        binary = Path(on_path).resolve()
        return TritonInstall(binary, binary.parent.parent / "backends", "system")
    root = _pytriton_root()
    if root is not None:
        libs = root.parent.parent / "nvidia_pytriton.libs"  # the stub's RPATH assumes its original location
        return TritonInstall(root / "bin" / "tritonserver", root / "backends", "nvidia-pytriton", (libs,))
    raise SetupError(
        "no tritonserver found: install the project (pip install -e . brings nvidia-pytriton, which ships one), "
        "use an NGC Triton image, or set VLM_TRITON_TRITONSERVER to the binary"
    )


def prepare_backends(install: TritonInstall, work_dir: Path) -> Path:
    """Return a backend directory whose Python backend has the stub for this interpreter."""
    if install.source != "nvidia-pytriton":
        return install.backends_dir  # system installs ship their own stub
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = install.binary.parent.parent / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise SetupError(f"nvidia-pytriton ships no Python backend stub for Python {version}; use Python 3.8-3.13")
    python_dir = work_dir / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    source_dir = install.backends_dir / "python"
    for item in source_dir.iterdir():
        if item.name == "__pycache__":
            continue
        link = python_dir / item.name
        if not link.exists():
            link.symlink_to(item)
    target = python_dir / "triton_python_backend_stub"
    if not target.exists() or target.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, target)
    return work_dir / "backends"
