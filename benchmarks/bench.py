"""Benchmark: milliseconds per training step and inference throughput, optionally vs DeePMD-kit.

    python benchmarks/bench.py                       # every examples/**/input.json
    python benchmarks/bench.py --case water/se_e2_a --steps 50
    python benchmarks/bench.py --deepmd ~/.cache/mtcore-bench/deepmd-venv/bin/dp   # side by side

Training time is the median wall time of a step after warm-up (statistics and the first steps
excluded), the same input as the example with only numb_steps changed. Inference is frames per
second of the frozen (TorchScript) model on the first validation frames, neighbour list included.
DeePMD-kit runs are alternated with mtcore's in the same process run, since timings on a shared
machine drift; its figure is its own "average training time" log line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def find_cases(selected: list[str]) -> list[Path]:
    if selected:
        return [ROOT / "examples" / c / "input.json" if not c.endswith(".json") else Path(c) for c in selected]
    return sorted(ROOT.glob("examples/**/input.json"))


def prepared_input(case: Path, steps: int, workdir: Path) -> Path:
    """The example input with numb_steps changed and absolute data paths."""
    from mtcore.config import read_input

    doc = read_input(case)

    def absolute(section):
        if isinstance(section, dict) and "systems" in section:
            systems = section["systems"]
            section["systems"] = (
                str((case.parent / systems).resolve()) if isinstance(systems, str)
                else [str((case.parent / s).resolve()) for s in systems]
            )

    training = doc["training"]
    for key in ("training_data", "validation_data"):
        absolute(training.get(key))
    for entry in (training.get("data_dict") or {}).values():
        absolute(entry.get("training_data"))
        absolute(entry.get("validation_data"))
    training["numb_steps"] = steps
    training["disp_freq"] = max(steps, 1)
    training["save_freq"] = 0
    path = workdir / "input.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def time_mtcore(input_path: Path, steps: int, warmup: int) -> dict:
    from rich.console import Console

    from mtcore.config import load_config
    from mtcore.train.trainer import Trainer

    config = load_config(input_path)
    console = Console(file=open(os.devnull, "w"))
    start = time.perf_counter()
    trainer = Trainer(config, input_path.parent, console)
    setup = time.perf_counter() - start
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(trainer.draw_head())
        trainer.step += 1
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    infer = time_inference(trainer)
    return {"ms_per_step": 1000 * statistics.median(times), "setup_s": setup, **infer}


def time_inference(trainer, nframes: int = 8, repeats: int = 3) -> dict:
    from mtcore.model.frozen import FrozenModel

    head = trainer.trained[0]
    runtime = trainer.heads[head]
    data = runtime.valid or runtime.train
    system = data.systems[0]
    frames = min(nframes, system.nframes)
    scripted = torch.jit.script(FrozenModel(trainer.model.descriptor, trainer.model.heads[head], trainer.model.type_map, head, "{}"))
    coord = torch.tensor(system.coords[:frames])
    atype = torch.tensor(np.asarray(system.atypes[0]))
    box = None if system.boxes is None else torch.tensor(system.boxes[:frames])
    scripted(coord[:1], atype, None if box is None else box[:1])  # warm-up (TorchScript profiling runs)
    scripted(coord[:1], atype, None if box is None else box[:1])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        scripted(coord, atype, box)
        best = min(best, time.perf_counter() - t0)
    return {"infer_frames_per_s": frames / best, "infer_atoms_per_s": frames * system.natoms / best}


def multi_task_v2(input_path: Path) -> bool:
    """DeePMD-kit 3 reads multi-task inputs in its own v3 layout only, not v2's keys."""
    return "fitting_net_dict" in json.loads(input_path.read_text()).get("model", {})


def time_deepmd(dp: str, input_path: Path, steps: int) -> float:
    """DeePMD-kit's own 'average training time' for the same input (PyTorch backend)."""
    doc = json.loads(input_path.read_text())
    doc["training"]["numb_steps"] = steps
    doc["training"]["disp_freq"] = max(1, steps // 5)
    doc["training"]["save_freq"] = steps
    doc["training"].pop("max_ckpt_keep", None)
    workdir = Path(tempfile.mkdtemp(prefix="dpbench-"))
    (workdir / "input.json").write_text(json.dumps(doc))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    out = subprocess.run([dp, "--pt", "train", "input.json"], cwd=workdir, env=env, capture_output=True, text=True)
    log = out.stdout + out.stderr
    match = re.search(r"average training time: ([0-9.]+) s/batch", log)
    if not match:
        raise RuntimeError(f"DeePMD-kit run failed in {workdir}:\n{log[-2000:]}")
    return 1000 * float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", default=[], help="examples/<case>/input.json (repeatable)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--deepmd", help="path to DeePMD-kit's dp executable (PyTorch backend) to compare with")
    parser.add_argument("--rounds", type=int, default=1, help="alternate mtcore/DeePMD-kit this many times")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from mtcore.runtime import tune_allocator

    tuned = tune_allocator()  # as the CLI does (MTCORE_KEEP_MALLOC=1 to measure without)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator tuned: {tuned}", file=sys.stderr)
    for case in find_cases(args.case):
        name = str(case.parent.relative_to(ROOT / "examples")) if ROOT / "examples" in case.parents else str(case)
        with tempfile.TemporaryDirectory() as tmp:
            path = prepared_input(case, args.steps, Path(tmp))
            mt, dp = [], []
            for _ in range(args.rounds):
                mt.append(time_mtcore(path, args.steps, args.warmup))
                if args.deepmd and not multi_task_v2(path):
                    try:
                        dp.append(time_deepmd(args.deepmd, path, max(args.steps, 30)))
                    except RuntimeError as exc:  # DeePMD-kit cannot run every input; say so and go on
                        print(f"{name}: {str(exc).splitlines()[0]} (last line: {str(exc).splitlines()[-1]})", file=sys.stderr)
        row = {
            "case": name,
            "mtcore_ms_per_step": statistics.median(m["ms_per_step"] for m in mt),
            "infer_frames_per_s": statistics.median(m["infer_frames_per_s"] for m in mt),
            "infer_atoms_per_s": statistics.median(m["infer_atoms_per_s"] for m in mt),
        }
        if dp:
            row["deepmd_ms_per_step"] = statistics.median(dp)
            row["speedup_vs_deepmd"] = row["deepmd_ms_per_step"] / row["mtcore_ms_per_step"]
        if args.json:
            print(json.dumps(row))
        else:
            line = f"{name:32s} train {row['mtcore_ms_per_step']:8.1f} ms/step   infer {row['infer_frames_per_s']:8.1f} frames/s"
            if dp:
                line += f"   DeePMD-kit {row['deepmd_ms_per_step']:8.1f} ms/step   speed-up x{row['speedup_vs_deepmd']:.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
