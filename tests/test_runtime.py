"""runtime.keep_freed_memory: freed blocks of a few megabytes are reused without new page faults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

FAULTS = """
import ctypes, ctypes.util, resource, sys
if sys.argv[1] == "keep":
    from drive_mbrl.runtime import keep_freed_memory
    if not keep_freed_memory():  # another C library
        sys.exit(3)
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
    env = {**os.environ, "DRIVE_MBRL_KEEP_FREED_MEMORY": "1"}
    runs = {mode: subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, env=env)
            for mode in ("default", "keep")}
    if runs["keep"].returncode == 3:
        pytest.skip("not glibc: mallopt is not there")
    faults = {mode: int(run.stdout) for mode, run in runs.items()}
    assert faults["keep"] < 100, faults
    assert faults["default"] > 20 * max(faults["keep"], 100), faults
