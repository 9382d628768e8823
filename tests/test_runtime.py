"""The allocator setting the CLI applies (mtcore.runtime)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "from mtcore.runtime import tune_allocator; print(tune_allocator(), tune_allocator())"


def _run(extra_env: dict) -> str:
    env = dict(os.environ, **extra_env)
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuning_takes_effect_on_glibc_and_can_be_turned_off():
    assert _run({}) == ["True", "True"]
    assert _run({"MTCORE_KEEP_MALLOC": "1"}) == ["False", "False"]
