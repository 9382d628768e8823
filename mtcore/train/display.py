"""What training shows on the terminal: a progress bar with ETA and a per-head metrics table
that updates in place. Without a terminal (CI, pipes) it prints one line per display step."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:  # pragma: no cover
    from mtcore.train.best import BestTracker
    from mtcore.train.checkpoint import CheckpointManager


def metrics_table(step: int, values: dict[str, tuple[dict, Optional[dict], float]]) -> Table:
    table = Table(title=f"step {step}", show_lines=False)
    table.add_column("head")
    table.add_column("metric")
    table.add_column("train", justify="right")
    table.add_column("validation", justify="right")
    table.add_column("lr", justify="right")
    for head, (trn, val, lr) in values.items():
        for i, (name, value) in enumerate(trn.items()):
            table.add_row(
                head if i == 0 else "",
                name,
                _fmt(value),
                _fmt(val.get(name, math.nan)) if val else "-",
                f"{lr:.1e}" if i == 0 else "",
            )
    return table


def _fmt(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.3e}"


class TrainingDisplay:
    def __init__(self, console: Console, total: int, start: int):
        self.console = console
        self.live_mode = console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[speed]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, speed="")
        self.table: Optional[Table] = None
        self.live: Optional[Live] = None

    def __enter__(self) -> "TrainingDisplay":
        if self.live_mode:
            self.live = Live(self._renderable(), console=self.console, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.update(self._renderable())
            self.live.__exit__(*exc)

    def _renderable(self):
        return Group(self.progress, self.table) if self.table is not None else Group(self.progress)

    def advance(self, step: int, seconds_per_step: float) -> None:
        self.progress.update(self.task, completed=step, speed=f"{seconds_per_step * 1000:.0f} ms/step")
        if self.live is not None:
            self.live.update(self._renderable())

    def metrics(self, step: int, values: dict[str, tuple[dict, Optional[dict], float]]) -> None:
        self.table = metrics_table(step, values)
        if self.live is not None:
            self.live.update(self._renderable())
            return
        parts = []
        for head, (trn, val, lr) in values.items():
            shown = " ".join(
                f"{name}={_fmt(value)}" + (f"/{_fmt(val.get(name, math.nan))}" if val else "")
                for name, value in trn.items()
            )
            parts.append(f"{head}: {shown} lr={lr:.1e}")
        self.console.print(f"step {step:>7d}  " + "  |  ".join(parts), highlight=False, soft_wrap=True)


def print_table(console: Console, table: Table) -> None:
    """Print a table whole: without a terminal (a pipe, a log file) rich would squeeze it into
    80 columns and cut cells with '…'; a log must keep every file name and number."""
    if console.is_terminal:
        console.print(table)
        return
    wide = console.options.update(width=100_000, max_width=100_000)
    width = max(console.width, min(console.measure(table, options=wide).maximum, 100_000))
    buffer = io.StringIO()  # Console.print caps width at the console's own; render at full width
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(table)
    console.out(buffer.getvalue(), end="", highlight=False)


def best_summary_table(best: "BestTracker", checkpoints: "CheckpointManager", workdir: Path) -> Table:
    """End of run: per head, the step and value of its best model and the file that holds it."""
    table = Table(title="best model per head (fixed validation frames)")
    for column in ("head", "metric", "best", "step", "frames", "stopped", "file"):
        table.add_column(column, justify="right" if column in ("best", "step", "frames") else "left", overflow="fold")
    for head, entry in best.heads.items():
        path = checkpoints.best_path(head)
        shown = os.path.relpath(path, workdir) if entry.step is not None and path.exists() else "-"
        table.add_row(
            head,
            entry.metric,
            _fmt(entry.value) if entry.step is not None else "-",
            str(entry.step) if entry.step is not None else "-",
            f"{entry.nframes}/{entry.total}",
            f"at step {entry.stopped}" if entry.stopped is not None else "-",
            shown,
        )
    for head in best.without_validation:
        table.add_row(head, "-", "-", "-", "0", "-", "no validation data: no best model")
    return table
