"""The best model of each head, chosen on a FIXED set of validation frames, and early stopping.

Why a fixed set: the display's validation metric (lcurve.out) is measured on ``numb_btch``
randomly drawn batches, so two display steps compare different frames and the "best" one is
mostly the luckiest draw. Here each head with validation data has a fixed list of frames (all
of them, or a seeded subset of ``validation_frames``; by default as many frames as the display's
``numb_btch`` validation batches, so it costs what the display's validation costs) evaluated
every ``validation_freq`` steps;
when the chosen metric (``best_metric``) is strictly lower than the best so far, the whole model
state at that step is written to ``<stem>.best.<head>.pt`` (checkpoint.CheckpointManager.save_best).

Early stopping (``patience``): a head whose metric has not improved for ``patience`` evaluations
in a row is no longer drawn (the other heads' probabilities are renormalised); the run ends when
no head is left. A head without validation data is never stopped.

The bookkeeping here is plain data (no torch); the trainer evaluates frames and writes files.
"""

from __future__ import annotations

import math
import uuid
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from mtcore.errors import MtcoreError

if TYPE_CHECKING:  # pragma: no cover
    from mtcore.config import HeadConfig
    from mtcore.data.dataset import DataSet

#: default best_metric: the first of these the head's loss reports (forces for energy heads, the
#: frame tensor, then the atomic tensor for tensor heads); else the first other "rmse_*" (the total
#: "rmse" of an energy loss mixes prefactors that change with the learning rate), else "rmse"
PREFERRED_METRICS = ("rmse_f", "rmse_gl", "rmse_lc", "rmse_e", "rmse_v")


def default_metric(names: list[str]) -> str:
    for name in PREFERRED_METRICS:
        if name in names:
            return name
    partial = [n for n in names if n.startswith("rmse_")]
    if partial:
        return partial[0]
    return "rmse" if "rmse" in names or not names else names[0]


def default_frame_count(valid: "DataSet", numb_btch: int) -> int:
    """``validation_frames`` null: the frames of the display's ``numb_btch`` validation batches
    (the largest batch size), so by default best-model tracking costs what the display's
    validation costs; it compares the SAME frames every time, which the display does not."""
    return max(1, int(numb_btch)) * max(valid.batch_sizes)


def fixed_frames(valid: "DataSet", limit: Optional[int], seed: int, head: str) -> tuple[list[tuple[int, np.ndarray]], int]:
    """The head's fixed validation frames as (system index, frame indices) chunks of at most the
    validation batch size, and the total number of validation frames. A subset is drawn from
    its own generator (seed, head name), so it is the same at every evaluation and after a
    restart, and drawing it never moves the training's random stream."""
    sizes = [s.nframes for s in valid.systems]
    total = int(sum(sizes))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if limit is not None and limit < total:
        rng = np.random.default_rng([int(seed), 0xBE57, zlib.crc32(head.encode())])
        chosen = np.sort(rng.choice(total, size=int(limit), replace=False))
    else:
        chosen = np.arange(total)
    chunks = []
    for index, size in enumerate(sizes):
        mine = chosen[(chosen >= offsets[index]) & (chosen < offsets[index + 1])] - offsets[index]
        step = max(1, min(valid.batch_sizes[index], size))
        for start in range(0, len(mine), step):
            chunks.append((index, mine[start : start + step]))
    return chunks, total


@dataclass
class HeadBest:
    """One head's best-model bookkeeping (what a checkpoint stores so a restart continues it)."""

    head: str
    metric: str
    freq: int
    patience: Optional[int]
    chunks: list = field(default_factory=list, repr=False)
    nframes: int = 0  # frames evaluated each time
    total: int = 0  # validation frames of the head
    value: float = math.inf
    step: Optional[int] = None  # step of the best model (None: none yet)
    since: int = 0  # evaluations in a row without improvement
    stopped: Optional[int] = None  # step at which patience stopped the head
    digest: Optional[str] = None  # sha256 of the best file this run wrote
    chosen: bool = False  # best_metric given in the input (else the default, which may be revised once)

    def due(self, step: int) -> bool:
        return self.stopped is None and step % self.freq == 0

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation; True when it improves on the best (NaN never does)."""
        if math.isfinite(value) and value < self.value:
            self.value, self.step, self.since = float(value), int(step), 0
            return True
        self.since += 1
        if self.patience is not None and self.since >= self.patience:
            self.stopped = int(step)
        return False

    def reset(self) -> None:
        """Forget the best (its file is not this run's): the next evaluation sets a new one."""
        self.value, self.step, self.since, self.digest = math.inf, None, 0, None

    def state_dict(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step, "since": self.since,
                "stopped": self.stopped, "sha256": self.digest}

    def revise_default(self, metrics: dict[str, float]) -> Optional[str]:
        """Before the first best: a default metric the validation frames have no label for
        (e.g. rmse_gl when only atomic dipoles are given) is replaced by the preferred one they
        do have. Returns the new metric name, or None when nothing changed."""
        if self.chosen or self.step is not None or math.isfinite(metrics.get(self.metric, math.nan)):
            return None
        finite = [name for name, value in metrics.items() if math.isfinite(value)]
        if not finite:
            return None
        self.metric = default_metric(finite)
        return self.metric

    def load_state_dict(self, state: dict) -> None:
        if state.get("metric") != self.metric and (self.chosen or not state.get("metric")):
            return  # a different chosen metric: values are not comparable, start again
        self.metric = state.get("metric", self.metric)
        self.value = float(state.get("value", math.inf))
        self.step = state.get("step")
        self.since = int(state.get("since", 0))
        self.stopped = state.get("stopped")
        self.digest = state.get("sha256")

    def describe(self) -> str:
        """The plan table's cell: what is evaluated, how often, and the best so far."""
        frames = f"all {self.total} frames" if self.nframes == self.total else f"{self.nframes} of {self.total} frames (seeded)"
        text = f"{self.metric} every {self.freq} steps on {frames}"
        if self.patience is not None:
            text += f", patience {self.patience}"
        if self.step is not None:
            text += f"; best so far {self.value:.3e} at step {self.step}"
        if self.stopped is not None:
            text += f"; stopped at step {self.stopped}"
        return text


class BestTracker:
    """All heads' best-model bookkeeping, and the run id that marks this run's best files."""

    def __init__(self, heads: dict[str, HeadBest], without_validation: list[str], run_id: Optional[str] = None):
        self.heads = heads
        self.without_validation = without_validation
        self.run_id = run_id or uuid.uuid4().hex

    @classmethod
    def build(cls, configs: dict[str, "HeadConfig"], trained: list[str], valid: dict[str, Optional["DataSet"]],
              metric_names: dict[str, list[str]], disp_freq: int, seed: int, multi_task: bool,
              numb_btch: Optional[dict[str, int]] = None) -> "BestTracker":
        heads, without = {}, []
        for name in trained:
            settings = configs[name].best or {}
            where = f"training/data_dict/{name}" if multi_task else "training"
            metric = settings.get("best_metric")
            names = metric_names[name]
            if metric is not None and metric not in names:
                raise MtcoreError(
                    f"{where}/best_metric: '{metric}' is not a metric of head '{name}' (its loss reports "
                    f"{', '.join(names)})" + ("; set it per head in training/data_dict" if multi_task else "")
                )
            if valid.get(name) is None:
                without.append(name)
                continue
            frames_limit = settings.get("validation_frames")
            if frames_limit is None:
                frames_limit = default_frame_count(valid[name], (numb_btch or {}).get(name, 1))
            elif frames_limit == "all":
                frames_limit = None
            chunks, total = fixed_frames(valid[name], frames_limit, seed, name)
            heads[name] = HeadBest(
                head=name,
                metric=metric or default_metric(names),
                freq=int(settings.get("validation_freq") or max(1, int(disp_freq))),
                patience=settings.get("patience"),
                chunks=chunks,
                chosen=metric is not None,
                nframes=int(sum(len(frames) for _, frames in chunks)),
                total=total,
            )
        return cls(heads, without)

    def stopped(self) -> set[str]:
        return {h for h, b in self.heads.items() if b.stopped is not None}

    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "heads": {h: b.state_dict() for h, b in self.heads.items()}}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """A restart continues the comparison (and the patience counts) of the checkpoint."""
        if not state:
            return
        self.run_id = state.get("run_id") or self.run_id
        for name, head_state in (state.get("heads") or {}).items():
            if name in self.heads:
                self.heads[name].load_state_dict(head_state)


def pooled_rmse(parts: list[tuple[dict, float]]) -> dict[str, float]:
    """Metrics of several batches as one over all of them: an RMSE as sqrt(Σ w·m² / Σ w), a
    mean absolute error (``mae*``) as Σ w·m / Σ w; w is the batch's atoms (frames × the loss's
    metric weight per frame). Exact for per-component errors such as rmse_f; a batch without a
    label (NaN) does not count for that metric."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics, weight in parts:
        for key, value in metrics.items():
            sums.setdefault(key, 0.0)
            weights.setdefault(key, 0.0)
            if math.isfinite(value):
                sums[key] += weight * (value if key.startswith("mae") else value * value)
                weights[key] += weight
    return {
        k: (sums[k] / weights[k] if k.startswith("mae") else math.sqrt(sums[k] / weights[k])) if weights[k] > 0 else math.nan
        for k in sums
    }
