"""Benchmark: data larger than memory — peak memory and time to the first training step as the
data grows tenfold (not a test; docs/performance.md, "Data larger than memory").

    python benchmarks/bench_large_data.py                       # 1x, 10x frames, 10x systems, under /tmp
    python benchmarks/bench_large_data.py --root /scratch/big --variants 1x 10x-frames
    python benchmarks/bench_large_data.py --systems 20 --frames 50 --steps 2   # a quick look

Data: ``--systems`` deepmd/npy systems of ``--frames`` frames of 192 atoms (the first water frame
of examples/water/data/data_0, every frame jittered by 0.05 Å, seeded), float64 coord.npy,
force.npy, energy.npy, box.npy, type.raw/type_map.raw, sets of at most 500 frames. The default
200 × 500 is 100,000 frames, ~0.92 GB of coordinates and forces. "10x-frames" has 10 times the
frames per system (10 sets each), "10x-systems" 10 times the systems. Data are written under
``--root`` (default a new folder in /tmp; never inside the repository), flushed and dropped
from the page cache (posix_fadvise DONTNEED) so every run starts cold, and deleted after the run
unless ``--keep``.

Each run is ``mtcore train`` (se_e2_a with sel "auto", batch_size "auto", ``--steps`` steps) in a
child process with MTCORE_TIMING=1: the trainer prints the wall-clock time when setup (data,
statistics, plan) is done and when the first step is done; times here are from just before the
child was started, so they include Python's start and imports. Peak RSS is the child's
ru_maxrss (wait4), which counts file pages mapped and touched; peak RssAnon (sampled every
50 ms from /proc/<pid>/status) is the process's own memory, the part that cannot be dropped.
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT / "examples" / "water" / "data" / "data_0" / "set.000"
SET_FRAMES = 500
JITTER = 0.05  # Å


def _drop_from_cache(path: Path) -> None:
    """Write the file to disk and ask the kernel to forget its pages (a cold start, without root)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def generate(root: Path, nsystems: int, nframes: int, seed: int = 0) -> float:
    """``nsystems`` systems of ``nframes`` jittered water frames under ``root``; returns GB written."""
    coord0 = np.load(WATER / "coord.npy")[0].astype(np.float64)
    box0 = np.load(WATER / "box.npy")[0].astype(np.float64)
    types = (ROOT / "examples" / "water" / "data" / "data_0" / "type.raw").read_text()
    type_map = (ROOT / "examples" / "water" / "data" / "data_0" / "type_map.raw").read_text()
    rng = np.random.default_rng(seed)
    written = 0
    for s in range(nsystems):
        folder = root / f"sys.{s:05d}"
        folder.mkdir(parents=True)
        (folder / "type.raw").write_text(types)
        (folder / "type_map.raw").write_text(type_map)
        for k, start in enumerate(range(0, nframes, SET_FRAMES)):
            n = min(SET_FRAMES, nframes - start)
            set_dir = folder / f"set.{k:03d}"
            set_dir.mkdir()
            arrays = {
                "coord": coord0 + rng.normal(0.0, JITTER, (n, coord0.size)),
                "force": rng.normal(0.0, 1.0, (n, coord0.size)),
                "energy": -30000.0 + rng.normal(0.0, 1.0, n),
                "box": np.tile(box0, (n, 1)),
            }
            for name, values in arrays.items():
                path = set_dir / f"{name}.npy"
                np.save(path, values)
                written += path.stat().st_size
                _drop_from_cache(path)
    return written / 1e9


def train_input(data: Path, steps: int) -> dict:
    return {
        "model": {
            "type_map": ["O", "H"],
            "descriptor": {"type": "se_e2_a", "sel": "auto", "rcut": 6.0, "rcut_smth": 0.5, "neuron": [8, 16, 32],
                           "axis_neuron": 4, "seed": 1},
            "fitting_net": {"neuron": [32, 32, 32], "seed": 2},
        },
        "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 100},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
        "training": {
            "training_data": {"systems": str(data), "batch_size": "auto"},
            "numb_steps": steps, "seed": 7, "disp_freq": steps, "save_freq": steps,
        },
    }


def _watch_anon(pid: int, peak: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(("RssAnon:", "RssFile:")):
                    key, value = line.split(":")[0], int(line.split()[1])
                    peak[key] = max(peak.get(key, 0), value)
        except OSError:
            return
        stop.wait(0.05)


def run_training(workdir: Path, data: Path, steps: int, threads: int) -> dict:
    """``mtcore train`` in a child; its peak memory and the times to setup and to the first step."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "input.json").write_text(json.dumps(train_input(data, steps), indent=1))
    env = dict(os.environ, MTCORE_TIMING="1", OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-c", "from mtcore.cli import app; app()", "train", "input.json"]
    started = time.time()
    child = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_anon, args=(child.pid, peak, stop), daemon=True)
    watcher.start()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stderr), daemon=True)
    reader.start()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    total = time.time() - started
    stop.set()
    reader.join()
    fields = [p for p in (line.split() for line in lines) if len(p) == 4 and p[0] == "MTCORE_TIMING"]
    marks = {p[1]: float(p[2]) - started for p in fields}
    cpu = {p[1]: float(p[3]) for p in fields}
    if child.returncode != 0 or "first_step_done" not in marks:
        raise SystemExit(f"training failed (exit {child.returncode}):\n" + "".join(lines[-20:]))
    return {
        "setup_s": marks.get("setup_done"), "first_step_s": marks["first_step_done"], "total_s": total,
        "first_step_cpu_s": cpu["first_step_done"],
        "maxrss_mb": usage.ru_maxrss / 1024, "rss_anon_mb": peak.get("RssAnon", 0) / 1024,
        "rss_file_mb": peak.get("RssFile", 0) / 1024,
    }


VARIANTS = {"1x": (1, 1), "10x-frames": (1, 10), "10x-systems": (10, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="where data are generated (default: a new folder in /tmp)")
    parser.add_argument("--systems", type=int, default=200)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="mtcore-large-data-"))
    if ROOT in root.resolve().parents or root.resolve() == ROOT:
        raise SystemExit(f"--root {root}: inside the repository; generate elsewhere")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={args.threads}; "
          f"data under {root}")
    rows = []
    for variant in args.variants:
        ksys, kframes = VARIANTS[variant]
        data = root / variant / "data"
        if data.exists():
            raise SystemExit(f"{data}: exists; give an empty --root")
        t0 = time.time()
        gb = generate(data, args.systems * ksys, args.frames * kframes)
        made = time.time() - t0
        try:
            result = run_training(root / variant / "run", data, args.steps, args.threads)
        finally:
            if not args.keep:
                shutil.rmtree(root / variant)
        result.update(variant=variant, systems=args.systems * ksys, frames=args.systems * ksys * args.frames * kframes,
                      gb=gb, generate_s=made)
        rows.append(result)
        print(json.dumps(result), flush=True)
    if not args.keep and not any(root.iterdir()):
        root.rmdir()
    base = rows[0]
    print("\n| data | systems × frames | on disk | setup (wall) | first step (wall) | first step (CPU) | peak RSS "
          "| peak RssAnon |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f" ({r['first_step_cpu_s'] / base['first_step_cpu_s']:.2f}×)" if r is not base else ""
        print(f"| {r['variant']} | {r['systems']:,} × {r['frames'] // r['systems']:,} | {r['gb']:.2f} GB | {r['setup_s']:.1f} s "
              f"| {r['first_step_s']:.1f} s | {r['first_step_cpu_s']:.1f} s{ratio} | {r['maxrss_mb']:.0f} MB ({r['maxrss_mb'] / base['maxrss_mb']:.2f}×) "
              f"| {r['rss_anon_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
