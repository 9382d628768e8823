"""Where a training step's time goes: torch.profiler over a few steps of an example input.

    python benchmarks/profile_step.py --case water/se_e2_a --steps 10 [--precision float32] [--batch 4]

Prints the operators by self CPU time (the table docs/performance.md quotes). Run on a quiet
machine: profiles taken while other processes compete for the cores mislead.

    python benchmarks/profile_step.py --case water/se_atten --flops

instead counts the step's matrix-product work (torch.utils.flop_counter: mm, addmm, addmm_,
bmm, baddbmm; element-wise work and mtcore's C loops are not counted) and times a large float64/float32 matrix product on
this machine, so the step's arithmetic floor (GFLOP / peak GFLOP/s) can be set against a target.
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

ROOT = Path(__file__).resolve().parents[1]


def prepared_input(case: Path, steps: int, workdir: Path) -> Path:
    """The example input (absolute data paths, bench.py's) with numb_steps changed, no checkpoints."""
    from bench import absolute_document

    doc = absolute_document(case)
    training = doc["training"]
    training["numb_steps"] = steps
    training["disp_freq"] = max(steps, 1)
    training["save_freq"] = 0
    path = workdir / "input.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="water/se_e2_a")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default=None, help="set descriptor and fitting precision")
    parser.add_argument("--batch", type=int, default=None, help="set batch_size")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--shapes", action="store_true", help="group operators by input shape")
    parser.add_argument("--flops", action="store_true", help="count matrix-product FLOPs per step and the floor they set")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from rich.console import Console

    from bench import fittings
    from mtcore.config import load_config
    from mtcore.runtime import tune_allocator
    from mtcore.train.trainer import Trainer

    tune_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        path = prepared_input(ROOT / "examples" / args.case / "input.json", args.steps + args.warmup, Path(tmp))
        doc = json.loads(path.read_text())
        if args.precision:
            doc["model"]["descriptor"]["precision"] = args.precision
            for fit in fittings(doc["model"]):
                fit["precision"] = args.precision
        if args.batch:
            doc["training"]["training_data"]["batch_size"] = args.batch
        path.write_text(json.dumps(doc))
        trainer = Trainer(load_config(path), path.parent, Console(file=open(os.devnull, "w")))
        for _ in range(args.warmup):
            trainer.train_step(trainer.draw_head())
            trainer.step += 1
        if args.flops:
            report_flops(trainer, args.steps, args.case, doc["model"]["descriptor"].get("precision", "float64"))
            return
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            for _ in range(args.steps):
                trainer.train_step(trainer.draw_head())
                trainer.step += 1
        elapsed = time.perf_counter() - t0
    print(f"{args.case}: {1000 * elapsed / args.steps:.1f} ms/step under the profiler, {torch.get_num_threads()} threads")
    averages = prof.key_averages(group_by_input_shape=args.shapes)
    if args.shapes:  # one line per (operator, shapes): ms per step, calls per step, shapes
        rows = sorted(averages, key=lambda e: -e.self_cpu_time_total)[: args.rows]
        for e in rows:
            print(f"{e.self_cpu_time_total / 1000 / args.steps:8.2f} ms {e.count / args.steps:6.1f}x  "
                  f"{e.key[:40]:40s} {str(e.input_shapes)[:90]}")
        return
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


def peak_gflops(dtype: torch.dtype, n: int = 2000, repeats: int = 3) -> float:
    """Best GFLOP/s of an n×n matrix product: what the BLAS reaches on this machine and thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def report_flops(trainer, steps: int, case: str, precision: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_flop(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    # the in-place addmm_ (the embedding nets' backward accumulates into its gradients with it)
    # is not in torch's table: counted as addmm
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flop})
    t0 = time.process_time()
    with counter:
        for _ in range(steps):
            trainer.train_step(trainer.draw_head())
            trainer.step += 1
    per_step = counter.get_total_flops() / steps / 1e9
    parts = {str(op).split(".")[-1]: round(n / steps / 1e9, 3) for op, n in counter.get_flop_counts()["Global"].items()}
    dtype = torch.float32 if precision == "float32" else torch.float64
    peak = peak_gflops(dtype)
    print(f"{case} ({precision}, {torch.get_num_threads()} threads): {per_step:.3f} GFLOP of matrix products per step "
          f"{parts}; {dtype} matrix-product peak here {peak:.1f} GFLOP/s; floor {1000 * per_step / peak:.0f} ms/step "
          f"(the counted steps took {1000 * (time.process_time() - t0) / steps:.0f} CPU ms each, counting overhead included)")


if __name__ == "__main__":
    main()
