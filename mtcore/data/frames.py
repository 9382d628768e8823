"""Frames read from disk when they are asked for, not when a system is opened.

A data set can be larger than memory: a loader hands each per-set file over as a (usually
memory-mapped) array of rows, and :class:`FrameStore` presents the sets of one system as a single
``[nframes, ...]`` float64 array. ``store[frames]`` reads only those frames (from the page cache
or disk), converts them to float64 and checks them, so a batch never trains on NaN or inf even
though nothing scanned the whole file at load time. Small data is still scanned whole at load
(:func:`check_all`), where that is cheap and gives the error before anything starts.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from mtcore.errors import MtcoreError

#: data sets up to this many bytes on disk are scanned whole for NaN/inf when loaded; larger
#: ones are checked frame by frame as frames are read (the time to the first step stays flat)
FULL_CHECK_BYTES = 256 << 20

#: rows of a part converted at once by a full scan (bounds the scan's extra memory)
_SCAN_ROWS_BYTES = 64 << 20

Convert = Callable[[np.ndarray, np.ndarray], np.ndarray]
Validate = Callable[[str, np.ndarray, np.ndarray], None]


def open_npy(path: Path) -> np.ndarray:
    """A .npy file memory-mapped (read-only) when it can be; otherwise read normally. Files that
    cannot be mapped (object arrays, a truncated file, a non-C layout) take the ordinary path and
    so give the ordinary errors. Raises whatever ``np.load`` raises."""
    try:
        mapped = np.load(path, mmap_mode="r")
    except OSError as exc:
        if exc.errno == errno.ENOMEM:  # out of memory maps: reading whole files instead would fill memory
            raise MtcoreError(
                f"{path}: cannot be memory-mapped: this process has reached the limit on memory maps (one per set "
                "file; Linux vm.max_map_count, 65530 by default); raise it (sysctl -w vm.max_map_count=262144) "
                "or merge small set folders"
            ) from None
        return np.load(path)
    except Exception:  # noqa: BLE001 - any other reason not to map: read it the ordinary way
        return np.load(path)
    if isinstance(mapped, np.ndarray) and mapped.ndim >= 1 and not mapped.flags.c_contiguous:
        return np.array(mapped)  # reshaping a Fortran-ordered map would copy it anyway
    return mapped


def check_finite_rows(path: str, rows: np.ndarray, frames: np.ndarray, per_atom: int = 0,
                      whole_file: bool = False, system_frames: Optional[np.ndarray] = None) -> None:
    """Refuse NaN/inf in ``rows`` (``[k, width]``, frame ``frames[i]`` of file ``path``): one
    vectorised test; the message names the first bad frame (and atom, for atomic arrays of
    ``per_atom`` values per atom)."""
    bad = ~np.isfinite(rows)
    if not bad.any():
        return
    flat = rows.reshape(rows.shape[0], -1)
    row, column = (int(v) for v in np.argwhere(bad.reshape(flat.shape))[0])
    value = flat[row, column]
    where = f"frame {int(frames[row])}" + (f", atom {column // per_atom}" if per_atom else f", column {column}")
    count = int(bad.sum())
    if whole_file:
        detail = f"{count} non-finite value{'s' if count > 1 else ''} in the file"
    else:
        sys_frame = "" if system_frames is None else f"system frame {int(system_frames[row])}, "
        detail = f"{sys_frame}found when the frame was read for a batch or statistics"
    raise MtcoreError(f"{path}: non-finite value {value} at {where} ({detail}); fix or drop these frames")


@dataclass
class FramePart:
    """The frames of one file: ``rows`` is ``[n, width]`` in the file's own dtype (a memory map
    as a rule). ``convert`` turns float64 rows of local frames into ``[k, *frame_shape]``
    (default: a reshape); ``validate`` adds checks beyond finiteness (a cell's volume)."""

    path: str
    rows: np.ndarray
    per_atom: int = 0
    convert: Optional[Convert] = None
    validate: Optional[Validate] = None

    def read(self, local: np.ndarray, frame_shape: tuple, whole_file: bool = False,
             system_frames: Optional[np.ndarray] = None) -> np.ndarray:
        rows = np.asarray(self.rows[local], dtype=np.float64)
        check_finite_rows(self.path, rows, local, self.per_atom, whole_file, system_frames)
        if self.validate is not None:
            self.validate(self.path, rows, local)
        if self.convert is not None:
            return self.convert(rows, local)
        return rows.reshape((len(local),) + frame_shape)

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)


class FrameStore:
    """Several files presented as one ``[nframes, *frame_shape]`` float64 array.

    Supports what the consumers of :class:`~mtcore.data.system.SystemData` do with arrays:
    ``store[f]``, ``store[a:b]``, ``store[frames]`` (an int array or a mask) and those followed
    by more indices (``store[:, mask]``), ``.shape``, ``len()``, ``np.asarray(store)`` (reads
    everything: for small data and tests). Each read touches only the asked frames' rows."""

    def __init__(self, parts: Sequence[FramePart], frame_shape: tuple):
        self.parts = list(parts)
        self.frame_shape = tuple(int(v) for v in frame_shape)
        sizes = [int(p.rows.shape[0]) for p in self.parts]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.shape = (int(self._offsets[-1]),) + self.frame_shape
        self.dtype = np.dtype(np.float64)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes on disk (the files' own dtype), what reading everything would touch."""
        return sum(p.nbytes for p in self.parts)

    def __repr__(self) -> str:
        return f"FrameStore(shape={self.shape}, files={len(self.parts)})"

    def take(self, frames: np.ndarray) -> np.ndarray:
        """Frames ``frames`` (int array, any order, repeats allowed) as ``[k, *frame_shape]``.
        One read per file touched, not per frame."""
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        out = np.empty((frames.size,) + self.frame_shape, dtype=np.float64)
        if frames.size == 0:
            return out
        part_of = np.searchsorted(self._offsets, frames, side="right") - 1
        for p in np.unique(part_of):
            at = np.nonzero(part_of == p)[0]
            local = frames[at] - self._offsets[p]
            out[at] = self.parts[int(p)].read(local, self.frame_shape, system_frames=frames[at])
        return out

    def _frames_of(self, key) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, slice):
            return np.arange(n)[key]
        if key is Ellipsis:
            return np.arange(n)
        index = np.asarray(key)
        if index.size == 0:
            return np.zeros(index.shape, dtype=np.int64)
        if index.dtype == bool:
            if index.shape != (n,):
                raise IndexError(f"boolean index of shape {index.shape} for {n} frames")
            return np.nonzero(index)[0]
        if index.dtype.kind not in "iu":
            raise IndexError(f"frames must be integers, slices or a mask, got {index.dtype}")
        if index.size and (index.max() >= n or index.min() < -n):
            raise IndexError(f"frame index out of range for {n} frames")
        return np.where(index < 0, index + n, index)

    def __getitem__(self, key):
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (Ellipsis, ())
        if isinstance(key, (int, np.integer)):
            f = int(key)
            if not -self.shape[0] <= f < self.shape[0]:
                raise IndexError(f"frame {f} out of range for {self.shape[0]} frames")
            one = self.take(np.array([f % self.shape[0]]))[0]
            return one[rest] if rest else one
        frames = self._frames_of(key)
        shape = np.shape(frames)
        out = self.take(frames).reshape(shape + self.frame_shape)
        return out[(slice(None),) * len(shape) + rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        out = self.take(np.arange(self.shape[0]))
        return out if dtype is None else out.astype(dtype, copy=False)

    def reshape(self, *shape) -> np.ndarray:
        return np.asarray(self).reshape(*shape)

    def view(self, start: int, stop: Optional[int] = None) -> "FrameStore":
        """Frames ``start:stop`` as another store (nothing read): a system's last set for ``dp test``."""
        stop = self.shape[0] if stop is None else stop
        parts = []
        for p, part in enumerate(self.parts):
            lo, hi = int(self._offsets[p]), int(self._offsets[p + 1])
            a, b = max(lo, start), min(hi, stop)
            if a >= b:
                continue
            parts.append(_shifted(part, a - lo, b - lo))
        return FrameStore(parts, self.frame_shape)

    def check_all(self) -> None:
        """Read every frame once (in bounded chunks) and check it, naming the file, the first
        bad frame and how many values are bad in the file: the scan done at load for small data."""
        for part in self.parts:
            n = int(part.rows.shape[0])
            width = max(1, int(np.prod(part.rows.shape[1:])))
            step = max(1, _SCAN_ROWS_BYTES // (8 * width))
            for start in range(0, n, step):
                local = np.arange(start, min(n, start + step))
                rows = np.asarray(part.rows[start:start + len(local)], dtype=np.float64)
                if not np.isfinite(rows).all():
                    everything = np.asarray(part.rows, dtype=np.float64)  # the count over the whole file
                    check_finite_rows(part.path, everything, np.arange(n), part.per_atom, whole_file=True)
                if part.validate is not None:
                    part.validate(part.path, rows, local)


def _shifted(part: FramePart, a: int, b: int) -> FramePart:
    """``part`` restricted to its local frames a:b; conversions still see the file's frame numbers."""
    convert = None if part.convert is None else (lambda rows, local, c=part.convert: c(rows, local + a))
    validate = None if part.validate is None else (lambda path, rows, local, v=part.validate: v(path, rows, local + a))
    return FramePart(part.path, part.rows[a:b], part.per_atom, convert, validate)


def stores_of(arrays: Iterable) -> list[FrameStore]:
    return [a for a in arrays if isinstance(a, FrameStore)]


def check_stores(stores: Sequence[FrameStore], limit: Optional[int] = None) -> bool:
    """Scan ``stores`` whole when together they hold at most ``limit`` bytes (None:
    FULL_CHECK_BYTES); returns whether it did."""
    if sum(s.nbytes for s in stores) > (FULL_CHECK_BYTES if limit is None else limit):
        return False
    for store in stores:
        store.check_all()
    return True
