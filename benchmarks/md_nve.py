"""Energy drift of NVE molecular dynamics through the ASE calculator (and LAMMPS, if it loads).

    python benchmarks/md_nve.py MODEL [--steps 1000] [--dt 0.5] [--frame 0] [--lammps]

Velocity Verlet from 300 K Maxwell–Boltzmann velocities on a water frame of examples/water
(192 atoms, periodic); the drift is the slope of a linear fit of the total energy per atom
against time, in meV/atom/ps. Prints one line per engine.
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT / "examples" / "water" / "data" / "data_0" / "set.000"


def water(frame: int):
    from ase import Atoms

    coord = np.load(WATER / "coord.npy")[frame].reshape(-1, 3)
    box = np.load(WATER / "box.npy")[frame].reshape(3, 3)
    types = np.loadtxt(WATER.parent / "type.raw", dtype=int)
    return Atoms(["O" if t == 0 else "H" for t in types], positions=coord, cell=box, pbc=True)


def drift(totals: np.ndarray, dt_fs: float, natoms: int) -> tuple[float, float]:
    per_atom = totals / natoms
    times = np.arange(len(per_atom)) * dt_fs * 1e-3
    return 1e3 * np.polyfit(times, per_atom, 1)[0], 1e3 * np.abs(per_atom - per_atom[0]).max()


def run_ase(model: str, steps: int, dt: float, frame: int) -> None:
    from ase import units
    from ase.md.velocitydistribution import Stationary
    from ase.md.verlet import VelocityVerlet

    from mtcore.calculator import MtcoreCalculator

    atoms = water(frame)
    atoms.calc = MtcoreCalculator(model, device="cpu")
    rng = np.random.default_rng(3)
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(atoms.get_masses()[:, None] * units.kB * 300.0))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=dt * units.fs)
    totals = []
    dyn.attach(lambda: totals.append(atoms.get_total_energy()), interval=1)
    start = time.perf_counter()
    dyn.run(steps)
    elapsed = time.perf_counter() - start
    slope, excursion = drift(np.array(totals), dt, len(atoms))
    print(f"ASE    {len(atoms)} atoms, {steps} x {dt} fs: drift {slope:+.4f} meV/atom/ps, max |E-E0| "
          f"{excursion:.4f} meV/atom, final T {atoms.get_temperature():.0f} K, {1e3 * elapsed / steps:.1f} ms/step")


def run_lammps(model: str, steps: int, dt: float, frame: int) -> None:
    from mtcore.md.lammps import attach, import_lammps, write_data

    atoms = water(frame)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "w.data", atoms.positions, atoms.cell.array, atoms.get_chemical_symbols(), ["O", "H"])
        lmp = import_lammps().lammps(cmdargs=["-log", "none", "-screen", "none"])
        lmp.commands_string(f"units metal\natom_style atomic\nboundary p p p\nread_data {data}")
        coupling = attach(lmp, model, ["O", "H"])
        out = Path(tmp) / "e.txt"
        lmp.commands_string(f"velocity all create 300 3 dist gaussian mom yes\nfix nve all nve\ntimestep {dt * 1e-3}\n"
                            f"variable e equal etotal\nfix log all print 1 \"${{e}}\" screen no file {out}")
        start = time.perf_counter()
        lmp.command(f"run {steps}")
        elapsed = time.perf_counter() - start
        coupling.check()
        slope, excursion = drift(np.loadtxt(out, comments="#"), dt, len(atoms))
        print(f"LAMMPS {len(atoms)} atoms, {steps} x {dt} fs: drift {slope:+.4f} meV/atom/ps, max |E-E0| "
              f"{excursion:.4f} meV/atom, final T {lmp.get_thermo('temp'):.0f} K, {1e3 * elapsed / steps:.1f} ms/step")
        lmp.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--dt", type=float, default=0.5, help="time step in fs")
    parser.add_argument("--frame", type=int, default=0)
    parser.add_argument("--lammps", action="store_true", help="also run the LAMMPS coupling")
    args = parser.parse_args()
    run_ase(args.model, args.steps, args.dt, args.frame)
    if args.lammps:
        run_lammps(args.model, args.steps, args.dt, args.frame)


if __name__ == "__main__":
    main()
