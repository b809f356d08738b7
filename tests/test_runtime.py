"""runtime.keep_freed_memory: freed blocks of a few megabytes are reused without new page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

FAULTS = """
import ctypes, ctypes.util, resource, sys
if sys.argv[1] == "keep":
    from drive_mbrl.runtime import keep_freed_memory
    assert keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 8 << 20

def step():  # like a planning step: a few activations of 8 MB, written, then all freed
    blocks = [libc.malloc(size) for _ in range(4)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    """Ten steps of 4 x 8 MB touch 81,920 fresh 4 KiB pages when glibc hands the memory back after each step
    (its default mmap and trim thresholds); with the settings, none."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    assert faults["keep"] < 100, faults
    assert faults["default"] > 20 * max(faults["keep"], 100), faults
