"""Benchmark: ms per training step of float64, mixed precision and float32 (issue 17).

    OMP_NUM_THREADS=1 python benchmarks/mixed_precision_speed.py [--case water/se_e2_a] [--steps 30] [--rounds 3]

Three trainers of the same example input in one process: ``float64`` (as the example),
``mixed`` (``training/mixed_precision``: compute float32, output float64) and ``float32``
(descriptor and fitting ``precision: float32``). After a few warm-up steps each, every round
times ``--steps`` steps of each variant in turn (alternating, so a change in machine load hits
all three alike), in CPU seconds of this process (time.process_time), and prints ms/step per
round, the median, and the ratio to float64. Report ``uptime``'s load average beside it.
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = ("float64", "mixed", "float32")


def variant_document(doc: dict, variant: str) -> dict:
    doc = json.loads(json.dumps(doc))
    model = doc["model"]
    if variant == "mixed":
        doc["training"]["mixed_precision"] = {"output_prec": "float64", "compute_prec": "float32"}
    elif variant == "float32":
        model["descriptor"]["precision"] = "float32"
        for fit in [model.get("fitting_net")] + list((model.get("fitting_net_dict") or {}).values()):
            if fit:
                fit["precision"] = "float32"
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="water/se_e2_a")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from rich.console import Console

    from mtcore.config import load_config
    from mtcore.runtime import tune_allocator
    from mtcore.train.trainer import Trainer
    from profile_step import prepared_input

    tune_allocator()
    total = args.warmup + args.rounds * args.steps
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = json.loads(prepared_input(ROOT / "examples" / args.case / "input.json", total, Path(tmp)).read_text())
        for variant in VARIANTS:
            folder = Path(tmp) / variant
            folder.mkdir()
            path = folder / "input.json"
            path.write_text(json.dumps(variant_document(base, variant)))
            trainer = Trainer(load_config(path), folder, Console(file=open(os.devnull, "w")))
            for _ in range(args.warmup):
                trainer.train_step(trainer.draw_head())
                trainer.step += 1
            trainers[variant] = trainer
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for variant, trainer in trainers.items():
                start = time.process_time()
                for _ in range(args.steps):
                    trainer.train_step(trainer.draw_head())
                    trainer.step += 1
                times[variant].append(1000 * (time.process_time() - start) / args.steps)
    load = os.getloadavg()
    print(f"{args.case}: {args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} thread(s), "
          f"CPU ms/step; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    reference = statistics.median(times["float64"])
    print(f"{'variant':<10} {'rounds':<28} {'median':>8} {'vs float64':>11}")
    for variant, values in times.items():
        median = statistics.median(values)
        rounds = " ".join(f"{v:7.1f}" for v in values)
        print(f"{variant:<10} {rounds:<28} {median:8.1f} {median / reference:10.2f}x")


if __name__ == "__main__":
    main()
