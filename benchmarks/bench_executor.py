"""Benchmark: a frozen model under TorchScript's optimising (profiling) executor and without it.

    OMP_NUM_THREADS=1 python benchmarks/bench_executor.py [--sizes 192 1536 12288] [--calls 12] [--markdown]

A frozen file loaded with ``torch.jit.load`` runs, by default, under TorchScript's profiling
executor: the first calls record shapes and build a specialised, differentiable graph, and later
calls run that. ``torch.jit.optimized_execution(False)`` runs the scripted code as written
(autograd does the backward). This times both on the same file in one process: two loaded copies,
one always called optimised and one never, calls alternating, over an MD-like sequence of frames
(the water frame of examples/water replicated n×n×n, every call with fresh random displacements
of 0.05 Å, so the number of neighbour pairs changes from call to call as it does in MD).

Models: the se_e2_a model of examples/water/se_e2_a/input.json (random weights, statistics from
its data) frozen in float64, the same compressed (``mtcore compress``), and frozen in float32.
``--ase-md STEPS`` instead runs velocity-Verlet MD through the ASE calculator on the 192-atom
water frame (the float64 frozen model), in blocks of 10 steps alternating between calculators:
the file's TorchScript module with the optimising executor and without it, the file's eager twin
as mtcore ships it (mtcore.eager_twin), and the compressed file's twin; ms per MD step (wall).

Reported per model and size: the first call and the sum of the first three (a fresh process's
start-up), then the median and best of the remaining calls; CPU time of the process
(``time.process_time``), which other processes on a shared machine disturb less than wall time.
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compress import frozen_pair, load, machine  # noqa: E402
from bench_inference import SIZES, build_module, replicated_water  # noqa: E402

MODES = ("optimised", "plain")


def float32_file(workdir: Path) -> Path:
    import torch

    path = workdir / "se_e2_a_float32.pth"
    torch.jit.save(build_module("float32"), str(path))
    return path


def frames(atoms: int, calls: int, dtype):
    import torch

    coord, atype, box = replicated_water(SIZES[atoms])
    gen = torch.Generator().manual_seed(atoms)
    for _ in range(calls):
        yield (coord + 0.05 * torch.randn(coord.shape, generator=gen, dtype=coord.dtype)).to(dtype), atype, box.to(dtype)


def compare(path: Path, atoms: int, calls: int, dtype) -> dict:
    """Alternate the two modes call by call (order swapped every call) on the same frames."""
    import torch

    modules = {mode: load(path) for mode in MODES}
    cpu: dict = {mode: [] for mode in MODES}
    energies: dict = {mode: [] for mode in MODES}
    for k, frame in enumerate(frames(atoms, calls, dtype)):
        for mode in MODES if k % 2 == 0 else MODES[::-1]:
            with torch.jit.optimized_execution(mode == "optimised"):
                c0 = time.process_time()
                out = modules[mode](*frame)
                cpu[mode].append(1000 * (time.process_time() - c0))
            energies[mode].append(float(out["energy"].sum()))
    row = {"atoms": atoms, "calls": calls,
           "max_energy_diff_per_atom": max(abs(a - b) for a, b in zip(*energies.values())) / atoms}
    for mode in MODES:
        rest = cpu[mode][3:]
        row[f"{mode}_first_ms"] = cpu[mode][0]
        row[f"{mode}_first3_ms"] = sum(cpu[mode][:3])
        row[f"{mode}_median_ms"] = statistics.median(rest)
        row[f"{mode}_best_ms"] = min(rest)
    row["speedup_median"] = row["optimised_median_ms"] / row["plain_median_ms"]
    return row


MD_MODES = ("optimised", "plain", "twin", "compressed twin")


def ase_md(path: Path, packed: Path, steps: int) -> dict:
    """ms per velocity-Verlet step through MtcoreCalculator: the frozen file's TorchScript module
    with the optimising executor ("optimised") and without it ("plain", what mtcore ran before
    the eager twin), the file's eager twin as mtcore ships it ("twin", mtcore.eager_twin), and the
    compressed file's twin."""
    import os

    import numpy as np
    import torch
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from md_nve import water

    from mtcore.calculator import MtcoreCalculator

    runs = {}
    for mode in MD_MODES:
        atoms = water(0)
        if mode in ("optimised", "plain"):
            os.environ["MTCORE_INFER_SCRIPTED"] = "1"
        try:
            atoms.calc = MtcoreCalculator(str(packed if mode == "compressed twin" else path), device="cpu")
        finally:
            os.environ.pop("MTCORE_INFER_SCRIPTED", None)
        assert atoms.calc.potential.eager == mode.endswith("twin"), mode
        if mode == "optimised":  # the call inside evaluate, with the executor turned back on
            plain_call = atoms.calc.potential.runner

            def optimised_call(*args, _call=plain_call):
                with torch.jit.optimized_execution(True):
                    return _call(*args)

            atoms.calc.potential.runner = optimised_call
        rng = np.random.default_rng(3)
        atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(atoms.get_masses()[:, None] * units.kB * 300.0))
        runs[mode] = (atoms, VelocityVerlet(atoms, timestep=0.5 * units.fs))
    spent = {mode: 0.0 for mode in MD_MODES}
    for block in range(max(1, steps // 10)):
        for mode in MD_MODES if block % 2 == 0 else MD_MODES[::-1]:
            t0 = time.perf_counter()
            runs[mode][1].run(10)
            spent[mode] += time.perf_counter() - t0
    done = 10 * max(1, steps // 10)
    row = {"steps": done, **{f"{mode.replace(' ', '_')}_ms_per_step": 1000 * spent[mode] / done for mode in MD_MODES}}
    row["speedup"] = row["optimised_ms_per_step"] / row["plain_ms_per_step"]
    row["twin_speedup"] = row["plain_ms_per_step"] / row["twin_ms_per_step"]
    row["compressed_twin_speedup"] = row["plain_ms_per_step"] / row["compressed_twin_ms_per_step"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[192, 1536], choices=sorted(SIZES))
    parser.add_argument("--calls", type=int, default=12, help="calls per mode and size (the first three are start-up)")
    parser.add_argument("--models", nargs="+", default=["frozen", "compressed", "float32"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--ase-md", type=int, default=0, metavar="STEPS", help="time ASE MD steps instead (both modes)")
    args = parser.parse_args()
    import torch

    from mtcore.runtime import tune_allocator

    torch.set_num_threads(args.threads)
    tune_allocator()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mtcore-bench-executor-") as tmp:
        plain, packed, _ = frozen_pair("se_e2_a", Path(tmp), 0.01)
        if args.ase_md:
            print(json.dumps({"ase_md": ase_md(plain, packed, args.ase_md)}), flush=True)
            print(f"machine: {machine()}", flush=True)
            return
        files = {"frozen": (plain, torch.float64), "compressed": (packed, torch.float64)}
        if "float32" in args.models:
            files["float32"] = (float32_file(Path(tmp)), torch.float32)
        for atoms in args.sizes:
            calls = args.calls if atoms <= 1536 else max(5, args.calls // 3)
            for name in args.models:
                path, dtype = files[name]
                row = {"model": name, **compare(path, atoms, calls, dtype)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nmachine: {machine()}", flush=True)
    if args.markdown:
        print("\n| model | atoms | first call: optimised / plain (ms) | first 3 calls: optimised / plain (ms) "
              "| later calls, median: optimised / plain (ms) | best: optimised / plain (ms) | plain faster by | max \\|ΔE\\|/atom |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['atoms']:,} | {r['optimised_first_ms']:,.0f} / {r['plain_first_ms']:,.0f} "
                  f"| {r['optimised_first3_ms']:,.0f} / {r['plain_first3_ms']:,.0f} "
                  f"| {r['optimised_median_ms']:,.0f} / {r['plain_median_ms']:,.0f} "
                  f"| {r['optimised_best_ms']:,.0f} / {r['plain_best_ms']:,.0f} | {r['speedup_median']:.2f}× "
                  f"| {r['max_energy_diff_per_atom']:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
