"""Benchmark: training ms/step against DeePMD-kit, peak RSS, float32, batch curve, inference (not a test).

    OMP_NUM_THREADS=1 python benchmarks/bench.py --markdown --json > bench.jsonl   # classic cases, 2 rounds; tables on stderr
    python benchmarks/bench.py --tables-from bench.jsonl --markdown                 # its tables, again
    python benchmarks/bench.py --case water/se_e2_a --rounds 3
    python benchmarks/bench.py --quick --case water/se_e2_a   # a pipeline check (2-4 minutes; all seven: ~18)
    python benchmarks/bench.py --deepmd none                  # mtcore only

The default run (seven cases, both codes, 2 rounds, one thread) should take about 55 minutes on
the 2-core development machine when it is quiet (an estimate from the step times of a --quick run
of the first six, which took 16 minutes; se_atten is a third of it; --deepmd-infer adds ~5 minutes a
round). Under load it takes longer and the wall columns measure the load: read the CPU columns
then, and quote the load average printed.

Per case (examples/<case>/input.json, data paths made absolute, nothing else changed unless said):
- training, float64 (the example as is) and float32 (descriptor and fitting precision float32, in
  both codes): ms/step of mtcore and of DeePMD-kit (PyTorch backend), wall and CPU, DeePMD-kit /
  mtcore, the peak RSS of each run, and the float64 / float32 step-time ratio of each code;
- batch curve (float64): per-frame ms at batch_size 1, 4, 8 as a ratio to batch 1, and peak RSS
  (mtcore; DeePMD-kit too with --deepmd-batch, it is slow);
- inference: frames/s of the frozen model (`mtcore freeze`) and of the compressed one (`mtcore
  compress`; "—" where the descriptor has no tables), one frame of the case's validation data,
  energy, forces and virial, neighbour list included, each as `mtcore.infer` runs it (on the CPU
  the file's eager twin on mtcore's C kernels), and the frozen file's TorchScript module for
  comparison (what plain torch runs).

How: every measurement is a child process of its own (benchmarks/bench_children.py for mtcore,
`dp --pt train` through benchmarks/deepmd_train_child.py for DeePMD-kit); peak RSS is that
child's ``ru_maxrss`` from ``os.wait4``, so it is that run's alone (Python, torch, data and
statistics included). mtcore's ms/step is the median step after ``--warmup`` steps (statistics
excluded; a multi-task run: each head's median weighted by its draw probability), wall and
process CPU time. DeePMD-kit's is its own "average training time" (a mean of wall time) over
the steps after its first ``disp_freq`` (= ``--warmup``) steps, and the CPU time of the same
intervals; validation_data is removed from its input (its validation batches would run inside
the timed intervals) and ``NUM_WORKERS=0`` (one process, the resources mtcore gets). Both get
``--threads`` threads (OMP_NUM_THREADS, torch, DP_INTRA_OP_PARALLELISM_THREADS) and the same
glibc allocator setting (mtcore's CLI raises the mmap/trim thresholds; DeePMD-kit gets
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` unless ``--deepmd-default-malloc``). On an AMD
processor mtcore answers MKL's vendor check (mtcore/mkl_dispatch.py) and so runs MKL's AVX2/AVX-512
kernels; DeePMD-kit runs MKL's generic path as its users get it, unless ``--deepmd-mkl-answer``
preloads the same library into its runs (the header line says which).
Rounds alternate the codes (mtcore, then DeePMD-kit, run by run, case by case), since a shared
machine's speed drifts; every figure is the BEST over ``--rounds`` (least disturbed; peak RSS:
the largest). A child is stopped above ``--mem-gb`` resident (default half the machine; se_atten
trains at ~2.7 GB per 192-atom frame) and a batch expected above it is not started. DeePMD-kit 3
does not read v2 multi-task inputs: it trains their translation to its own multi-task layout
(benchmarks/deepmd_v3_input.py: same descriptor, fitting nets, losses, data and draw weights;
v2's layer_name sharing has no v3 form and is dropped, which changes no step's work). Every "—"
is explained under the tables.
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import argparse
import copy
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from deepmd_v3_input import v3_multi_task

ROOT = Path(__file__).resolve().parents[1]
CHILDREN = Path(__file__).with_name("bench_children.py")
DP_CHILD = Path(__file__).with_name("deepmd_train_child.py")
CLASSIC = ["water/se_e2_a", "water/se_e2_r", "water/se_e3", "water/se_atten", "water/hybrid",
           "water_multi_task/ener_dipole", "water_multi_task/two_levels"]
DEFAULT_DP = Path.home() / ".cache" / "mtcore-bench" / "deepmd-venv" / "bin" / "dp"
BATCHES = (1, 4, 8)
DASH = "—"


# inputs ------------------------------------------------------------------------------------------
def case_input(case: str) -> Path:
    path = Path(case) if case.endswith(".json") else ROOT / "examples" / case / "input.json"
    if not path.is_file():
        raise SystemExit(f"--case {case}: no file {path}")
    return path


def absolute_document(path: Path) -> dict:
    """The example's input with absolute data paths, so it runs from any folder."""
    from mtcore.config import read_input

    doc = read_input(path)

    def absolute(section: Optional[dict]) -> None:
        if isinstance(section, dict) and "systems" in section:
            systems = section["systems"]
            section["systems"] = (str((path.parent / systems).resolve()) if isinstance(systems, str)
                                  else [str((path.parent / s).resolve()) for s in systems])

    for section in data_sections(doc):
        absolute(section)
    return doc


def data_sections(doc: dict, which: tuple = ("training_data", "validation_data")) -> list[dict]:
    training = doc["training"]
    found = [training.get(key) for key in which]
    for entry in (training.get("data_dict") or {}).values():
        found += [entry.get(key) for key in which]
    return [s for s in found if isinstance(s, dict)]


def fittings(model: dict) -> list[dict]:
    return list((model.get("fitting_net_dict") or {}).values()) or [model["fitting_net"]]


def variant(doc: dict, precision: str, batch: Optional[int]) -> dict:
    """The document with every descriptor (hybrid members too), type embedding and fitting net in
    ``precision``, and every training batch_size set to ``batch`` (None: as the example says)."""
    doc = copy.deepcopy(doc)
    model = doc["model"]
    if precision != "float64":
        descriptor = model["descriptor"]
        for d in descriptor.get("list") or [descriptor]:  # hybrid: its members hold the precision
            d["precision"] = precision
        if isinstance(model.get("type_embedding"), dict):
            model["type_embedding"]["precision"] = precision
        for f in fittings(model):
            f["precision"] = precision
    if batch is not None:
        for section in data_sections(doc, ("training_data",)):
            section["batch_size"] = batch
    return doc


def multi_task_v2(doc: dict) -> bool:
    """DeePMD-kit 3 reads multi-task inputs in its own v3 layout only, not v2's fitting_net_dict
    (bench.py translates them: benchmarks/deepmd_v3_input.py)."""
    return "fitting_net_dict" in doc["model"]


def timed_head(doc: dict) -> str:
    """The head whose frozen model is timed: the first energy head (the first head if none)."""
    heads = doc["model"].get("fitting_net_dict")
    if not heads:
        return "default"
    return next((h for h, f in heads.items() if f.get("type", "ener") == "ener"), next(iter(heads)))


# children ----------------------------------------------------------------------------------------
def run_measured(cmd: list, cwd: Path, env: dict, limits: dict, log: Path) -> dict:
    """Run ``cmd`` to the end; its exit code, wall time, and peak RSS and CPU time from
    ``os.wait4`` (its own and its waited-for children's: one process with NUM_WORKERS=0).
    Stopped (an "error" row) past ``limits["timeout"]`` seconds or ``limits["mem_mb"]`` resident
    MB, checked every 50 ms: the machine is shared, and a large batch can outgrow it."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        why = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            resident = resident_mb(proc.pid)
            if time.perf_counter() - t0 > limits["timeout"]:
                why = f"timed out after {limits['timeout']:.0f} s"
            elif resident > limits["mem_mb"]:
                why = f"stopped at {resident:.0f} MB resident, above --mem-gb {limits['mem_mb'] / 1024:g}"
            if why:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                return {"error": f"{why} (log {log})"}
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "log": log.read_text(errors="replace")}


def resident_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "?"


#: set by --deepmd-mkl-answer: DeePMD-kit's children preload mtcore's answer to MKL's vendor check
DEEPMD_PRELOAD: list[str] = []


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               DP_INTRA_OP_PARALLELISM_THREADS=str(threads), DP_INTER_OP_PARALLELISM_THREADS="1")
    return env


def deepmd_env(threads: int) -> dict:
    """thread_env, plus LD_PRELOAD of mtcore's MKL answer with --deepmd-mkl-answer (the same
    MKL kernels mtcore gets on an AMD processor; mtcore/mkl_dispatch.py)."""
    env = thread_env(threads)
    if DEEPMD_PRELOAD:
        env["LD_PRELOAD"] = " ".join(DEEPMD_PRELOAD + env.get("LD_PRELOAD", "").split())
    return env


def mtcore_child(what: str, spec: dict, workdir: Path, threads: int, limits: dict) -> dict:
    name = f"{what}-{len(list(workdir.glob(what + '-*.json')))}"
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    run = run_measured([sys.executable, str(CHILDREN), what, str(spec_path)], workdir, thread_env(threads),
                       limits, workdir / f"{name}.log")
    if "error" in run:
        return run
    if run["rc"] != 0:
        return {"error": f"exit {run['rc']}: {last_line(run['log'])} (log {workdir / (name + '.log')})"}
    row = json.loads(run["log"].strip().splitlines()[-1])
    row["peak_rss_mb"] = run["peak_rss_mb"]  # the child's own report agrees; wait4 is the parent's view
    return row


def deepmd_child(dp: Path, doc: dict, workdir: Path, steps: int, warmup: int, threads: int, limits: dict,
                 default_malloc: bool, workers: int) -> dict:
    """``dp --pt train`` of the document: its "average training time" and its peak RSS."""
    doc = copy.deepcopy(doc)
    training = doc["training"]
    training.pop("validation_data", None)  # its validation would run inside the timed intervals
    for entry in (training.get("data_dict") or {}).values():
        entry.pop("validation_data", None)
    steps = max(steps, warmup + 1)  # else DeePMD-kit averages over every step, its first ones included
    training.update(numb_steps=warmup + steps, disp_freq=warmup, save_freq=warmup + steps)
    training.pop("max_ckpt_keep", None)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "input.json").write_text(json.dumps(doc, indent=1))
    env = deepmd_env(threads)
    env["NUM_WORKERS"] = str(workers)
    if not default_malloc:
        env.update(MALLOC_MMAP_THRESHOLD_=str(2**31 - 1), MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
    python = dp.with_name("python")  # its venv's: runs dp with a CPU-time average too
    cmd = [str(python), str(DP_CHILD)] if python.exists() else [str(dp)]
    run = run_measured(cmd + ["--pt", "train", "input.json"], workdir, env, limits, workdir / "dp.log")
    if "error" in run:
        return run
    match = re.search(r"average training time: ([0-9.]+) s/batch", run["log"])
    if run["rc"] != 0 or not match:
        return {"error": f"dp --pt train failed (exit {run['rc']}): {last_line(run['log'])} (log {workdir / 'dp.log'})"}
    row = {"ms_per_step": 1000 * float(match.group(1)), "peak_rss_mb": run["peak_rss_mb"],
           "wall_s": run["wall_s"], "cpu_s": run["cpu_s"]}
    cpu = re.search(r"MTCORE_BENCH average training CPU time: ([0-9.]+) s/batch", run["log"])
    if cpu:
        row["cpu_ms_per_step"] = 1000 * float(cpu.group(1))
    return row


# the plan ----------------------------------------------------------------------------------------
def plan(args, doc: dict) -> list[tuple[str, str, Optional[int]]]:
    """(label, precision, batch) of every training run of a case."""
    runs = [("float64", "float64", None), ("float32", "float32", None)]
    runs += [(f"batch {b}", "float64", b) for b in args.batches]
    return runs


def scaled_steps(args, batch: Optional[int]) -> tuple[int, int]:
    """(timed steps, warm-up steps) of a run: larger batches take fewer, so a run costs about the
    same frames whatever its batch (at least 3 timed steps and 2 warm-up)."""
    b = batch or 1
    return max(3, -(-args.steps // b)), max(2, -(-args.warmup // b))


def better(old: Optional[dict], new: dict, key: str) -> dict:
    """Best-of over rounds: the faster run's figures, the largest peak RSS of all."""
    if old is None or "error" in old:
        return new
    if "error" in new:
        return old
    best = dict(new if new[key] < old[key] else old) if key.endswith("ms_per_step") else \
        dict(new if new[key] > old[key] else old)
    if "peak_rss_mb" in old and "peak_rss_mb" in new:
        best["peak_rss_mb"] = max(old["peak_rss_mb"], new["peak_rss_mb"])
    best["rounds"] = old.get("rounds", 1) + 1
    return best


class Session:
    """One benchmark run: the options, the limits, and the best row so far of every measurement
    (key: case, code, run label)."""

    def __init__(self, args, dp: Optional[Path], root: Path):
        self.args, self.dp, self.root = args, dp, root
        self.limits = {"timeout": args.timeout, "mem_mb": 1024 * args.mem_gb}
        self.results: dict = {}

    def keep(self, key: tuple, row: dict, by: str) -> None:
        """Record a measurement (best of rounds) and print it as it comes."""
        self.results[key] = better(self.results.get(key), row, by)
        load = round(os.getloadavg()[0], 2)
        if self.args.json:
            print(json.dumps({"case": key[0], "code": key[1], "run": key[2], **row, "load": load}), flush=True)
            return
        text = row["error"] if "error" in row else ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "frame")
        print(f"  {' '.join(key)}: {text} (load average {load})", file=sys.stderr, flush=True)

    def skip(self, key: tuple, batch: Optional[int]) -> bool:
        """A run that hit a limit is not tried again; one expected to outgrow --mem-gb is not tried."""
        earlier = self.results.get(key, {})
        if any(word in earlier.get("error", "") for word in ("--mem-gb", "timed out")):
            return True
        expected = predicted_mb(self.results, key, batch)
        if expected is not None and expected > self.limits["mem_mb"]:
            self.results[key] = {"error": f"not run: about {expected / 1024:.1f} GB expected at batch {batch} (linear "
                                          f"in the batch from the smaller batches), above --mem-gb {self.args.mem_gb:g}"}
            return True
        return False

    def run_case(self, case: str, doc: dict, round_: int) -> None:
        """Every run of one case in this round, mtcore then DeePMD-kit run by run."""
        args, dp = self.args, self.dp
        folder = self.root / case.replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for label, precision, batch in plan(args, doc):
            steps, warmup = scaled_steps(args, batch)
            own_batch_is_1 = value(self.results.get((case, "mtcore", "float64")), "batch_sizes") == [1]
            if batch == 1 and own_batch_is_1 and (dp is None or not args.deepmd_batch):
                continue  # the example's own batch is 1: the float64 run is the batch-1 point
            tag = label.replace(" ", "")
            input_path = folder / f"input-{tag}.json"
            input_path.write_text(json.dumps(variant(doc, precision, batch), indent=1))
            state = folder / f"state-{tag}.pt" if batch is None else None
            spec = {"input": str(input_path), "steps": steps, "warmup": warmup, "min_timed": min(3, steps),
                    "max_timed_s": args.max_timed_s, "state": str(state) if state and not state.exists() else None}
            if not self.skip((case, "mtcore", label), batch):
                self.keep((case, "mtcore", label), mtcore_child("train", spec, folder, args.threads, self.limits),
                          "ms_per_step")
            if dp is not None and (batch is None or args.deepmd_batch):
                if not self.skip((case, "deepmd", label), batch):
                    dp_doc = variant(doc, precision, batch)
                    if multi_task_v2(dp_doc):  # DeePMD-kit 3 reads its own multi-task layout only
                        dp_doc = v3_multi_task(dp_doc, folder / f"dp-v3-data-{tag}")
                    row = deepmd_child(dp, dp_doc, folder / f"dp-{tag}-{round_}",
                                       max(3, steps), max(2, warmup), args.threads, self.limits,
                                       args.deepmd_default_malloc, args.deepmd_workers)
                    self.keep((case, "deepmd", label), row, "ms_per_step")
            if state is not None and state.exists() and not args.no_infer:
                self.infer(case, doc, folder, tag, label, state, round_)

    def infer(self, case: str, doc: dict, folder: Path, tag: str, label: str, state: Path, round_: int) -> None:
        args = self.args
        spec = {"state": str(state), "head": timed_head(doc), "repeats": args.infer_repeats,
                "frozen": str(folder / f"frozen-{tag}.pth"), "compressed": str(folder / f"compressed-{tag}.pth"),
                "frame_prefix": str(folder / "frame-")}
        self.keep((case, "infer", label), mtcore_child("infer", spec, folder, args.threads, self.limits),
                  "frozen_frames_per_s")
        if args.deepmd_infer and self.dp is not None and not multi_task_v2(doc):
            self.keep((case, "deepmd-infer", label), deepmd_infer(self.dp, folder, tag, round_, args, self.limits),
                      "frozen_frames_per_s")


def measure(args, cases: list[str], dp: Optional[Path], root: Path) -> dict:
    """Round after round, case after case (so every case sees the machine's drift alike)."""
    session = Session(args, dp, root)
    docs = {case: absolute_document(case_input(case)) for case in cases}
    for round_ in range(1, args.rounds + 1):
        print(f"round {round_} of {args.rounds} (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
        for case in cases:
            session.run_case(case, docs[case], round_)
    return session.results


def deepmd_infer(dp: Path, folder: Path, tag: str, round_: int, args, limits: dict) -> dict:
    """DeePMD-kit's frames/s on the frame mtcore's inference used: its model of this round's
    training (``dp --pt freeze``, once; ``dp --pt compress`` tried once), timed by
    benchmarks/deepmd_infer_child.py (``DeepPot.eval``, best of --infer-repeats calls)."""
    python = dp.with_name("python")
    frozen, packed = folder / f"dp-frozen-{tag}.pth", folder / f"dp-compressed-{tag}.pth"
    env = deepmd_env(args.threads)
    if not frozen.exists():
        trained = folder / f"dp-{tag}-{round_}"
        run = run_measured([str(dp), "--pt", "freeze", "-o", str(frozen)], trained, env, limits, folder / "dp-freeze.log")
        if "error" in run or run["rc"] != 0 or not frozen.exists():
            return {"error": f"dp --pt freeze failed in {trained}: {run.get('error') or last_line(run['log'])}"}
        run = run_measured([str(dp), "--pt", "compress", "-i", str(frozen), "-o", str(packed), "-t", "input.json"],
                           trained, env, limits, folder / "dp-compress.log")
        if "error" in run or run["rc"] != 0 or not packed.exists():
            packed.with_suffix(".why-not").write_text(f"dp --pt compress failed: {run.get('error') or last_line(run['log'])}")
    frame = [str(folder / f"frame-{part}.npy") for part in ("coord", "box", "type")]
    if not Path(frame[0]).exists():
        return {"error": "no periodic frame to evaluate (mtcore's inference run writes it)"}
    row: dict = {}
    for name, model in (("frozen", frozen), ("compressed", packed)):
        if not model.exists():
            why = packed.with_suffix(".why-not")
            row["compressed_why_not"] = why.read_text() if why.exists() else "no compressed model"
            continue
        run = run_measured([str(python), str(Path(__file__).with_name("deepmd_infer_child.py")), str(model), *frame,
                            str(args.infer_repeats)], folder, env, limits, folder / f"dp-infer-{name}.log")
        if "error" in run or run["rc"] != 0:
            return {"error": f"DeePMD-kit inference of {model.name}: {run.get('error') or last_line(run['log'])}"}
        result = json.loads(run["log"].strip().splitlines()[-1])
        row[f"{name}_frames_per_s"] = 1000 / result["ms_per_frame"]
        row["peak_rss_mb"] = max(row.get("peak_rss_mb", 0), run["peak_rss_mb"])
    return row


def predicted_mb(results: dict, key: tuple, batch: Optional[int]) -> Optional[float]:
    """Peak RSS expected at ``batch`` from the same code's runs at smaller batches: the line
    through the two largest. None for the example's own batch or fewer than two measured (then
    only the cap's check while the child runs guards the machine)."""
    if batch is None:
        return None
    case, code, _ = key
    known = {}
    for b in range(1, batch):
        rss = value(results.get((case, code, f"batch {b}")), "peak_rss_mb")
        if rss is not None:
            known[b] = rss
    if 1 not in known and value(results.get((case, "mtcore", "float64")), "batch_sizes") == [1]:
        rss = value(results.get((case, code, "float64")), "peak_rss_mb")  # the example's run is at batch 1
        if rss is not None:
            known[1] = rss
    if len(known) < 2:  # one point says nothing of the slope (DeePMD-kit's base alone is ~2.5 GB)
        return None
    (b0, r0), (b1, r1) = sorted(known.items())[-2:]
    return r1 + (batch - b1) * (r1 - r0) / (b1 - b0)


# tables ------------------------------------------------------------------------------------------
def fmt(value: Optional[float], spec: str = "{:.0f}") -> str:
    return DASH if value is None else spec.format(value)


def figure(results: dict, key: tuple, name: str) -> Optional[float]:
    return value(results.get(key), name)


def value(row: Optional[dict], name: str) -> Optional[float]:
    """A figure of a measured row; None (printed "—") when the run failed or has no such figure."""
    return None if row is None or "error" in row or name not in row else row[name]


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def tables(args, cases: list[str], results: dict, dp: Optional[Path]) -> list[str]:
    def table(header: list[str], aligns: str, rows: list[list[str]]) -> list[str]:
        if args.markdown:
            return ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in aligns) + "|",
                    *("| " + " | ".join(r) + " |" for r in rows)]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, aligns))
        return [line(header), *(line(r) for r in rows)]

    out = [f"Training: ms per step, best of {args.rounds} round(s) (mtcore: median step; DeePMD-kit: its mean; "
           "DeePMD-kit / mtcore: mean against mean); peak RSS of the whole run, setup included (largest)"]
    rows = []
    for case in cases:
        for label in ("float64", "float32"):
            mt = figure(results, (case, "mtcore", label), "ms_per_step")
            cpu = figure(results, (case, "mtcore", label), "cpu_ms_per_step")
            d = figure(results, (case, "deepmd", label), "ms_per_step")
            dcpu = figure(results, (case, "deepmd", label), "cpu_ms_per_step")
            rss = [figure(results, (case, code, label), "peak_rss_mb") for code in ("mtcore", "deepmd")]
            f64 = figure(results, (case, "mtcore", "float64"), "ms_per_step")
            dp64 = figure(results, (case, "deepmd", "float64"), "ms_per_step")
            speed = f"{fmt(ratio(f64, mt), '{:.2f}×')} / {fmt(ratio(dp64, d), '{:.2f}×')}" if label == "float32" else ""
            # the ratio compares means, as DeePMD-kit's figure is one (the median is the mtcore column)
            mt_mean = figure(results, (case, "mtcore", label), "mean_ms_per_step") or mt
            cpu_mean = figure(results, (case, "mtcore", label), "mean_cpu_ms_per_step") or cpu
            rows.append([case, label, f"{fmt(mt)} / {fmt(cpu)}", f"{fmt(d)} / {fmt(dcpu)}",
                         f"{fmt(ratio(d, mt_mean), '{:.2f}×')} / {fmt(ratio(dcpu, cpu_mean), '{:.2f}×')}",
                         f"{fmt(rss[0])} / {fmt(rss[1])}", speed])
    out += table(["case", "precision", "mtcore ms/step: wall / CPU", "DeePMD-kit ms/step: wall / CPU",
                  "DeePMD-kit / mtcore: wall / CPU", "peak RSS mtcore / DeePMD-kit (MB)",
                  "float64 / float32 time: mtcore / DeePMD-kit"], "llrrrrr", rows)

    out += ["", "Batch curve (float64): ms per frame at batch 1, then per-frame time at batch b / at batch 1; "
                "wall / CPU (CPU time is less disturbed by other processes)"]
    codes = ["mtcore"] + (["deepmd"] if dp is not None and args.deepmd_batch else [])
    rows = []
    for case in cases:
        for code in codes:
            runs = {b: results.get((case, code, f"batch {b}")) for b in args.batches}
            f64 = results.get((case, code, "float64"))
            if runs[1] is None and f64 is not None and f64.get("batch_sizes") == [1]:
                runs[1] = f64  # the example's own batch is 1: that run is the batch-1 point
            per_frame = {b: (value(r, "ms_per_step"), value(r, "cpu_ms_per_step")) for b, r in runs.items()}
            one = per_frame[1]
            cells = [case, "mtcore" if code == "mtcore" else "DeePMD-kit", f"{fmt(one[0])} / {fmt(one[1])}"]
            for b in args.batches[1:]:
                wall, cpu = (ratio(ratio(x, b), y) for x, y in zip(per_frame[b], one))
                cells.append(f"{fmt(wall, '{:.2f}')} / {fmt(cpu, '{:.2f}')}")
            cells.append(" / ".join(fmt(value(runs[b], "peak_rss_mb")) for b in args.batches))
            rows.append(cells)
    out += table(["case", "code", "ms/frame at batch 1", *(f"batch {b}" for b in args.batches[1:]),
                  "peak RSS at batch " + " / ".join(map(str, args.batches)) + " (MB)"],
                 "llr" + "r" * len(args.batches), rows)

    with_dp = any(code == "deepmd-infer" for _, code, _ in results)
    if not args.no_infer:
        out += ["", f"Inference (mtcore{', DeePMD-kit' if with_dp else ''}): frames/s of one frame, best of {args.infer_repeats} calls per round, "
                    "energy, forces, virial, neighbour list included"]
        rows = []
        for case in cases:
            for label in ("float64", "float32"):
                key = (case, "infer", label)
                plain, packed = figure(results, key, "frozen_frames_per_s"), figure(results, key, "compressed_frames_per_s")
                plain_cpu = figure(results, key, "frozen_cpu_frames_per_s")
                packed_cpu = figure(results, key, "compressed_cpu_frames_per_s")
                atoms = figure(results, key, "atoms")
                script_cpu = figure(results, key, "frozen_scripted_cpu_frames_per_s")
                cells = [case, label, fmt(atoms), f"{fmt(plain, '{:.1f}')} / {fmt(plain_cpu, '{:.1f}')}",
                         f"{fmt(packed, '{:.1f}')} / {fmt(packed_cpu, '{:.1f}')}",
                         f"{fmt(ratio(packed, plain), '{:.2f}×')} / {fmt(ratio(packed_cpu, plain_cpu), '{:.2f}×')}",
                         f"{fmt(script_cpu, '{:.1f}')}", f"{fmt(ratio(plain_cpu, script_cpu), '{:.2f}×')} / "
                         f"{fmt(ratio(packed_cpu, script_cpu), '{:.2f}×')}"]
                if with_dp:
                    dkey = (case, "deepmd-infer", label)
                    d_plain = figure(results, dkey, "frozen_frames_per_s")
                    d_packed = figure(results, dkey, "compressed_frames_per_s")
                    cells += [f"{fmt(d_plain, '{:.1f}')} / {fmt(d_packed, '{:.1f}')}",
                              f"{fmt(ratio(plain, d_plain), '{:.2f}×')} / {fmt(ratio(packed, d_packed), '{:.2f}×')}"]
                rows.append(cells)
        out += table(["case", "precision", "atoms", "frozen frames/s: wall / CPU", "compressed frames/s: wall / CPU",
                      "compressed / frozen: wall / CPU", "frozen, TorchScript: CPU frames/s",
                      "frozen / compressed against TorchScript (CPU)"]
                     + (["DeePMD-kit frames/s: frozen / compressed", "mtcore / DeePMD-kit: frozen / compressed (wall)"]
                        if with_dp else []), "llrrrrrr" + ("rr" if with_dp else ""), rows)
    reasons: dict = {}  # one line per reason, naming the runs it stopped
    for key, row in results.items():
        if "error" in row:
            reasons.setdefault(row["error"], []).append(" ".join(key))
        if row.get("compressed_why_not"):
            reasons.setdefault(row["compressed_why_not"].split(". ")[0], []).append(" ".join(key) + " compressed")
    if reasons:
        out += ["", "Not measured (" + DASH + "):", *(f"- {', '.join(runs)}: {why}" for why, runs in reasons.items())]
    return out


def tables_from(args, path: Path) -> list[str]:
    """The tables of the best rows (those with "best_of") of a --json run's output."""
    results, cases, notes = {}, [], []
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.startswith("{") else {}
        if "header" in row or "total_s" in row:
            notes.append(row.get("header") or f"(total {row['total_s']:.0f} s; load average at the end {row['load_at_end']})")
        if "best_of" not in row:
            continue
        case, code, run = row.pop("case"), row.pop("code"), row.pop("run")
        results[(case, code, run)] = row
        cases += [case] if case not in cases else []
        args.rounds = row["best_of"]
        args.infer_repeats = row.get("repeats", args.infer_repeats)
    found = sorted({int(run.split()[1]) for _, _, run in results if run.startswith("batch ")})
    args.batches = sorted(set([1] + found))
    args.deepmd_batch = any(code == "deepmd" and run.startswith("batch") for _, code, run in results)
    args.no_infer = not any(code == "infer" for _, code, _ in results)
    dp = Path("dp") if any(code == "deepmd" for _, code, _ in results) else None
    return notes + [""] + tables(args, cases, results, dp)


def total_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return 16.0


def header(args, dp: Optional[Path]) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dp_text = "DeePMD-kit: not run"
    if dp is not None:
        version = subprocess.run([str(dp), "--version"], capture_output=True, text=True).stdout.strip() or "?"
        dp_text = (f"DeePMD-kit: {dp} ({last_line(version)}), NUM_WORKERS={args.deepmd_workers}, allocator "
                   + ("default" if args.deepmd_default_malloc else "as mtcore's (MALLOC_*_THRESHOLD_)")
                   + (", MKL vendor check answered as mtcore's (LD_PRELOAD)" if DEEPMD_PRELOAD else ""))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, {total_memory_gb():.0f} GB; torch {torch.__version__}; "
            f"{args.threads} thread(s) per run, at most {args.mem_gb:g} GB resident; "
            f"load average {load}; {args.steps} timed steps after {args.warmup} (fewer at larger batches), "
            f"best of {args.rounds} round(s); mtcore's MKL dispatch: {mtcore.mkl_dispatch.status}; {dp_text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", default=[], help="examples/<case> or an input.json (repeatable; "
                        "default: " + ", ".join(CLASSIC) + ")")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (DeePMD-kit: its disp_freq)")
    parser.add_argument("--max-timed-s", type=float, default=120, help="mtcore: stop timing a run after this (default 120 s)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best is kept (default 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch curve (default 1 4 8)")
    parser.add_argument("--deepmd", default=str(DEFAULT_DP) if DEFAULT_DP.exists() else "none",
                        help=f"DeePMD-kit's dp (PyTorch backend); 'none' to skip (default {DEFAULT_DP} when present)")
    parser.add_argument("--deepmd-batch", action="store_true", help="DeePMD-kit's batch curve too (slow)")
    parser.add_argument("--deepmd-default-malloc", action="store_true",
                        help="run DeePMD-kit with glibc's default allocator settings (mtcore keeps its own)")
    parser.add_argument("--deepmd-mkl-answer", action="store_true",
                        help="preload mtcore's answer to MKL's vendor check in DeePMD-kit's runs too (LD_PRELOAD): "
                             "both codes then get MKL's AVX2/AVX-512 kernels on an AMD processor")
    parser.add_argument("--deepmd-workers", type=int, default=0, help="DeePMD-kit's NUM_WORKERS (default 0: one process)")
    parser.add_argument("--deepmd-infer", action="store_true",
                        help="DeePMD-kit's inference frames/s too (dp --pt freeze, and compress where it can)")
    parser.add_argument("--no-infer", action="store_true", help="skip the inference rows")
    parser.add_argument("--infer-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                        help="threads per run, both codes (default OMP_NUM_THREADS or 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="wall-clock cap per child (s)")
    parser.add_argument("--mem-gb", type=float, default=round(total_memory_gb() / 2, 1),
                        help="resident-memory cap per child; a run expected above it is not started "
                             "(default: half of this machine's memory)")
    parser.add_argument("--quick", action="store_true", help="pipeline check: 3 steps after 2, one round, 2 calls")
    parser.add_argument("--markdown", action="store_true", help="tables for docs/performance.md")
    parser.add_argument("--json", action="store_true",
                        help="JSON lines on stdout: every measurement, then the best rows (tables on stderr)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (inputs, logs, models)")
    parser.add_argument("--tables-from", metavar="JSONL", help="print the tables of an earlier --json run's output and stop")
    args = parser.parse_args()
    if args.deepmd_mkl_answer:
        from mtcore import mkl_dispatch

        if not mkl_dispatch.status.startswith("on") or not mkl_dispatch.library_path().exists():
            parser.error(f"--deepmd-mkl-answer: mtcore's MKL answer is not in use here ({mkl_dispatch.status})")
        DEEPMD_PRELOAD.append(str(mkl_dispatch.library_path()))
    if args.tables_from:
        print("\n".join(tables_from(args, Path(args.tables_from))))
        return
    if args.quick:
        args.steps, args.warmup, args.rounds, args.infer_repeats = 3, 2, 1, 2
    if sorted(args.batches) != args.batches or args.batches[0] != 1:
        raise SystemExit("--batches: start at 1 and increase (e.g. 1 4 8)")
    dp = None if args.deepmd in ("none", "") else Path(args.deepmd)
    if dp is not None and not dp.exists():
        raise SystemExit(f"--deepmd {dp}: no such file; give the dp of a DeePMD-kit 3 install or 'none'")
    cases = args.case or CLASSIC
    for case in cases:
        case_input(case)
    text = header(args, dp)
    print(json.dumps({"header": text}) if args.json else text, flush=True)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mtcore-bench-"))
    try:
        results = measure(args, cases, dp, work)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}", file=sys.stderr)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.json:
        for key, row in results.items():
            print(json.dumps({"case": key[0], "code": key[1], "run": key[2], "best_of": args.rounds, **row}))
        print(json.dumps({"total_s": time.perf_counter() - started, "load_at_end": load}), flush=True)
        print("\n".join(tables(args, cases, results, dp)), file=sys.stderr)  # stdout stays JSON lines
        return
    print(f"\n(total {time.perf_counter() - started:.0f} s; load average at the end {load})\n")
    print("\n".join(tables(args, cases, results, dp)))


if __name__ == "__main__":
    main()
