"""Process settings that make CPU training and inference faster.

glibc's malloc serves large blocks (above a threshold that starts at 128 KiB) with fresh
``mmap`` calls and hands them back to the system on ``free``. A training step allocates and
frees the same tens-of-megabytes tensors every step, so each step pays page faults to zero
fresh pages again: on the 2-core development machine that was a third of se_atten's step time.
Raising the mmap threshold and the trim threshold keeps freed blocks in the heap for reuse
(the same effect as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment).
The cost is that the process keeps its peak heap instead of returning it to the system.

The CLI, the benchmark and ``mtcore.infer.load`` (so the ASE calculator and every Python
caller of a frozen model) call :func:`tune_allocator`; a program that uses mtcore otherwise as a
library may call it too. It does nothing off glibc, or when ``MTCORE_KEEP_MALLOC=1``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1  # mallopt takes a C int

_tuned = False


def tune_allocator() -> bool:
    """Keep freed large blocks for reuse; True if the setting took effect (once per process)."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MTCORE_KEEP_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _LARGEST) == 1 and mallopt(_M_TRIM_THRESHOLD, _LARGEST) == 1
    _tuned = ok
    return ok
