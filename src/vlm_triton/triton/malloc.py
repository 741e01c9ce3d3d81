"""Keep a stub's freed memory for its next request instead of handing it back to the OS.

Measured (benchmarks/preprocess_stage.py, W1 with one image thread): inside the Triton stub every preprocess call
took ~4,800 minor page faults and 16 ms of system time (CPU machine; the H100 host's stub took 44 ms more than the
same `prepare` in a plain process), while a plain process doing the same work took ~110 faults. glibc returned the
request's large image buffers to the OS (munmap, or heap trimming) after each call and faulted them in again at the
next. With the mmap threshold above those buffers and a large trim threshold, the stub's faults went to 0 and its
system time to 2.5 ms per call. The cost: each stub keeps up to its peak request's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold_mib: int = 64, trim_threshold_mib: int = 512) -> bool:
    """Allocations below `mmap_threshold_mib` come from the heap (reused after free instead of unmapped); the heap
    is trimmed only when more than `trim_threshold_mib` are free at its top. True when glibc took both settings;
    False elsewhere (another C library: nothing is changed)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold_mib << 20))
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold_mib << 20))
    return bool(mmap_ok and trim_ok)
