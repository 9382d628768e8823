"""mtcore model-devi and the ASE ensemble: DeePMD-kit's model_devi.out, checked by hand with numpy."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import ENER, SE_E2_A, WATER, model_with_stats, small_input
from mtcore import infer
from mtcore.cli import app
from mtcore.errors import MtcoreError
from mtcore.freeze import freeze
from mtcore.model_devi import make_model_devi

# small frames evaluated many times: thread barriers cost more than they save
pytestmark = pytest.mark.usefixtures("single_torch_thread")
NFRAMES = 4


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """Three small untrained models that differ only in their seeds, frozen; a 4-frame periodic
    system and a non-periodic copy of it (no box.npy)."""
    tmp = tmp_path_factory.mktemp("devi")
    paths = []
    for seed in (1, 2, 3):
        desc = dict(SE_E2_A, neuron=[4, 8], axis_neuron=2, seed=seed, rcut=4.0, sel=[16, 32])
        doc = small_input(tmp, descriptor=desc, fitting=dict(ENER, neuron=[8, 8], seed=seed + 10))
        model, config = model_with_stats(doc, nbatch=1)
        paths += freeze({"model": model.state_dict(), "config": config.document}, tmp / f"graph.00{seed}.pth")
    periodic = tmp / "periodic"  # 12 O and 24 H of the water frames (cheap to evaluate)
    (periodic / "set.000").mkdir(parents=True)
    atype = np.loadtxt(WATER / "data_0" / "type.raw", dtype=np.int64)
    keep = np.concatenate([np.flatnonzero(atype == 0)[:12], np.flatnonzero(atype == 1)[:24]])
    np.savetxt(periodic / "type.raw", atype[keep], fmt="%d")
    shutil.copy(WATER / "data_0" / "type_map.raw", periodic / "type_map.raw")
    coord = np.load(WATER / "data_0" / "set.000" / "coord.npy")[:NFRAMES].reshape(NFRAMES, -1, 3)[:, keep]
    np.save(periodic / "set.000" / "coord.npy", coord.reshape(NFRAMES, -1))
    np.save(periodic / "set.000" / "box.npy", np.load(WATER / "data_0" / "set.000" / "box.npy")[:NFRAMES])
    isolated = tmp / "isolated"
    shutil.copytree(periodic, isolated)
    (isolated / "set.000" / "box.npy").unlink()
    (isolated / "nopbc").touch()
    return tmp, paths, periodic, isolated, [infer.load(p) for p in paths]


def _by_hand(pots, folder: Path, periodic: bool) -> np.ndarray:
    """The seven columns with explicit loops over frames and models, ε² = ⟨|F|²⟩ − |⟨F⟩|²."""
    coord = np.load(folder / "set.000" / "coord.npy")
    box = np.load(folder / "set.000" / "box.npy") if periodic else None
    atype = np.loadtxt(folder / "type.raw", dtype=np.int64)
    natoms = atype.size
    outs = [pot.evaluate(coord, box, atype) for pot in pots]
    rows = []
    for f in range(coord.shape[0]):
        forces = [o["force"][f].reshape(natoms, 3) for o in outs]
        mean = sum(forces) / len(forces)
        sq = sum((x**2).sum(1) for x in forces) / len(forces)
        eps_f = np.sqrt(np.maximum(sq - (mean**2).sum(1), 0.0))
        row = [0.0, 0.0, 0.0]
        if periodic:
            vir = np.array([o["virial"][f].reshape(9) / natoms for o in outs])
            eps_v = np.sqrt(((vir - vir.mean(0)) ** 2).mean(0))
            row = [eps_v.max(), eps_v.min(), np.sqrt((eps_v**2).sum()) / 3]
        energies = np.array([float(o["energy"][f]) / natoms for o in outs])
        row += [eps_f.max(), eps_f.min(), eps_f.mean(), energies.std()]
        rows.append(row)
    return np.array(rows)


def _read(path: Path) -> list[tuple[str, list[str], np.ndarray]]:
    """(system, column names, rows) per block of a model_devi.out."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        system, names = lines[i][2:], lines[i + 1][1:].split()
        i += 2
        rows = []
        while i < len(lines) and not lines[i].startswith("#"):
            rows.append([float(v) for v in lines[i].split()])
            i += 1
        blocks.append((system, names, np.array(rows)))
    return blocks


def test_matches_a_hand_computation(ensemble, tmp_path):
    _, _, periodic, isolated, pots = ensemble
    out = tmp_path / "model_devi.out"
    done = make_model_devi(pots, [str(periodic), str(isolated)], out, frequency=10)
    assert done == [(str(periodic), NFRAMES), (str(isolated), NFRAMES)]
    blocks = _read(out)
    assert [b[0] for b in blocks] == [str(periodic), str(isolated)]
    for (system, names, rows), folder, pbc in zip(blocks, (periodic, isolated), (True, False)):
        assert names == ["step", "max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f", "devi_e"]
        assert np.array_equal(rows[:, 0], np.arange(NFRAMES) * 10)
        expected = _by_hand(pots, folder, pbc)
        # the file holds 7 significant digits (DeePMD-kit's %19.6e)
        assert np.allclose(rows[:, 1:], expected, rtol=2e-6, atol=1e-12)
        assert (rows[:, 4] > 0).all() and (rows[:, 4] >= rows[:, 6]).all() and (rows[:, 6] >= rows[:, 5]).all()
        if not pbc:
            assert (rows[:, 1:4] == 0).all()
    # DeePMD-kit's exact layout: %10s/%19s header, %12d step, %19.6e values
    text = out.read_text().splitlines()
    assert text[1] == "# " + "%10s" % "step" + "".join("%19s" % c for c in blocks[0][1][1:])
    assert len(text[2]) == 12 + 7 * 19


def test_relative_deviation(ensemble, tmp_path):
    _, _, periodic, _, pots = ensemble
    out = tmp_path / "rel.out"
    make_model_devi(pots, [str(periodic)], out, relative=1.0, relative_v=0.5)
    rows = _read(out)[0][2]
    coord = np.load(periodic / "set.000" / "coord.npy")
    box = np.load(periodic / "set.000" / "box.npy")
    atype = np.loadtxt(periodic / "type.raw", dtype=np.int64)
    outs = [pot.evaluate(coord, box, atype) for pot in pots]
    forces = np.stack([o["force"].reshape(NFRAMES, -1, 3) for o in outs])
    eps = np.sqrt(((forces - forces.mean(0)) ** 2).sum(-1).mean(0)) / (np.linalg.norm(forces.mean(0), axis=-1) + 1.0)
    assert np.allclose(rows[:, 4], eps.max(1), rtol=2e-6, atol=0)
    vir = np.stack([o["virial"].reshape(NFRAMES, 9) for o in outs]) / atype.size
    eps_v = vir.std(0) / (np.linalg.norm(vir.mean(0), axis=-1, keepdims=True) + 0.5)
    assert np.allclose(rows[:, 1], eps_v.max(1), rtol=2e-6, atol=0)


def test_blocks_of_frames_give_the_same_table(ensemble):
    """A long trajectory is evaluated block by block (bounded memory): same rows as at once."""
    from mtcore.model_devi import system_deviation

    _, _, periodic, _, pots = ensemble
    whole = system_deviation(pots[:2], periodic)
    blocks = system_deviation(pots[:2], periodic, block=3)
    assert whole.shape == (NFRAMES, 7)
    assert np.allclose(whole, blocks, rtol=1e-10, atol=1e-14)


def test_cli_and_refusals(ensemble, tmp_path):
    _, paths, periodic, _, _ = ensemble
    runner = CliRunner()
    out = tmp_path / "model_devi.out"
    args = ["model-devi", "-m", str(paths[0]), "-m", str(paths[1]), "-s", str(periodic), "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 models" in result.output
    first = out.read_text()
    # dp model-devi's spelling, as DP-GEN calls it: -m followed by several files
    result = runner.invoke(app, ["model-devi", "-m", str(paths[0]), str(paths[1]), "-s", str(periodic), "-o", str(out)])
    assert result.exit_code == 0 and "2 models" in result.output, result.output
    assert out.read_text() == first
    assert _read(out)[0][2].shape == (NFRAMES, 8)
    assert runner.invoke(app, args).exit_code == 0  # its own earlier output may be replaced
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\n")
    result = runner.invoke(app, args[:-1] + [str(mine)])
    assert result.exit_code == 1 and "not a model_devi.out" in result.output and mine.read_text() == "my notes\n"
    result = runner.invoke(app, ["model-devi", "-m", str(paths[0]), "-s", str(periodic), "-o", str(tmp_path / "x.out")])
    assert result.exit_code == 1 and "at least two models" in result.output
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(MtcoreError, match="frequency"):
        make_model_devi(paths, [str(periodic)], tmp_path / "y.out", frequency=0)


def test_ase_ensemble_reports_the_deviation(ensemble):
    pytest.importorskip("ase")
    from ase import Atoms

    from mtcore.calculator import MtcoreCalculator

    _, _, periodic, _, pots = ensemble
    coord = np.load(periodic / "set.000" / "coord.npy")[0].reshape(-1, 3)
    box = np.load(periodic / "set.000" / "box.npy")[0].reshape(3, 3)
    atype = np.loadtxt(periodic / "type.raw", dtype=np.int64)
    atoms = Atoms(symbols=["O" if t == 0 else "H" for t in atype], positions=coord, cell=box, pbc=True)
    atoms.calc = MtcoreCalculator(pots)
    forces = atoms.get_forces()
    devi = atoms.calc.get_property("model_devi")
    alone = MtcoreCalculator(pots[0])
    atoms_alone = atoms.copy()
    atoms_alone.calc = alone
    assert np.allclose(forces, atoms_alone.get_forces(), atol=1e-10, rtol=0)  # the first model's forces
    expected = _by_hand(pots, periodic, True)[0]
    assert np.allclose(devi, expected[3:6], rtol=1e-10, atol=1e-12)
    with pytest.raises(MtcoreError):
        alone.get_property("model_devi", atoms_alone)
