"""A head's data set: several systems, DeePMD-kit's batch-size and system-probability rules.

A batch holds ``batch_size`` frames of one system (so all frames have the same atoms), drawn
without replacement from a shuffled order that is refreshed when it runs out. Which system a
batch comes from is drawn with the system probabilities. Only the sampling state (the shuffled
orders and cursors) changes during training; it is saved in checkpoints so that a restart
continues exactly where the run stopped.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from mtcore.data.neighbors import NeighborCache
from mtcore.data.statsample import stat_systems
from mtcore.data.system import SystemData
from mtcore.errors import MtcoreError
from mtcore.model.descriptor import StatSample


@dataclass
class Batch:
    """B frames of one system, ready for the model (flat neighbour list over the B·N atoms)."""

    coord: torch.Tensor  # [B, N, 3] float64
    atype: torch.Tensor  # [B, N] long
    box: Optional[torch.Tensor]  # [B, 3, 3] or None
    center: torch.Tensor  # [P] long
    neighbor: torch.Tensor  # [P] long
    image: torch.Tensor  # [P, 3] float64, cell units
    labels: dict = field(default_factory=dict)
    find: dict = field(default_factory=dict)
    system: str = ""

    @property
    def nframes(self) -> int:
        return int(self.atype.shape[0])

    @property
    def natoms(self) -> int:
        return int(self.atype.shape[1])

    def shift(self) -> torch.Tensor:
        """Cartesian shift per pair (no strain); what descriptors see as ``shift``."""
        if self.box is None:
            return torch.zeros(self.image.shape[0], 3, dtype=self.coord.dtype)
        frame = torch.div(self.center, self.natoms, rounding_mode="floor")
        return torch.bmm(self.image.unsqueeze(1), self.box.index_select(0, frame)).squeeze(1)

    def stat_sample(self) -> StatSample:
        return StatSample(
            coord=self.coord.reshape(-1, 3),
            atype=self.atype.reshape(-1),
            center=self.center,
            neighbor=self.neighbor,
            shift=self.shift(),
            nframes=self.nframes,
            natoms=self.natoms,
            labels=self.labels,
            find=self.find,
            system=self.system,
        )


def resolve_batch_sizes(rule: Union[int, str, list], systems: Sequence[SystemData], where: str) -> list[int]:
    """DeePMD-kit's batch_size: int, list (one per system), "auto" (= "auto:32") or "auto:N"."""
    if isinstance(rule, bool):
        raise MtcoreError(f"{where}/batch_size: expected an int, a list of ints, 'auto' or 'auto:N'")
    if isinstance(rule, int):
        if rule < 1:
            raise MtcoreError(f"{where}/batch_size: must be at least 1, got {rule}")
        return [rule] * len(systems)
    if isinstance(rule, list):
        if len(rule) != len(systems):
            raise MtcoreError(f"{where}/batch_size: has {len(rule)} entries for {len(systems)} systems")
        for value in rule:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MtcoreError(f"{where}/batch_size: list entries must be integers of at least 1, got {value!r}")
        return [int(v) for v in rule]
    if isinstance(rule, str) and (rule == "auto" or rule.startswith("auto:")):
        try:
            target = 32 if rule == "auto" else int(rule.split(":", 1)[1])
        except ValueError:
            raise MtcoreError(f"{where}/batch_size: '{rule}' is not 'auto:<int>'") from None
        if target < 1:
            raise MtcoreError(f"{where}/batch_size: '{rule}' needs a positive number of atoms")
        return [max(1, math.ceil(target / s.natoms)) for s in systems]
    raise MtcoreError(f"{where}/batch_size: '{rule}' is not an int, a list, 'auto' or 'auto:N'")


def system_probabilities(
    nbatches: Sequence[int], auto_prob: str, sys_probs: Optional[Sequence[float]], where: str
) -> np.ndarray:
    """System probabilities: explicit ``sys_probs`` or the ``auto_prob`` rule."""
    nbatches = np.asarray(nbatches, dtype=np.float64)
    n = len(nbatches)
    if sys_probs is not None:
        if len(sys_probs) != n:
            raise MtcoreError(f"{where}/sys_probs: has {len(sys_probs)} entries for {n} systems")
        for value in sys_probs:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MtcoreError(f"{where}/sys_probs: entries must be numbers (negative: share the rest), got {value!r}")
        probs = np.asarray(sys_probs, dtype=np.float64)
        given = probs >= 0
        rest = 1.0 - probs[given].sum()
        if rest < -1e-8:
            raise MtcoreError(f"{where}/sys_probs: the given probabilities sum to more than 1")
        if (~given).any():
            probs[~given] = rest * nbatches[~given] / nbatches[~given].sum()
        if abs(probs.sum() - 1.0) > 1e-6:
            raise MtcoreError(f"{where}/sys_probs: probabilities sum to {probs.sum():.6g}, not 1")
        return probs
    if auto_prob == "prob_uniform":
        return np.full(n, 1.0 / n)
    if auto_prob == "prob_sys_size":
        return nbatches / nbatches.sum()
    if auto_prob.startswith("prob_sys_size;"):
        probs = np.zeros(n)
        blocks = auto_prob.split(";")[1:]
        weights = []
        try:
            for block in blocks:
                lo, hi, w = block.split(":")
                weights.append((int(lo), int(hi), float(w)))
        except ValueError:
            raise MtcoreError(f"{where}/auto_prob: '{auto_prob}' blocks must look like 'start:stop:weight'") from None
        total = sum(w for _, _, w in weights)
        if any(not math.isfinite(w) or w < 0 for _, _, w in weights) or not total > 0:
            raise MtcoreError(f"{where}/auto_prob: '{auto_prob}' block weights must be non-negative with a positive sum")
        for lo, hi, w in weights:
            if not (0 <= lo < hi <= n):
                raise MtcoreError(f"{where}/auto_prob: block {lo}:{hi} is outside the {n} systems")
            part = nbatches[lo:hi]
            probs[lo:hi] = w / total * part / part.sum()
        return probs
    raise MtcoreError(
        f"{where}/auto_prob: '{auto_prob}' is not prob_uniform, prob_sys_size or 'prob_sys_size;a:b:w;...'"
    )


class DataSet:
    """The training (or validation) data of one head."""

    def __init__(
        self,
        systems: list[SystemData],
        batch_size: Union[int, str, list],
        auto_prob: str,
        sys_probs: Optional[list],
        cache: NeighborCache,
        where: str,
    ):
        if not systems:
            raise MtcoreError(f"{where}/systems: no data systems")
        self.systems = systems
        self.where = where
        self.cache = cache
        self.batch_sizes = resolve_batch_sizes(batch_size, systems, where)
        if not (isinstance(batch_size, str) and batch_size.startswith("auto")):
            for system, bs in zip(systems, self.batch_sizes):
                if bs > system.nframes:
                    warnings.warn(
                        f"{where}/batch_size: {bs} is more than the {system.nframes} frames of {system.path}; "
                        f"its batches hold {system.nframes} frames",
                        stacklevel=2,
                    )
        self.nbatches = [
            sum(max(1, size // bs) for size in (s.set_sizes or [s.nframes]))
            for s, bs in zip(systems, self.batch_sizes)
        ]
        self.probs = system_probabilities(self.nbatches, auto_prob, sys_probs, where)
        self._prob_rule = (auto_prob, sys_probs)
        self.rank, self.world = 0, 1  # data-parallel: this rank's slice of what all ranks draw
        self._orders: list[Optional[np.ndarray]] = [None] * len(systems)
        self._cursor = [0] * len(systems)

    def __len__(self) -> int:
        return len(self.systems)

    def label_keys(self) -> set[str]:
        return {k for s in self.systems for k in s.labels}

    # sampling -----------------------------------------------------------------------------
    def set_ranks(self, rank: int, world: int) -> None:
        """Data-parallel: every rank draws what ONE process with batch world·batch_size would
        draw (the same shared random stream) and keeps its own slice of it, so a run with N
        ranks equals a single-process run with the summed batch. System probabilities follow
        the summed batch too (``prob_sys_size`` counts batches)."""
        self.rank, self.world = int(rank), int(world)
        self.nbatches = [
            sum(max(1, size // (bs * self.world)) for size in (s.set_sizes or [s.nframes]))
            for s, bs in zip(self.systems, self.batch_sizes)
        ]
        self.probs = system_probabilities(self.nbatches, *self._prob_rule, self.where)

    def _next_frames(self, index: int, rng: np.random.Generator) -> np.ndarray:
        system = self.systems[index]
        bs = min(self.batch_sizes[index] * self.world, system.nframes)
        order = self._orders[index]
        if order is None or self._cursor[index] + bs > len(order):
            order = rng.permutation(system.nframes)
            self._orders[index] = order
            self._cursor[index] = 0
        start = self._cursor[index]
        self._cursor[index] = start + bs
        return order[start : start + bs]

    def sample(self, rng: np.random.Generator) -> Batch:
        """The next batch: a system drawn by probability, its next frames."""
        index = int(rng.choice(len(self.systems), p=self.probs)) if len(self.systems) > 1 else 0
        frames = self._next_frames(index, rng)
        if self.world > 1:
            from mtcore.train.distributed import rank_positions

            frames = frames[rank_positions(len(frames), self.batch_sizes[index], self.rank, self.world)]
        return self.batch(index, frames)

    def state_dict(self) -> dict:
        return {"orders": [None if o is None else o.copy() for o in self._orders], "cursor": list(self._cursor)}

    def load_state_dict(self, state: dict) -> None:
        self._orders = [None if o is None else np.asarray(o) for o in state["orders"]]
        self._cursor = list(state["cursor"])

    # assembling ---------------------------------------------------------------------------
    def batch(self, index: int, frames: np.ndarray) -> Batch:
        """The frames ``frames`` of system ``index``. Each array is read once for the whole batch
        (frames on disk are read, converted and checked for NaN/inf here)."""
        system = self.systems[index]
        natoms = system.natoms
        frames = np.asarray(frames, dtype=np.int64)
        coord = np.ascontiguousarray(system.coords[frames])
        atype = np.ascontiguousarray(system.atypes[frames])
        box = None if system.boxes is None else np.ascontiguousarray(system.boxes[frames])
        centers, neighbors, images = [], [], []
        for k, f in enumerate(frames):
            c, n, img = self.cache.get(system.path, int(f), coord[k], None if box is None else box[k], atype[k])
            if k == 0 and len(frames) == 1:
                centers, neighbors, images = [c], [n], [img]
                break
            centers.append(c.astype(np.int64) + k * natoms)
            neighbors.append(n.astype(np.int64) + k * natoms)
            images.append(img)
        labels = {}
        find = {}
        for key, values in system.labels.items():
            labels[key] = torch.from_numpy(np.ascontiguousarray(values[frames]))
            find[key] = 1.0
        return Batch(
            coord=torch.from_numpy(coord),
            atype=torch.from_numpy(atype).long(),
            box=None if box is None else torch.from_numpy(box),
            center=torch.from_numpy(np.concatenate(centers).astype(np.int64)),
            neighbor=torch.from_numpy(np.concatenate(neighbors).astype(np.int64)),
            image=torch.from_numpy(np.concatenate(images).astype(np.float64)),
            labels=labels,
            find=find,
            system=system.path,
        )

    def stat_batches(self, nbatch: int, rng: np.random.Generator, max_frames: Optional[int] = None) -> list[Batch]:
        """``nbatch`` batches from every system, for statistics (does not touch the sampling
        state), reading at most ``max_frames`` frames in all (statsample.stat_systems: fewer
        batches per system, then a seeded choice of systems). Uncapped, the draws are the same."""
        # data-parallel: the summed batch
        sizes = [min(bs * self.world, s.nframes) for bs, s in zip(self.batch_sizes, self.systems)]
        chosen, nbatch = stat_systems(sizes, nbatch, max_frames, rng)
        out = []
        for index in chosen:
            system, bs = self.systems[index], sizes[index]
            order = rng.permutation(system.nframes)
            for b in range(nbatch):
                start = (b * bs) % system.nframes
                frames = order[start : start + bs]
                if len(frames) < bs:
                    frames = order[:bs]
                out.append(self.batch(index, frames))
        return out
