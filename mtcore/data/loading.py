"""Finding and loading data systems through the registered data-loader plugins."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np

from mtcore.data.dataset import DataSet
from mtcore.data.frames import FrameStore, check_stores, stores_of
from mtcore.data.neighbors import NeighborCache, max_neighbor_counts
from mtcore.data.requirements import DataRequirement
from mtcore.data.statsample import neighbor_stat_frames
from mtcore.data.system import SystemData
from mtcore.errors import MtcoreError, PluginError
from mtcore.hookspecs import NeighborStat
from mtcore.plugins import Registry


def _loader_for(path: Path, registry: Registry):
    """The first loader that recognises ``path`` (the registry refuses an ambiguous one). A
    loader's ``detect`` that fails on it (one written for folders, given a file) is one line."""
    try:
        return registry.loader_for(path)
    except OSError as exc:
        raise MtcoreError(f"{path}: a data loader's detect() failed on it ({type(exc).__name__}: {exc.strerror or exc})") from None


def _formats(registry: Registry) -> str:
    return ", ".join(registry.names("data_loader")) or "none installed"


def _file_loader(path: Path, registry: Registry):
    """The loader of a file met while searching a folder. Loaders written when ``detect`` saw only
    folders may raise on a file (``os.listdir``): that file is skipped with a warning naming it,
    so one such plugin never stops a search."""
    try:
        return _loader_for(path, registry)
    except MtcoreError as exc:
        if isinstance(exc, PluginError):
            raise  # a name two packages register: the user must choose
        warnings.warn(f"skipped: {exc}")
        return None


def _walk_systems(root: Path, registry: Registry) -> list[Path]:
    """Every system below ``root``, folders and files alike (a format may keep one system per
    file), in a stable order. Folder links are followed (data trees are often built from links)
    but each real folder is entered once, so a link loop ends the walk instead of looping. Files
    inside a system folder belong to it and are not offered as systems of their own."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    in_system: dict[str, bool] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
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
        folder = Path(dirpath)
        is_system = _loader_for(folder, registry) is not None
        inside = is_system or in_system.get(os.path.dirname(dirpath), False)
        in_system[dirpath] = inside
        if is_system:
            found.append(folder)
        if not inside:
            found.extend(folder / name for name in sorted(filenames) if _file_loader(folder / name, registry) is not None)
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
            raise MtcoreError(f"{where}/systems: {path}: is a link to a missing file or folder") from None
        raise MtcoreError(f"{where}/systems: {path}: not found") from None


def expand_systems(systems: Union[str, list], registry: Registry, where: str) -> list[Path]:
    """A list of systems (folders or files, whatever the loaders recognise); a single folder
    string means every system found below it, a single file string that one file."""
    if isinstance(systems, str):
        root = Path(systems)
        _check_link(root, where)
        if not root.is_dir():
            if _loader_for(root, registry) is None:
                raise MtcoreError(f"{where}/systems: {root}: not a folder, nor a data file any loader "
                                  f"recognises (formats: {_formats(registry)})")
            return [root]
        found = _walk_systems(root, registry)
        if not found:
            raise MtcoreError(f"{where}/systems: no data system found below {root}")
        return found
    if not isinstance(systems, list) or not systems:
        raise MtcoreError(f"{where}/systems: expected a folder or a non-empty list of systems, got {systems!r}")
    paths = []
    for s in systems:
        if not isinstance(s, str):
            raise MtcoreError(f"{where}/systems: expected system paths (strings), got {s!r}")
        path = Path(s)
        _check_link(path, where)
        paths.append(path)
    return paths


def load_system(
    path: Path, type_map: Optional[list[str]], requirements: list[DataRequirement], set_prefix: str, registry: Registry,
    full_check: Optional[bool] = None,
) -> SystemData:
    """One system through its loader, checked (:func:`check_system`; ``full_check`` as there)."""
    loader = _loader_for(path, registry)
    if loader is None:
        what = "folder" if Path(path).is_dir() else "file"
        raise MtcoreError(f"{path}: not a data system any loader recognises as a {what} "
                          f"(formats: {_formats(registry)}; a deepmd/npy folder needs type.raw)")
    system = loader.load(path, type_map, requirements, set_prefix)
    check_system(system, len(type_map) if type_map else None, full_check)
    return system


def _arrays(system: SystemData) -> list:
    return [("coordinates", system.coords), ("cells", system.boxes)] + sorted(system.labels.items())


def check_system(system: SystemData, ntypes: Optional[int] = None, full_check: Optional[bool] = None) -> None:
    """What every loader must deliver, checked whatever the format: frames, finite numbers,
    types inside the type_map. Loaders give more precise messages (the file); this is the net
    under third-party loaders. One vectorised pass per in-memory array. Arrays read from disk
    (FrameStore) check each frame as it is read; they are scanned whole here as well when
    ``full_check`` says so (None: when this system holds at most FULL_CHECK_BYTES)."""
    if system.nframes == 0 or system.natoms == 0:
        raise MtcoreError(f"{system.path}: holds no frames or no atoms")
    arrays = _arrays(system)
    stores = stores_of(values for _, values in arrays)
    if full_check is None:
        check_stores(stores)
    elif full_check:
        check_stores(stores, limit=1 << 62)
    for name, values in arrays:
        if values is None or isinstance(values, FrameStore):
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
    systems = [load_system(p, type_map, requirements, section.get("set_prefix", "set"), registry, full_check=False)
               for p in paths]
    # small data is scanned whole now (errors before anything starts); large data frame by frame
    check_stores(stores_of(values for s in systems for _, values in _arrays(s)))
    return DataSet(systems, section.get("batch_size", "auto"), section.get("auto_prob", "prob_sys_size"),
                   section.get("sys_probs"), cache, where)


#: frames of one system read at once by the neighbour statistics
_STAT_CHUNK = 256


def pooled_neighbor_stat(systems: list[SystemData], ntypes: int, max_frames: Optional[int] = None,
                         seed: int = 0) -> NeighborStat:
    """Neighbour statistics over the frames of ``systems`` (all heads' training data): every
    frame when they hold at most ``max_frames`` (None: always), else a bounded seeded sample
    (statsample.neighbor_stat_frames). ``frames_read``/``frames_total`` say which it was."""
    computed: dict[float, tuple[list, int, float]] = {}
    picked = neighbor_stat_frames([s.nframes for s in systems], max_frames, np.random.default_rng([seed, 2]))

    def counts(rcut: float) -> tuple[list, int, float]:
        if not rcut > 0:
            raise MtcoreError(f"model/descriptor/rcut: must be a positive distance, got {rcut}")
        if rcut not in computed:
            per_type = np.zeros(ntypes, dtype=np.int64)
            total, mind = 0, np.inf
            for system, chosen in zip(systems, picked):
                for start in range(0, len(chosen), _STAT_CHUNK):  # one read per chunk, memory bounded
                    frames = chosen[start:start + _STAT_CHUNK]
                    coords = system.coords[frames]
                    boxes = None if system.boxes is None else system.boxes[frames]
                    atypes = np.asarray(system.atypes[frames])
                    for k, f in enumerate(frames):
                        box = None if boxes is None else boxes[k]
                        per, tot, d = max_neighbor_counts(coords[k], box, atypes[k], rcut, ntypes,
                                                          name=(system.path, int(f)))
                        per_type = np.maximum(per_type, per)
                        total, mind = max(total, tot), min(mind, d)
            computed[rcut] = ([int(v) for v in per_type], total, float(mind))
        return computed[rcut]

    def max_count(rcut: float, mixed: bool) -> list:
        per, total, _ = counts(float(rcut))
        return [total] if mixed else list(per)

    def min_distance() -> float:
        return min((c[2] for c in computed.values()), default=float("inf"))

    stat = NeighborStat(max_count=max_count, min_distance=min_distance, ntypes=ntypes)
    stat.frames_read = sum(len(f) for f in picked)  # for the plan table
    stat.frames_total = sum(s.nframes for s in systems)
    return stat
