"""lcurve.out in DeePMD-kit's column layout, one row per display step.

Single-task: ``#  step  rmse_val rmse_trn  rmse_e_val rmse_e_trn ... lr`` exactly as DeePMD-kit.
Multi-task: one row per step (readable by numpy.loadtxt), each column named with the head as
suffix (``rmse_f_val_water_ener``), one ``lr_<head>`` column per head.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional


class LcurveWriter:
    def __init__(self, path: Path, columns: dict[str, tuple[list[str], bool]], multi_task: bool, append: bool,
                 notes: Optional[list[str]] = None):
        """columns: head → (metric names, has validation data); notes: extra ``#`` comment lines
        of the header (multi-task: the heads' draw probabilities), never extra columns."""
        self.path = Path(path)
        self.notes = list(notes or [])
        self.columns = columns
        self.multi = multi_task
        continuing = append and self.path.is_file() and self.path.stat().st_size > 0
        self.handle = open(self.path, "a" if append else "w", buffering=1)
        self._widths: list[int] = []
        self._write_header(to_file=not continuing)  # a restart appends below the existing header

    def _names(self) -> list[str]:
        names = []
        for head, (metrics, has_val) in self.columns.items():
            suffix = f"_{head}" if self.multi else ""
            for metric in metrics:
                if has_val:
                    names.append(f"{metric}_val{suffix}")
                names.append(f"{metric}_trn{suffix}")
            names.append(f"lr{suffix}")
        return names

    def _write_header(self, to_file: bool = True) -> None:
        parts = ["# %5s" % "step"]
        if self.multi:
            names = self._names()
            self._widths = [max(11, len(n)) for n in names]
            parts += ["   " + name.rjust(width) for name, width in zip(names, self._widths)]
        else:
            for metrics, has_val in self.columns.values():
                for metric in metrics:
                    if has_val:
                        parts.append("   %11s %11s" % (metric + "_val", metric + "_trn"))
                    else:
                        parts.append("   %11s" % (metric + "_trn"))
                parts.append("   %8s" % "lr")
        if to_file:
            self.handle.write("".join(parts) + "\n")
            self.handle.write("# If there is no available reference data, rmse_*_{val,trn} will print nan\n")
            for note in self.notes:
                self.handle.write(f"# {note}\n")

    def write(self, step: int, values: dict[str, tuple[dict, Optional[dict], float]]) -> None:
        """values: head → (training metrics, validation metrics or None, lr)."""
        parts = ["%7d" % step]
        if not self.multi:
            for head, (metrics, has_val) in self.columns.items():
                trn, val, lr = values[head]
                for metric in metrics:
                    if has_val:
                        parts.append("   %11.2e %11.2e" % (_num(val, metric), _num(trn, metric)))
                    else:
                        parts.append("   %11.2e" % _num(trn, metric))
                parts.append("   %8.1e" % lr)
        else:
            widths = iter(self._widths)
            for head, (metrics, has_val) in self.columns.items():
                trn, val, lr = values[head]
                for metric in metrics:
                    if has_val:
                        parts.append("   " + ("%.2e" % _num(val, metric)).rjust(next(widths)))
                    parts.append("   " + ("%.2e" % _num(trn, metric)).rjust(next(widths)))
                parts.append("   " + ("%.1e" % lr).rjust(next(widths)))
        self.handle.write("".join(parts) + "\n")

    def close(self) -> None:
        self.handle.close()


def truncate_after(path: Path, step: int) -> int:
    """--restart from ``step``: drop the rows written after it (a killed run got further than its
    last checkpoint; those steps are trained again and would appear twice), and a half-written
    last line. Header and comment lines stay. Returns the number of lines dropped."""
    from mtcore.train.checkpoint import atomic_text

    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        if line.lstrip().startswith("#"):
            kept.append(line)
            continue
        fields = line.split()
        if not fields or not line.endswith("\n"):
            continue
        try:
            row_step = int(fields[0])
        except ValueError:
            continue
        if row_step <= step:
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        atomic_text(path, "".join(kept))
    return dropped


def _num(values: Optional[dict], key: str) -> float:
    if not values:
        return math.nan
    return float(values.get(key, math.nan))
