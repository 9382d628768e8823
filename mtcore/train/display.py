"""What training shows on the terminal: a progress bar with ETA and a per-head metrics table
that updates in place. Without a terminal (CI, pipes) it prints one line per display step."""

from __future__ import annotations

import math
from typing import Optional

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


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
