"""mtcore plot: lcurve.out of single- and multi-task runs → panels per metric, lines per head."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mtcore.cli import app
from mtcore.errors import MtcoreError
from mtcore.plot import figure, plot_lcurve, read_lcurve, save_figure, text_plot
from mtcore.train.lcurve import LcurveWriter

METRICS = ["rmse", "rmse_e", "rmse_f"]


def _write(path: Path, heads: dict, multi: bool, steps=range(0, 1001, 100)) -> Path:
    """heads: name → has validation. Values 10^-(head index + step/1000) (val 1.5x trn);
    rmse_e of the first head's validation is nan throughout (no energy labels)."""
    writer = LcurveWriter(path, {h: (METRICS, val) for h, val in heads.items()}, multi, append=False)
    for step in steps:
        values = {}
        for i, (head, val) in enumerate(heads.items()):
            trn = {m: 10 ** -(i + step / 1000 + k) for k, m in enumerate(METRICS)}
            vld = {m: 1.5 * v for m, v in trn.items()} if val else None
            if vld is not None and i == 0:
                vld["rmse_e"] = math.nan
            values[head] = (trn, vld, 1e-3)
        writer.write(step, values)
    writer.close()
    return path


def test_multi_task_layout_gives_panels_and_lines(tmp_path):
    path = _write(tmp_path / "lcurve.out", {"water_ener": True, "h2o_v2": False}, multi=True)
    curves = read_lcurve(path)
    assert curves.multi_task and curves.heads == ["water_ener", "h2o_v2"]
    assert list(curves.metrics) == METRICS
    assert np.array_equal(curves.steps, np.arange(0, 1001, 100))
    assert np.allclose(curves.metrics["rmse_f"]["h2o_v2"]["trn"], [10 ** -(1 + s / 1000 + 2) for s in range(0, 1001, 100)], rtol=0.01)
    fig = figure(curves)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == METRICS
    for ax in axes:
        assert ax.get_yscale() == "log"
        styles = sorted((line.get_label(), line.get_linestyle()) for line in ax.get_lines())
        expected = [("h2o_v2 training", "--"), ("water_ener training", "--"), ("water_ener validation", "-")]
        if ax.get_title() == "rmse_e":  # the nan validation column draws no line
            expected.remove(("water_ener validation", "-"))
        assert styles == expected
    # one colour per head, shared by its training and validation lines
    rmse = {line.get_label(): line.get_color() for line in axes[0].get_lines()}
    assert rmse["water_ener training"] == rmse["water_ener validation"] != rmse["h2o_v2 training"]


def test_single_task_png_pdf_svg(tmp_path):
    path = _write(tmp_path / "lcurve.out", {"default": True}, multi=False)
    curves = read_lcurve(path)
    assert not curves.multi_task and curves.heads == ["default"]
    fig = figure(curves)
    assert len(fig.get_axes()) == 3
    assert sorted(line.get_label() for line in fig.get_axes()[2].get_lines()) == ["training", "validation"]
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")):
        out = save_figure(fig, tmp_path / f"lc{suffix}")
        assert out.read_bytes().startswith(magic)
        save_figure(fig, out)  # its own image may be replaced
    mine = tmp_path / "photo.png"
    mine.write_bytes(b"\x89PNG not from mtcore")
    with pytest.raises(MtcoreError, match="not written by mtcore plot"):
        save_figure(fig, mine)
    assert mine.read_bytes() == b"\x89PNG not from mtcore"
    with pytest.raises(MtcoreError, match="choose a .png"):
        save_figure(fig, tmp_path / "lc.jpg")


def test_terminal_plot(tmp_path):
    path = _write(tmp_path / "lcurve.out", {"water_ener": True, "h2o_v2": False}, multi=True)
    text = text_plot(read_lcurve(path), width=50)
    for metric in METRICS:
        assert f"\n{metric}\n" in "\n" + text
    assert "A = water_ener validation" in text and "b = h2o_v2 training" in text
    panel = text.split("\n\n")[0].splitlines()
    grid = [line.split("|", 1)[1] for line in panel if "|" in line]
    assert len(grid) == 12 and all(len(row) == 50 for row in grid)
    # decreasing curves: the first column's marks sit above the last column's
    first = min(r for r, row in enumerate(grid) if row[0] != " ")
    last = min(r for r, row in enumerate(grid) if row[-1] != " ")
    assert first < last
    buffer = io.StringIO()
    assert plot_lcurve(path, None, False, Console(file=buffer, width=80)) is None
    assert "rmse_f" in buffer.getvalue() and "mtcore plot -o" in buffer.getvalue()


def test_cli_and_bad_files(tmp_path):
    runner = CliRunner()
    path = _write(tmp_path / "lcurve.out", {"default": True}, multi=False)
    result = runner.invoke(app, ["plot", str(path), "-o", str(tmp_path / "lc.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lc.png").is_file()
    result = runner.invoke(app, ["plot", str(path), "--terminal"])
    assert result.exit_code == 0 and "rmse_e" in result.output
    # a run still writing: a torn last line is left out
    torn = tmp_path / "torn.out"
    torn.write_text(path.read_text() + "   1100    1.0e-02")
    assert read_lcurve(torn).steps[-1] == 1000
    bad = {
        "missing.out": None,
        "notlcurve.out": "hello world\n",
        "empty.out": path.read_text().splitlines()[0] + "\n",
        "ragged.out": path.read_text().replace("   1.0e-03\n", "\n", 1),
        "words.out": path.read_text().replace("1.0e-03", "fast", 1),
    }
    for name, content in bad.items():
        if content is not None:
            (tmp_path / name).write_text(content)
        result = runner.invoke(app, ["plot", str(tmp_path / name)])
        assert result.exit_code == 1, name
        assert len(result.output.strip().splitlines()) == 1 and name in result.output, result.output
