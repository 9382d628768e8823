"""npz_system: one compressed numpy archive (``.npz``) per data system.

Arrays in the file (F frames, N atoms):

=============  ===========================================  ==========================================
key            shape                                        meaning
=============  ===========================================  ==========================================
``coord``      [F, N, 3] or [F, 3N]                         positions, Å
``box``        [F, 3, 3] or [F, 9]; absent = not periodic   cell vectors as rows, Å
``types``      [N] (or [F, N] when types change per frame)  type index into ``type_map``
``type_map``   [ntypes] strings (optional)                  element names; mapped onto the model's
                                                            ``type_map`` by name
any label      [F], [F, ndof], [F, N, ndof] or [F, N·ndof]  read when a head requires it (``energy``,
                                                            ``force``, ``gap``, ...)
=============  ===========================================  ==========================================

The whole file is one set (``mtcore test`` evaluates every frame of it). ``detect`` only looks at
the suffix and whether the path is a file, as mtcore requires: it is called for every file met
while searching a folder. The file is opened with ``allow_pickle=False``: an archive can never
run code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from mtcore.data.requirements import DataRequirement
from mtcore.data.system import SystemData
from mtcore.errors import MtcoreError
from mtcore.hookspecs import DataLoaderRegistration, hookimpl

#: The plugin API this module was written for (see docs/plugins.md, "Publishing").
MTCORE_PLUGIN_API = 2

NAME = "npz_system"
DOC = "One .npz file per system: coord, box (absent: not periodic), types, type_map, labels."
SUFFIX = ".npz"
STRUCTURE_KEYS = ("coord", "box", "types", "type_map")


def detect(path: Path) -> bool:
    """Cheap and safe: the suffix first, then one stat; the file is not opened."""
    path = Path(path)
    return path.suffix == SUFFIX and path.is_file()


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MtcoreError(f"{path}: cannot be read as a .npz archive of numeric arrays ({detail})") from None


def _numeric(path: Path, key: str, value: np.ndarray) -> np.ndarray:
    if value.dtype.kind not in "biuf":
        raise MtcoreError(f"{path}: array '{key}' holds {value.dtype} values; expected real numbers")
    value = value.astype(np.float64, copy=False)
    if not np.all(np.isfinite(value)):
        frame = int(np.argwhere(~np.isfinite(value.reshape(value.shape[0], -1)))[0][0]) if value.ndim else 0
        raise MtcoreError(f"{path}: array '{key}' has a non-finite value (frame {frame}); fix or drop these frames")
    return value


def _types(path: Path, arrays: dict, nframes: int, natoms: int, type_map: Optional[list[str]]) -> np.ndarray:
    """Model type indices [F, N] (a broadcast view when the types do not change per frame)."""
    if "types" not in arrays:
        raise MtcoreError(f"{path}: has no 'types' array (one type index per atom)")
    raw = arrays["types"]
    if raw.dtype.kind not in "iu":
        raise MtcoreError(f"{path}: array 'types' holds {raw.dtype} values; expected integers")
    if raw.shape not in ((natoms,), (nframes, natoms)):
        raise MtcoreError(f"{path}: array 'types' has shape {raw.shape}; expected ({natoms},) or ({nframes}, {natoms})")
    raw = raw.astype(np.int64)
    if raw.min() < 0:
        raise MtcoreError(f"{path}: array 'types' has negative entries")
    names = [str(n) for n in arrays["type_map"].tolist()] if "type_map" in arrays else None
    if names is None:
        mapping = np.arange(int(raw.max()) + 1)
        if type_map is not None and mapping.size > len(type_map):
            raise MtcoreError(f"{path}: uses {mapping.size} types but the model's type_map has {len(type_map)} "
                              "(add a 'type_map' array to map elements by name)")
    else:
        if int(raw.max()) >= len(names):
            raise MtcoreError(f"{path}: array 'types' uses type {int(raw.max())} but 'type_map' names {len(names)}")
        if type_map is None:
            mapping = np.arange(len(names))
        else:
            missing = [n for n in names if n not in type_map]
            if missing:
                raise MtcoreError(f"{path}: element '{missing[0]}' is not in the model's type_map {type_map}")
            mapping = np.array([type_map.index(n) for n in names], dtype=np.int64)
    mapped = mapping[raw]
    return np.broadcast_to(mapped, (nframes, natoms)) if mapped.ndim == 1 else mapped


def _label(path: Path, arrays: dict, req: DataRequirement, nframes: int, natoms: int, atypes: np.ndarray):
    if req.key not in arrays:
        if req.must:
            raise MtcoreError(f"{path}: has no '{req.key}' array (required)")
        return None
    value = _numeric(path, req.key, arrays[req.key])
    if value.ndim == 0 or value.shape[0] != nframes:
        raise MtcoreError(f"{path}: array '{req.key}' has shape {value.shape}; expected {nframes} frames first")
    flat = value.reshape(nframes, -1)
    expected = natoms * req.ndof if req.atomic else req.ndof
    if flat.shape[1] != expected:
        per = f" ({req.ndof} per atom)" if req.atomic else ""
        raise MtcoreError(f"{path}: array '{req.key}' has {flat.shape[1]} values per frame; expected {expected}{per}")
    if not req.atomic:
        return flat
    out = flat.reshape(nframes, natoms, req.ndof)
    if req.sel_types is not None:
        out = out * np.isin(atypes, req.sel_types)[..., None]
    return out


def load(path: Path, type_map: Optional[list[str]], requirements: list[DataRequirement], set_prefix: str) -> SystemData:
    """Read one system; ``set_prefix`` does not apply (the file is one set)."""
    path = Path(path)
    if not path.is_file():
        raise MtcoreError(f"{path}: data file not found")
    arrays = _read(path)
    if "coord" not in arrays:
        raise MtcoreError(f"{path}: has no 'coord' array")
    coord = _numeric(path, "coord", arrays["coord"])
    if coord.ndim not in (2, 3) or coord.shape[0] == 0 or coord.size == 0 or coord.reshape(coord.shape[0], -1).shape[1] % 3:
        raise MtcoreError(f"{path}: array 'coord' has shape {coord.shape}; expected [frames, atoms, 3]")
    nframes = coord.shape[0]
    coord = coord.reshape(nframes, -1, 3)
    natoms = coord.shape[1]
    atypes = _types(path, arrays, nframes, natoms, type_map)
    boxes = None
    if "box" in arrays:
        box = _numeric(path, "box", arrays["box"])
        if box.shape[:1] != (nframes,) or box.reshape(nframes, -1).shape[1] != 9:
            raise MtcoreError(f"{path}: array 'box' has shape {box.shape}; expected ({nframes}, 3, 3)")
        boxes = box.reshape(nframes, 3, 3)
        flat = np.abs(np.linalg.det(boxes)) < 1e-8
        if flat.any():
            raise MtcoreError(f"{path}: the cell of frame {int(np.argmax(flat))} has zero volume")
    labels = {}
    for req in requirements:
        value = _label(path, arrays, req, nframes, natoms, atypes)
        if value is not None:
            labels[req.key] = value
    return SystemData(path=str(path), atypes=atypes, coords=coord, boxes=boxes, labels=labels, set_sizes=[nframes])


REGISTRATION = DataLoaderRegistration(name=NAME, detect=detect, load=load, doc=DOC)


@hookimpl
def mtcore_data_loaders() -> list[DataLoaderRegistration]:
    return [REGISTRATION]
