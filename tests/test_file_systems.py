"""Files as systems: a loader whose format keeps one system per file (here a toy ``.npz`` format
from an outside, fake-installed distribution) is found while searching a folder, named directly
in ``systems`` lists, and taken by ``mtcore test -s FILE`` and ``-f LIST``; its errors equal those
of the same frames read as deepmd/npy folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import WATER, fake_distribution, small_input, write_input
from mtcore.config import load_config
from mtcore.data.loading import expand_systems, load_system
from mtcore.errors import MtcoreError
from mtcore.evaluate import run_test
from mtcore.train.checkpoint import load_checkpoint

TOY_NPZ = """
from pathlib import Path
import numpy as np
from mtcore.data.system import SystemData
from mtcore.errors import MtcoreError
from mtcore.hookspecs import DataLoaderRegistration, hookimpl


def detect(path):
    path = Path(path)
    return path.suffix == ".npz" and path.is_file()  # the suffix first: no disk access for others


def load(path, type_map, requirements, set_prefix):
    with np.load(path) as data:
        arrays = {key: np.asarray(data[key]) for key in data.files}
    coord = arrays["coord"].astype(np.float64)
    nframes, natoms = coord.shape[:2]
    labels = {}
    for req in requirements:
        if req.key in arrays:
            shape = (nframes, natoms, req.ndof) if req.atomic else (nframes, req.ndof)
            labels[req.key] = arrays[req.key].astype(np.float64).reshape(shape)
        elif req.must:
            raise MtcoreError(f"{path}: no '{req.key}' array (required)")
    atypes = np.broadcast_to(arrays["atype"].astype(np.int64), (nframes, natoms))
    return SystemData(path=str(path), atypes=atypes, coords=coord, boxes=arrays["box"].astype(np.float64),
                      labels=labels, set_sizes=[nframes])


@hookimpl
def mtcore_data_loaders():
    return [DataLoaderRegistration(name="toy/npz", detect=detect, load=load, doc="one .npz file per system")]
"""

# A loader written when detect saw only folders: it lists the path, which fails on a file.
FOLDER_ONLY = """
import os
from mtcore.hookspecs import DataLoaderRegistration, hookimpl

@hookimpl
def mtcore_data_loaders():
    return [DataLoaderRegistration(name="listing", detect=lambda p: "listing.marker" in os.listdir(p),
                                   load=lambda *a: None)]
"""

MTCORE = [sys.executable, "-m", "mtcore.cli"]
FRAMES = {"a": slice(0, 3), "b": slice(3, 5)}


def write_systems(root: Path) -> dict[str, tuple[Path, Path]]:
    """The same frames of water data_0 as one .npz file and as one deepmd/npy folder per system."""
    src = WATER / "data_0"
    atype = np.loadtxt(src / "type.raw", dtype=np.int64).reshape(-1)
    arrays = {name: np.load(src / "set.000" / f"{name}.npy") for name in ("coord", "box", "energy", "force")}
    out = {}
    for name, frames in FRAMES.items():
        part = {k: v[frames] for k, v in arrays.items()}
        nframes = part["coord"].shape[0]
        npz = root / "npz" / f"{name}.npz"
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz, coord=part["coord"].reshape(nframes, -1, 3), box=part["box"].reshape(nframes, 3, 3), atype=atype,
                 energy=part["energy"].reshape(nframes), force=part["force"].reshape(nframes, -1, 3))
        folder = root / "npy" / name
        (folder / "set.000").mkdir(parents=True)
        (folder / "type.raw").write_text((src / "type.raw").read_text())
        (folder / "type_map.raw").write_text((src / "type_map.raw").read_text())
        for key, value in part.items():
            np.save(folder / "set.000" / f"{key}.npy", value)
        out[name] = (npz, folder)
    return out


def tiny_input(workdir: Path, train, valid) -> dict:
    doc = small_input(workdir, numb_steps=2, disp_freq=1, save_freq=2)
    doc["model"]["descriptor"].update(neuron=[4, 8], axis_neuron=2)
    doc["model"]["fitting_net"]["neuron"] = [8, 8]
    doc["training"]["training_data"]["systems"] = train
    doc["training"]["validation_data"].update(systems=valid, numb_btch=1)
    return doc


def train(workdir: Path, doc: dict) -> Path:
    from test_training import QUIET
    from mtcore.train.trainer import Trainer

    workdir.mkdir(parents=True, exist_ok=True)
    Trainer(load_config(write_input(workdir, doc)), workdir, QUIET).run()
    return workdir / "model.ckpt.pt"


def only_the_toy_npz_loader(monkeypatch) -> None:
    """Two installed loaders that both read ``.npz`` files are refused where a file is met (see
    the next test); the example plugin package (installed in CI) has one, so these tests select
    every entry point but that one, as a user would with MTCORE_PLUGINS."""
    from importlib.metadata import entry_points

    names = ({ep.name for ep in entry_points(group="mtcore")} - {"npz_system"}) | {"loader"}
    monkeypatch.setenv("MTCORE_PLUGINS", ",".join(sorted(names)))


def test_two_loaders_claiming_one_file_are_refused_naming_both(tmp_path, installed_plugins, monkeypatch):
    fake_distribution(tmp_path / "site", "toy-npz", "1.0", TOY_NPZ, entry_point="loader")
    fake_distribution(tmp_path / "site", "other-npz", "2.0", TOY_NPZ.replace('"toy/npz"', '"other/npz"'), entry_point="other_loader")
    only_the_toy_npz_loader(monkeypatch)
    monkeypatch.setenv("MTCORE_PLUGINS", os.environ["MTCORE_PLUGINS"] + ",other_loader")
    registry = installed_plugins(tmp_path / "site")
    systems = write_systems(tmp_path / "data")
    file = systems["a"][0]
    with pytest.raises(MtcoreError) as info:
        load_system(file, ["O", "H"], [], "set", registry)
    text = str(info.value)
    assert "\n" not in text and "more than one data loader reads it" in text, text
    assert "'toy/npz'" in text and "toy-npz" in text and "'other/npz'" in text and "other-npz" in text, text
    with pytest.raises(MtcoreError, match="more than one data loader reads it"):
        expand_systems(str(file.parent), registry, "t")


def test_discovery_finds_files_and_folders(tmp_path, installed_plugins, monkeypatch):
    fake_distribution(tmp_path / "site", "toy-npz", "1.0", TOY_NPZ, entry_point="loader")
    only_the_toy_npz_loader(monkeypatch)
    registry = installed_plugins(tmp_path / "site")
    systems = write_systems(tmp_path / "data")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.npz").write_bytes(systems["a"][0].read_bytes())
    (tree / "sub" / "b.npz").write_bytes(systems["b"][0].read_bytes())
    (tree / "notes.txt").write_text("not data")
    water = tree / "water"
    water.mkdir()
    for item in ("type.raw", "type_map.raw"):
        (water / item).write_text((systems["a"][1] / item).read_text())
    (water / "set.000").symlink_to(systems["a"][1] / "set.000")
    (water / "extra.npz").write_bytes(systems["b"][0].read_bytes())  # part of the deepmd/npy system, not its own
    assert expand_systems(str(tree), registry, "t") == [tree / "a.npz", tree / "sub" / "b.npz", water]
    assert expand_systems(str(tree / "a.npz"), registry, "t") == [tree / "a.npz"]  # a file string is that system
    assert expand_systems([str(tree / "a.npz"), str(water)], registry, "t") == [tree / "a.npz", water]
    one = load_system(tree / "a.npz", ["O", "H"], [], "set", registry)
    assert (one.nframes, one.natoms) == (3, 192)
    # unrecognised or missing: one line naming the path and the known formats
    for given in (str(tree / "notes.txt"), [str(tree / "notes.txt")]):
        with pytest.raises(MtcoreError) as info:
            paths = expand_systems(given, registry, "t")
            load_system(paths[0], ["O", "H"], [], "set", registry)
        text = str(info.value)
        assert "\n" not in text and "notes.txt" in text and "toy/npz" in text and "deepmd/npy" in text, text
    with pytest.raises(MtcoreError, match=r"^t/systems: .*gone\.npz: not found$"):
        expand_systems([str(tree / "gone.npz")], registry, "t")
    with pytest.raises(MtcoreError, match=r"^t/systems: .*gone\.npz: not found$"):
        expand_systems(str(tree / "gone.npz"), registry, "t")


def test_a_folder_only_detect_skips_files_with_a_warning(tmp_path, installed_plugins):
    fake_distribution(tmp_path / "site", "listing-loader", "1.0", FOLDER_ONLY, entry_point="loader")
    registry = installed_plugins(tmp_path / "site")
    tree = tmp_path / "tree"
    (tree / "sys").mkdir(parents=True)
    (tree / "sys" / "listing.marker").write_text("")
    (tree / "loose.dat").write_text("")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert expand_systems(str(tree), registry, "t") == [tree / "sys"]  # files inside a system are not asked
    assert [str(w.message) for w in caught if "loose.dat" in str(w.message)], [str(w.message) for w in caught]
    with pytest.raises(MtcoreError, match=r"loose\.dat: a data loader's detect\(\) failed on it \(NotADirectoryError"):
        expand_systems(str(tree / "loose.dat"), registry, "t")


def test_train_and_test_on_file_systems(tmp_path, installed_plugins, monkeypatch):
    fake_distribution(tmp_path / "site", "toy-npz", "1.0", TOY_NPZ, entry_point="loader")
    only_the_toy_npz_loader(monkeypatch)
    installed_plugins(tmp_path / "site")
    systems = write_systems(tmp_path / "data")
    (tmp_path / "data" / "npz" / "README").write_text("frames of water data_0")  # ignored by the search
    npz = [str(systems[n][0]) for n in FRAMES]
    npy = [str(systems[n][1]) for n in FRAMES]
    # systems as a folder of .npz files (training) and as a list of .npz files (validation)
    ckpt = train(tmp_path / "folder", tiny_input(tmp_path, str(tmp_path / "data" / "npz"), [npz[1]]))
    state = load_checkpoint(ckpt)
    assert {"toy/npz"} <= {c["name"] for c in state["provenance"]["components"] if c.get("kind") == "data_loader"}
    # -s FILE gives the errors of the same frames read as a deepmd/npy folder
    for file, folder in zip(npz, npy):
        got, got_all = run_test(ckpt, [file])
        want, want_all = run_test(ckpt, [folder])
        assert got[0].system == file and got[0].nframes == want[0].nframes
        assert set(got_all) == set(want_all) and {"Energy", "Force"} <= {k.split("/")[0] for k in got_all}
        for title, stat in want_all.items():
            assert stat.count == got_all[title].count
            assert abs(stat.mae - got_all[title].mae) <= 1e-10 * max(1.0, stat.mae), title
            assert abs(stat.rmse - got_all[title].rmse) <= 1e-10 * max(1.0, stat.rmse), title
    # the command line: -s FILE and -f LIST with a file entry, in a process that finds the plugin
    (tmp_path / "list.txt").write_text(npz[1] + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="250")  # MTCORE_PLUGINS: only the toy .npz loader
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(tmp_path / "site"), env.get("PYTHONPATH", "")] if p)
    proc = subprocess.run(MTCORE + ["test", "-m", str(ckpt), "-s", npz[0], "-f", "list.txt", "--json"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert [s["system"] for s in payload["systems"]] == npz
    _, want_all = run_test(ckpt, npy)
    for title, stat in want_all.items():
        assert abs(payload["combined"][title]["rmse"] - stat.rmse) <= 1e-10 * max(1.0, stat.rmse), title
    bad = subprocess.run(MTCORE + ["test", "-m", str(ckpt), "-s", "list.txt"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode != 0 and len(lines) == 1 and "list.txt" in lines[0] and "toy/npz" in lines[0], bad.stderr
    # systems as a list of .npz files (training)
    listed = train(tmp_path / "listed", tiny_input(tmp_path, npz, npz[:1]))
    assert listed.is_file()
