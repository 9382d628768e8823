"""The measurements of benchmarks/bench.py, each run in a child process of its own (not a test).

    python benchmarks/bench_children.py train SPEC.json     # mtcore ms/step of one input
    python benchmarks/bench_children.py infer SPEC.json     # frames/s of a frozen and a compressed model

Why a process each: the parent reads the child's peak RSS (``ru_maxrss`` from ``os.wait4``), which
is then that one run's alone, and no measurement inherits another's heap, caches or TorchScript
profiles. Each prints one JSON line (its result) as the last line of stdout. SPEC is a JSON file
written by bench.py; the keys are read below.
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _threads() -> int:
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train(spec: dict) -> dict:
    """Build the trainer (statistics included, not timed), take ``warmup`` steps, then time up to
    ``steps`` more, stopping early once ``max_timed_s`` of wall time is spent (at least
    ``min_timed`` steps). Wall and CPU time per step; the median is the figure, the mean is there
    to compare with DeePMD-kit's own average. ``state``: where to save the trained state for the
    inference child (after the timing, so it costs the timed steps nothing)."""
    import numpy as np
    import torch
    from rich.console import Console

    from mtcore.config import load_config
    from mtcore.runtime import tune_allocator
    from mtcore.train.trainer import Trainer

    threads = _threads()
    tuned = tune_allocator()  # as the CLI does
    path = Path(spec["input"])
    config = load_config(path)
    start = time.perf_counter()
    trainer = Trainer(config, path.parent, Console(file=open(os.devnull, "w")))
    setup_s = time.perf_counter() - start
    wall, cpu, heads = [], [], []
    timed_since = None
    for i in range(spec["warmup"] + spec["steps"]):
        head = trainer.draw_head()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(head)
        trainer.step += 1
        if i < spec["warmup"]:
            continue
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        heads.append(head)
        timed_since = timed_since or t0
        if len(wall) >= spec["min_timed"] and time.perf_counter() - timed_since > spec["max_timed_s"]:
            break
    bad = trainer.non_finite_parameter()
    if bad:
        raise SystemExit(f"{path}: parameter {bad} is not finite after {trainer.step} steps; no timing reported")
    if spec.get("state"):
        torch.save(trainer.state_dict(), spec["state"])
    batch = sorted({bs for h in trainer.trained for bs in trainer.heads[h].train.batch_sizes})
    weights = {h: float(w) for h, w in zip(trainer.trained, trainer.draw_weights())}
    return {"ms_per_step": 1000 * expected(wall, heads, weights), "mean_ms_per_step": 1000 * float(np.mean(wall)),
            "mean_cpu_ms_per_step": 1000 * float(np.mean(cpu)),
            "cpu_ms_per_step": 1000 * expected(cpu, heads, weights), "timed_steps": len(wall), "setup_s": setup_s,
            "per_head_ms": {h: 1000 * statistics.median([t for t, g in zip(wall, heads) if g == h]) for h in sorted(set(heads))},
            "draw_weights": weights, "batch_sizes": batch, "threads": threads, "allocator_tuned": tuned,
            "peak_rss_mb": _peak_rss_mb()}


def expected(times: list, heads: list, weights: dict) -> float:
    """The time of an average step: each head's median step weighted by its draw probability.
    (With heads of different cost, a median over all steps would pick one head's time.) Heads
    the timed steps never drew are left out and the others' weights renormalised."""
    drawn = {h: w for h, w in weights.items() if h in heads}
    total = sum(drawn.values())
    return sum(w / total * statistics.median([t for t, g in zip(times, heads) if g == h]) for h, w in drawn.items())


def _frame(state: dict, head: str):
    """The first frame of the head's first validation system (training when it has none)."""
    import numpy as np
    import torch

    from mtcore.config import config_from_document
    from mtcore.data.loading import expand_systems, load_system
    from mtcore.plugins import get_registry

    registry = get_registry()
    config = config_from_document(state["config"], registry)
    spec = config.heads[head]
    data = spec.validation_data or spec.training_data
    path = expand_systems(data["systems"], registry, "validation_data")[0]
    system = load_system(Path(path), config.type_map, [], data.get("set_prefix", "set"), registry)
    coord = torch.tensor(np.asarray(system.coords[:1]), dtype=torch.float64)
    box = None if system.boxes is None else torch.tensor(np.asarray(system.boxes[:1]), dtype=torch.float64)
    return coord, torch.tensor(np.asarray(system.atypes[0]), dtype=torch.int64), box, str(path)


def infer(spec: dict) -> dict:
    """Freeze the saved state (once: kept for later rounds) and compress it where the descriptor
    compresses; then call the frozen and the compressed model alternately on one frame,
    ``repeats`` times after two warm-up calls each (TorchScript profiles its first calls), and
    keep the best call of each: frames/s = 1 / best call (energy, forces, virial, neighbour list
    included), each as mtcore.infer runs it, and the frozen file's TorchScript module too
    (``frozen_scripted``). Also the largest energy difference of the two, a check that both
    compute the same."""
    import numpy as np
    import torch

    from mtcore.compress import compress
    from mtcore.errors import MtcoreError
    from mtcore.freeze import freeze
    from mtcore.runtime import tune_allocator

    threads = _threads()
    tune_allocator()
    state = torch.load(spec["state"], weights_only=False)
    head = spec["head"]
    plain, packed = Path(spec["frozen"]), Path(spec["compressed"])
    why_not = None
    if not plain.exists():
        freeze(state, plain, head=head if state["multi_task"] else None)
    marker = packed.with_suffix(".why-not")
    if marker.exists():
        why_not = marker.read_text()
    elif not packed.exists():
        try:
            compress(plain, packed)
        except MtcoreError as exc:  # a descriptor without tables (hybrid): say why, time the frozen model only
            why_not = str(exc).splitlines()[0]
            marker.write_text(why_not)
    coord, atype, box, source = _frame(state, state_head(state, head))
    if spec.get("frame_prefix") and box is not None:  # the same frame for DeePMD-kit's inference
        np.save(spec["frame_prefix"] + "coord.npy", coord.numpy())
        np.save(spec["frame_prefix"] + "box.npy", box.numpy())
        np.save(spec["frame_prefix"] + "type.npy", atype.numpy())
    calls = _inference_calls(plain, None if why_not else packed)
    outs, best, best_cpu = {}, {}, {}
    for name, call in calls.items():
        for _ in range(2):
            outs[name] = call(coord, atype, box)
    for _ in range(spec["repeats"]):
        for name, call in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outs[name] = call(coord, atype, box)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[name] = min(best.get(name, wall), wall)
            best_cpu[name] = min(best_cpu.get(name, cpu), cpu)
    row = {"frame": source, "atoms": int(atype.numel()), "threads": threads, "repeats": spec["repeats"]}
    for name in calls:
        row[f"{name}_frames_per_s"] = 1.0 / best[name]
        row[f"{name}_cpu_frames_per_s"] = 1.0 / best_cpu[name]
    first = "energy" if "energy" in outs["frozen"] else next(iter(outs["frozen"]))
    for name, out in outs.items():
        if not all(bool(np.isfinite(v).all()) for v in out.values()):
            raise SystemExit(f"{name} model of {plain}: non-finite output on {source}")
    if "compressed" in outs:
        row["max_abs_diff_per_atom"] = float(np.abs(outs["frozen"][first] - outs["compressed"][first]).max()) / row["atoms"]
        row["compared_output"] = first
    else:
        row["compressed_why_not"] = why_not
    row["peak_rss_mb"] = _peak_rss_mb()
    return row


def _inference_calls(plain: Path, packed) -> dict:
    """Calls (coord, atype, box) → numpy outputs: "frozen" and "compressed" as mtcore.infer runs
    the files (on the CPU their eager twins on mtcore's C kernels), "frozen_scripted" the
    TorchScript module the frozen file holds (what plain torch runs)."""
    from mtcore.infer import DeepPotential

    os.environ["MTCORE_INFER_SCRIPTED"] = "1"
    try:
        scripted = DeepPotential(plain)
    finally:
        del os.environ["MTCORE_INFER_SCRIPTED"]
    pots = {"frozen": DeepPotential(plain), "frozen_scripted": scripted}
    if packed is not None:
        pots["compressed"] = DeepPotential(packed)

    def call(pot):
        return lambda coord, atype, box: pot.evaluate(coord.numpy(), None if box is None else box.numpy(), atype.numpy())

    return {name: call(pot) for name, pot in pots.items()}


def state_head(state: dict, head: str) -> str:
    """The trainer's name of the head: 'default' for a single-task run."""
    return head if state["multi_task"] else "default"


def main() -> None:
    what, spec_path = sys.argv[1:3]
    spec = json.loads(Path(spec_path).read_text())
    result = {"train": train, "infer": infer}[what](spec)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
