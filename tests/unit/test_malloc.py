"""`keep_freed_memory`: a stub's large per-request buffers are reused instead of unmapped and faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from vlm_triton.triton.malloc import keep_freed_memory
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(5_000_000).sum()  # 40 MB: above glibc's largest automatic mmap threshold (32 MiB)
before = faults()
for _ in range(10):  # a request: a large buffer, written, freed
    np.ones(5_000_000).sum()
print((faults() - before) / 10)
"""


def faults_per_request(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc mallopt")
def test_large_buffers_are_reused_instead_of_faulted_in_again() -> None:
    default, kept = faults_per_request("default"), faults_per_request("keep")
    assert default >= 20  # every request faults its buffer in again (~9,800 pages of 4 KiB, fewer with huge pages)
    assert kept <= default / 20
