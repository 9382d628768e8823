"""Shared fixtures: paths to the data shipped in the repository, small model builders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mtcore.runtime import tune_allocator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

tune_allocator()  # as the CLI does: the suite runs about a third faster

WATER = ROOT / "examples" / "water" / "data"
WATER_TENSOR = ROOT / "examples" / "water_tensor"


@pytest.fixture
def water_dir() -> Path:
    return WATER


@pytest.fixture
def water_tensor_dir() -> Path:
    return WATER_TENSOR


@pytest.fixture(scope="module")
def single_torch_thread():
    """One torch thread for a module: on systems of tens to a few hundred atoms, evaluated
    hundreds of times (MD), thread barriers cost more than they save."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def installed_plugins(monkeypatch):
    """``install(root)``: put fake distributions (helpers.fake_distribution) on sys.path for this
    test and return the rebuilt process-wide registry; the registry is rebuilt again afterwards."""
    from mtcore.plugins import get_registry

    monkeypatch.delenv("MTCORE_PLUGINS", raising=False)
    get_registry.cache_clear()

    def install(root: Path):
        monkeypatch.syspath_prepend(str(root))
        get_registry.cache_clear()
        return get_registry()

    yield install
    get_registry.cache_clear()
