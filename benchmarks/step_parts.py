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

    OMP_NUM_THREADS=1 python benchmarks/step_parts.py --case water/se_e2_a --phases

instead times the parts of the example's own step in order (the prediction, within it the
forces' ``torch.autograd.grad``, the loss's backward, the optimiser step; medians), and

    OMP_NUM_THREADS=1 python benchmarks/step_parts.py --loops

times the embedding nets' element-wise C loops alone on preallocated rows of width 100
(float64; 1,024, 7,600 and 17,000 rows) in elements and bytes per second, to tell whether a loop
is bound by its arithmetic (the same rate at every size) or by memory.
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


def phases(case: str, steps: int, warmup: int) -> None:
    """Median ms of each part of a step of the example ``case`` as it is."""
    import statistics
    from collections import defaultdict

    from rich.console import Console

    from mtcore.config import load_config
    from mtcore.train.trainer import Trainer

    spent = defaultdict(list)

    def timed(name: str, function):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name].append(time.perf_counter() - t0)
        return run

    with tempfile.TemporaryDirectory() as tmp:
        path = prepared_input(ROOT / "examples" / case / "input.json", steps + warmup, Path(tmp))
        trainer = Trainer(load_config(path), path.parent, Console(file=open(os.devnull, "w")))
        grad, backward = torch.autograd.grad, torch.Tensor.backward
        trainer._predict = timed("prediction (forces included)", trainer._predict)
        for runtime in trainer.heads.values():
            runtime.optimizer.step = timed("optimiser step", runtime.optimizer.step)
        torch.autograd.grad = timed("  forces: torch.autograd.grad", grad)
        torch.Tensor.backward = timed("loss.backward", backward)
        try:
            for i in range(steps + warmup):
                if i == warmup:
                    spent.clear()
                t0 = time.perf_counter()
                trainer.train_step(trainer.draw_head())
                trainer.step += 1
                if i >= warmup:
                    spent["whole step"].append(time.perf_counter() - t0)
        finally:
            torch.autograd.grad, torch.Tensor.backward = grad, backward
    print(f"{case}, {torch.get_num_threads()} thread(s), medians of {steps} steps after {warmup}")
    print("| part | ms |\n|---|---:|")
    for name, times in spent.items():
        print(f"| {name} | {1000 * statistics.median(times):.2f} |")


def loops() -> None:
    """Rates of the embedding nets' forward and backward loops (tangent_embedding) on their own."""
    from mtcore.model import tangent_embedding as te

    if te.KERNELS.load() is None:
        raise SystemExit(f"the nets' loops are not available here: {te.status()}")
    dtype, n, m = torch.float64, 100, 50
    print("| loop | rows | ms | G elements/s | GB/s |\n|---|---:|---:|---:|---:|")
    for P in (1024, 7600, 17000):
        z, tz, g_out, g_tout = (torch.randn(P, n, dtype=dtype) for _ in range(4))
        x, tx = torch.randn(P, m, dtype=dtype), torch.randn(P, m, dtype=dtype)
        bias2 = torch.randn(n, dtype=dtype)
        out, tout, gz, gtz = (torch.empty(P, n, dtype=dtype) for _ in range(4))
        gxs, gtxs = torch.empty(P, m, dtype=dtype), torch.empty(P, m, dtype=dtype)
        calls = {  # (the call, bytes it reads and writes per row)
            "forward (bias, tanh, tangent)": (lambda: te._run("fwdz", dtype, P, n, m, 2, [
                (z, n), (bias2, 0), (x, m), (tz, n), (tx, m), (out, n), (tout, n)]), 8 * (5 * n + 2 * m)),
            "backward": (lambda: te._run("bwd", dtype, P, n, m, 2, [
                (g_out, n), (g_tout, n), (z, n), (tz, n), (gz, n), (gtz, n), (gxs, m), (gtxs, m)]), 8 * (6 * n + 2 * m)),
        }
        for name, (call, row_bytes) in calls.items():
            for _ in range(3):
                call()
            best = float("inf")
            for _ in range(20):
                t0 = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - t0)
            print(f"| {name} | {P} | {1000 * best:.3f} | {P * n / best / 1e9:.2f} | {P * row_bytes / best / 1e9:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="water/se_e2_a")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--phases", action="store_true", help="time the parts of the example's own step")
    parser.add_argument("--loops", action="store_true", help="time the embedding nets' C loops on their own")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from mtcore.runtime import tune_allocator

    tune_allocator()
    if args.phases:
        phases(args.case, args.steps, args.warmup)
        return
    if args.loops:
        loops()
        return
    variants = [("as in the input", None, None), (f"embedding {SMALL_EMBEDDING}", SMALL_EMBEDDING, None),
                (f"fitting {SMALL_FITTING}", None, SMALL_FITTING),
                (f"embedding {SMALL_EMBEDDING}, fitting {SMALL_FITTING}", SMALL_EMBEDDING, SMALL_FITTING)]
    print(f"{args.case}, {torch.get_num_threads()} thread(s), median of {args.steps} steps after {args.warmup}")
    print("| nets | ms per step |\n|---|---:|")
    for name, embedding, fitting in variants:
        print(f"| {name} | {median_step(args.case, embedding, fitting, args.steps, args.warmup):.1f} |")


if __name__ == "__main__":
    main()
