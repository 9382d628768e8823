"""Neighbour lists for training data, built with vesin once per frame and kept.

The atoms of a training frame never move, so a frame's list is computed the first time the
frame is drawn and reused in every later epoch (within a memory budget). The layout and order
match :mod:`mtcore.model.neighbor_list`, the plain-torch builder frozen models carry.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import vesin

from mtcore.data.pair_order import ordered_pairs, pair_order
from mtcore.errors import MtcoreError

OVERLAP = 1e-3  # Å: closer atoms are a data error (a duplicated atom), not physics

#: bytes a cached list costs beyond its arrays (three array headers, the key, the dict slot)
_ENTRY_OVERHEAD = 512

_EMPTY = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, 3), np.int16))


def frame_neighbor_list(
    coord: np.ndarray, box: Optional[np.ndarray], atype: np.ndarray, rcut: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(center, neighbor, image, distance) of all pairs within rcut, sorted like the torch builder."""
    if coord.shape[0] == 0:
        return (*_EMPTY, np.zeros(0))
    calc = vesin.NeighborList(cutoff=float(rcut), full_list=True)
    if box is None:
        span = np.ptp(coord, axis=0) + 2.0 * rcut + 1.0
        i, j, shifts, d = calc.compute(coord - coord.min(0), np.diag(span), False, "ijSd")
        shifts = np.zeros_like(shifts)
    else:
        i, j, shifts, d = calc.compute(coord, box, True, "ijSd")
    listed = ordered_pairs(i, j, shifts, d, atype, rcut)  # within rcut, in order: one pass in C
    if listed is None:
        keep = d < rcut
        i, j, shifts, d = i[keep], j[keep], shifts[keep], d[keep]
        order = pair_order(i, j, atype[j], d)  # np.lexsort((j, d, atype[j], i)), per centre in C
        i, j, shifts, d = i[order], j[order], shifts[order], d[order]
    else:
        i, j, shifts, d = listed
    if shifts.size and np.abs(shifts).max() > np.iinfo(np.int16).max:
        raise ValueError("periodic image index does not fit in int16")
    return i.astype(np.int32), j.astype(np.int32), shifts.astype(np.int16), d


def check_overlap(i: np.ndarray, j: np.ndarray, d: np.ndarray, name: Optional[tuple[str, int]]) -> None:
    """Atoms closer than OVERLAP give infinite descriptors: refuse, naming system, frame, atoms."""
    if d.size == 0:
        return
    k = int(np.argmin(d))
    if d[k] < OVERLAP:
        system, frame = name if name is not None else ("?", -1)
        a, b = sorted((int(i[k]), int(j[k])))
        raise MtcoreError(
            f"{system}: frame {frame}: atoms {a} and {b} overlap (distance {float(d[k]):.2e} Å < {OVERLAP} Å)"
        )


def max_neighbor_counts(
    coord: np.ndarray, box: Optional[np.ndarray], atype: np.ndarray, rcut: float, ntypes: int,
    name: Optional[tuple[str, int]] = None,
) -> tuple[np.ndarray, int, float]:
    """Per neighbour type: the largest count around any atom; also the largest total, min distance.
    ``name`` (system, frame) is what an overlap error names."""
    i, j, _, d = frame_neighbor_list(coord, box, atype, rcut)
    check_overlap(i, j, d, name)
    natoms = coord.shape[0]
    per = np.bincount(i.astype(np.int64) * ntypes + atype[j], minlength=natoms * ntypes).reshape(natoms, ntypes)
    total = per.sum(1)
    mind = float(d.min()) if d.size else np.inf
    return per.max(0), int(total.max() if total.size else 0), mind


class NeighborCache:
    """Per-frame neighbour lists, computed on first use and kept up to a byte budget.

    At the budget the oldest lists are evicted (first in, first out), so memory stays bounded
    however large the data; with random draws over more frames than fit, any policy keeps the
    same share of hits, and FIFO costs nothing to track. A list larger than the whole budget is
    returned but not kept."""

    def __init__(self, rcut: float, budget_bytes: int = 4 << 30):
        self.rcut = float(rcut)
        self.budget = budget_bytes
        self.used = 0
        self.evicted = 0
        self._store: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def get(self, system_id, frame: int, coord, box, atype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = (system_id, frame)
        hit = self._store.get(key)
        if hit is not None:
            return hit
        i, j, img, d = frame_neighbor_list(coord, box, atype, self.rcut)
        check_overlap(i, j, d, (str(system_id), int(frame)))
        entry = (i, j, img)
        size = i.nbytes + j.nbytes + img.nbytes + _ENTRY_OVERHEAD  # empty lists are not free either
        if size <= self.budget:
            while self.used + size > self.budget:
                oldest = next(iter(self._store))
                old = self._store.pop(oldest)
                self.used -= sum(a.nbytes for a in old) + _ENTRY_OVERHEAD
                self.evicted += 1
            self._store[key] = entry
            self.used += size
        return entry
