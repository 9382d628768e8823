"""Benchmark: frozen-model inference time and peak memory against system size (not a test).

    python benchmarks/bench_inference.py                    # 192, 1,536, 12,288 atoms; float64 and float32
    python benchmarks/bench_inference.py --large            # also 98,304 atoms (minutes in float64)
    python benchmarks/bench_inference.py --sizes 192 12288 --precision float64 --markdown

The model is examples/water/se_e2_a/input.json's (se_e2_a, sel [46, 92], rcut 6, embedding
[25, 50, 100], fitting [240, 240, 240]) with random weights and unit statistics: timing does not
depend on the weights. Frames are the first frame of examples/water/data/data_0 (192 atoms, a
12.4 Å box) replicated n×n×n. One call evaluates energy, forces and virial, neighbour list
included, through the TorchScript module exactly as ``mtcore.infer`` runs it.

Every (size, precision) runs in its own child process, so the peak resident memory reported
(``ru_maxrss`` of the child) belongs to that size alone; the figure includes the Python
interpreter and torch (about 0.3 GB).
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
SIZES = {192: 1, 1536: 2, 12288: 4, 98304: 8}


def build_module(precision: str):
    import torch

    from mtcore.config import normalize, read_input
    from mtcore.model.build import build_model
    from mtcore.model.frozen import FrozenModel
    from mtcore.plugins import get_registry

    case = ROOT / "examples" / "water" / "se_e2_a" / "input.json"
    doc = read_input(case)
    doc["model"]["descriptor"]["precision"] = precision
    doc["model"]["fitting_net"]["precision"] = precision
    for key in ("training_data", "validation_data"):
        section = doc["training"].get(key)
        if section:
            section["systems"] = [str((case.parent / s).resolve()) for s in (
                [section["systems"]] if isinstance(section["systems"], str) else section["systems"])]
    registry = get_registry()
    config = normalize(doc, case.parent, registry)
    model = build_model(config, registry).eval()
    return torch.jit.script(FrozenModel(model.descriptor, model.heads["default"], model.type_map, "default", "{}"))


def replicated_water(reps: int):
    import numpy as np
    import torch

    data = ROOT / "examples" / "water" / "data" / "data_0"
    coord = np.load(data / "set.000" / "coord.npy")[0].reshape(-1, 3)
    box = np.load(data / "set.000" / "box.npy")[0].reshape(3, 3)
    atype = np.loadtxt(data / "type.raw", dtype=np.int64)
    cells = np.array([[i, j, k] for i in range(reps) for j in range(reps) for k in range(reps)], dtype=np.float64)
    big = (coord[None, :, :] + (cells @ box)[:, None, :]).reshape(-1, 3)
    return torch.tensor(big), torch.tensor(np.tile(atype, len(cells))), torch.tensor(box * reps)


def child(atoms: int, precision: str, repeats: int, chunk: int) -> dict:
    """Runs in its own process: build, warm up, time; report ms per frame and this process's peak RSS."""
    import torch

    from mtcore.runtime import tune_allocator

    tune_allocator()
    module = build_module(precision)
    if chunk > 0:
        module.set_chunk_atoms(chunk)
    coord, atype, box = replicated_water(SIZES[atoms])
    module(coord, atype, box)  # warm-up: TorchScript profiles the first calls
    if atoms <= 1536:
        module(coord, atype, box)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = module(coord, atype, box)
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(out["energy"]).all() and out["force"].shape == (1, atoms, 3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB → GiB
    return {"atoms": atoms, "precision": precision, "ms_per_frame": 1000 * min(times), "peak_rss_gb": peak,
            "threads": torch.get_num_threads()}


def run_child(atoms: int, precision: str, repeats: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(atoms), precision, str(repeats), str(chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"atoms": atoms, "precision": precision, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # cross-check: the largest child so far
    result["children_max_rss_gb"] = usage.ru_maxrss / 1024**2
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[192, 1536, 12288], choices=sorted(SIZES))
    parser.add_argument("--large", action="store_true", help="add 98,304 atoms (float64 takes minutes)")
    parser.add_argument("--precision", nargs="*", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per size (default: 5 below 12,288 atoms, else 2)")
    parser.add_argument("--markdown", action="store_true", help="print the table for docs/performance.md")
    parser.add_argument("--chunk", type=int, default=0, help="centre atoms per pass (default: the model's own)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], int(args.child[2]), int(args.child[3]))))
        return
    sizes = sorted(set(args.sizes + ([98304] if args.large else [])))
    rows = []
    for precision in args.precision:
        for atoms in sizes:
            repeats = args.repeats or (5 if atoms < 12288 else 2 if atoms == 12288 else 1)
            row = run_child(atoms, precision, repeats, args.chunk)
            rows.append(row)
            print(json.dumps(row), flush=True)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nOMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average at the end {load} (others' processes count)")
    header = "| atoms | precision | ms / frame | ms / atom | × 192-atom time | peak RSS (GB) |"
    print(header if args.markdown else header.replace("|", " "))
    if args.markdown:
        print("|---:|---|---:|---:|---:|---:|")
    for precision in args.precision:
        base = next((r["ms_per_frame"] for r in rows if r["precision"] == precision and r["atoms"] == 192 and "error" not in r), None)
        for r in (r for r in rows if r["precision"] == precision):
            if "error" in r:
                print(f"| {r['atoms']:,} | {precision} | failed: {r['error']} | | | |")
                continue
            ratio = f"{r['ms_per_frame'] / base:.1f}" if base else "-"
            print(f"| {r['atoms']:,} | {precision} | {r['ms_per_frame']:.0f} | {r['ms_per_frame'] / r['atoms']:.3f} | {ratio} | {r['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
