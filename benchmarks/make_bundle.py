"""Assemble the offline bundle a GPU host without network needs to run the benchmark (<= 64 MiB).

    .venv/bin/python benchmarks/make_bundle.py            # writes .bundle/ (git-ignored)

Contents of `.bundle/`:
  triton.tar.xz   tritonserver 2.51 from the nvidia-pytriton 0.7.0 wheel, in the wheel's own layout
                  (pytriton/tritonserver/{bin,backends,python_backend_stubs/3.12}, nvidia_pytriton.libs without
                  libpython3.13), so that `vlm_triton.server.triton_install` finds it once it is unpacked into a
                  site-packages folder (an empty pytriton/__init__.py makes `pytriton` importable there).
  perf.tar.xz     perf_analyzer 2.51 (from tritonclient[all]'s wheel data, beside this interpreter) and the libb64 it
                  links (GPU images lack it), as bin/perf_analyzer and lib/; about 4.5 MiB.
  wheels.tar.xz   numpy 1.26.4 (cp312; the Triton Python stub garbles BYTES tensors with numpy 2) and the small
                  packages the stack needs that a GPU image with torch/transformers may lack (fastapi, starlette,
                  pydantic(-core), uvicorn, uvloop, httptools, tritonclient, python-rapidjson, protobuf<5, ...);
                  pystack with --with-pystack, py-spy with --with-pyspy. The wheels are downloaded to
                  .bundle-cache/wheels and stored here re-zipped without compression, then xz -9 over all of them:
                  17 MiB instead of the 28 MiB of the downloaded (deflated) wheels, which makes room for perf.tar.xz.
                  Each file inside a wheel is unchanged, so its RECORD hashes hold and pip installs it as downloaded.
On the GPU host `benchmarks/gpu_setup.sh` installs them into the interpreter that holds torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = "3.12"
# name==version: pinned to what the project's own venv runs (pyproject.toml), cp312 / manylinux x86_64
WHEELS = [
    "numpy==1.26.4",
    "protobuf==4.25.9",
    "tritonclient==2.51.0",
    "python-rapidjson==1.25",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "pydantic==2.14.3",
    "pydantic-core==2.50.4",
    "annotated-types==0.8.0",
    "annotated-doc==0.0.7",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "uvicorn==0.54.0",
    "uvloop==0.23.0",  # the frontend's event loop (openai_frontend --loop auto), 4.3 MiB
    "httptools==0.9.0",  # the frontend's HTTP parser (--http auto)
    "prometheus-client==0.26.0",
    "opentelemetry-api==1.45.2",  # fastapi >= 0.16x imports it
    "pytest==9.2.0",  # the GPU-only tests (tests/unit/test_engine.py -k cuda) run on the GPU host
    "pluggy==1.7.0",
    "iniconfig==2.3.1",
    "pygments==2.21.0",
]
# --with-pystack: every thread of a stuck stub, native ones too (benchmarks/stack.py native_stacks), 6.4 MiB. Left
# out by default since the stalls of items 7 and 26 were fixed: the bundle must stay under 64 MiB with the tree.
PYSTACK = "pystack==1.7.2"
# --with-pyspy: `stack_variants --profile MODEL`, where a stub's GIL time goes (py-spy --gil), 2.9 MiB. Left out by
# default for the same reason: build a bundle with it (and without perf.tar.xz if need be) for a profiling call.
PYSPY = "py-spy==0.4.3"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_5_x86_64"]


def pytriton_site() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nvidia-pytriton is not installed in this interpreter (pip install nvidia-pytriton==0.7.0)")
    return Path(next(iter(spec.submodule_search_locations))).parent


def build_triton(out: Path, py: str) -> Path:
    site = pytriton_site()
    root = site / "pytriton" / "tritonserver"
    target = out / "triton.tar.xz"

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = info.name
        if "__pycache__" in name or "/libpython3" in name:  # pytriton's libpython3.13 (hashed name): nothing links it
            return None
        if "/python_backend_stubs/" in name and f"/python_backend_stubs/{py}" not in name:
            return None
        return info

    with tarfile.open(target, "w:xz", preset=6) as tar:
        init = out / "_pytriton_init.py"
        init.write_text('"""tritonserver parts of nvidia-pytriton 0.7.0 (benchmark bundle)."""\n')
        tar.add(init, "pytriton/__init__.py")
        init.unlink()
        for sub in ("bin", "backends", f"python_backend_stubs/{py}"):
            tar.add(root / sub, f"pytriton/tritonserver/{sub}", filter=keep)
        tar.add(site / "nvidia_pytriton.libs", "nvidia_pytriton.libs", filter=keep)
    return target


def build_perf(out: Path) -> Path | None:
    """perf_analyzer + libb64.so.0d, xz -9: the Triton-level view of the GPU run (benchmarks/perf_bls.py)."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.is_file():
        binary = Path(shutil.which("perf_analyzer") or "")
    libb64 = next(iter(sorted(Path("/lib/x86_64-linux-gnu").glob("libb64.so.0d*"))), None)
    if not binary.is_file() or libb64 is None:
        print("perf_analyzer or libb64 not found here: perf.tar.xz left out (the GPU run skips the perf_analyzer view)")
        return None
    target = out / "perf.tar.xz"
    with tarfile.open(target, "w:xz", preset=9) as tar:
        tar.add(binary.resolve(), "bin/perf_analyzer")
        tar.add(libb64.resolve(), "lib/libb64.so.0d")
    return target


def slim_tritonclient(wheel: Path) -> None:
    """Drop perf_analyzer/perf_client (2 x 20 MB) from the tritonclient wheel: the stack needs only its Python
    gRPC client, and the bundle must stay under 64 MiB. (perf_analyzer also needs libb64, absent on GPU images.)"""
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if ".data/data/bin/" in item.filename:
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True) if b".data/data/bin/" not in line)
            dst.writestr(item, data)
    slim.replace(wheel)


def download_wheels(dest: Path, py: str, extras: tuple[str, ...] = ()) -> list[Path]:
    """The wheels in `dest` (a cache: pip skips those already there), plus the optional ones named in `extras`
    (PYSTACK, PYSPY); optional wheels not asked for are removed from it. Returns the wheels to bundle."""
    dest.mkdir(parents=True, exist_ok=True)
    for spec in (PYSTACK, PYSPY):
        if spec not in extras:
            for old in dest.glob(f"{spec.split('==')[0].replace('-', '_')}-*.whl"):
                old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", py,
           "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + WHEELS + list(extras), check=True)
    for wheel in dest.glob("tritonclient-*.whl"):
        slim_tritonclient(wheel)
    return sorted(dest.glob("*.whl"))


def stored_copy(wheel: Path, target: Path) -> None:
    """`wheel` re-zipped without compression (every member's bytes and metadata as they were), so that xz over all
    the wheels sees their contents instead of deflate streams."""
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename), compress_type=zipfile.ZIP_STORED)


def build_wheels(out: Path, wheels: list[Path]) -> Path:
    """out/wheels.tar.xz: the stored copies of `wheels` (rebuilt when the set of wheels changed; xz -9 takes about
    a minute on 2 cores)."""
    target, listing = out / "wheels.tar.xz", out / ".wheels.txt"
    names = "\n".join(w.name for w in wheels) + "\n"
    if target.is_file() and listing.is_file() and listing.read_text() == names:
        return target
    listing.unlink(missing_ok=True)  # written back only once the archive is whole
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(target, "w:xz", preset=9) as tar:
        for wheel in wheels:
            stored = Path(tmp) / wheel.name
            stored_copy(wheel, stored)
            tar.add(stored, wheel.name)
            stored.unlink()
    listing.write_text(names)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".bundle")
    ap.add_argument("--python", default=PY, help="the GPU host's Python (major.minor), default %(default)s")
    ap.add_argument("--cache", type=Path, default=ROOT / ".bundle-cache", help="where the wheels are downloaded")
    ap.add_argument("--force", action="store_true", help="rebuild triton.tar.xz even if it exists (xz: minutes)")
    ap.add_argument("--with-pystack", action="store_true", help="add pystack (stall hunts; 6.4 MiB)")
    ap.add_argument("--with-pyspy", action="store_true", help="add py-spy (stack_variants --profile; 2.9 MiB)")
    ap.add_argument("--without-perf", action="store_true",
                    help="leave perf_analyzer out (4.5 MiB; the harness skips its phase): room for --with-pyspy")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.force or not (args.out / "triton.tar.xz").is_file():
        print("wrote", build_triton(args.out, args.python))
    if args.without_perf:
        (args.out / "perf.tar.xz").unlink(missing_ok=True)
    elif args.force or not (args.out / "perf.tar.xz").is_file():
        print("wrote", build_perf(args.out))
    extras = tuple(spec for spec, wanted in ((PYSTACK, args.with_pystack), (PYSPY, args.with_pyspy)) if wanted)
    wheels = download_wheels(args.cache / "wheels", args.python, extras)
    shutil.rmtree(args.out / "wheels", ignore_errors=True)  # the layout before wheels.tar.xz
    print("wrote", build_wheels(args.out, wheels))
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    for f in sorted(args.out.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            print(f"{f.stat().st_size / 2**20:8.1f} MiB  {f.relative_to(args.out)}")
    print(f"{total / 2**20:8.1f} MiB  total (the device tool carries at most 64 MiB with the working tree)")
    if total > 62 * 2**20:
        raise SystemExit("bundle too large")


if __name__ == "__main__":
    main()
