"""The ASE calculator: forces are −∇E, stress is the finite-strain derivative of E, NVE conserves
energy, cell and pbc changes are honoured, every model source (frozen, united, checkpoint) and
head kind (energy, tensor, with fparam/aparam) works, and bad input is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("ase", reason="ase is not installed (pip install -e '.[ase]')")

from ase import Atoms, units  # noqa: E402
from ase.md.velocitydistribution import Stationary, ZeroRotation  # noqa: E402
from ase.md.verlet import VelocityVerlet  # noqa: E402
from rich.console import Console  # noqa: E402

from helpers import ROOT, SE_E2_A, model_with_stats, water_frame, write_input  # noqa: E402
import helpers  # noqa: E402
from mtcore import infer  # noqa: E402
from mtcore.calculator import MtcoreCalculator, PropertyNotAvailable  # noqa: E402
from mtcore.config import load_config  # noqa: E402
from mtcore.errors import MtcoreError  # noqa: E402
from mtcore.freeze import freeze  # noqa: E402
from mtcore.train.checkpoint import load_checkpoint  # noqa: E402
from mtcore.train.trainer import Trainer  # noqa: E402

QUIET = Console(file=open(os.devnull, "w"))
TENSOR = ROOT / "examples" / "water_tensor"
SMALL_SE = dict(SE_E2_A, neuron=[4, 8, 16], axis_neuron=4)


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # small MD systems, many calls


def two_head_input(numb_steps: int) -> dict:
    """An energy head on water and a dipole head on the water_tensor example, one descriptor."""
    return helpers.two_head_input(numb_steps, SMALL_SE)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 10-step two-head training: its checkpoint, one frozen file per head, a united file."""
    workdir = tmp_path_factory.mktemp("calc")
    Trainer(load_config(write_input(workdir, two_head_input(10))), workdir, QUIET).run()
    state = load_checkpoint(workdir / "model.ckpt.pt")
    files = {p.stem.replace("frozen_", ""): p for p in freeze(state, workdir / "frozen.pth")}
    united = freeze(state, workdir / "united.pth", united=True)[0]
    return {"checkpoint": workdir / "model.ckpt.pt", "united": united, **files}


def water_atoms(frame: int = 0, natoms: int = 192) -> Atoms:
    coord, atype, box = water_frame(frame)
    symbols = ["O" if t == 0 else "H" for t in atype.tolist()]
    return Atoms(symbols=symbols[:natoms], positions=coord.numpy()[:natoms], cell=box.numpy(), pbc=True)


def water_cluster(nmolecules: int = 16, frame: int = 0) -> Atoms:
    """Whole molecules nearest the box centre, unwrapped into an open cluster: a small system
    for long MD that keeps real water geometry (no broken bonds, no overlaps)."""
    atoms = water_atoms(frame)
    cell = atoms.cell.array
    inverse = np.linalg.inv(cell)

    def minimum_image(vectors):
        frac = vectors @ inverse
        return (frac - np.round(frac)) @ cell

    pos, numbers = atoms.positions, atoms.numbers
    oxygens, hydrogens = np.flatnonzero(numbers == 8), np.flatnonzero(numbers == 1)
    centre = cell.sum(0) / 2
    chosen = oxygens[np.argsort(np.linalg.norm(minimum_image(pos[oxygens] - centre), axis=1))[:nmolecules]]
    owner = np.argmin(np.linalg.norm(minimum_image(pos[hydrogens, None] - pos[None, oxygens]), axis=2), axis=1)
    symbols, positions = [], []
    for o in chosen:
        origin = centre + minimum_image(pos[o] - centre)
        members = hydrogens[oxygens[owner] == o]
        assert len(members) == 2
        symbols += ["O", "H", "H"]
        positions += [origin] + [origin + minimum_image(pos[h] - pos[o]) for h in members]
    return Atoms(symbols=symbols, positions=np.array(positions), pbc=False)


def types_of(atoms: Atoms) -> np.ndarray:
    return np.array([0 if s == "O" else 1 for s in atoms.get_chemical_symbols()])


def sheared(atoms: Atoms) -> Atoms:
    """The same atoms in a triclinic cell (a small shear of the orthogonal water box)."""
    out = atoms.copy()
    shear = np.array([[1.0, 0.0, 0.0], [0.13, 1.0, 0.0], [-0.07, 0.09, 1.0]])
    out.set_cell(shear @ atoms.cell.array, scale_atoms=True)
    return out


# ---------------------------------------------------------------------------------------------
# physics: forces, stress, energy conservation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("periodic", [True, False])
def test_forces_are_minus_the_energy_gradient(models, periodic):
    atoms = water_atoms(1, 48) if periodic else water_cluster(8)
    atoms.calc = MtcoreCalculator(models["water"], device="cpu")
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-3  # a test of something
    h = 1e-4
    numeric = np.zeros_like(forces)
    base = atoms.positions.copy()
    for i in range(0, len(atoms), 3):  # every third atom, all three directions
        for k in range(3):
            energies = []
            for step in (h, -h):
                atoms.positions = base
                atoms.positions[i, k] += step
                energies.append(atoms.get_potential_energy())
            numeric[i, k] = -(energies[0] - energies[1]) / (2 * h)
    rows = slice(0, len(atoms), 3)
    np.testing.assert_allclose(forces[rows], numeric[rows], rtol=0, atol=2e-6)


@pytest.mark.parametrize("triclinic", [False, True])
def test_stress_is_the_finite_strain_derivative(models, triclinic):
    atoms = water_atoms(2, 96)
    if triclinic:
        atoms = sheared(atoms)
    calc = MtcoreCalculator(models["water"], device="cpu")
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False)
    assert np.abs(stress).max() > 1e-6
    cell, positions, volume = atoms.cell.array.copy(), atoms.positions.copy(), atoms.get_volume()
    h = 1e-5
    numeric = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            energies = []
            for step in (h, -h):
                strain = np.eye(3)
                strain[a, b] += step
                strained = atoms.copy()
                strained.set_cell(cell @ strain, scale_atoms=False)
                strained.positions = positions @ strain
                strained.calc = calc
                energies.append(strained.get_potential_energy())
            numeric[a, b] = (energies[0] - energies[1]) / (2 * h) / volume  # σ = (1/V) ∂E/∂ε
    numeric = 0.5 * (numeric + numeric.T)
    np.testing.assert_allclose(stress, numeric, rtol=0, atol=1e-9)
    voigt = atoms.get_stress()
    np.testing.assert_allclose(voigt, stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]], rtol=0, atol=1e-15)


def nve_drift(atoms: Atoms, steps: int, timestep_fs: float = 0.5, temperature: float = 300.0, seed: int = 3):
    """Velocity Verlet from Maxwell–Boltzmann velocities; returns (drift meV/atom/ps from a linear
    fit of the total energy, largest deviation from the first total energy in meV/atom)."""
    masses = atoms.get_masses()[:, None]
    rng = np.random.default_rng(seed)
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * temperature))
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    totals = []
    dyn.attach(lambda: totals.append(atoms.get_total_energy()), interval=1)
    dyn.run(steps)
    totals = np.array(totals) / len(atoms)
    times = np.arange(len(totals)) * timestep_fs * 1e-3  # ps
    slope = np.polyfit(times, totals, 1)[0]
    return 1e3 * slope, 1e3 * np.abs(totals - totals[0]).max()


def test_nve_conserves_energy(models):
    """1,000 steps of 0.5 fs on a 16-molecule water cluster cut from a data frame."""
    atoms = water_cluster(16)
    atoms.calc = MtcoreCalculator(models["water"], device="cpu")
    start = time.perf_counter()
    drift, excursion = nve_drift(atoms, 1000)
    elapsed = time.perf_counter() - start
    print(f"NVE 1000 x 0.5 fs, {len(atoms)} atoms: drift {drift:.4f} meV/atom/ps, "
          f"max |E-E0| {excursion:.4f} meV/atom, {elapsed:.1f} s")
    assert atoms.get_temperature() > 10  # the atoms did move
    assert abs(drift) < 0.5, drift
    assert excursion < 2.0, excursion


# ---------------------------------------------------------------------------------------------
# cell, pbc, atoms changes between calls
# ---------------------------------------------------------------------------------------------


def test_cell_and_pbc_changes_are_honoured(models):
    pot = infer.load(models["water"])
    atoms = water_atoms(0, 96)
    atoms.calc = MtcoreCalculator(pot)
    types = types_of(atoms)

    def direct(box):
        return pot.evaluate(atoms.positions, box, types)

    ref = direct(atoms.cell.array)
    assert abs(atoms.get_potential_energy() - ref["energy"][0]) < 1e-9
    np.testing.assert_allclose(atoms.get_forces(), ref["force"][0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(atoms.get_potential_energies(), ref["atom_energy"][0], rtol=0, atol=1e-10)

    atoms.set_cell(atoms.cell.array * 0.97, scale_atoms=True)  # a new cell and positions
    ref = direct(atoms.cell.array)
    assert abs(atoms.get_potential_energy() - ref["energy"][0]) < 1e-9
    np.testing.assert_allclose(atoms.get_stress(voigt=False),
                               -ref["virial"][0].reshape(3, 3) / atoms.get_volume(), rtol=0, atol=1e-10)

    atoms.set_cell(atoms.cell.array * 1.5, scale_atoms=False)  # a new cell, same positions
    ref = direct(atoms.cell.array)
    assert abs(atoms.get_potential_energy() - ref["energy"][0]) < 1e-9

    atoms.pbc = False  # the same atoms, now open
    ref = direct(None)
    assert abs(atoms.get_potential_energy() - ref["energy"][0]) < 1e-9
    np.testing.assert_allclose(atoms.get_forces(), ref["force"][0], rtol=0, atol=1e-10)
    with pytest.raises(PropertyNotAvailable, match="stress: the atoms are not periodic"):
        atoms.get_stress()

    atoms.pbc = True
    assert abs(atoms.get_potential_energy() - direct(atoms.cell.array)["energy"][0]) < 1e-9

    atoms.pbc = [True, True, False]
    with pytest.raises(MtcoreError, match=r"pbc=\[True, True, False\] mixes periodic and open"):
        atoms.get_potential_energy()


def test_atoms_outside_the_cell_give_the_same_results(models):
    atoms = water_atoms(0, 96)
    calc = MtcoreCalculator(models["water"], device="cpu")
    atoms.calc = calc
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    moved = atoms.copy()
    moved.positions += (np.arange(len(atoms)) % 3)[:, None] * (np.array([2, -1, 3]) @ atoms.cell.array)
    moved.calc = calc
    assert abs(moved.get_potential_energy() - energy) < 1e-9
    np.testing.assert_allclose(moved.get_forces(), forces, rtol=0, atol=1e-10)
    np.testing.assert_allclose(moved.get_stress(), stress, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# model sources, heads, parameters, errors
# ---------------------------------------------------------------------------------------------


def test_every_model_source_gives_the_same_numbers(models):
    atoms = water_atoms(3, 60)
    atoms.calc = MtcoreCalculator(models["water"], device="cpu")
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    for source, head in ((models["united"], "water"), (models["checkpoint"], "water"),
                         (infer.load(models["water"]), None)):
        other = atoms.copy()
        other.calc = MtcoreCalculator(source, head=head, device="cpu")
        assert abs(other.get_potential_energy() - energy) < 1e-9
        np.testing.assert_allclose(other.get_forces(), forces, rtol=0, atol=1e-10)
        np.testing.assert_allclose(other.get_stress(), stress, rtol=0, atol=1e-12)
        assert other.calc.get_property("free_energy") == other.get_potential_energy()


def test_head_choice_errors_list_the_heads(models):
    with pytest.raises(MtcoreError, match=r"a united model; choose a head with head= \(one of water, dipole\)"):
        MtcoreCalculator(models["united"])
    with pytest.raises(MtcoreError, match=r"no head 'wate'; heads: water, dipole"):
        MtcoreCalculator(models["united"], head="wate")
    with pytest.raises(MtcoreError, match=r"multi-task checkpoint; choose a head .*one of water, dipole"):
        MtcoreCalculator(models["checkpoint"])
    with pytest.raises(MtcoreError, match="model file not found"):
        MtcoreCalculator(models["water"].with_name("missing.pth"))


def test_unknown_element_is_named(models):
    atoms = water_atoms(0, 6)
    atoms[0].symbol = "Na"
    atoms.calc = MtcoreCalculator(models["water"], device="cpu")
    with pytest.raises(MtcoreError, match=r"element Na is not in the model's type_map \['O', 'H'\]"):
        atoms.get_potential_energy()


@pytest.mark.parametrize("source", ["dipole", "united"])
def test_tensor_head_gives_its_tensor_and_refuses_energy(models, source):
    atoms = water_atoms(1, 96)
    calc = MtcoreCalculator(models[source], head="dipole" if source == "united" else None, device="cpu")
    atoms.calc = calc
    ref = infer.load(models["dipole"]).evaluate(atoms.positions, atoms.cell.array, types_of(atoms))
    np.testing.assert_allclose(atoms.get_dipole_moment(), ref["dipole"][0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(calc.get_property("atomic_dipole", atoms), ref["atomic_dipole"][0], rtol=0, atol=1e-10)
    assert np.abs(ref["dipole"][0]).max() > 1e-6
    assert calc.implemented_properties == ["dipole", "atomic_dipole"]
    with pytest.raises(PropertyNotAvailable, match=r"energy: head 'dipole' is a dipole head \(no energy"):
        atoms.get_potential_energy()
    with pytest.raises(PropertyNotAvailable):
        atoms.get_forces()


def test_polarizability_head_gives_a_3x3_tensor(tmp_path):
    doc = two_head_input(0)
    polar = [str(TENSOR / "polar" / "training_data" / n) for n in ("atomic_system", "global_system")]
    doc["model"]["fitting_net_dict"]["polar"] = {"type": "polar", "sel_type": [0], "neuron": [16, 16], "seed": 4,
                                                 "precision": "float64", "fit_diag": False}
    doc["loss_dict"]["polar"] = {"type": "tensor", "pref": 1.0, "pref_atomic": 1.0}
    doc["training"]["data_dict"]["polar"] = {"training_data": {"systems": polar, "batch_size": 1}}
    model, config = model_with_stats(doc, nbatch=1)
    path = freeze({"config": config.document, "model": model.state_dict()}, tmp_path / "polar.pth", head="polar")[0]
    atoms = water_atoms(0, 48)
    atoms.calc = MtcoreCalculator(path, device="cpu")
    ref = infer.load(path).evaluate(atoms.positions, atoms.cell.array, types_of(atoms))
    alpha = atoms.calc.get_property("polarizability", atoms)
    assert alpha.shape == (3, 3)
    np.testing.assert_allclose(alpha.reshape(9), ref["polarizability"][0], rtol=0, atol=1e-10)
    assert atoms.calc.get_property("atomic_polarizability", atoms).shape == (48, 3, 3)


def test_fparam_and_aparam_are_calculator_arguments(tmp_path):
    from test_fparam import parameter_input

    Trainer(load_config(write_input(tmp_path, parameter_input(tmp_path, numb_steps=1, aparam=True))), tmp_path, QUIET).run()
    path = freeze(load_checkpoint(tmp_path / "model.ckpt.pt"), tmp_path / "p.pth")[0]
    pot = infer.load(path)
    atoms = water_atoms(0, 30)
    aparam = np.random.default_rng(0).normal(size=(30, 2))
    energies = []
    for fparam in (0.7, 1.3):
        atoms.calc = MtcoreCalculator(pot, fparam=[fparam], aparam=aparam)
        ref = pot.evaluate(atoms.positions, atoms.cell.array, types_of(atoms), fparam=[fparam], aparam=aparam)
        energies.append(atoms.get_potential_energy())
        assert abs(energies[-1] - ref["energy"][0]) < 1e-9
        np.testing.assert_allclose(atoms.get_forces(), ref["force"][0], rtol=0, atol=1e-10)
    assert abs(energies[0] - energies[1]) > 1e-6  # the parameter reaches the model
    atoms.calc.set(fparam=[0.7])  # a parameter change drops the cached results
    assert abs(atoms.get_potential_energy() - energies[0]) < 1e-9
    with pytest.raises(MtcoreError, match=r"fparam: head 'default' needs fparam \(1 per frame\)"):
        MtcoreCalculator(pot, aparam=aparam)
    with pytest.raises(MtcoreError, match=r"fparam: head 'default' takes 1 value\(s\), got 2"):
        MtcoreCalculator(pot, fparam=[1.0, 2.0], aparam=aparam)


def test_parameters_refused_for_a_head_without_them(models):
    with pytest.raises(MtcoreError, match="fparam: head 'water' was trained without fparam"):
        MtcoreCalculator(models["water"], fparam=[1.0])


def test_import_mtcore_does_not_need_ase():
    script = (
        "import sys\nsys.modules['ase'] = None\n"
        "import mtcore, mtcore.infer, mtcore.cli\n"
        "try:\n    import mtcore.calculator\nexcept ImportError as e:\n    print('needs', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "needs" in out.stdout and "pip install" in out.stdout
