"""The forgetting report of a run that extends a trained model (``--init-model``): each old
head's validation error with the source weights and after training, side by side. Whether the
new heads cost the old ones accuracy is the first question after adding heads; the run answers
it instead of leaving it to a separate ``mtcore test`` of two models."""

from __future__ import annotations

import math

from rich.table import Table


def _change(before: float, after: float) -> str:
    if not (math.isfinite(before) and math.isfinite(after)) or before == 0:
        return "-"
    return f"{100 * (after - before) / before:+.1f}%"


def forgetting_table(report: dict, file_name: str) -> Table:
    """One row per old head and metric: before (the --init-model weights), after, change."""
    table = Table(title=f"forgetting of the --init-model heads on their validation frames (step {report['step']}; {file_name})")
    for column in ("head", "trained", "frames", "metric", "before", "after", "change"):
        table.add_column(column, justify="left" if column in ("head", "trained", "metric") else "right")
    for head, entry in report["heads"].items():
        share = f"yes ({100 * entry['fitting_weight']:.1f}%)" if entry["trained"] else "no"
        for k, (metric, before) in enumerate(entry["before"].items()):
            after = float(entry["after"].get(metric, math.nan))
            table.add_row(head if k == 0 else "", share if k == 0 else "", str(entry["validation_frames"]) if k == 0 else "",
                          metric, f"{before:.4e}", f"{after:.4e}", _change(float(before), after))
    return table
