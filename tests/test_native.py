"""mtcore/native.py: small C libraries are built once, cached, rebuilt without function clones
where the compiler refuses them, and loaded with their argument types declared."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from mtcore import native

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")

SOURCE = native.CLONES + """
MTCORE_CLONES void twice(long n, double *x) { for (long i = 0; i < n; ++i) x[i] += x[i]; }
"""


def test_a_cloned_kernel_builds_loads_and_computes(tmp_path, monkeypatch):
    monkeypatch.setenv("MTCORE_CACHE_DIR", str(tmp_path))
    lib, status = native.open_library("twice", SOURCE, ("-O3",), {"twice": [ctypes.c_long, ctypes.c_void_p]})
    assert status == "on" and lib is not None
    values = (ctypes.c_double * 3)(1.0, -2.5, 4.0)
    lib.twice(3, values)
    assert list(values) == [2.0, -5.0, 8.0]
    assert native.library_path("twice", SOURCE, ("-O3",)).exists()  # cached under its source and flags


def test_where_the_first_build_fails_the_fallback_flags_are_built_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MTCORE_CACHE_DIR", str(tmp_path))
    picky = "#ifndef ACCEPT\n#error refused\n#endif\nvoid f(void) {}\n"
    path, why = native.cached_library("picky", picky, ("-O2",), ("-DACCEPT",))
    assert why == "" and path == native.library_path("picky", picky, ("-O2", "-DACCEPT"))

    def no_more_builds(*args):
        raise AssertionError("rebuilt a cached library")

    monkeypatch.setattr(native, "build_library", no_more_builds)
    assert native.cached_library("picky", picky, ("-O2",), ("-DACCEPT",)) == (path, "")


def test_a_source_that_never_builds_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("MTCORE_CACHE_DIR", str(tmp_path))
    lib, status = native.open_library("broken", "this is not C", ("-O2",), {})
    assert lib is None and status.startswith("off (") and "failed" in status


def test_a_missing_function_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("MTCORE_CACHE_DIR", str(tmp_path))
    lib, status = native.open_library("twice", SOURCE, ("-O3",), {"thrice": [ctypes.c_long]})
    assert lib is None and "thrice" in status


def test_a_kernel_library_loads_once_and_its_switch_keeps_it_off(tmp_path, monkeypatch):
    monkeypatch.setenv("MTCORE_CACHE_DIR", str(tmp_path))
    signatures = {"twice": [ctypes.c_long, ctypes.c_void_p]}
    kernels = native.KernelLibrary("twice", SOURCE, ("-O3",), signatures, "MTCORE_TEST_SWITCH")
    assert kernels.status == "not tried" and kernels.library is None
    lib = kernels.load()
    assert lib is not None and kernels.status == "on" and kernels.load() is lib
    monkeypatch.setenv("MTCORE_TEST_SWITCH", "1")
    switched = native.KernelLibrary("twice", SOURCE, ("-O3",), signatures, "MTCORE_TEST_SWITCH")
    assert switched.load() is None and switched.status == "off (MTCORE_TEST_SWITCH=1)"
