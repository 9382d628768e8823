"""DeePMD-kit v2.2.9's own example inputs train unchanged (only numb_steps is cut for time).

The files in tests/data/deepmd-v2.2.9 are v2.2.9's examples byte for byte; they are placed in a
temporary tree laid out like DeePMD-kit's examples/ folder, whose data come from this repository's
examples/, so every relative system path resolves as it does for a v2 user.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from mtcore.config import load_config
from mtcore.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
V229 = ROOT / "tests" / "data" / "deepmd-v2.2.9"
EXAMPLES = sorted(V229.glob("*.json"))


def place(example: Path, tree: Path) -> Path:
    """Where the example sits in DeePMD-kit's examples tree (data linked from this repo)."""
    (tree / "water").mkdir(parents=True, exist_ok=True)
    if not (tree / "water" / "data").exists():
        (tree / "water" / "data").symlink_to(ROOT / "examples" / "water" / "data")
    for kind in ("dipole", "polar"):
        folder = tree / "water_tensor" / kind
        if not folder.exists():
            folder.mkdir(parents=True)
            for part in ("training_data", "validation_data"):
                (folder / part).symlink_to(ROOT / "examples" / "water_tensor" / kind / part)
    stem = example.stem
    if stem.startswith("water_tensor_"):
        target = tree / "water_tensor" / stem.rsplit("_", 1)[1] / "input.json"
    elif stem.startswith("water_multi_task_"):
        target = tree / "water_multi_task" / stem[len("water_multi_task_"):] / "input.json"
    else:
        target = tree / "water" / stem[len("water_"):] / "input.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(example, target)
    return target


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_v229_example_trains_unchanged(example, tmp_path):
    path = place(example, tmp_path)
    config = load_config(path)
    assert json.loads(example.read_text())["training"]["numb_steps"] > 1000  # a real input, untouched
    config.training["numb_steps"] = 2
    config.training["disp_freq"] = 1
    summary = Trainer(config, path.parent, Console(file=io.StringIO())).run()
    assert summary["steps"] == 2
    assert (path.parent / "lcurve.out").is_file() and (path.parent / "model.ckpt-2.pt").is_file()
