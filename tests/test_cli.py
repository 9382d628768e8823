"""The command line end to end, and the bad-input matrix: one line on stderr, non-zero exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import WATER, small_input, write_input

MTCORE = [sys.executable, "-m", "mtcore.cli"]


def run(args, cwd, timeout=600):
    return subprocess.run(MTCORE + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_train_freeze_test_show_list(tmp_path):
    doc = small_input(tmp_path, numb_steps=6, disp_freq=3, save_freq=3)
    doc["training"]["training_data"]["systems"] = ["../data/data_0"]
    case = tmp_path / "case"
    case.mkdir()
    shutil.copytree(WATER / "data_0", tmp_path / "data" / "data_0")
    write_input(case, doc)
    trained = run(["train", "input.json"], case)
    assert trained.returncode == 0, trained.stderr
    assert "finished training" in trained.stdout
    for name in ("lcurve.out", "out.json", "model.ckpt-6.pt", "model.ckpt.pt", "checkpoint"):
        assert (case / name).exists(), name
    frozen = run(["freeze", "-o", "model.pth"], case)
    assert frozen.returncode == 0, frozen.stderr
    tested = run(["test", "-m", "model.pth", "-s", str(WATER / "data_3"), "-n", "3", "--json"], case)
    assert tested.returncode == 0, tested.stderr
    report = json.loads(tested.stdout)
    assert report["systems"][0]["nframes"] == 3
    assert set(report["combined"]) >= {"Energy", "Energy/atom", "Force"}
    assert report["combined"]["Force"]["rmse"] >= report["combined"]["Force"]["mae"] > 0
    two = ["test", "-m", "model.pth", "-s", str(WATER / "data_3"), "-s", str(WATER / "data_2"), "-n", "2"]
    table = run(two + ["-d", "detail"], case)
    assert "Energy/atom" in table.stdout and "RMSE" in table.stdout
    _check_detail_files(case, json.loads(run(two + ["--json"], case).stdout)["combined"])
    _check_last_set_and_datafile(case)
    shown = run(["show", "model.ckpt.pt"], case)
    assert shown.returncode == 0 and "default" in shown.stdout and "se_e2_a" in shown.stdout
    plugins = run(["list-plugins"], case)
    assert plugins.returncode == 0 and "se_e2_a" in plugins.stdout and "deepmd/npy" in plugins.stdout
    restarted = run(["train", "--restart", "model.ckpt-3.pt"], case)
    assert restarted.returncode == 0, restarted.stderr


def _check_last_set_and_datafile(case: Path) -> None:
    """dp test's choices: only the last set folder is tested (--all-sets for every one); -f lists
    the systems in a file."""
    import numpy as np

    split = case / "split"
    shutil.copytree(WATER / "data_3", split)
    first, second = split / "set.000", split / "set.001"
    second.mkdir()
    for npy in first.glob("*.npy"):
        values = np.load(npy)
        np.save(first / npy.name, values[:3])
        np.save(second / npy.name, values[3:5])
    (case / "systems.txt").write_text("split\n")
    reports = {}
    for name, extra in (("last", []), ("all", ["--all-sets"])):
        result = run(["test", "-m", "model.pth", "-f", "systems.txt", "--json"] + extra, case)
        assert result.returncode == 0, result.stderr
        reports[name] = json.loads(result.stdout)
    assert reports["last"]["systems"][0]["nframes"] == 2 and reports["all"]["systems"][0]["nframes"] == 5
    only_second = json.loads(run(["test", "-m", "model.pth", "-s", "split", "-n", "5", "--all-sets", "--json"], case).stdout)
    assert only_second["combined"]["Force"]["rmse"] == pytest.approx(reports["all"]["combined"]["Force"]["rmse"], rel=1e-10)
    assert reports["last"]["combined"]["Force"]["rmse"] != reports["all"]["combined"]["Force"]["rmse"]


def _check_detail_files(case: Path, report: dict) -> None:
    """dp test -d layout: data columns then prediction columns, a '# system: ...' header per
    system; the numbers reproduce the reported errors."""
    import numpy as np

    expected = {"e": 1, "e_peratom": 1, "f": 192}
    for suffix, rows_per_frame in expected.items():
        path = case / f"detail.{suffix}.out"
        headers = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert [h.split(":")[0] for h in headers] == [f"# {WATER / 'data_3'}", f"# {WATER / 'data_2'}"], suffix
        table = np.loadtxt(path, ndmin=2)
        assert table.shape[0] == 2 * 2 * rows_per_frame, suffix
    header = (case / "detail.f.out").read_text().splitlines()[0]
    assert header.endswith("data_fx data_fy data_fz pred_fx pred_fy pred_fz")
    for suffix, title in (("f", "Force"), ("e", "Energy"), ("e_peratom", "Energy/atom")):
        table = np.loadtxt(case / f"detail.{suffix}.out", ndmin=2)
        half = table.shape[1] // 2
        diff = table[:, half:] - table[:, :half]
        assert np.sqrt(np.mean(diff**2)) == pytest.approx(report[title]["rmse"], rel=1e-6), title
        assert np.mean(np.abs(diff)) == pytest.approx(report[title]["mae"], rel=1e-6), title
    assert not (case / "detail.v.out").exists()  # the water data have no virial.npy
    energy = np.loadtxt(case / "detail.e.out")
    per_atom = np.loadtxt(case / "detail.e_peratom.out")
    np.testing.assert_allclose(per_atom, energy / 192, rtol=1e-12)


def _bad_system(tmp_path: Path, kind: str) -> str:
    system = tmp_path / "bad_system"
    shutil.copytree(WATER / "data_0", system)
    if kind == "natoms":
        (system / "type.raw").write_text("0 1 1\n")
    if kind == "element":
        (system / "type_map.raw").write_text("O\nC\n")
    return str(system)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("json", r"input.json: not valid JSON"),
        ("unknown_key", r"model/descriptor: undefined key `rcutt`.*Did you mean: rcut"),
        ("wrong_type", r"training: key `numb_steps` gets wrong value type"),
        ("missing_folder", r"training/training_data/systems: .*nowhere: not found"),
        ("natoms", r"coord.npy: has 576 values per frame but type.raw lists 3 atoms"),
        ("element", r"type_map.raw: element 'C' is not in the model's type_map"),
        ("negative_width", r"model/descriptor/neuron: .*-50"),
        ("zero_fitting_width", r"model/fitting_net/neuron: .*got 0"),
        ("negative_rcut", r"model/descriptor/rcut: must be a positive distance, got -1.0"),
        ("axis_neuron", r"model/descriptor/axis_neuron: 1000 must be between 1 and the last neuron"),
    ],
)
def test_bad_input_gives_one_line_and_non_zero_exit(tmp_path, case, expected):
    import re

    doc = small_input(tmp_path, numb_steps=2)
    if case == "unknown_key":
        doc["model"]["descriptor"]["rcutt"] = 6.0
    if case == "wrong_type":
        doc["training"]["numb_steps"] = "many"
    if case == "missing_folder":
        doc["training"]["training_data"]["systems"] = [str(tmp_path / "nowhere")]
    if case == "negative_width":
        doc["model"]["descriptor"]["neuron"] = [4, -50]
    if case == "zero_fitting_width":
        doc["model"]["fitting_net"]["neuron"] = [8, 0]
    if case == "negative_rcut":
        doc["model"]["descriptor"].update(rcut=-1.0, rcut_smth=-2.0, sel="auto")
    if case == "axis_neuron":
        doc["model"]["descriptor"]["axis_neuron"] = 1000
    if case in ("natoms", "element"):
        doc["training"]["training_data"]["systems"] = [_bad_system(tmp_path, case)]
    path = write_input(tmp_path, doc)
    if case == "json":
        path.write_text(path.read_text()[:-5])
    result = run(["train", "input.json"], tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and re.search(expected, lines[0]), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
