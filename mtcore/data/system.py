"""One data system: frames of the same atoms, whatever format it came from (in memory, or
read frame by frame from disk through :class:`~mtcore.data.frames.FrameStore`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mtcore.data.frames import FrameStore


@dataclass
class SystemData:
    """All frames of one system, as a loader returns them.

    atypes: ``[nframes, natoms]`` model type indices (a broadcast view when the types do not
        change between frames; mixed-type data varies per frame).
    coords: ``[nframes, natoms, 3]`` float64, Å. Coordinates, cells and labels are numpy arrays
        or :class:`~mtcore.data.frames.FrameStore` s (same indexing; frames are read when asked
        for), so a data set need not fit in memory.
    boxes: ``[nframes, 3, 3]`` float64 (rows are cell vectors), or ``None`` when not periodic.
    labels: label key → ``[nframes, natoms, ndof]`` (atomic) or ``[nframes, ndof]`` (per frame);
        only labels whose file exists.
    set_sizes: frames per set folder, in order (batch counting follows DeePMD-kit).
    """

    path: str
    atypes: np.ndarray
    coords: np.ndarray
    boxes: Optional[np.ndarray]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    set_sizes: list[int] = field(default_factory=list)

    @property
    def nframes(self) -> int:
        return int(self.coords.shape[0])

    @property
    def natoms(self) -> int:
        return int(self.coords.shape[1])

    @property
    def periodic(self) -> bool:
        return self.boxes is not None

    def last_set(self) -> "SystemData":
        """The frames of the last set folder only (what ``dp test`` evaluates)."""
        if len(self.set_sizes) <= 1:
            return self
        start = sum(self.set_sizes[:-1])
        return SystemData(
            path=self.path,
            atypes=self.atypes[start:],
            coords=_tail(self.coords, start),
            boxes=None if self.boxes is None else _tail(self.boxes, start),
            labels={k: _tail(v, start) for k, v in self.labels.items()},
            set_sizes=[self.set_sizes[-1]],
        )

    def has(self, key: str) -> bool:
        return key in self.labels


def _tail(values, start: int):
    """Frames ``start:`` without reading them when they live on disk."""
    return values.view(start) if isinstance(values, FrameStore) else values[start:]
