"""What a training step's parts cost, by shrinking them: the example's model as is, with small
embedding nets, with a small fitting net, and with both (not a test).

    OMP_NUM_THREADS=1 python benchmarks/step_parts.py --case water/se_e2_a [--steps 40]

Each variant is the example input with other ``neuron`` lists (the descriptor's ``axis_neuron``
capped at its last width), trained in this process on the same data; the median step after a
warm-up is printed. The small-nets variant is what the step costs apart from the nets'
arithmetic (data, environment rows, loss, optimiser, the overhead of each operator); the
differences are the embedding nets with the contraction, and the fitting nets. A small
embedding also narrows the descriptor the fitting net reads (axis × last width), so the
fitting's share measured with small embeddings is less than its share in the full model.
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench import fittings
from profile_step import prepared_input

ROOT = Path(__file__).resolve().parents[1]
SMALL_EMBEDDING = [2, 4, 8]
SMALL_FITTING = [8, 8, 8]


def median_step(case: str, embedding, fitting, steps: int, warmup: int) -> float:
    """Median ms per training step of the example ``case`` with the given neuron lists (None: as is)."""
    from rich.console import Console

    from mtcore.config import load_config
    from mtcore.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        path = prepared_input(ROOT / "examples" / case / "input.json", steps + warmup, Path(tmp))
        doc = json.loads(path.read_text())
        descriptor = doc["model"]["descriptor"]
        if embedding is not None:
            descriptor["neuron"] = embedding
            descriptor["axis_neuron"] = min(int(descriptor.get("axis_neuron", 4)), embedding[-1])
        if fitting is not None:
            for fit in fittings(doc["model"]):
                fit["neuron"] = fitting
        path.write_text(json.dumps(doc))
        trainer = Trainer(load_config(path), path.parent, Console(file=open(os.devnull, "w")))
        times = []
        for i in range(steps + warmup):
            t0 = time.perf_counter()
            trainer.train_step(trainer.draw_head())
            trainer.step += 1
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="water/se_e2_a")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from mtcore.runtime import tune_allocator

    tune_allocator()
    variants = [("as in the input", None, None), (f"embedding {SMALL_EMBEDDING}", SMALL_EMBEDDING, None),
                (f"fitting {SMALL_FITTING}", None, SMALL_FITTING),
                (f"embedding {SMALL_EMBEDDING}, fitting {SMALL_FITTING}", SMALL_EMBEDDING, SMALL_FITTING)]
    print(f"{args.case}, {torch.get_num_threads()} thread(s), median of {args.steps} steps after {args.warmup}")
    print("| nets | ms per step |\n|---|---:|")
    for name, embedding, fitting in variants:
        print(f"| {name} | {median_step(args.case, embedding, fitting, args.steps, args.warmup):.1f} |")


if __name__ == "__main__":
    main()
