"""Benchmark: frozen-model inference time and peak memory against system size (not a test).

    python benchmarks/bench_inference.py                    # 192, 1,536, 12,288 atoms; float64 and float32
    python benchmarks/bench_inference.py --large            # also 98,304 atoms (minutes in float64)
    python benchmarks/bench_inference.py --sizes 192 12288 --precision float64 --markdown
    python benchmarks/bench_inference.py --deepmd ~/.cache/mtcore-bench/deepmd-venv/bin/dp   # side by side

The model is examples/water/se_e2_a/input.json's (se_e2_a, sel [46, 92], rcut 6, embedding
[25, 50, 100], fitting [240, 240, 240]) with random weights and unit statistics: timing does not
depend on the weights. Frames are the first frame of examples/water/data/data_0 (192 atoms, a
12.4 Å box) replicated n×n×n. One call evaluates energy, forces and virial, neighbour list
included, through the TorchScript module exactly as ``mtcore.infer`` runs it.

Every (size, precision) runs in its own child process, so the peak resident memory reported
(``ru_maxrss`` of the child) belongs to that size alone; the figure includes the Python
interpreter and torch (about 0.3 GB).

With ``--deepmd PATH_TO_dp`` the same sizes are also evaluated by DeePMD-kit (PyTorch backend):
the same input (same descriptor, fitting net and precision) is trained for one step with
``dp --pt train`` and frozen with ``dp --pt freeze`` (cached under ~/.cache/mtcore-bench, keyed by
the input and precision), then ``benchmarks/deepmd_infer_child.py`` runs under DeePMD-kit's own
Python (the ``python`` next to ``dp``) and times ``DeepPot(model).eval(coords, cells, atypes)``.
The two alternate in one run (per round: mtcore then DeePMD-kit at each size) with the same
thread count (OMP_NUM_THREADS, torch intra-op threads, DP_INTRA_OP_PARALLELISM_THREADS); each
child is capped by RLIMIT_AS (``--mem-gb``) and a wall-clock ``--timeout``, so a size that runs
out of memory is reported as such instead of bringing the machine down.
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import argparse
import json
import os
import resource
import hashlib
import statistics
import subprocess
import sys
import tempfile
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

    from mtcore.freeze import frozen_execution
    from mtcore.runtime import tune_allocator

    tune_allocator()
    module = build_module(precision)
    if chunk > 0:
        module.set_chunk_atoms(chunk)
    coord, atype, box = replicated_water(SIZES[atoms])
    with frozen_execution("cpu"):  # as mtcore.infer calls frozen files
        module(coord, atype, box)  # warm-up
        if atoms <= 1536:
            module(coord, atype, box)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = module(coord, atype, box)
            times.append(time.perf_counter() - t0)
    assert torch.isfinite(out["energy"]).all() and out["force"].shape == (1, atoms, 3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB → GiB
    return {"atoms": atoms, "precision": precision, "ms_per_frame": 1000 * min(times),
            "median_ms": 1000 * statistics.median(times), "peak_rss_gb": peak, "threads": torch.get_num_threads()}


def capped(mem_gb: float):
    """preexec_fn: cap the child's address space, so running out of memory fails that child only."""
    def apply() -> None:
        if mem_gb > 0:
            limit = int(mem_gb * 1024**3)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    if threads <= 0:  # mtcore-only runs keep the caller's environment, as before
        return env
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               DP_INTRA_OP_PARALLELISM_THREADS=str(threads), DP_INTER_OP_PARALLELISM_THREADS="1")
    return env


def run_capped(cmd: list, atoms: int, precision: str, threads: int, mem_gb: float, timeout: float) -> dict:
    """Run one timing child; a crash, a memory cap hit or a timeout becomes an 'error' row."""
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads),
                             preexec_fn=capped(mem_gb), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"atoms": atoms, "precision": precision, "error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        tail = [line for line in out.stderr.strip().splitlines() if line.strip()] or ["?"]
        memory = any("MemoryError" in line or "alloc" in line.lower() for line in tail[-20:])
        why = f"out of memory under the {mem_gb:g} GB cap" if memory or out.returncode == -9 else f"exit {out.returncode}"
        return {"atoms": atoms, "precision": precision, "error": f"{why}: {tail[-1][:160]}",
                "wall_s": time.perf_counter() - t0}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(atoms=atoms, precision=precision)
    return result


def run_child(atoms: int, precision: str, repeats: int, chunk: int, threads: int = 0,
              mem_gb: float = 0, timeout: float = 3600) -> dict:
    cmd = [sys.executable, __file__, "--child", str(atoms), precision, str(repeats), str(chunk)]
    return run_capped(cmd, atoms, precision, threads, mem_gb, timeout)


def deepmd_model(dp: str, precision: str, threads: int) -> Path:
    """Train the example input for one step with DeePMD-kit and freeze it (.pth); cached by input hash."""
    case = ROOT / "examples" / "water" / "se_e2_a" / "input.json"
    doc = json.loads(case.read_text())
    doc["model"]["descriptor"]["precision"] = precision
    doc["model"]["fitting_net"]["precision"] = precision
    for key in ("training_data", "validation_data"):
        systems = doc["training"][key]["systems"]
        systems = [systems] if isinstance(systems, str) else systems
        doc["training"][key]["systems"] = [str((case.parent / s).resolve()) for s in systems]
    doc["training"].update(numb_steps=1, disp_freq=1, save_freq=1)
    text = json.dumps(doc, indent=1, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    workdir = Path.home() / ".cache" / "mtcore-bench" / f"deepmd-infer-{precision}-{key}"
    model = workdir / "model.pth"
    if model.exists():
        return model
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "input.json").write_text(text)
    for step in (["train", "input.json"], ["freeze", "-o", "model.pth"]):
        out = subprocess.run([dp, "--pt", *step], cwd=workdir, env=thread_env(threads), capture_output=True, text=True)
        if out.returncode != 0 or (step[0] == "freeze" and not model.exists()):
            raise SystemExit(f"DeePMD-kit 'dp --pt {step[0]}' failed in {workdir}: "
                             f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return model


def run_deepmd(python: Path, model: Path, atoms: int, precision: str, repeats: int, threads: int,
               mem_gb: float, timeout: float, frames_dir: Path) -> dict:
    coord, atype, box = replicated_water(SIZES[atoms])
    stem = frames_dir / str(atoms)
    import numpy as np

    np.save(f"{stem}-coord.npy", coord.numpy())
    np.save(f"{stem}-box.npy", box.numpy())
    np.save(f"{stem}-type.npy", atype.numpy())
    cmd = [str(python), str(Path(__file__).with_name("deepmd_infer_child.py")), str(model),
           f"{stem}-coord.npy", f"{stem}-box.npy", f"{stem}-type.npy", str(repeats)]
    return run_capped(cmd, atoms, precision, threads, mem_gb, timeout)


def side_by_side(args, sizes: list) -> None:
    """Alternate mtcore and DeePMD-kit children, size by size, for --rounds rounds; keep the best."""
    python = Path(args.deepmd).with_name("python")
    threads = args.threads
    models = {p: deepmd_model(args.deepmd, p, threads) for p in args.precision}
    print(json.dumps({"deepmd_models": {p: str(m) for p, m in models.items()}}), flush=True)
    best: dict = {}
    frames_dir = Path(tempfile.mkdtemp(prefix="mtcore-bench-frames-"))
    for round_ in range(args.rounds):
        for precision in args.precision:
            for atoms in sizes:
                repeats = args.repeats or (5 if atoms < 12288 else 2 if atoms == 12288 else 1)
                for code in ("mtcore", "deepmd"):
                    previous = best.get((code, precision, atoms))
                    if previous and "error" in previous:
                        continue  # a size that failed (memory, time) is not retried
                    if code == "mtcore":
                        row = run_child(atoms, precision, repeats, args.chunk, threads, args.mem_gb, args.timeout)
                    else:
                        row = run_deepmd(python, models[precision], atoms, precision, repeats, threads,
                                         args.mem_gb, args.timeout, frames_dir)
                    row.update(code=code, round=round_ + 1, load=os.getloadavg()[0])
                    print(json.dumps(row), flush=True)
                    if previous is None or "error" in row or row["ms_per_frame"] < previous["ms_per_frame"]:
                        best[(code, precision, atoms)] = row if previous is None or "error" in row else \
                            {**row, "peak_rss_gb": max(row["peak_rss_gb"], previous["peak_rss_gb"])}
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{threads} thread(s) for both (OMP_NUM_THREADS, torch, DP_INTRA_OP_PARALLELISM_THREADS); "
          f"best over {args.rounds} round(s); load average at the end {load} (others' processes count)")
    header = ("| atoms | precision | mtcore ms / frame | DeePMD-kit ms / frame | mtcore frames/s | "
              "DeePMD-kit frames/s | mtcore / DeePMD-kit frames/s | peak RSS mtcore / DeePMD-kit (GB) |")
    print(header if args.markdown else header.replace("|", " "))
    if args.markdown:
        print("|---:|---|---:|---:|---:|---:|---:|---:|")

    def cell(row: dict, fmt: str) -> str:
        return "failed: " + row["error"] if "error" in row else fmt.format(row["ms_per_frame"])

    for precision in args.precision:
        for atoms in sizes:
            m, d = best[("mtcore", precision, atoms)], best[("deepmd", precision, atoms)]
            fps = [("-" if "error" in r else f"{1000 / r['ms_per_frame']:.2f}") for r in (m, d)]
            ratio = "-" if "error" in m or "error" in d else f"{d['ms_per_frame'] / m['ms_per_frame']:.1f}×"
            rss = " / ".join("-" if "error" in r else f"{r['peak_rss_gb']:.2f}" for r in (m, d))
            print(f"| {atoms:,} | {precision} | {cell(m, '{:.0f}')} | {cell(d, '{:.0f}')} | {fps[0]} | {fps[1]} | "
                  f"{ratio} | {rss} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[192, 1536, 12288], choices=sorted(SIZES))
    parser.add_argument("--large", action="store_true", help="add 98,304 atoms (float64 takes minutes)")
    parser.add_argument("--precision", nargs="*", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per size (default: 5 below 12,288 atoms, else 2)")
    parser.add_argument("--markdown", action="store_true", help="print the table for docs/performance.md")
    parser.add_argument("--chunk", type=int, default=0, help="centre atoms per pass (default: the model's own)")
    parser.add_argument("--deepmd", metavar="PATH_TO_dp", help="also time DeePMD-kit (PyTorch backend) side by side")
    parser.add_argument("--rounds", type=int, default=2, help="with --deepmd: alternating rounds, best kept (default 2)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                        help="with --deepmd: threads for both codes (default: OMP_NUM_THREADS or 1)")
    parser.add_argument("--mem-gb", type=float, default=16, help="with --deepmd: address-space cap per child (GB)")
    parser.add_argument("--timeout", type=float, default=600, help="with --deepmd: wall-clock cap per child (s)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], int(args.child[2]), int(args.child[3]))))
        return
    sizes = sorted(set(args.sizes + ([98304] if args.large else [])))
    if args.deepmd:
        side_by_side(args, sizes)
        return
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
