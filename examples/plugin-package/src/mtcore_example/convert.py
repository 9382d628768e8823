"""Convert a deepmd/npy system folder into one .npz file (the ``npz_system`` format).

    python -m mtcore_example.convert SYSTEM_DIR OUT.npz [--frames START:STOP] [--labels energy,force]

Every ``set.*`` folder is concatenated in order; ``type_map.raw`` becomes the ``type_map`` array,
a ``nopbc`` file means no ``box`` array. Labels are copied as stored (flat per frame); the loader
reshapes them for each head's requirement. An existing OUT is never replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mtcore.errors import MtcoreError

STRUCTURE_FILES = ("coord", "box")
#: per-frame type files of mixed-type systems: not supported by this small converter
MIXED_TYPE_FILE = "real_atom_types.npy"


def read_deepmd_npy(system: Path, frames: Optional[slice] = None, labels: Optional[Sequence[str]] = None) -> dict:
    """Arrays of the .npz format from a deepmd/npy folder: coord [F, N, 3], box [F, 3, 3] (periodic
    only), types [N], type_map (when the folder has type_map.raw) and each label [F, width]."""
    system = Path(system)
    if not (system / "type.raw").is_file():
        raise MtcoreError(f"{system}: not a deepmd/npy system (no type.raw)")
    types = np.array(system.joinpath("type.raw").read_text().split(), dtype=np.int64)
    sets = sorted(p for p in system.glob("set.*") if p.is_dir())
    if not sets:
        raise MtcoreError(f"{system}: no set.* folder found")
    if any((s / MIXED_TYPE_FILE).is_file() for s in sets):
        raise MtcoreError(f"{system}: mixed-type systems ({MIXED_TYPE_FILE}) are not supported by this converter")
    periodic = not (system / "nopbc").exists()
    stems = [p.stem for p in sorted(sets[0].glob("*.npy")) if p.stem not in STRUCTURE_FILES]
    wanted = stems if labels is None else list(labels)
    for key in wanted:
        if not all((s / f"{key}.npy").is_file() for s in sets):
            raise MtcoreError(f"{system}: label '{key}' is not in every set folder ({key}.npy)")
    reserved = [key for key in wanted if key in STRUCTURE_FILES + ("types", "type_map")]
    if reserved:
        raise MtcoreError(f"{system}: '{reserved[0]}' is not a label")
    parts: dict[str, list] = {key: [] for key in ["coord"] + (["box"] if periodic else []) + wanted}
    for s in sets:
        coord = _read_npy(s / "coord.npy")
        nframes = coord.shape[0] if coord.ndim > 1 else 1
        if coord.size != nframes * 3 * types.size:
            raise MtcoreError(f"{s / 'coord.npy'}: {coord.size} values are not {nframes} frame(s) of {types.size} atoms x 3")
        for key in parts:
            value = _read_npy(s / f"{key}.npy")
            if value.size % nframes:
                raise MtcoreError(f"{s / f'{key}.npy'}: {value.size} values are not {nframes} frames (coord.npy)")
            parts[key].append(value.reshape(nframes, -1))
    out = {key: np.concatenate(value) for key, value in parts.items()}
    nframes = out["coord"].shape[0]
    window = frames or slice(None)
    out = {key: value[window] for key, value in out.items()}
    if out["coord"].shape[0] == 0:
        raise MtcoreError(f"{system}: no frames in {window.start}:{window.stop} (the system has {nframes})")
    out["coord"] = out["coord"].reshape(out["coord"].shape[0], types.size, 3)
    if periodic:
        out["box"] = out["box"].reshape(-1, 3, 3)
    out["types"] = types
    if (system / "type_map.raw").is_file():
        out["type_map"] = np.array(system.joinpath("type_map.raw").read_text().split())
    return out


def _read_npy(path: Path) -> np.ndarray:
    try:
        value = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MtcoreError(f"{path}: cannot be read as a .npy array ({exc})") from None
    if value.dtype.kind not in "biuf" or value.ndim == 0:
        raise MtcoreError(f"{path}: expected an array of real numbers, one row per frame")
    return value.astype(np.float64)


def write_npz(path: Path, arrays: dict) -> None:
    """Write compressed, through a temporary file renamed into place; never replace a file."""
    path = Path(path)
    if path.exists():
        raise MtcoreError(f"{path}: exists; remove it or choose another name (it is never replaced)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the data from co-workers
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.link(tmp, path)  # fails if someone created `path` meanwhile: nothing is replaced
    finally:
        os.unlink(tmp)


def parse_frames(text: Optional[str]) -> Optional[slice]:
    if not text:
        return None
    try:
        start, stop = (int(v) if v else None for v in text.split(":"))
    except ValueError:
        raise MtcoreError(f"--frames: expected START:STOP (integers, either may be empty), got {text!r}") from None
    return slice(start, stop)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtcore_example.convert", description=__doc__.splitlines()[0])
    parser.add_argument("system", type=Path, help="deepmd/npy system folder")
    parser.add_argument("output", type=Path, help="the .npz file to write (must not exist)")
    parser.add_argument("--frames", help="START:STOP, a slice of the concatenated frames")
    parser.add_argument("--labels", help="comma-separated label names to copy (default: every label file)")
    args = parser.parse_args(argv)
    try:
        labels = None if args.labels is None else [v for v in args.labels.split(",") if v]
        arrays = read_deepmd_npy(args.system, parse_frames(args.frames), labels)
        write_npz(args.output, arrays)
    except MtcoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output}: {arrays['coord'].shape[0]} frames of {arrays['coord'].shape[1]} atoms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
