"""Finding and loading data systems through the registered data-loader plugins."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from mtcore.data.dataset import DataSet
from mtcore.data.neighbors import NeighborCache, max_neighbor_counts
from mtcore.data.requirements import DataRequirement
from mtcore.data.system import SystemData
from mtcore.errors import MtcoreError
from mtcore.hookspecs import NeighborStat
from mtcore.plugins import Registry


def _loader_for(path: Path, registry: Registry):
    return registry.loader_for(path)  # first loader that recognises it; refuses an ambiguous one


def _walk_systems(root: Path, registry: Registry) -> list[Path]:
    """Every system folder below ``root``, following folder links (data trees are often built from
    links) but entering each real folder once, so a link loop ends the walk instead of looping."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        try:
            info = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen:
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames.sort()
        if _loader_for(Path(dirpath), registry) is not None:
            found.append(Path(dirpath))
    return found


def _check_link(path: Path, where: str) -> None:
    """A path that is a link loop (or leads into one) is named as such, not as 'not found'."""
    try:
        path.resolve(strict=True)
    except RuntimeError:
        raise MtcoreError(f"{where}/systems: {path}: is a symlink loop") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MtcoreError(f"{where}/systems: {path}: is a symlink loop") from None
        if path.is_symlink():
            raise MtcoreError(f"{where}/systems: {path}: is a link to a missing folder") from None
        raise MtcoreError(f"{where}/systems: {path}: folder not found") from None


def expand_systems(systems: Union[str, list], registry: Registry, where: str) -> list[Path]:
    """A list of system folders; a single folder string means every system found below it."""
    if isinstance(systems, str):
        root = Path(systems)
        _check_link(root, where)
        if not root.is_dir():
            raise MtcoreError(f"{where}/systems: {root}: folder not found")
        found = _walk_systems(root, registry)
        if not found:
            raise MtcoreError(f"{where}/systems: no data system found below {root}")
        return found
    if not isinstance(systems, list) or not systems:
        raise MtcoreError(f"{where}/systems: expected a folder or a non-empty list of folders, got {systems!r}")
    paths = []
    for s in systems:
        if not isinstance(s, str):
            raise MtcoreError(f"{where}/systems: expected folder paths (strings), got {s!r}")
        path = Path(s)
        _check_link(path, where)
        paths.append(path)
    return paths


def load_system(
    path: Path, type_map: Optional[list[str]], requirements: list[DataRequirement], set_prefix: str, registry: Registry
) -> SystemData:
    loader = _loader_for(path, registry)
    if loader is None:
        names = ", ".join(registry.names("data_loader")) or "none installed"
        raise MtcoreError(f"{path}: not a data system any loader recognises (formats: {names}; deepmd/npy needs type.raw)")
    system = loader.load(path, type_map, requirements, set_prefix)
    check_system(system, len(type_map) if type_map else None)
    return system


def check_system(system: SystemData, ntypes: Optional[int] = None) -> None:
    """What every loader must deliver, checked whatever the format: frames, finite numbers,
    types inside the type_map. Loaders give more precise messages (the file); this is the net
    under third-party loaders. One vectorised pass per array."""
    if system.nframes == 0 or system.natoms == 0:
        raise MtcoreError(f"{system.path}: holds no frames or no atoms")
    arrays = [("coordinates", system.coords), ("cells", system.boxes)] + sorted(system.labels.items())
    for name, values in arrays:
        if values is None:
            continue
        bad = ~np.isfinite(np.asarray(values))
        if bad.any():
            frame = int(np.argwhere(bad)[0][0])
            raise MtcoreError(f"{system.path}: {name} hold NaN or inf (first in frame {frame})")
    atypes = np.asarray(system.atypes)
    if ntypes is not None and atypes.size and (atypes.max() >= ntypes or atypes.min() < -1):
        raise MtcoreError(f"{system.path}: atom types outside 0..{ntypes - 1} (the model's type_map)")


def load_dataset(
    section: dict,
    type_map: Optional[list[str]],
    requirements: list[DataRequirement],
    cache: NeighborCache,
    registry: Registry,
    where: str,
) -> DataSet:
    paths = expand_systems(section["systems"], registry, where)
    systems = [load_system(p, type_map, requirements, section.get("set_prefix", "set"), registry) for p in paths]
    return DataSet(systems, section.get("batch_size", "auto"), section.get("auto_prob", "prob_sys_size"),
                   section.get("sys_probs"), cache, where)


def pooled_neighbor_stat(systems: list[SystemData], ntypes: int) -> NeighborStat:
    """Neighbour statistics over every frame of ``systems`` (all heads' training data)."""
    computed: dict[float, tuple[list, int, float]] = {}

    def counts(rcut: float) -> tuple[list, int, float]:
        if not rcut > 0:
            raise MtcoreError(f"model/descriptor/rcut: must be a positive distance, got {rcut}")
        if rcut not in computed:
            per_type = np.zeros(ntypes, dtype=np.int64)
            total, mind = 0, np.inf
            for system in systems:
                for f in range(system.nframes):
                    box = None if system.boxes is None else system.boxes[f]
                    per, tot, d = max_neighbor_counts(system.coords[f], box, np.asarray(system.atypes[f]), rcut, ntypes,
                                                      name=(system.path, f))
                    per_type = np.maximum(per_type, per)
                    total, mind = max(total, tot), min(mind, d)
            computed[rcut] = ([int(v) for v in per_type], total, float(mind))
        return computed[rcut]

    def max_count(rcut: float, mixed: bool) -> list:
        per, total, _ = counts(float(rcut))
        return [total] if mixed else list(per)

    def min_distance() -> float:
        return min((c[2] for c in computed.values()), default=float("inf"))

    return NeighborStat(max_count=max_count, min_distance=min_distance, ntypes=ntypes)
