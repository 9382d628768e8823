"""The example plugin package (examples/plugin-package, installed as mtcore-example-plugin, as
.ci/run and README's test command do): listed with its version, its shipped multi-task input
trains its 'gap' head beside a built-in 'ener' head, freezes and tests through the command line;
its converter and loader reproduce what the deepmd/npy loader reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from helpers import WATER

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "plugin-package"
EXAMPLE = PACKAGE / "examples"
MTCORE = [sys.executable, "-m", "mtcore.cli"]
DIST = "mtcore-example-plugin"

try:
    VERSION = metadata.version(DIST)
except metadata.PackageNotFoundError:  # pragma: no cover - a setup mistake, reported by every test
    VERSION = None



def installed() -> None:
    assert VERSION is not None, f"{DIST} is not installed: pip install -e examples/plugin-package"


def run(args, cwd, timeout=600):
    env = dict(os.environ, COLUMNS="240")  # list-plugins is a table: no truncated names
    return subprocess.run(MTCORE + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_list_plugins_shows_the_package_and_its_version(tmp_path):
    installed()
    done = run(["list-plugins"], tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if DIST in line]
    names = {"gauss_radial", "gap", "npz_system"}
    assert {n for n in names for row in rows if f" {n} " in row} == names
    assert len(rows) == 4 and all(VERSION in row for row in rows)  # descriptor, fitting net, loss, loader
    assert "failed to load" not in done.stderr


def shipped_input(workdir: Path, numb_steps: int) -> Path:
    """examples/input.json with absolute data paths and fewer steps; everything else as shipped."""
    doc = json.loads((EXAMPLE / "input.json").read_text())
    for head in doc["training"]["data_dict"].values():
        for part in (head["training_data"], head["validation_data"]):
            part["systems"] = [str((EXAMPLE / s).resolve()) for s in part["systems"]]
    doc["training"].update(numb_steps=numb_steps, disp_freq=numb_steps, save_freq=numb_steps)
    path = workdir / "input.json"
    path.write_text(json.dumps(doc))
    return path


def test_multi_task_with_the_example_head_trains_freezes_and_tests(tmp_path):
    installed()
    shipped_input(tmp_path, numb_steps=4)
    done = run(["train", "input.json"], tmp_path)
    assert done.returncode == 0, done.stderr
    header = (tmp_path / "lcurve.out").read_text().splitlines()[0].split()
    assert "rmse_val_gap" in header and "rmse_f_val_water" in header

    done = run(["show", "model.ckpt.pt"], tmp_path)
    assert done.returncode == 0 and "gauss_radial" in done.stdout and "shared_0" in done.stdout, done.stdout

    done = run(["freeze", "-o", "model.pth"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "model_gap.pth").is_file() and (tmp_path / "model_water.pth").is_file()

    valid = EXAMPLE / "data" / "water_gap_valid.npz"
    done = run(["test", "-m", "model_gap.pth", "-s", str(valid), "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["combined"]["Gap"]
    # the same numbers by hand: frame gap = mean of the atomic outputs, against the file's labels
    from mtcore import infer

    with np.load(valid) as z:
        pred = infer.load(tmp_path / "model_gap.pth").evaluate(z["coord"], z["box"], z["types"])
        diff = pred["gap"].reshape(-1) - z["gap"].reshape(-1)
    assert np.allclose(pred["gap"].reshape(-1), pred["atom_gap"].reshape(len(diff), -1).mean(1), rtol=1e-10, atol=0)
    assert result["mae"] == pytest.approx(np.abs(diff).mean(), rel=1e-9)
    assert result["rmse"] == pytest.approx(np.sqrt((diff**2).mean()), rel=1e-9)

    done = run(["test", "-m", "model_water.pth", "-s", str(WATER / "data_3"), "-n", "2", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.isfinite(json.loads(done.stdout)["combined"]["Energy"]["rmse"])


def test_converter_and_loader_read_what_deepmd_npy_reads(tmp_path):
    """data_1 has two set folders: converted to .npz and read back by npz_system, every array is
    what the deepmd/npy loader returns from the folder (frames 3..80 of the concatenation)."""
    installed()
    from mtcore.data.requirements import DataRequirement
    from mtcore.plugins import get_registry
    from mtcore_example import convert, loader

    system = WATER / "data_1"
    out = tmp_path / "data_1.npz"
    assert convert.main([str(system), str(out), "--frames", "3:"]) == 0
    assert convert.main([str(system), str(out)]) == 1  # never replaces a file
    reqs = [DataRequirement("energy", 1), DataRequirement("force", 3, atomic=True), DataRequirement("virial", 9)]
    type_map = ["H", "O"]  # reversed: both loaders map by element name
    npy = get_registry().loader_for(system).load(system, type_map, reqs, "set")
    npz = loader.load(out, type_map, reqs, "set")
    assert np.array_equal(npz.atypes, npy.atypes[3:])
    assert np.array_equal(npz.coords, npy.coords[3:]) and np.array_equal(npz.boxes, npy.boxes[3:])
    assert sorted(npz.labels) == sorted(npy.labels) == ["energy", "force"]
    for key in npz.labels:
        assert np.array_equal(npz.labels[key], npy.labels[key][3:]), key
    assert npz.set_sizes == [npy.nframes - 3]


def test_shipped_example_data_is_what_make_data_writes(tmp_path):
    installed()
    done = subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for shipped in sorted((EXAMPLE / "data").glob("*.npz")):
        with np.load(shipped) as a, np.load(tmp_path / shipped.name) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                assert np.array_equal(a[key], b[key]), (shipped.name, key)
    assert sum(p.stat().st_size for p in (EXAMPLE / "data").glob("*")) < 1_000_000
