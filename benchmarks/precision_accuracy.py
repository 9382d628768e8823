"""Benchmark: does single or mixed precision cost accuracy? (issue 17: within 3 % of float64)

    python benchmarks/precision_accuracy.py --steps 2000 --workdir /tmp/precision
    python benchmarks/precision_accuracy.py --steps 100 --quick          # pipeline check

Trains examples/water/se_e2_a three times with the same seeds, changing only the precision:
``float64`` (the example), ``float32`` (descriptor and fitting ``precision: float32``) and
``mixed`` (``training/mixed_precision``: float32 compute, float64 weights and outputs). Each run is a
real ``mtcore train``, ``freeze`` and ``test`` on the held-out system data_3 (every frame). Prints the
validation energy and force RMSE and their ratio to float64's, and the CPU seconds of each training
(a speed figure only on a quiet machine; benchmarks/bench.py times steps properly). Runs are
sequential; results of finished runs are kept in ``results.json`` under the workdir, so an interrupted
benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "water" / "se_e2_a" / "input.json"
DATA = ROOT / "examples" / "water" / "data"
VARIANTS = ("float64", "float32", "mixed")


def variant_input(variant: str, steps: int) -> dict:
    doc = json.loads(EXAMPLE.read_text())
    doc = {k: v for k, v in doc.items() if not k.startswith("_")}
    model = doc["model"]
    if variant == "float32":
        model["descriptor"]["precision"] = "float32"
        model["fitting_net"]["precision"] = "float32"
    elif variant == "mixed":
        doc["training"]["mixed_precision"] = {"output_prec": "float64", "compute_prec": "float32"}
    training = doc["training"]
    training["training_data"]["systems"] = [str(DATA / f"data_{i}") for i in range(3)]
    training["validation_data"]["systems"] = [str(DATA / "data_3")]
    training["numb_steps"] = steps
    training["disp_freq"] = max(1, steps // 10)
    training["save_freq"] = steps
    return doc


def run(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout


def one_variant(variant: str, steps: int, workdir: Path) -> dict:
    folder = workdir / variant
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "input.json").write_text(json.dumps(variant_input(variant, steps), indent=1))
    python = sys.executable
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    run([python, "-m", "mtcore", "train", "input.json"], folder)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run([python, "-m", "mtcore", "freeze", "-o", "frozen.pth"], folder)
    report = json.loads(run([python, "-m", "mtcore", "test", "-m", "frozen.pth", "-s", str(DATA / "data_3"), "--json"], folder))
    return {"variant": variant, "steps": steps, "report": report, "train_wall_s": wall,
            "train_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def rmse(report: dict, key: str) -> float:
    """RMSE of ``key`` ("Energy/atom", "Force") over every tested frame (`mtcore test --json`)."""
    return float(report["combined"][key]["rmse"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--workdir", default="/tmp/mtcore-precision")
    parser.add_argument("--only", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="100 steps, a pipeline check")
    args = parser.parse_args()
    steps = 100 if args.quick else args.steps
    workdir = Path(args.workdir) / f"steps{steps}"
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / "results.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    for variant in args.only:
        if variant not in results:
            print(f"training {variant} ({steps} steps) in {workdir / variant}", file=sys.stderr, flush=True)
            results[variant] = one_variant(variant, steps, workdir)
            cache.write_text(json.dumps(results, indent=1))
    base = results.get("float64")
    print(f"water se_e2_a, {steps} steps, validation on data_3 (all frames); load average {os.getloadavg()[0]:.1f}")
    print("| precision | energy RMSE (eV/atom) | force RMSE (eV/Å) | force RMSE / float64 | training CPU s |")
    print("|---|---:|---:|---:|---:|")
    for variant in VARIANTS:
        if variant not in results:
            continue
        r = results[variant]
        e, f = rmse(r["report"], "Energy/atom"), rmse(r["report"], "Force")
        ratio = f / rmse(base["report"], "Force") if base else float("nan")
        print(f"| {variant} | {e:.3e} | {f:.4f} | {ratio:.3f} | {r['train_cpu_s']:.0f} |")


if __name__ == "__main__":
    main()
