"""Alternating A/B of training-step variants in one trainer (ab_kernels.py, ab_step.py).

Variants alternate step by step, order reversed every other round, so slow spells of a shared
machine fall on all of them alike; only ratios within one run mean anything on a VM whose speed
swings by 20-30 %.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable


def timed_step(trainer, head: str | None = None) -> float:
    """One training step of ``head`` (default: a drawn head), in ms."""
    head = head or trainer.draw_head()
    t0 = time.perf_counter()
    trainer.train_step(head)
    trainer.step += 1
    return 1000 * (time.perf_counter() - t0)


def alternate(trainer, variants: list[str], use: Callable[[str], None], rounds: int,
              head: str | None = None) -> dict[str, list[float]]:
    """ms per step of each variant; two untimed warm-up steps per variant first (they allocate).
    Every step trains ``head`` when given (a multi-task median otherwise mixes the heads' steps)."""
    for variant in variants:
        use(variant)
        timed_step(trainer, head), timed_step(trainer, head)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            use(variant)
            times[variant].append(timed_step(trainer, head))
    return times


def print_table(title: str, times: dict[str, list[float]]) -> None:
    """Median, lower quartile and ratio to the first variant, as a markdown table."""
    variants = list(times)
    base = statistics.median(times[variants[0]])
    print(title)
    print("| variant | median ms/step | lower quartile | against " + variants[0] + " |")
    print("|---|---:|---:|---:|")
    for variant in variants:
        values = sorted(times[variant])
        print(f"| {variant} | {statistics.median(values):.1f} | {values[len(values) // 4]:.1f} | "
              f"{statistics.median(values) / base:.3f} |")


def example_trainer(case: str, precision: str | None, workdir: Path):
    """A quiet Trainer of examples/<case>/input.json (descriptor and fittings set to
    ``precision`` when given), its data paths made absolute, for a long run of steps."""
    from rich.console import Console

    from bench import fittings
    from mtcore.config import load_config
    from mtcore.train.trainer import Trainer
    from profile_step import ROOT, prepared_input

    path = prepared_input(ROOT / "examples" / case / "input.json", 10**6, workdir)
    doc = json.loads(path.read_text())
    if precision:
        doc["model"]["descriptor"]["precision"] = precision
        for fit in fittings(doc["model"]):
            fit["precision"] = precision
    path.write_text(json.dumps(doc))
    return Trainer(load_config(path), path.parent, Console(file=open(os.devnull, "w")))
