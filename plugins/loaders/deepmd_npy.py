"""deepmd/npy: DeePMD-kit's system folders (type.raw, type_map.raw, nopbc, set.*/*.npy).

Only ever reads. Atom types are mapped from the system's ``type_map.raw`` onto the model's
``type_map`` by element name. Mixed-type systems (``real_atom_types.npy`` per set) give per-frame
types. Atomic tensor labels stored for selected types only (v2) or for every atom (v3) are both
accepted and returned with one row per atom.

Set files are memory-mapped: a system is opened from the file headers, and its frames are read,
converted to float64 and checked for NaN/inf when a batch or the statistics ask for them
(mtcore.data.frames), so a data set can be larger than memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from mtcore.data.frames import FramePart, FrameStore, check_finite_rows, open_npy
from mtcore.data.requirements import DataRequirement
from mtcore.data.system import SystemData
from mtcore.errors import MtcoreError
from mtcore.hookspecs import DataLoaderRegistration, hookimpl

#: the plugin API this module was written for (mtcore.hookspecs: versions)
MTCORE_PLUGIN_API = 2

DOC = "DeePMD-kit's deepmd/npy system folders."


def detect(path: Path) -> bool:
    return (Path(path) / "type.raw").is_file()


def _read_npy(path: Path) -> np.ndarray:
    """A numeric .npy file, memory-mapped when it can be (frames are read when a batch asks for
    them; float32 stays float32 on disk and becomes float64 per read); anything else is one line
    naming the file."""
    try:
        raw = open_npy(path)
    except MtcoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear line
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise MtcoreError(f"{path}: cannot be read as a .npy array ({type(exc).__name__}: {detail})") from None
    if not isinstance(raw, np.ndarray) or raw.dtype.kind not in "biuf":
        kind = raw.dtype if isinstance(raw, np.ndarray) else type(raw).__name__
        raise MtcoreError(f"{path}: holds {kind} values; expected real numbers")
    if raw.ndim == 0:
        raise MtcoreError(f"{path}: holds a single number; expected one row per frame")
    return raw


def _frames(path: Path, raw: np.ndarray, nframes: int, width: Optional[int] = None) -> np.ndarray:
    """``raw`` as [nframes, values]. The first axis counts frames; a 1-D file is cut into frames of
    ``width`` values (into ``nframes`` rows when the width is not fixed). A frame count that
    differs from coord.npy's is reported as the two frame counts."""
    if raw.ndim == 1:
        if width is None:
            width = raw.size // nframes if nframes and raw.size % nframes == 0 else raw.size
        if width == 0 or raw.size % width:
            raise MtcoreError(f"{path}: holds {raw.size} values, not a whole number of frames of {width} values")
        raw = raw.reshape(-1, width)
    if raw.shape[0] != nframes:
        count = raw.shape[0]
        raise MtcoreError(f"{path}: has {count} frame{'' if count == 1 else 's'}; coord.npy has {nframes}")
    return raw.reshape(nframes, -1)


def check_finite(path: Path, values: np.ndarray, per_atom: int = 0) -> None:
    """Refuse NaN/inf in a whole in-memory array: one vectorised test; the message names the
    first bad frame (and atom, for atomic arrays of ``per_atom`` values per atom) and how many
    are bad. Frames read lazily are checked as they are read (mtcore.data.frames)."""
    values = np.asarray(values, dtype=np.float64)
    check_finite_rows(str(path), values.reshape(values.shape[0], -1), np.arange(values.shape[0]), per_atom,
                      whole_file=True)


def _read_types(system: Path) -> np.ndarray:
    path = system / "type.raw"
    try:
        text = path.read_text()
        types = np.array([int(v) for v in text.split()], dtype=np.int64)
    except (OSError, ValueError, OverflowError) as exc:
        raise MtcoreError(f"{path}: expected whitespace-separated integer atom types ({exc})") from None
    if types.size == 0:
        raise MtcoreError(f"{path}: lists no atoms")
    if types.min() < 0:
        raise MtcoreError(f"{path}: atom types must be non-negative")
    return types


def _type_mapping(system: Path, ntypes_in_file: int, type_map: Optional[list[str]]) -> np.ndarray:
    """index in the system's types → index in the model's type_map."""
    map_file = system / "type_map.raw"
    if not map_file.is_file():
        if type_map is not None and ntypes_in_file > len(type_map):
            raise MtcoreError(
                f"{system}/type.raw: uses {ntypes_in_file} types but the model's type_map has {len(type_map)} "
                "(add a type_map.raw to map elements by name)"
            )
        return np.arange(ntypes_in_file)
    try:
        names = map_file.read_text().split()
    except (OSError, ValueError) as exc:
        raise MtcoreError(f"{map_file}: cannot be read as text ({exc})") from None
    if not names:
        raise MtcoreError(f"{map_file}: is empty; expected one element name per type")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MtcoreError(
            f"{map_file}: names {', '.join(repr(n) for n in repeated)} twice; each type needs its own element name"
        )
    if len(names) < ntypes_in_file:
        raise MtcoreError(f"{map_file}: names {len(names)} types but type.raw uses {ntypes_in_file}")
    if type_map is None:
        return np.arange(len(names))
    mapping = []
    for name in names:
        if name not in type_map:
            raise MtcoreError(f"{map_file}: element '{name}' is not in the model's type_map {type_map}")
        mapping.append(type_map.index(name))
    return np.array(mapping, dtype=np.int64)


def _label(
    set_dir: Path, req: DataRequirement, nframes: int, natoms: int, atypes: np.ndarray
) -> Optional[FramePart]:
    """The label file of one set as a lazily read part (None when the file is absent). Shapes
    are checked now, from the file header; values when frames are read."""
    path = set_dir / f"{req.key}.npy"
    if not path.is_file():
        return None
    fixed = req.ndof if not req.atomic else (natoms * req.ndof if req.sel_types is None else None)
    raw = _frames(path, _read_npy(path), nframes, fixed)
    width = raw.shape[1]
    if not req.atomic:
        if width != req.ndof:
            raise MtcoreError(f"{path}: has {width} values per frame; expected {req.ndof}")
        return FramePart(str(path), raw)
    ndof = req.ndof
    if width == natoms * ndof:
        if req.sel_types is None:
            return FramePart(str(path), raw, ndof)
        selected = np.isin(atypes, req.sel_types)  # [nframes, natoms] (a broadcast view: no copy)

        def masked(rows: np.ndarray, local: np.ndarray) -> np.ndarray:
            return rows.reshape(len(local), natoms, ndof) * selected[local][..., None]

        return FramePart(str(path), raw, ndof, masked)
    if req.sel_types is not None:
        selected = np.isin(atypes, req.sel_types)  # [nframes, natoms]
        counts = selected.sum(1)
        if np.all(counts * ndof == width):

            def scattered(rows: np.ndarray, local: np.ndarray) -> np.ndarray:
                out = np.zeros((len(local), natoms, ndof))
                out[selected[local]] = rows.reshape(-1, ndof)
                return out

            return FramePart(str(path), raw, 0, scattered)
        if int(counts.min()) == natoms:  # every atom is selected: one layout only
            raise MtcoreError(f"{path}: has {width} values per frame; expected {natoms * ndof} ({ndof} per atom)")
        raise MtcoreError(
            f"{path}: has {width} values per frame; expected {natoms * ndof} (every atom) or "
            f"{int(counts[0]) * ndof} (atoms of types {list(req.sel_types)} only)"
        )
    raise MtcoreError(f"{path}: has {width} values per frame; expected {natoms * ndof} ({ndof} per atom)")


def _check_volume(path: str, rows: np.ndarray, local: np.ndarray) -> None:
    """A cell of zero volume makes every periodic image the same point: refuse it by frame."""
    flat = np.abs(np.linalg.det(rows.reshape(-1, 3, 3))) < 1e-8
    if flat.any():
        raise MtcoreError(f"{path}: the cell of frame {int(local[int(np.argmax(flat))])} has zero volume")


def load(path: Path, type_map: Optional[list[str]], requirements: list[DataRequirement], set_prefix: str) -> SystemData:
    """Open a system: headers, shapes and types are checked now; coordinates, cells and labels
    stay on disk (memory-mapped) and are read, converted and checked frame by frame."""
    system = Path(path)
    if not system.is_dir():
        raise MtcoreError(f"{system}: data system folder not found")
    if not detect(system):
        raise MtcoreError(f"{system}: not a deepmd/npy system (no type.raw)")
    types = _read_types(system)
    mapping = _type_mapping(system, int(types.max()) + 1, type_map)
    natoms = types.size
    set_dirs = sorted(p for p in system.glob(f"{set_prefix}.*") if p.is_dir())
    if not set_dirs:
        raise MtcoreError(f"{system}: no {set_prefix}.* folder found")
    periodic = not (system / "nopbc").exists()
    coords, boxes, atypes, sizes = [], [], [], []
    mixed = False
    labels: dict[str, list] = {}
    for set_dir in set_dirs:
        coord_file = set_dir / "coord.npy"
        if not coord_file.is_file():
            raise MtcoreError(f"{coord_file}: not found (every set folder needs coord.npy)")
        coord = _read_npy(coord_file)
        if coord.shape[0] == 0 or coord.size == 0:
            raise MtcoreError(f"{coord_file}: holds no frames (shape {coord.shape}); remove the empty set folder")
        coord = coord.reshape(1, -1) if coord.ndim == 1 else coord.reshape(coord.shape[0], -1)
        if coord.shape[1] != 3 * natoms:
            raise MtcoreError(
                f"{coord_file}: has {coord.shape[1]} values per frame but type.raw lists {natoms} atoms "
                f"(expected {3 * natoms})"
            )
        nframes = coord.shape[0]
        coords.append(FramePart(str(coord_file), coord, 3))
        sizes.append(nframes)
        real_types_file = set_dir / "real_atom_types.npy"
        if real_types_file.is_file():  # per-frame types are read whole: one small int per atom
            mixed = True
            real_raw = np.asarray(_frames(real_types_file, _read_npy(real_types_file), nframes, natoms), dtype=np.float64)
            check_finite(real_types_file, real_raw, 1)
            if np.any(real_raw != np.round(real_raw)):
                raise MtcoreError(f"{real_types_file}: atom types must be integers")
            real = real_raw.astype(np.int64)
            if real.shape[1] != natoms:
                raise MtcoreError(f"{real_types_file}: has {real.shape[1]} atoms per frame; expected {natoms}")
            if real.max() >= len(mapping):
                raise MtcoreError(f"{real_types_file}: uses type {real.max()} beyond {system}/type_map.raw")
            frame_types = np.where(real >= 0, mapping[np.clip(real, 0, None)], -1)
        else:
            frame_types = np.broadcast_to(mapping[types], (nframes, natoms))
        atypes.append(frame_types)
        if periodic:
            box_file = set_dir / "box.npy"
            if not box_file.is_file():
                raise MtcoreError(f"{box_file}: not found (add an empty 'nopbc' file for a non-periodic system)")
            box = _frames(box_file, _read_npy(box_file), nframes, 9)
            if box.shape[1] != 9:
                raise MtcoreError(f"{box_file}: has {box.shape[1]} values per frame; expected 9 (a 3x3 cell)")
            boxes.append(FramePart(str(box_file), box, 0, None, _check_volume))
        for req in requirements:
            value = _label(set_dir, req, nframes, natoms, frame_types)
            labels.setdefault(req.key, []).append(value)
    merged: dict[str, FrameStore] = {}
    for req in requirements:
        parts = labels.get(req.key, [])
        found = [p is not None for p in parts]
        if all(found) and parts:
            merged[req.key] = FrameStore(parts, (natoms, req.ndof) if req.atomic else (req.ndof,))
        elif any(found):
            missing = [str(d.name) for d, f in zip(set_dirs, found) if not f]
            raise MtcoreError(f"{system}: {req.key}.npy is missing in {', '.join(missing)} but present in other sets")
        elif req.must:
            raise MtcoreError(f"{set_dirs[0]}/{req.key}.npy: not found (required)")
    total = sum(sizes)
    if not mixed:  # the same types in every frame: one row, broadcast (nothing per frame in memory)
        all_types = np.broadcast_to(mapping[types], (total, natoms))
    else:
        all_types = np.concatenate([np.asarray(a) for a in atypes])
        if len(set(map(tuple, all_types))) == 1:
            all_types = np.broadcast_to(all_types[0], all_types.shape)
    return SystemData(
        path=str(system),
        atypes=all_types,
        coords=FrameStore(coords, (natoms, 3)),
        boxes=FrameStore(boxes, (3, 3)) if periodic else None,
        labels=merged,
        set_sizes=sizes,
    )


@hookimpl
def mtcore_data_loaders() -> list[DataLoaderRegistration]:
    return [DataLoaderRegistration(name="deepmd/npy", detect=detect, load=load, aliases=("npy",), doc=DOC)]
