"""Process-wide settings of the hot loops (planning, imagination): the C allocator's reuse of freed memory.

A planning step allocates and frees tensors of a few megabytes each (a (5 members, 1,700 agent-plans, 384) bfloat16
activation is 6.5 MB). glibc's malloc serves such sizes with fresh `mmap`s, or returns the freed top of its heap to the
kernel, so the next step touches new pages and pays a page fault per 4 KiB before its kernel does any arithmetic.
Raising the mmap and trim thresholds keeps that memory in the process for reuse (the resident size stays near the
peak working set). PyTorch's CPU performance tuning guide suggests jemalloc or tcmalloc for the same reason; this
needs no other library. Knows nothing of torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

KEEP_BYTES = 1 << 30
"""[bytes] freed memory up to this much stays in the process (`M_TRIM_THRESHOLD`), and blocks below
`MMAP_THRESHOLD` come from the heap rather than from fresh mappings."""
MMAP_THRESHOLD = 32 << 20
"""[bytes] glibc's largest allowed mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2)."""
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
_state = {"done": False, "applied": False}


def keep_freed_memory() -> bool:
    """Tune glibc's malloc to keep freed memory for reuse (see the module docstring); once per process, a no-op
    off Linux, on another C library, or with the environment variable DRIVE_MBRL_KEEP_FREED_MEMORY=0. It applies
    to the whole process (up to KEEP_BYTES of freed memory stay resident). Returns whether the settings are in
    effect."""
    if _state["done"]:
        return _state["applied"]
    _state["done"] = True
    if not sys.platform.startswith("linux") or os.environ.get("DRIVE_MBRL_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, KEEP_BYTES), (_M_TOP_PAD, 64 << 20))
    results = [mallopt(param, value) == 1 for param, value in settings]  # each tried, whatever the others gave
    _state["applied"] = all(results)
    return _state["applied"]
