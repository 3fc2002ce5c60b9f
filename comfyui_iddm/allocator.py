"""The CPU allocator policy for processes this package owns (the CLI, the demo, the benchmarks).

glibc's malloc serves every block above its mmap threshold (at most 32 MiB on 64-bit) with a fresh
mmap and gives it back on free, so each training step maps its large activations again and the
kernel zero-fills them page by page: millions of minor faults and seconds of system time per run
(a [4,32,256,256] float32 activation is exactly 32 MiB). Told never to mmap and never to trim, malloc
keeps freed memory in its heap and the next step reuses it. The price: the process keeps its peak
memory until it exits (benchmarks/bench_allocator.py measures both). That is right for a process that
exits after one job, and wrong for a long-lived server shared with other work, so ComfyUI's process
is left alone unless IDDM_MALLOC_POLICY=keep is set there.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
ENV = "IDDM_MALLOC_POLICY"  # "keep" applies the policy, "default" leaves malloc as it is


def keep_freed_memory() -> bool:
    """Applies the policy (glibc on Linux only; elsewhere nothing). Returns whether it took effect.
    Call it at start-up, before the large allocations."""
    if os.environ.get(ENV, "keep") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def wanted_in_shared_process() -> bool:
    """In a process this package does not own (ComfyUI), only when the user asked for it."""
    return os.environ.get(ENV) == "keep"
