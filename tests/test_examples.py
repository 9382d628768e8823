"""Every shipped example input trains from where it lies (2 steps; outputs go to a temporary
folder, the example's data are only read)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from mtcore.config import load_config
from mtcore.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(ROOT.glob("examples/**/input.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.parent.relative_to(ROOT / "examples")) for p in EXAMPLES])
def test_example_trains(path, tmp_path):
    config = load_config(path)
    assert config.training["numb_steps"] <= 2000  # sized for a few minutes on 2 cores
    config.training.update(numb_steps=2, disp_freq=1, save_freq=2)
    summary = Trainer(config, tmp_path, Console(file=io.StringIO())).run()
    assert summary["steps"] == 2
    assert (tmp_path / "lcurve.out").is_file()
    assert not list(path.parent.glob("*.pt")) and not (path.parent / "lcurve.out").exists()
