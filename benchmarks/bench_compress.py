"""Benchmark: per-frame inference of a frozen model against its compressed twin (not a test).

    python benchmarks/bench_compress.py                              # se_e2_a, 192 and 12,288 atoms
    python benchmarks/bench_compress.py --cases se_e2_a se_e2_r se_e3 se_atten --sizes 192 --markdown
    python benchmarks/bench_compress.py --profile                    # where a 192-atom call spends its time
    python benchmarks/bench_compress.py --small                      # 3-192 atoms: twin against TorchScript

Each case is the model of examples/water/<case>/input.json (float64; random weights, statistics
from its training data, so the table covers the same input range a trained model's would),
frozen as ``mtcore freeze`` writes it and compressed as ``mtcore compress`` does. Frames are the
first frame of examples/water/data/data_0 (192 atoms) replicated n×n×n. One call = energy,
forces and virial, neighbour list included, through ``mtcore.infer`` as users call it: on the
CPU each file's eager twin with mtcore's C kernels (mtcore.eager_twin), and, for comparison, the
TorchScript module the file holds (what plain torch runs). The models alternate in one process,
round after round, and each cell is the
best of all its timed calls: on a shared machine the load changes from minute to minute, so
alternating exposes both to the same conditions and best-of is the least disturbed figure. Both
wall time and the process's CPU time are reported: when other processes compete for the cores,
wall time measures the competition, CPU time much less so. ``--floor`` adds a third model whose
tabulated nets are replaced by x·w (one multiply per output): the speed-up no table can beat.
Threads: OMP_NUM_THREADS / torch.set_num_threads (1 by default).
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench_inference import replicated_water  # the same water supercells as the inference benchmark

ROOT = Path(__file__).resolve().parents[1]
REPS = {192: 1, 1536: 2, 12288: 4}


def frozen_pair(case: str, workdir: Path, step: float) -> tuple[Path, Path, dict]:
    """Freeze the example model of ``case`` (statistics from its data) and compress it."""
    import numpy as np

    from mtcore.compress import compress
    from mtcore.config import normalize, read_input
    from mtcore.data.loading import load_dataset, pooled_neighbor_stat
    from mtcore.data.neighbors import NeighborCache
    from mtcore.freeze import _save_script, head_metadata
    from mtcore.model.build import build_model, update_sel
    from mtcore.model.frozen import FrozenModel
    from mtcore.plugins import get_registry

    source = ROOT / "examples" / "water" / case / "input.json"
    doc = read_input(source)
    registry = get_registry()
    config = normalize(doc, source.parent, registry)
    head = config.heads["default"]
    rcut = float(config.model["descriptor"].get("rcut", 6.0))
    data = load_dataset(head.training_data, config.type_map, [], NeighborCache(rcut), registry, "training_data")
    update_sel(config, pooled_neighbor_stat(data.systems, len(config.type_map)), registry)  # sel "auto"
    model = build_model(config, registry)
    data = load_dataset(head.training_data, config.type_map, model.heads["default"].stat_requirements(),
                        NeighborCache(model.rcut), registry, "training_data")
    samples = [b.stat_sample() for b in data.stat_batches(4, np.random.default_rng(0))]
    model.descriptor.compute_input_stats(samples)
    model.heads["default"].compute_output_stats(samples)
    model.eval()
    text = json.dumps(head_metadata(model, config.document, "default", False))
    plain = workdir / f"{case}.pth"
    _save_script(FrozenModel(model.descriptor, model.heads["default"], model.type_map, "default", text), plain, text)
    packed = workdir / f"{case}_compressed.pth"
    info = compress(plain, packed, step=step)
    return plain, packed, info


def floor_model(plain: Path, info: dict, workdir: Path) -> Path:
    """The frozen model with every tabulated net replaced by x·w (one multiply per output, no
    table): what any embedding replacement could at best reach, the rest of the call unchanged."""

    from mtcore.compress import read_frozen, rebuild
    from mtcore.freeze import _save_script
    from mtcore.model.frozen import FrozenModel
    from mtcore.plugins import get_registry

    module, meta = read_frozen(plain)
    model = rebuild(module, meta, plain, get_registry())
    swap_for_free(model.descriptor, info)
    path = workdir / (plain.stem + "_floor.pth")
    text = json.dumps({k: v for k, v in meta.items() if k != "config"})  # no recorded input: no eager twin
    _save_script(FrozenModel(model.descriptor, model.heads["default"], model.type_map, "default", text), path, text)
    return path


def load(path: Path):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path))


def timed(module, frame) -> tuple[float, float, dict]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = module(*frame)
    return time.perf_counter() - t0, time.process_time() - c0, out


def potentials(plain: Path, packed: Path, floor: Path = None) -> dict:
    """The files as ``mtcore.infer`` runs them (on the CPU the eager twin with mtcore's C
    kernels, mtcore.eager_twin) and as their TorchScript modules (MTCORE_INFER_SCRIPTED=1: what
    plain torch, LAMMPS's loader and mtcore before the twin run)."""
    from mtcore.infer import DeepPotential

    os.environ["MTCORE_INFER_SCRIPTED"] = "1"
    try:
        scripted = {"plain_scripted": DeepPotential(plain), "compressed_scripted": DeepPotential(packed)}
        if floor is not None:
            scripted["floor"] = DeepPotential(floor)
    finally:
        del os.environ["MTCORE_INFER_SCRIPTED"]
    twins = {"plain": DeepPotential(plain), "compressed": DeepPotential(packed)}
    for name, pot in twins.items():
        if not pot.eager:
            print(f"warning: no eager twin for the {name} model; its rows time the scripted module", file=sys.stderr)
    return {**twins, **scripted}


def compare(plain: Path, packed: Path, atoms: int, rounds: int, floor: Path = None) -> dict:
    """Alternate the models ``rounds`` times on one frame; best and median wall ms, best CPU ms
    of the process (less disturbed by other processes), and the largest differences of the two
    models' results (a check that the timed calls compute the same thing)."""
    import statistics

    pots = potentials(plain, packed, floor)
    coord, atype, box = (t.numpy() for t in replicated_water(REPS[atoms]))
    outs = {}
    for name, pot in pots.items():  # warm-up
        for _ in range(2 if atoms <= 1536 else 1):
            outs[name] = pot.evaluate(coord, box, atype)
    times: dict = {name: [] for name in pots}
    cpu: dict = {name: [] for name in pots}
    for _ in range(rounds):
        for name, pot in pots.items():
            c0, t0 = time.process_time(), time.perf_counter()
            outs[name] = pot.evaluate(coord, box, atype)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    diff_e = float(abs(outs["plain"]["energy"] - outs["compressed"]["energy"]).max()) / atoms
    diff_f = float(abs(outs["plain"]["force"] - outs["compressed"]["force"]).max())
    twin_f = float(abs(outs["plain"]["force"] - outs["plain_scripted"]["force"]).max())
    row = {"atoms": atoms, "rounds": rounds, "energy_diff_per_atom": diff_e, "force_diff": diff_f,
           "twin_vs_scripted_force_diff": twin_f, "eager": {n: bool(p.eager) for n, p in pots.items()}}
    for name in pots:
        row[f"{name}_ms"] = 1000 * min(times[name])
        row[f"{name}_median_ms"] = 1000 * statistics.median(times[name])
        row[f"{name}_cpu_ms"] = 1000 * min(cpu[name])
    row["speedup"] = row["plain_ms"] / row["compressed_ms"]
    row["speedup_cpu"] = row["plain_cpu_ms"] / row["compressed_cpu_ms"]
    row["speedup_scripted_cpu"] = row["plain_scripted_cpu_ms"] / row["compressed_scripted_cpu_ms"]
    row["speedup_over_scripted_cpu"] = row["plain_scripted_cpu_ms"] / row["compressed_cpu_ms"]
    if floor is not None:
        row["floor_speedup"] = row["plain_scripted_ms"] / row["floor_ms"]
    return row


def small_frames(plain: Path, packed: Path, sizes=(3, 12, 48, 96, 192), repeats: int = 15) -> list:
    """Best wall ms per call of each model on the first ``n`` atoms of the water frame (open
    boundaries), the twins forced on whatever the size (EAGER_MIN_ATOMS set to 1)."""
    import mtcore.infer

    mtcore.infer.EAGER_MIN_ATOMS = 1
    pots = potentials(plain, packed)
    coord, atype, _ = (t.numpy() for t in replicated_water(1))
    rows = []
    for n in sizes:
        row = {"atoms": n}
        for name, pot in pots.items():
            pot.evaluate(coord[:n], None, atype[:n])
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                pot.evaluate(coord[:n], None, atype[:n])
                best = min(best, time.perf_counter() - t0)
            row[f"{name}_ms"] = round(1000 * best, 2)
        rows.append(row)
    return rows


def profile(path: Path, atoms: int, label: str, top: int) -> str:
    import torch

    from mtcore.freeze import frozen_execution

    module = load(path)
    frame = replicated_water(REPS[atoms])
    with frozen_execution("cpu"):  # as mtcore.infer calls frozen files
        module(*frame)
        with torch.profiler.profile() as prof:
            module(*frame)
    return f"--- {label}, {atoms} atoms ---\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def stage_times(plain: Path, info: dict, repeats: int = 7) -> dict:
    """CPU ms per stage of one 192-atom call as the eager twin runs it (best of ``repeats``; the
    first-derivative switch on, the frame's list from vesin), for the frozen model, the
    compressed one and the free-embedding one: neighbour list, descriptor forward (and within it
    the embedding nets, or tables called as modules: the compressed se_e2_a evaluates its tables
    inside the contraction, mtcore.model.table_contraction, and shows none), fitting forward,
    backward (forces)."""
    import torch

    from mtcore.compress import compress_descriptor, read_frozen, rebuild
    from mtcore.eager_twin import first_derivatives
    from mtcore.model.neighbor_list import frame_pairs_in_c
    from mtcore.plugins import get_registry

    coord, atype, box = replicated_water(1)
    coord, box = coord.to(torch.float64), box.to(torch.float64)
    result = {}
    for label in ("frozen", "compressed", "free embedding"):
        module, meta = read_frozen(plain)
        model = rebuild(module, meta, plain, get_registry())
        if label == "compressed":
            compress_descriptor(model.descriptor, info["min_distance"], info["step"], info["extrapolate"], -1, "")
        elif label == "free embedding":
            swap_for_free(model.descriptor, info)
        clock = {"spent": 0.0, "start": 0.0}

        def before(_m, _i):
            clock["start"] = time.process_time()

        def after(_m, _i, _o):
            clock["spent"] += time.process_time() - clock["start"]

        for table in info["tables"]:
            net = model.descriptor.get_submodule(table["path"])
            net.register_forward_pre_hook(before)
            net.register_forward_hook(after)
        best: dict = {}
        for _ in range(repeats):
            clock["spent"] = 0.0
            c0 = time.process_time()
            center, neighbor, image, _ = frame_pairs_in_c(coord, atype, box, model.rcut)
            shift = image.to(torch.float64) @ box
            c1 = time.process_time()
            with first_derivatives():
                x = coord.clone().requires_grad_(True)
                desc = model.descriptor(x, atype, center, neighbor, shift)
                c2 = time.process_time()
                energy = model.heads["default"](desc, atype).sum()
                c3 = time.process_time()
                torch.autograd.grad([energy], [x])
                c4 = time.process_time()
            row = {"neighbour list": c1 - c0, "descriptor forward": c2 - c1, "of which embedding": clock["spent"],
                   "fitting forward": c3 - c2, "backward": c4 - c3, "total": c4 - c0}
            best = row if not best else {k: min(best[k], v) for k, v in row.items()}
        result[label] = {k: 1000 * v for k, v in best.items()}
    return result


def swap_for_free(descriptor, info: dict) -> None:
    """Replace every tabulated net by x·w (see :func:`floor_model`)."""
    import torch

    from mtcore.compress import put_submodule

    class Scale(torch.nn.Module):
        def __init__(self, width: int, dtype: torch.dtype):
            super().__init__()
            self.register_buffer("w", torch.linspace(0.5, 1.5, width, dtype=dtype).unsqueeze(0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    for table in info["tables"]:
        net = descriptor.get_submodule(table["path"])
        put_submodule(descriptor, table["path"], Scale(net.n_out, next(net.parameters()).dtype))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"load average {load[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["se_e2_a"], help="examples/water/<case>/input.json models")
    parser.add_argument("--sizes", nargs="+", type=int, default=[192, 12288], choices=sorted(REPS))
    parser.add_argument("--rounds", type=int, default=0, help="timed calls per model (default 7 at 192 atoms, fewer above)")
    parser.add_argument("--step", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables at 192 atoms instead of timings")
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--stages", action="store_true", help="CPU ms per stage at 192 atoms (eager) instead of timings")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--floor", action="store_true", help="also time the model with free embeddings (x·w): the ceiling of any table")
    parser.add_argument("--small", action="store_true",
                        help="ms per call on the first 3-192 atoms of the water frame (no cell), twin against TorchScript: "
                             "where mtcore.infer's EAGER_MIN_ATOMS lies")
    args = parser.parse_args()
    import torch

    from mtcore.runtime import tune_allocator

    torch.set_num_threads(args.threads)
    tune_allocator()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mtcore-bench-compress-") as tmp:
        for case in args.cases:
            plain, packed, info = frozen_pair(case, Path(tmp), args.step)
            floor = floor_model(plain, info, Path(tmp)) if args.floor else None
            if args.stages:
                for label, row in stage_times(plain, info).items():
                    print(json.dumps({"case": case, "model": label, **{k: round(v, 1) for k, v in row.items()}}), flush=True)
                continue
            if args.small:
                for row in small_frames(plain, packed):
                    print(json.dumps({"case": case, **row}), flush=True)
                continue
            if args.profile:
                print(profile(plain, 192, f"{case} frozen", args.top))
                print(profile(packed, 192, f"{case} compressed", args.top))
                continue
            for atoms in args.sizes:
                rounds = args.rounds or (7 if atoms <= 1536 else 2)
                row = compare(plain, packed, atoms, rounds, floor)
                row.update(case=case, tables=len(info["tables"]), intervals=info["tables"][0]["intervals"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.profile or args.stages or args.small:
        return
    print(f"\nmachine: {machine()}", flush=True)
    if args.markdown:
        floor = any("floor_ms" in r for r in rows)
        print("\nCPU ms per call (best of the rounds); frozen and compressed as mtcore.infer runs them (eager, C kernels), "
              "and as TorchScript (plain torch)\n")
        print("| descriptor | atoms | frozen | compressed | speed-up | frozen, TorchScript | compressed, TorchScript | speed-up (TorchScript) "
              "| compressed against frozen TorchScript |" + (" free embedding, TorchScript (speed-up) |" if floor else "")
              + " max \\|ΔE\\|/atom (eV) | max \\|ΔF\\| (eV/Å) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if floor else "") + "---:|---:|")
        for r in rows:
            extra = f" {r['floor_cpu_ms']:.0f} ({r['plain_scripted_cpu_ms'] / r['floor_cpu_ms']:.2f}×) |" if floor else ""
            print(f"| {r['case']} | {r['atoms']:,} | {r['plain_cpu_ms']:.0f} | {r['compressed_cpu_ms']:.0f} | {r['speedup_cpu']:.2f}× "
                  f"| {r['plain_scripted_cpu_ms']:.0f} | {r['compressed_scripted_cpu_ms']:.0f} | {r['speedup_scripted_cpu']:.2f}× "
                  f"| {r['speedup_over_scripted_cpu']:.2f}× |{extra} {r['energy_diff_per_atom']:.1e} | {r['force_diff']:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
