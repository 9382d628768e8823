"""The pre-flight plan printed before training: what is shared, what each head trains on, how
often it is drawn and how many epochs of its data that makes, and where its output bias comes
from. Users of other multi-head codes have to ask these questions in issue trackers; here the
run answers them before the first step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
from rich.table import Table

if TYPE_CHECKING:  # pragma: no cover
    from mtcore.data.dataset import DataSet
    from mtcore.train.trainer import Trainer


def _count(params) -> tuple[int, int]:
    """(all, trainable) numbers of values."""
    params = list(params)
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _fmt_count(total: int, trainable: int) -> str:
    return f"{total:,}" if total == trainable else f"{total:,} ({trainable:,} trainable)"


def expected_epochs(data: "DataSet", steps: float) -> float:
    """Frames drawn over ``steps`` draws of this data set, over its frame count."""
    frames = sum(s.nframes for s in data.systems)
    per_draw = float(np.dot(np.asarray(data.probs, dtype=np.float64), np.asarray(data.batch_sizes, dtype=np.float64)))
    per_draw *= getattr(data, "world", 1)  # data-parallel: every rank trains on its own batch_size frames
    return steps * per_draw / max(frames, 1)


def _data(data: Optional["DataSet"]) -> str:
    if data is None:
        return "-"
    frames = sum(s.nframes for s in data.systems)
    return f"{len(data.systems)} sys, {frames} frames"


def _statistics_note(trainer: "Trainer") -> str:
    """How many frames the statistics read, against their caps (only where they ran)."""
    model = trainer.config.model
    parts = []
    neighbor = getattr(trainer, "neighbor_stat_frames", None)
    if neighbor is not None:
        read, total = neighbor
        parts.append(f"sel from {read:,} of {total:,} frames (neighbor_stat_nframes {model.get('neighbor_stat_nframes')})")
    stat = getattr(trainer, "stat_frames", None)
    if stat:
        counts = ", ".join(f"{h} {n:,}" for h, n in stat.items()) if len(stat) > 1 else f"{next(iter(stat.values())):,}"
        parts.append(f"statistics from {counts} frames (data_stat_nframes {model.get('data_stat_nframes')})")
    return "".join(f" · {p}" for p in parts)


def plan_table(trainer: "Trainer", bias_source: dict[str, str]) -> Table:
    model, config = trainer.model, trainer.config
    shared_ids = {id(p) for p in model.shared_layers.parameters()}
    descriptor = config.model["descriptor"]
    total, trainable = _count(model.descriptor.parameters())
    title = (
        f"{trainer.numb_steps} steps from step {trainer.step} · descriptor {descriptor['type']} "
        f"(rcut {model.rcut:g}, {_fmt_count(total, trainable)} parameters, shared by every head)"
    )
    if len(model.shared_layers) > 0:
        shared_total, shared_trainable = _count(model.shared_layers.parameters())
        title += f" · shared fitting layers: {_fmt_count(shared_total, shared_trainable)} parameters"
    if config.multi_task:
        title += f" · head draws: {trainer.weight_rule}"
    title += _statistics_note(trainer)
    carried = getattr(trainer, "carried_optimizers", [])
    if carried:
        title += f" · optimiser state from --init-model: {', '.join(carried)}"
    table = Table(title=title)
    for column in ("head", "fitting", "drawn", "training data", "epochs", "validation", "own parameters",
                   "shared layers", "output bias", "best model"):
        table.add_column(column, justify="right" if column in ("drawn", "epochs") else "left")
    active = set(trainer.active)
    weights = {h: w for h, w in zip(trainer.trained, trainer.weights) if h in active}
    norm = sum(weights.values()) or 1.0
    probability = {h: w / norm for h, w in weights.items()}  # early-stopped heads are no longer drawn
    best = trainer.best.heads
    remaining = max(trainer.numb_steps - trainer.step, 0)
    for name, head in config.heads.items():
        runtime = trainer.heads[name]
        fitting = model.heads[name]
        base = getattr(fitting, "base_name", None)  # a Δ head: its own net is the correction
        own = [p for p in (fitting.correction if base else fitting).parameters() if id(p) not in shared_ids]
        shared = sorted({key.split("/")[0] for key, users in model.shared_users.items() if name in users})
        if base:
            shared.append(f"Δ on head '{base}' ({'trained' if fitting.base_trainable else 'not trained'} by this loss)")
        p = float(probability.get(name, 0.0))
        trained = name in probability
        if name in best:
            best_cell = best[name].describe()
        elif name in trainer.trained:
            best_cell = "no validation data: no best model"
        else:
            best_cell = "-"
        stopped = best[name].stopped if name in best else None
        table.add_row(
            name,
            str(head.fitting.get("type", "ener")),
            f"{100 * p:.1f}%" if trained else (f"stopped at step {stopped}" if stopped is not None else "not trained"),
            _data(runtime.train),
            f"{expected_epochs(runtime.train, remaining * p):.2f}" if trained and runtime.train is not None else "-",
            _data(runtime.valid),
            _fmt_count(*_count(own)),
            ", ".join(shared) or "-",
            bias_source.get(name, "-"),
            best_cell,
        )
    return table
