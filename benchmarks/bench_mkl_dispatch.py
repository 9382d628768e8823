"""What answering MKL's vendor check is worth (mtcore/mkl_dispatch.py): the same work in child
processes with it (the default) and without it (MTCORE_KEEP_MKL_DISPATCH=1), alternating.

    OMP_NUM_THREADS=1 python benchmarks/bench_mkl_dispatch.py --rounds 3

Per round and in alternating order, each child measures one thing:
- ``gemm``: the float64 and float32 matrix products of the water embedding net and the
  descriptor's per-atom products (median of 15 calls each), and a 2000 × 2000 product;
- ``train``: median ms of training steps of an example input (after 10 untimed steps), float64
  and float32 (descriptor and fitting precision);
- ``infer``: median ms of frozen-model calls (energy, forces, virial) on water of 192 and 1,536
  atoms (bench_inference.py's model, called as mtcore.infer calls it).

On an Intel processor, or off Linux x86-64, both sides are the same code (the status line says so).
Every figure printed is the best (least disturbed) over the rounds.
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(fn, calls: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def child_gemm() -> dict:
    import torch

    out = {}
    for dtype in (torch.float64, torch.float32):
        name = str(dtype).replace("torch.", "")
        x, w = torch.randn(17000, 50, dtype=dtype), torch.randn(50, 100, dtype=dtype)
        g = torch.randn(17000, 100, dtype=dtype)
        rows, d_env = torch.randn(192, 102, 4, dtype=dtype), torch.randn(192, 4, 100, dtype=dtype)
        padded = torch.randn(192, 102, 100, dtype=dtype)
        square = torch.randn(2000, 2000, dtype=dtype)
        out[f"{name} x·W [17000×50]·[50×100]"] = timed(lambda: x @ w, 15)
        out[f"{name} dy·Wᵀ [17000×100]·[100×50]"] = timed(lambda: g @ w.t(), 15)
        out[f"{name} xᵀ·dy [50×17000]·[17000×100]"] = timed(lambda: x.t() @ g, 15)
        out[f"{name} bmm R̃ᵀG [192: 4×102·102×100]"] = timed(lambda: torch.bmm(rows.transpose(1, 2), padded), 15)
        out[f"{name} bmm R̃·dA [192: 102×4·4×100]"] = timed(lambda: torch.bmm(rows, d_env), 15)
        out[f"{name} 2000×2000 product"] = timed(lambda: square @ square, 5)
    return out


def child_train(case: str, precision: str, steps: int) -> dict:
    import torch
    from rich.console import Console

    from bench import fittings
    from mtcore.config import load_config
    from mtcore.runtime import tune_allocator
    from mtcore.train.trainer import Trainer
    from profile_step import ROOT, prepared_input

    tune_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        path = prepared_input(ROOT / "examples" / case / "input.json", 10**6, Path(tmp))
        doc = json.loads(path.read_text())
        doc["model"]["descriptor"]["precision"] = precision
        for fit in fittings(doc["model"]):
            fit["precision"] = precision
        path.write_text(json.dumps(doc))
        trainer = Trainer(load_config(path), path.parent, Console(file=open(os.devnull, "w")))
        times = []
        for i in range(10 + steps):
            t0 = time.perf_counter()
            trainer.train_step(trainer.draw_head())
            trainer.step += 1
            if i >= 10:
                times.append(1000 * (time.perf_counter() - t0))
    assert torch.get_num_threads() >= 1
    return {f"train {case} {precision} ms/step": statistics.median(times)}


def child_infer(atoms: int, calls: int) -> dict:
    import warnings

    from bench_inference import SIZES, build_module, replicated_water
    from mtcore.freeze import frozen_execution
    from mtcore.runtime import tune_allocator

    warnings.simplefilter("ignore")
    tune_allocator()
    module = build_module("float64")
    coord, atype, box = replicated_water(SIZES[atoms])
    with frozen_execution(coord.device):
        ms = timed(lambda: module(coord, atype, box), calls)
    return {f"frozen float64 {atoms} atoms ms/call": ms}


def run_child(args: list[str], dispatch: bool, threads: int, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("MTCORE_KEEP_MKL_DISPATCH", None)
    if not dispatch:
        env["MTCORE_KEEP_MKL_DISPATCH"] = "1"
    run = subprocess.run([sys.executable, __file__, "--steps", str(steps), "--threads", str(threads), "--child", *args], capture_output=True, text=True, env=env, cwd=HERE)
    if run.returncode != 0:
        raise SystemExit(f"child {args} failed: {run.stderr.strip()[-500:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--case", action="append", default=[], help="training cases (default water/se_e2_a, water/se_e2_r)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--atoms", type=int, nargs="*", default=[192, 1536])
    parser.add_argument("--no-gemm", action="store_true")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        kind = args.child[0]
        if kind == "gemm":
            result = child_gemm()
        elif kind == "train":
            result = child_train(args.child[1], args.child[2], args.steps)
        else:
            result = child_infer(int(args.child[1]), 7)
        result["status"] = mtcore.mkl_dispatch.status
        print(json.dumps(result))
        return
    jobs = [] if args.no_gemm else [["gemm"]]
    for case in args.case or ["water/se_e2_a", "water/se_e2_r"]:
        jobs += [["train", case, "float64"], ["train", case, "float32"]]
    jobs += [["infer", str(n)] for n in args.atoms]
    best: dict[tuple[str, bool], float] = {}
    statuses = {}
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds} (load average {os.getloadavg()[0]:.2f})", file=sys.stderr)
        for job in jobs:
            for dispatch in ((True, False) if r % 2 == 0 else (False, True)):
                result = run_child(job, dispatch, args.threads, args.steps)
                statuses[dispatch] = result.pop("status")
                for key, value in result.items():
                    best[key, dispatch] = min(value, best.get((key, dispatch), float("inf")))
    print(f"MKL dispatch: with the answer: {statuses.get(True)}; without: {statuses.get(False)}; "
          f"{args.threads} thread(s), best of {args.rounds} round(s)")
    print("| what | MKL's choice (ms) | vendor check answered (ms) | faster by |")
    print("|---|---:|---:|---:|")
    for key in dict.fromkeys(k for k, _ in best):
        off, on = best[key, False], best[key, True]
        print(f"| {key} | {off:.2f} | {on:.2f} | {off / on:.2f}× |")


if __name__ == "__main__":
    main()
