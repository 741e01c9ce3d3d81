"""The GPU bundle's wheels archive: each wheel stored uncompressed, byte for byte the same members, rebuilt only
when the set of wheels changes."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from benchmarks.make_bundle import build_wheels


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_wheels_are_stored_uncompressed_with_the_same_members(tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "bundle"
    cache.mkdir()
    out.mkdir()
    members = {"pkg/__init__.py": b"x = 1\n" * 500, "pkg-1.0.dist-info/RECORD": b"pkg/__init__.py,sha256=abc,3000\n"}
    wheels = [_wheel(cache / "pkg-1.0-py3-none-any.whl", members),
              _wheel(cache / "other-2.0-py3-none-any.whl", {"other.py": b"y = 2\n"})]
    target = build_wheels(out, wheels)
    unpacked = tmp_path / "unpacked"
    with tarfile.open(target) as tar:
        assert sorted(tar.getnames()) == sorted(w.name for w in wheels)
        tar.extractall(unpacked, filter="data")
    with zipfile.ZipFile(unpacked / "pkg-1.0-py3-none-any.whl") as z:
        assert z.testzip() is None
        assert {i.filename: z.read(i.filename) for i in z.infolist()} == members
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}


def test_the_archive_is_rebuilt_only_when_the_wheels_change(tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "bundle"
    cache.mkdir()
    out.mkdir()
    first = [_wheel(cache / "a-1-py3-none-any.whl", {"a.py": b"a"})]
    target = build_wheels(out, first)
    target.write_bytes(b"kept")  # a rebuild would replace it
    assert build_wheels(out, first).read_bytes() == b"kept"
    second = [*first, _wheel(cache / "b-1-py3-none-any.whl", {"b.py": b"b"})]
    with tarfile.open(build_wheels(out, second)) as tar:
        assert sorted(tar.getnames()) == ["a-1-py3-none-any.whl", "b-1-py3-none-any.whl"]
