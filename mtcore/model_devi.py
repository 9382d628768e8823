"""``mtcore model-devi``: how much an ensemble of models disagrees, frame by frame.

Written in DeePMD-kit's ``model_devi.out`` layout so that active-learning drivers built for
``dp model-devi`` (DP-GEN, which reads column 4, ``max_devi_f``) can call mtcore instead:
one ``# <system>`` line and a column header per system, then one row per frame::

    #       step         max_devi_v         min_devi_v         avg_devi_v         max_devi_f ...

Definitions (DeePMD-kit's; ⟨·⟩ is the mean over the models, deviations use 1/n_models):
- force, per atom: ε_F,i = sqrt(⟨|F_i − ⟨F_i⟩|²⟩); max / min / mean over the atoms;
- virial, per component: ε_V,αβ = std over models of V_αβ / N; max / min over the nine
  components, and their Euclidean norm / 3 as the average;
- energy: devi_e = std over models of E / N.
``relative=l`` divides ε_F,i by |⟨F_i⟩| + l; ``relative_v=l`` divides ε_V,αβ by the norm of the
mean per-atom virial + l (DeePMD-kit's relative deviations).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mtcore.errors import MtcoreError
from mtcore.infer import _renumber_frames

COLUMNS = ("max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f", "devi_e")


def force_deviation(forces: np.ndarray, relative: Optional[float] = None) -> np.ndarray:
    """Per-atom force deviation [nframes, natoms] from forces [nmodels, nframes, natoms, 3]."""
    mean = forces.mean(axis=0)
    devi = np.sqrt(np.mean(np.sum((forces - mean) ** 2, axis=-1), axis=0))
    if relative is not None:
        devi = devi / (np.linalg.norm(mean, axis=-1) + relative)
    return devi


def virial_deviation(virials: np.ndarray, natoms: int, relative_v: Optional[float] = None) -> np.ndarray:
    """Per-component deviation [nframes, 9] of the per-atom virial, virials [nmodels, nframes, 9]."""
    per_atom = virials / natoms
    devi = per_atom.std(axis=0)
    if relative_v is not None:
        devi = devi / (np.linalg.norm(per_atom.mean(axis=0), axis=-1, keepdims=True) + relative_v)
    return devi


def deviation_table(
    energies: np.ndarray,
    forces: np.ndarray,
    virials: Optional[np.ndarray],
    relative: Optional[float] = None,
    relative_v: Optional[float] = None,
) -> np.ndarray:
    """The seven data columns of model_devi.out, [nframes, 7], from the ensemble's predictions:
    energies [nmodels, nframes], forces [nmodels, nframes, natoms, 3], virials [nmodels, nframes, 9]
    or None (a non-periodic system: the virial columns are 0, as no cell defines them)."""
    nmodels, nframes, natoms = forces.shape[:3]
    f = force_deviation(forces, relative)
    out = np.zeros((nframes, 7))
    if virials is not None:
        v = virial_deviation(virials.reshape(nmodels, nframes, 9), natoms, relative_v)
        out[:, 0], out[:, 1], out[:, 2] = v.max(-1), v.min(-1), np.linalg.norm(v, axis=-1) / 3
    out[:, 3], out[:, 4], out[:, 5] = f.max(-1), f.min(-1), f.mean(-1)
    out[:, 6] = (energies.reshape(nmodels, nframes) / natoms).std(axis=0)
    return out


def header(system: str) -> str:
    """DeePMD-kit's header: the system on its own comment line, then the column names."""
    return f"{system}\n" + "%10s" % "step" + "".join("%19s" % c for c in COLUMNS)


def write_rows(handle, system: str, steps: np.ndarray, table: np.ndarray) -> None:
    data = np.concatenate([np.asarray(steps, dtype=np.float64).reshape(-1, 1), table], axis=1)
    np.savetxt(handle, data, fmt=["%12d"] + ["%19.6e"] * table.shape[1], delimiter="", header=header(system))


def load_models(paths: Sequence, head: Optional[str] = None, device: str = "cpu") -> list:
    """The ensemble: two or more energy models with one type_map (an error names the odd one)."""
    from mtcore.infer import DeepPotential

    if len(paths) < 2:
        raise MtcoreError(f"-m/--models: model deviation needs at least two models, got {len(paths)}")
    models = [p if isinstance(p, DeepPotential) else DeepPotential(p, head=head, device=device) for p in paths]
    names = [f"model {i}" if isinstance(p, DeepPotential) else str(p) for i, p in enumerate(paths)]
    first = models[0]
    for name, model in zip(names, models):
        if not model.head_metadata.get("output", {}).get("conservative", True):
            raise MtcoreError(f"{name}: head '{model.head}' is not an energy head (no forces to compare)")
        if model.type_map != first.type_map:
            raise MtcoreError(f"{name}: type_map {model.type_map} differs from {names[0]}'s {first.type_map}")
    return models


def ensemble_predictions(models: list, coords, box, atypes, virial: bool, fparam=None, aparam=None, chunk: int = 8):
    """Energies [M, B], forces [M, B, N, 3] and virials [M, B, 9] (or None) of every model on the
    frames (``chunk`` frames per call bounds memory on long trajectories)."""
    coords = np.asarray(coords, dtype=np.float64)
    nframes = coords.shape[0]
    natoms = np.asarray(atypes).shape[-1]
    energies = np.empty((len(models), nframes))
    forces = np.empty((len(models), nframes, natoms, 3))
    virials = np.empty((len(models), nframes, 9)) if virial else None
    for start in range(0, nframes, chunk):
        stop = min(nframes, start + chunk)
        frame_types = np.asarray(atypes)
        if frame_types.ndim == 2:
            frame_types = frame_types[start:stop]
        part = {
            "box": None if box is None else box[start:stop],
            "fparam": None if fparam is None else fparam[start:stop],
            "aparam": None if aparam is None else aparam[start:stop],
        }
        for m, model in enumerate(models):
            try:
                out = model.evaluate(coords[start:stop], part["box"], frame_types, virial=virial,
                                     fparam=part["fparam"], aparam=part["aparam"])
            except MtcoreError as exc:  # frame numbers of this chunk → of the caller's frames
                raise MtcoreError(_renumber_frames(str(exc), list(range(start, stop)))) from None
            energies[m, start:stop] = out["energy"].reshape(-1)
            forces[m, start:stop] = out["force"].reshape(stop - start, natoms, 3)
            if virial:
                virials[m, start:stop] = out["virial"].reshape(stop - start, 9)
    return energies, forces, virials


def system_deviation(models: list, path: Path, set_prefix: str = "set", relative=None, relative_v=None,
                     block: int = 256) -> np.ndarray:
    """The [nframes, 7] table of one system: every set folder, frames in order (as dp model-devi)."""
    from mtcore.data.loading import load_system
    from mtcore.data.requirements import DataRequirement
    from mtcore.plugins import get_registry

    first = models[0]
    reqs = [DataRequirement(i["key"], int(i["ndof"]), atomic=bool(i["atomic"]), must=True)
            for i in first.head_metadata.get("inputs", [])]
    system = load_system(Path(path), first.type_map, reqs, set_prefix, get_registry())
    atypes = np.asarray(system.atypes)  # one row per frame (mixed-type data too)
    fparam, aparam = system.labels.get("fparam"), system.labels.get("aparam")
    tables = []
    for start in range(0, system.nframes, block):  # a long trajectory: never all predictions at once
        stop = min(system.nframes, start + block)
        try:
            energies, forces, virials = ensemble_predictions(
                models, system.coords[start:stop], None if system.boxes is None else system.boxes[start:stop],
                atypes[start:stop], virial=system.boxes is not None,
                fparam=None if fparam is None else fparam[start:stop], aparam=None if aparam is None else aparam[start:stop],
            )
        except MtcoreError as exc:
            raise MtcoreError(f"{path}: {_renumber_frames(str(exc), list(range(start, stop)))}") from None
        tables.append(deviation_table(energies, forces, virials, relative, relative_v))
    return np.concatenate(tables)


def make_model_devi(
    models: Sequence,
    systems: list[str],
    output: Path,
    head: Optional[str] = None,
    set_prefix: str = "set",
    frequency: int = 1,
    relative: Optional[float] = None,
    relative_v: Optional[float] = None,
) -> list[tuple[str, int]]:
    """Write ``output`` (a new file, or one this command wrote: never someone else's); returns
    (system, frames) per system. ``step`` = frame index × ``frequency`` within each system."""
    from mtcore.data.loading import expand_systems
    from mtcore.plugins import get_registry
    from mtcore.train.checkpoint import atomic_text

    if frequency < 1:
        raise MtcoreError(f"-f/--frequency: must be a positive number of steps per frame, got {frequency}")
    for name, level in (("--relative", relative), ("--relative-v", relative_v)):
        if level is not None and not (np.isfinite(level) and level >= 0):
            raise MtcoreError(f"{name}: the level must be a finite non-negative number, got {level}")
    ensemble = load_models(list(models), head)
    paths: list[Path] = []
    for s in systems:
        paths.extend(expand_systems(s, get_registry(), "-s/--system"))
    tables = [(str(p), system_deviation(ensemble, p, set_prefix, relative, relative_v)) for p in paths]
    buffer = io.StringIO()
    for system, table in tables:
        write_rows(buffer, system, np.arange(table.shape[0]) * frequency, table)
    _check_output(Path(output))
    atomic_text(Path(output), buffer.getvalue())
    return [(s, t.shape[0]) for s, t in tables]


def _check_output(path: Path) -> None:
    """Replace only a model_devi.out this command wrote (its header says so); anything else of
    the user's is never overwritten."""
    if not path.exists():
        return
    if path.is_file():
        with open(path, errors="replace") as handle:
            lines = [handle.readline() for _ in range(2)]
        if len(lines) == 2 and lines[1].split()[:3] == ["#", "step", "max_devi_v"]:
            return
    raise MtcoreError(f"-o/--output {path}: exists and is not a model_devi.out; choose another name")
