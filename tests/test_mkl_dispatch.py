"""mtcore/mkl_dispatch.py: when MKL's vendor check is answered, and that results do not change."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mtcore import mkl_dispatch

ON_AMD_LINUX = sys.platform.startswith("linux") and mkl_dispatch.cpu_vendor() == "AuthenticAMD"
HAS_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))


def test_opt_out_and_other_processors(monkeypatch):
    monkeypatch.setenv("MTCORE_KEEP_MKL_DISPATCH", "1")
    assert mkl_dispatch._enable().startswith("off (MTCORE_KEEP_MKL_DISPATCH=1)")
    monkeypatch.delenv("MTCORE_KEEP_MKL_DISPATCH")
    monkeypatch.setattr(mkl_dispatch, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(mkl_dispatch.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(mkl_dispatch.sys, "platform", "linux")
    assert mkl_dispatch._enable() == "not needed (GenuineIntel processor)"
    monkeypatch.setattr(mkl_dispatch.platform, "machine", lambda: "aarch64")
    assert mkl_dispatch._enable().startswith("not needed (not Linux x86-64)")


def test_too_late_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401  (this process has it already)

    monkeypatch.setattr(mkl_dispatch, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(mkl_dispatch.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(mkl_dispatch.sys, "platform", "linux")
    assert mkl_dispatch._enable() == "too late (torch was loaded before mtcore)"


def test_no_compiler_is_a_quiet_off(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    why = mkl_dispatch.build_library(tmp_path / "lib.so")
    assert why is not None and not (tmp_path / "lib.so").exists()


@pytest.mark.skipif(not HAS_CC or not sys.platform.startswith("linux"), reason="needs a C compiler on Linux")
def test_built_library_answers_both_questions(tmp_path):
    target = tmp_path / "cache" / "answer.so"
    assert mkl_dispatch.build_library(target) is None
    lib = ctypes.CDLL(str(target), mode=ctypes.RTLD_LOCAL)
    assert lib.mkl_serv_intel_cpu() == 1 and lib.mkl_serv_intel_cpu_true() == 1
    assert [p.name for p in target.parent.iterdir()] == ["answer.so"]  # no temporary left behind


PRODUCTS = """
import json
import mtcore, torch
g = torch.Generator().manual_seed(7)
x = torch.randn(3000, 50, generator=g, dtype=torch.float64)
w = torch.randn(50, 100, generator=g, dtype=torch.float64)
r = torch.randn(64, 90, 4, generator=g, dtype=torch.float64)
e = torch.randn(64, 90, 100, generator=g, dtype=torch.float64)
out = {"status": mtcore.mkl_dispatch.status,
       "mm": (x @ w).numpy().tolist(), "wgrad": (x.t() @ (x @ w)).numpy().tolist(),
       "bmm": torch.bmm(r.transpose(1, 2), e).numpy().tolist()}
print(json.dumps(out))
"""


@pytest.mark.skipif(not (ON_AMD_LINUX and HAS_CC), reason="the answer is only given on AMD processors (Linux, C compiler)")
def test_answered_products_agree_with_generic_ones(tmp_path):
    """The same float64 products on MKL's generic path and on its AVX path agree to rounding."""
    results = {}
    for answered in (True, False):
        env = dict(os.environ, MTCORE_CACHE_DIR=str(tmp_path / "cache"), MKL_VERBOSE="0")
        env.pop("MTCORE_KEEP_MKL_DISPATCH", None)
        if not answered:
            env["MTCORE_KEEP_MKL_DISPATCH"] = "1"
        run = subprocess.run([sys.executable, "-c", PRODUCTS], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        results[answered] = json.loads(run.stdout.strip().splitlines()[-1])
    assert results[True]["status"].startswith("on")
    assert results[False]["status"].startswith("off")
    for key in ("mm", "wgrad", "bmm"):
        a, b = np.array(results[True][key]), np.array(results[False][key])
        scale = np.abs(b).max()
        assert np.abs(a - b).max() <= 1e-13 * scale, key
