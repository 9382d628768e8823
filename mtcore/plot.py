"""``mtcore plot``: learning curves from ``lcurve.out``, as an image or in the terminal.

Reads both layouts mtcore writes (mtcore/train/lcurve.py): single-task (DeePMD-kit's columns,
``rmse_e_val rmse_e_trn ... lr``) and multi-task (head-suffixed columns, ``rmse_f_val_<head>``,
one ``lr_<head>`` per head). One panel per metric (``rmse``, ``rmse_e``, ``rmse_f`` ...), one
colour per head, validation solid and training dashed, log scale (a loss spans decades).

Images need matplotlib (the optional extra ``plot``); without ``-o`` the curves are drawn in the
terminal with characters, which also works over ssh on a cluster without a display. An image
file is replaced only when this command wrote it (it carries ``mtcore plot`` in its metadata).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mtcore.errors import MtcoreError

IMAGE_SUFFIXES = (".png", ".pdf", ".svg")
SIGNATURE = "mtcore plot"
KINDS = ("val", "trn")


@dataclass
class Curves:
    """Parsed lcurve.out: steps, and per metric → head → kind ("val"/"trn") → values."""

    path: Path
    steps: np.ndarray
    heads: list[str]
    multi_task: bool
    metrics: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)

    def series(self, metric: str) -> list[tuple[str, str, np.ndarray]]:
        """(head, kind, values) with at least one finite positive value (log scale)."""
        out = []
        for head, kinds in self.metrics[metric].items():
            for kind in KINDS:
                values = kinds.get(kind)
                if values is not None and (np.isfinite(values) & (values > 0)).any():
                    out.append((head, kind, values))
        return out


def _split(name: str, heads: list[str], multi: bool) -> Optional[tuple[str, str, str]]:
    """Column name → (metric, kind, head); None for step/lr columns."""
    if name == "step" or name == "lr" or (multi and any(name == f"lr_{h}" for h in heads)):
        return None
    head = "default"
    if multi:
        matches = [h for h in heads if name.endswith("_" + h)]
        if not matches:
            return ("?", "?", "?")
        head = max(matches, key=len)
        name = name[: -len(head) - 1]
    metric, _, kind = name.rpartition("_")
    if kind not in KINDS or not metric:
        return ("?", "?", "?")
    return metric, kind, head


def read_lcurve(path: Path) -> Curves:
    """Parse ``path``; anything that is not an lcurve.out of mtcore is one line naming the file."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise MtcoreError(f"{path}: not found (mtcore train writes lcurve.out in its working folder)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MtcoreError(f"{path}: cannot be read as text ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    header = next((line for line in lines if line.startswith("#") and "step" in line.split()[1:2]), None)
    if header is None:
        raise MtcoreError(f"{path}: no '#  step ...' header line; not an lcurve.out")
    names = header[1:].split()
    multi = "lr" not in names
    heads = [n[3:] for n in names if n.startswith("lr_")] if multi else ["default"]
    if not heads:
        raise MtcoreError(f"{path}: the header has no lr column; not an lcurve.out")
    rows = []
    data_lines = [(i, line) for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
    for k, (i, line) in enumerate(data_lines):
        fields = line.split()
        if len(fields) != len(names):
            if k == len(data_lines) - 1:
                break  # a run still writing: its last line may be torn
            raise MtcoreError(f"{path}: line {i + 1} has {len(fields)} values for {len(names)} columns")
        try:
            rows.append([float(v) for v in fields])
        except ValueError:
            raise MtcoreError(f"{path}: line {i + 1} holds a value that is not a number") from None
    if not rows:
        raise MtcoreError(f"{path}: holds no data rows yet")
    table = np.array(rows)
    curves = Curves(path, table[:, 0], heads, multi)
    for column, name in enumerate(names):
        parts = _split(name, heads, multi)
        if parts is None:
            continue
        if parts[0] == "?":
            raise MtcoreError(f"{path}: column '{name}' is not <metric>_val/_trn{'_<head>' if multi else ''}")
        metric, kind, head = parts
        curves.metrics.setdefault(metric, {}).setdefault(head, {})[kind] = table[:, column]
    if not curves.metrics:
        raise MtcoreError(f"{path}: no metric columns")
    return curves


def figure(curves: Curves):
    """A matplotlib Figure (no pyplot, no global backend): one axes per metric."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MtcoreError("-o: an image needs matplotlib: pip install 'mtcore[plot]' (or omit -o for a terminal plot)") from None
    metrics = list(curves.metrics)
    ncols = 1 if len(metrics) == 1 else 2
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(6 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    colours = {head: f"C{i % 10}" for i, head in enumerate(curves.heads)}
    for ax, metric in zip(axes, metrics):
        for head, kind, values in curves.series(metric):
            label = ("" if not curves.multi_task else head + " ") + ("validation" if kind == "val" else "training")
            ax.plot(curves.steps, np.where(values > 0, values, np.nan), color=colours[head],
                    linestyle="-" if kind == "val" else "--", label=label)
        ax.set_yscale("log")
        ax.set_title(metric)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize="small")
    for ax in axes[len(metrics):]:
        fig.delaxes(ax)
    return fig


def save_figure(fig, output: Path) -> Path:
    """Write ``output`` atomically; an existing file is replaced only if this command wrote it."""
    output = Path(output)
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise MtcoreError(f"-o/--output {output}: choose a {', '.join(IMAGE_SUFFIXES)} file")
    if output.exists() or output.is_symlink():
        try:
            ours = output.is_file() and SIGNATURE.encode() in output.read_bytes()
        except OSError:
            ours = False
        if not ours:
            raise MtcoreError(f"-o/--output {output}: exists and was not written by mtcore plot; choose another name")
    fmt = output.suffix.lower()[1:]
    key = "Creator" if fmt in ("pdf", "svg") else "Software"
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format=fmt, metadata={key: SIGNATURE})
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output


def text_panel(curves: Curves, metric: str, width: int = 64, height: int = 12) -> list[str]:
    """One metric as a character plot: log10 y, one marker per series (validation upper case,
    training lower case, a letter per head), later series drawn over earlier ones."""
    series = curves.series(metric)
    lines = [f"{metric}"]
    if not series:
        return lines + ["  (no data: nan in every row)"]
    finite = np.concatenate([v[np.isfinite(v) & (v > 0)] for _, _, v in series])
    lo, hi = math.log10(finite.min()), math.log10(finite.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    steps = curves.steps
    x0, x1 = float(steps.min()), float(steps.max())
    span = (x1 - x0) or 1.0
    grid = [[" "] * width for _ in range(height)]
    legend = []
    for head, kind, values in sorted(series, key=lambda s: s[1] == "val"):  # validation drawn on top
        letter = chr(ord("a") + curves.heads.index(head) % 26)
        mark = letter.upper() if kind == "val" else letter
        legend.append(f"{mark} = {head + ' ' if curves.multi_task else ''}{'validation' if kind == 'val' else 'training'}")
        ok = np.isfinite(values) & (values > 0)
        cols = np.rint((steps[ok] - x0) / span * (width - 1)).astype(int)
        rows = np.rint((np.log10(values[ok]) - lo) / (hi - lo) * (height - 1)).astype(int)
        for c, r in zip(cols, rows):
            grid[height - 1 - r][c] = mark
    for r, row in enumerate(grid):
        value = 10 ** (hi - (hi - lo) * r / (height - 1))
        label = f"{value:9.2e}" if r in (0, height // 2, height - 1) else " " * 9
        lines.append(f"{label} |{''.join(row)}")
    lines.append(" " * 10 + "+" + "-" * width)
    left, right = f"{int(x0)}", f"step {int(x1)}"
    lines.append(" " * 11 + left + " " * max(1, width - len(left) - len(right)) + right)
    lines.append("  " + "   ".join(legend))
    return lines


def text_plot(curves: Curves, width: int = 64) -> str:
    return "\n\n".join("\n".join(text_panel(curves, m, width)) for m in curves.metrics) + "\n"


def plot_lcurve(path: Path, output: Optional[Path], terminal: bool, console) -> Optional[Path]:
    """The command: an image for ``-o`` (matplotlib), the terminal plot without it (or with
    ``--terminal``). Returns the image written, if any."""
    curves = read_lcurve(path)
    written = None
    if output is not None:
        written = save_figure(figure(curves), output)
    if output is None or terminal:
        width = max(20, min(100, (getattr(console, "width", 80) or 80) - 14))
        console.print(text_plot(curves, width), markup=False, highlight=False, end="")
        if output is None and not terminal:
            console.print("(an image: mtcore plot -o lcurve.png, with matplotlib installed)", markup=False, highlight=False)
    return written
