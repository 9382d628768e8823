"""Let Intel MKL run its AVX2 / AVX-512 kernels on AMD processors.

Why: torch's x86-64 wheels do their matrix products in MKL, and MKL chooses its fast code paths
only after asking whether the processor is an Intel one. On an AMD processor it takes a generic
path instead. On the 2-core AMD EPYC (Zen 4) development machine the float64 products of an
embedding net ([17,000 × 50] by [50 × 100]) take 11.4 ms on the generic path and 5.0 ms on the
AVX-512 one, and a water se_e2_a float64 training step is 1.35× faster
(benchmarks/bench_mkl_dispatch.py, docs/performance.md).

How: MKL asks through two exported functions, ``mkl_serv_intel_cpu`` and
``mkl_serv_intel_cpu_true``. A two-line library that answers "yes" to both, loaded with
``RTLD_GLOBAL`` before torch, takes their place, and MKL then picks its path from the processor's
feature bits (cpuid), as it does on Intel processors: AVX-512 on Zen 4 and later, AVX2 on Zen 1-3.
Answering only one of the two gives a slower SSE2 path, so both are answered. The library is
compiled once with the system C compiler and kept in mtcore's cache directory.

It must happen before torch is loaded, so ``import mtcore`` does it (the CLI imports mtcore
first; a script that imports torch before mtcore keeps MKL's choice). Nothing happens on Intel or
other processors, off Linux x86-64, without a C compiler, or with ``MTCORE_KEEP_MKL_DISPATCH=1``.
Results agree with the generic path to rounding (tests/test_mkl_dispatch.py).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path
from typing import Optional

from mtcore import native

SOURCE = "int mkl_serv_intel_cpu(void) { return 1; }\nint mkl_serv_intel_cpu_true(void) { return 1; }\n"
FLAGS = ("-O2",)

#: what enable() decided, for `mtcore show`-style reports and tests
status = "not tried"


def cpu_vendor() -> Optional[str]:
    """The vendor_id of /proc/cpuinfo (Linux), e.g. 'AuthenticAMD'; None where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def library_path() -> Path:
    """Where the answering library is cached (benchmarks preload it into DeePMD-kit's runs)."""
    return native.library_path("mkl_cpu_answer", SOURCE, FLAGS)


def build_library(target: Path) -> Optional[str]:
    """Compile SOURCE into ``target``; None on success, else why not."""
    return native.build_library(SOURCE, target, FLAGS)


def enable() -> str:
    """Answer MKL's vendor check where that makes MKL faster; returns (and stores) what happened."""
    global status
    if status != "not tried":
        return status
    status = _enable()
    return status


def _enable() -> str:
    if os.environ.get("MTCORE_KEEP_MKL_DISPATCH") == "1":
        return "off (MTCORE_KEEP_MKL_DISPATCH=1)"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return "not needed (not Linux x86-64)"
    vendor = cpu_vendor()
    if vendor != "AuthenticAMD":
        return f"not needed ({vendor or 'unknown'} processor)"
    if "torch" in sys.modules:
        return "too late (torch was loaded before mtcore)"
    target, why = native.cached_library("mkl_cpu_answer", SOURCE, FLAGS)
    if target is None:
        return f"off ({why})"
    try:
        ctypes.CDLL(str(target), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return f"off (could not load {target}: {exc})"
    return "on (AMD processor: MKL's vendor check answered)"
