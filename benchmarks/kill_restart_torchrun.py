"""Recovery of a data-parallel run by torchrun --max-restarts and ``--restart auto``.

    python benchmarks/kill_restart_torchrun.py                 # 2 CPU ranks (gloo), 120 steps
    python benchmarks/kill_restart_torchrun.py --ranks 2 --kill-step 55 --kill-rank 1

Runs the same small water input twice with
``torchrun --nproc_per_node=N --max-restarts=3 -m mtcore train input.json --restart auto``:
once uninterrupted, once with one rank killed by SIGKILL after the learning curve passed
``--kill-step``. Prints where the killed run continued from, whether it finished, and how its
lcurve.out and last checkpoint compare with the uninterrupted run's (docs/reliability.md quotes
the result). Too slow for the test suite (two torchrun jobs); tests/test_kill_restart.py covers
one process.
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import small_input  # noqa: E402

DESCRIPTOR = {"type": "se_e2_a", "sel": [46, 92], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8],
              "axis_neuron": 2, "seed": 1, "precision": "float64"}
FITTING = {"type": "ener", "neuron": [8, 8], "seed": 2, "precision": "float64"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(folder: Path, ranks: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--max-restarts=3",
               f"--master_port={free_port()}", "-m", "mtcore", "train", "input.json", "--restart", "auto"]
    with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
        return subprocess.Popen(command, cwd=folder, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})


def last_step(lcurve: Path) -> int:
    if not lcurve.is_file():
        return -1
    rows = [r for r in lcurve.read_text().splitlines(keepends=True) if r.strip() and not r.startswith("#") and r.endswith("\n")]
    return int(rows[-1].split()[0]) if rows else -1


def rank_pid(torchrun: subprocess.Popen, rank: int) -> int:
    """The worker of ``rank`` among torchrun's children (its RANK environment variable)."""
    children = subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            if f"RANK={rank}".encode() in handle.read().split(b"\0"):
                return int(pid)
    raise RuntimeError(f"no worker of rank {rank} among {children}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--kill-step", type=int, default=55)
    parser.add_argument("--kill-rank", type=int, default=1)
    args = parser.parse_args()
    doc = small_input(Path("."), DESCRIPTOR, FITTING, numb_steps=args.steps, disp_freq=5, save_freq=10,
                      save_ckpt="ckpts/model.ckpt")
    with tempfile.TemporaryDirectory() as tmp:
        full, killed = Path(tmp) / "full", Path(tmp) / "killed"
        for folder in (full, killed):
            folder.mkdir()
            (folder / "input.json").write_text(json.dumps(doc, indent=1))
        begin = time.monotonic()
        assert start(full, args.ranks).wait() == 0, (full / "err.txt").read_text()
        print(f"uninterrupted: {time.monotonic() - begin:.1f} s")
        job = start(killed, args.ranks)
        while last_step(killed / "lcurve.out") < args.kill_step:
            assert job.poll() is None, (killed / "err.txt").read_text()
            time.sleep(0.01)
        os.kill(rank_pid(job, args.kill_rank), signal.SIGKILL)
        print(f"rank {args.kill_rank} killed with SIGKILL after step {last_step(killed / 'lcurve.out')}")
        code = job.wait()
        out = (killed / "out.txt").read_text()
        resumed = re.findall(r"--restart auto: continuing from (\S+) \(step (\d+)\)", out)
        print(f"torchrun exit status {code}; continued from {resumed}")
        same_lcurve = (killed / "lcurve.out").read_text() == (full / "lcurve.out").read_text()
        last = f"ckpts/model.ckpt-{args.steps}.pt"
        a, b = (torch.load(folder / last, weights_only=False)["model"] for folder in (full, killed))
        worst = max(float(((a[k] - b[k]).abs() / a[k].abs().clamp_min(1e-300)).max())
                    for k in a if a[k].is_floating_point() and a[k].numel())
        print(f"lcurve.out identical: {same_lcurve}; {last}: max relative parameter difference {worst:.3g}")


if __name__ == "__main__":
    main()
