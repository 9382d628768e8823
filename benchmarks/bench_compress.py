"""Benchmark: per-frame inference of a frozen model against its compressed twin (not a test).

    python benchmarks/bench_compress.py                              # se_e2_a, 192 and 12,288 atoms
    python benchmarks/bench_compress.py --cases se_e2_a se_e2_r se_e3 se_atten --sizes 192 --markdown
    python benchmarks/bench_compress.py --profile                    # where a 192-atom call spends its time

Each case is the model of examples/water/<case>/input.json (float64; random weights, statistics
from its training data, so the table covers the same input range a trained model's would),
frozen as ``mtcore freeze`` writes it and compressed as ``mtcore compress`` does. Frames are the
first frame of examples/water/data/data_0 (192 atoms) replicated n×n×n. One call = energy,
forces and virial, neighbour list included, through the TorchScript modules (loaded back from
their files). The two models alternate in one process, round after round, and each cell is the
best of all its timed calls: on a shared machine the load changes from minute to minute, so
alternating exposes both to the same conditions and best-of is the least disturbed figure.
Threads: OMP_NUM_THREADS / torch.set_num_threads (1 by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPS = {192: 1, 1536: 2, 12288: 4}


def frozen_pair(case: str, workdir: Path, step: float) -> tuple[Path, Path, dict]:
    """Freeze the example model of ``case`` (statistics from its data) and compress it."""
    import numpy as np

    from mtcore.compress import compress
    from mtcore.config import normalize, read_input
    from mtcore.data.loading import load_dataset
    from mtcore.data.neighbors import NeighborCache
    from mtcore.freeze import _save_script, head_metadata
    from mtcore.model.build import build_model
    from mtcore.model.frozen import FrozenModel
    from mtcore.plugins import get_registry

    source = ROOT / "examples" / "water" / case / "input.json"
    doc = read_input(source)
    registry = get_registry()
    config = normalize(doc, source.parent, registry)
    model = build_model(config, registry)
    head = config.heads["default"]
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
    import torch

    from mtcore.compress import read_frozen, rebuild
    from mtcore.freeze import _save_script
    from mtcore.model.frozen import FrozenModel
    from mtcore.plugins import get_registry

    class Scale(torch.nn.Module):
        def __init__(self, width: int, dtype: torch.dtype):
            super().__init__()
            self.register_buffer("w", torch.linspace(0.5, 1.5, width, dtype=dtype).unsqueeze(0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    module, meta = read_frozen(plain)
    model = rebuild(module, meta, plain, get_registry())
    for table in info["tables"]:
        net = model.descriptor.get_submodule(table["path"])
        parent_name, _, attr = table["path"].rpartition(".")
        parent = model.descriptor.get_submodule(parent_name) if parent_name else model.descriptor
        swap = Scale(net.n_out, next(net.parameters()).dtype)
        if isinstance(parent, torch.nn.ModuleList):
            parent[int(attr)] = swap
        else:
            setattr(parent, attr, swap)
    path = workdir / (plain.stem + "_floor.pth")
    _save_script(FrozenModel(model.descriptor, model.heads["default"], model.type_map, "default", "{}"), path, "{}")
    return path


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


def compare(plain: Path, packed: Path, atoms: int, rounds: int, floor: Path = None) -> dict:
    """Alternate the models ``rounds`` times on one frame; best and median wall ms, best CPU ms
    of the process (less disturbed by other processes), and the largest differences of the two
    models' results (a check that the timed calls compute the same thing)."""
    import statistics

    modules = {"plain": load(plain), "compressed": load(packed)}
    if floor is not None:
        modules["floor"] = load(floor)
    frame = replicated_water(REPS[atoms])
    outs = {}
    for name, module in modules.items():  # warm-up: TorchScript profiles the first calls
        for _ in range(2 if atoms <= 1536 else 1):
            outs[name] = module(*frame)
    times: dict = {name: [] for name in modules}
    cpu: dict = {name: [] for name in modules}
    for _ in range(rounds):
        for name, module in modules.items():
            elapsed, used, outs[name] = timed(module, frame)
            times[name].append(elapsed)
            cpu[name].append(used)
    diff_e = float((outs["plain"]["energy"] - outs["compressed"]["energy"]).abs().max()) / atoms
    diff_f = float((outs["plain"]["force"] - outs["compressed"]["force"]).abs().max())
    row = {"atoms": atoms, "rounds": rounds, "energy_diff_per_atom": diff_e, "force_diff": diff_f}
    for name in modules:
        row[f"{name}_ms"] = 1000 * min(times[name])
        row[f"{name}_median_ms"] = 1000 * statistics.median(times[name])
        row[f"{name}_cpu_ms"] = 1000 * min(cpu[name])
    row["speedup"] = row["plain_ms"] / row["compressed_ms"]
    row["speedup_cpu"] = row["plain_cpu_ms"] / row["compressed_cpu_ms"]
    if floor is not None:
        row["floor_speedup"] = row["plain_ms"] / row["floor_ms"]
    return row


def profile(path: Path, atoms: int, label: str, top: int) -> str:
    import torch

    module = load(path)
    frame = replicated_water(REPS[atoms])
    module(*frame)
    module(*frame)
    with torch.profiler.profile() as prof:
        module(*frame)
    return f"--- {label}, {atoms} atoms ---\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


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
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--floor", action="store_true", help="also time the model with free embeddings (x·w): the ceiling of any table")
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
    if args.profile:
        return
    print(f"\nmachine: {machine()}", flush=True)
    if args.markdown:
        floor = any("floor_ms" in r for r in rows)
        print("\n| descriptor | atoms | frozen ms / frame | compressed ms / frame | speed-up (wall) | speed-up (CPU) |"
              + (" free-embedding ms / frame (ceiling) |" if floor else "") + " max |ΔE|/atom (eV) | max |ΔF| (eV/Å) |")
        print("|---|---:|---:|---:|---:|---:|" + ("---:|" if floor else "") + "---:|---:|")
        for r in rows:
            extra = f" {r['floor_ms']:.0f} ({r['floor_speedup']:.2f}×) |" if floor else ""
            print(f"| {r['case']} | {r['atoms']:,} | {r['plain_ms']:.0f} | {r['compressed_ms']:.0f} | {r['speedup']:.2f}× "
                  f"| {r['speedup_cpu']:.2f}× |{extra} {r['energy_diff_per_atom']:.1e} | {r['force_diff']:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
