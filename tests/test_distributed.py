"""Data-parallel training over loopback (2 CPU ranks, gloo): docs/distributed.md.

The ranks are real processes. Most tests start them with the environment torchrun gives its
workers (RANK, WORLD_SIZE, MASTER_ADDR, ...) so that the test sees each rank's exit status and
output; the restart test goes through torchrun itself (``python -m torch.distributed.run -m mtcore``).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from rich.console import Console

from helpers import ROOT, WATER, assert_nested_close, multi_task_input, small_input, write_input
from mtcore.config import load_config
from mtcore.train.checkpoint import load_checkpoint, read_checkpoint_file
from mtcore.train.trainer import Trainer


def _loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _why_not() -> str:
    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    try:
        _loopback_port()
    except OSError as exc:
        return f"no loopback TCP ({exc})"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")

QUIET = Console(file=io.StringIO())
TINY_DESCRIPTOR = {"type": "se_e2_a", "sel": [20, 40], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8],
                   "axis_neuron": 2, "seed": 1, "precision": "float64"}
TINY_FITTING = {"type": "ener", "neuron": [8, 8], "seed": 2, "precision": "float64"}

#: one rank of a run, as torchrun would start it, keeping what the test compares
WORKER = """
import sys
from pathlib import Path
import torch
from rich.console import Console
from mtcore.config import load_config
from mtcore.train import distributed
from mtcore.train.trainer import Trainer

workdir = Path(sys.argv[1])
group, device = distributed.setup(None)
trainer = Trainer(load_config(workdir / "input.json"), workdir, Console(quiet=True), device=device)
trainer.run()
display = trainer.display_values()  # a collective: every rank pools the same numbers
torch.save({"model": trainer.model.state_dict(), "display": display, "best": trainer.best.state_dict()["heads"]},
           workdir / f"rank{group.rank}.pt")
distributed.shutdown()
"""


def rank_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", MTCORE_DEVICE="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def start_ranks(workdir: Path, argv: list[str], world: int = 2) -> list[subprocess.Popen]:
    port = _loopback_port()
    return [
        subprocess.Popen([sys.executable, *argv], cwd=workdir, env=rank_env(r, world, port),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, stdout + stderr))
    return out


def tiny_single(workdir: Path, batch: int, numb_steps: int = 8) -> dict:
    doc = small_input(workdir, descriptor=TINY_DESCRIPTOR, fitting=TINY_FITTING, numb_steps=numb_steps,
                      disp_freq=4, save_freq=4)
    doc["training"]["training_data"]["batch_size"] = batch
    doc["training"]["validation_data"]["batch_size"] = batch
    return doc


def system_with_a_huge_force(workdir: Path, nframes: int = 8, bad: int = 5) -> Path:
    """The first frames of water data_0, one with a force of 1e200 (finite, so the loader takes
    it; its square is not): the step whose batch holds it has a non-finite loss on ONE rank, and
    every rank must skip that update."""
    target = workdir / "huge_force"
    if not target.exists():
        (target / "set.000").mkdir(parents=True)
        for name in ("type.raw", "type_map.raw"):
            shutil.copy(WATER / "data_0" / name, target / name)
        for name in ("box", "coord", "energy", "force"):
            values = np.load(WATER / "data_0" / "set.000" / f"{name}.npy")[:nframes].astype(np.float64)
            if name == "force":
                values[bad, 0] = 1e200
            np.save(target / "set.000" / f"{name}.npy", values)
    return target


def tiny_multi(workdir: Path, batch: int) -> dict:
    doc = multi_task_input(workdir, numb_steps=8, descriptor=TINY_DESCRIPTOR, disp_freq=4, save_freq=4)
    doc["training"]["data_dict"]["ccsd"]["training_data"]["systems"] = [str(system_with_a_huge_force(workdir))]
    for head, fitting in doc["model"]["fitting_net_dict"].items():
        fitting["neuron"] = [8, 8, 8]
    for section in doc["training"]["data_dict"].values():
        section["training_data"]["batch_size"] = batch
        section["validation_data"]["batch_size"] = batch
    return doc


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def lcurve_rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


@pytest.mark.filterwarnings("ignore:.*non-finite loss inf:UserWarning")  # the huge force, on purpose
def test_two_ranks_equal_one_process_with_the_summed_batch_multitask(tmp_path):
    """2 ranks × batch 1 = 1 process × batch 2 (float64, 1e-10): the ranks draw from one shared
    stream and step the same head each step; their parameters stay identical."""
    ranks, single = tmp_path / "ranks", tmp_path / "single"
    ranks.mkdir()
    single.mkdir()
    write_input(ranks, tiny_multi(tmp_path, batch=1))
    write_input(single, tiny_multi(tmp_path, batch=2))
    procs = start_ranks(ranks, ["-c", WORKER, "."])
    reference = Trainer(load_config(single / "input.json"), single, QUIET)  # meanwhile, in this process
    reference.run()
    display = reference.display_values()
    outputs = finish(procs)
    for rc, output in outputs:
        assert rc == 0, output[-3000:]
    # the huge force was on one rank: that rank saw the loss, the other was told, both skipped
    said = " ".join(output for _, output in outputs)
    assert "non-finite loss inf" in said and "non-finite loss on another rank" in said, said[-3000:]
    rank0, rank1 = (torch.load(ranks / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # identical across ranks: both apply the same averaged gradient (1e-12: identity up to the last bits)
    assert max_difference(rank0["model"], rank1["model"]) <= 1e-12
    # equal to the single process with the summed batch: float64, 1e-10
    assert max_difference(rank0["model"], reference.model.state_dict()) <= 1e-10
    assert max_difference(read_checkpoint_file(ranks / "model.ckpt-8.pt")["model"], reference.model.state_dict()) <= 1e-10
    # display rows and fixed-set validation pooled over the ranks = the single process (rel 1e-10)
    assert_nested_close(nan_as_text(rank0["display"]), nan_as_text(display), rel=1e-10)
    assert_nested_close(nan_as_text(rank1["display"]), nan_as_text(display), rel=1e-10)
    assert_nested_close(without_digest(rank0["best"]), without_digest(reference.best.state_dict()["heads"]))
    assert lcurve_rows(ranks / "lcurve.out") == lcurve_rows(single / "lcurve.out")


def nan_as_text(value):
    """Non-finite metrics (a batch holding the huge force) compare equal as text; the rest as floats."""
    if isinstance(value, dict):
        return {k: nan_as_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_as_text(v) for v in value]
    return repr(value) if isinstance(value, float) and not math.isfinite(value) else value


def without_digest(best: dict) -> dict:
    return {h: {k: v for k, v in b.items() if k != "sha256"} for h, b in best.items()}


def torchrun(workdir: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MTCORE_DEVICE="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_loopback_port()}",
         "--master_addr=127.0.0.1", "-m", "mtcore", "train", *args],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_torchrun_equals_one_process_and_its_restart_continues_identically(tmp_path):
    """torchrun … -m mtcore train (2 ranks × batch 1) = one process with batch 2 (1e-10); then
    --restart from the middle checkpoint gives the same parameters and lcurve rows as the
    uninterrupted 2-rank run (the shared stream and data cursors are in the checkpoint)."""
    full, single = tmp_path / "full", tmp_path / "single"
    full.mkdir()
    single.mkdir()
    write_input(full, tiny_single(tmp_path, batch=1))
    write_input(single, tiny_single(tmp_path, batch=2))
    launched = torchrun(full, "input.json")
    reference = Trainer(load_config(single / "input.json"), single, QUIET)  # meanwhile, in this process
    reference.run()
    [(rc, output)] = finish([launched], timeout=180)
    assert rc == 0, output[-3000:]
    assert output.count("finished training") == 1  # rank 0 reports; the others are quiet
    end = read_checkpoint_file(full / "model.ckpt-8.pt")
    assert max_difference(end["model"], reference.model.state_dict()) <= 1e-10
    assert_nested_close(without_digest(end["best"]["heads"]), without_digest(reference.best.state_dict()["heads"]))
    assert lcurve_rows(full / "lcurve.out") == lcurve_rows(single / "lcurve.out")
    # only rank 0 wrote: one set of checkpoints, no lock left
    assert sorted(p.name for p in full.glob("model.ckpt-*.pt")) == ["model.ckpt-4.pt", "model.ckpt-8.pt"]
    assert not (full / ".mtcore-train.lock").exists()

    again = tmp_path / "again"
    shutil.copytree(full, again)
    for rc, output in finish(start_ranks(again, ["-m", "mtcore", "train", "--restart", "model.ckpt-4.pt"])):
        assert rc == 0, output[-3000:]
    assert max_difference(read_checkpoint_file(again / "model.ckpt-8.pt")["model"], end["model"]) <= 1e-10
    assert lcurve_rows(again / "lcurve.out") == lcurve_rows(full / "lcurve.out")


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_rank_stops_the_job_with_one_line_and_the_last_checkpoint_loads(tmp_path, killed):
    """SIGKILL one rank mid-run: the other stops at once with one line naming the last checkpoint
    (rank 0: the newest it wrote; another rank: the newest rank 0 confirmed), and that loads."""
    doc = tiny_single(tmp_path, batch=1, numb_steps=100000)
    doc["training"].update(save_freq=2, disp_freq=1000)
    write_input(tmp_path, doc)
    procs = start_ranks(tmp_path, ["-m", "mtcore", "train", "input.json"])
    deadline = time.monotonic() + 90
    while not (tmp_path / "model.ckpt-4.pt").exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish(procs, 5)
        time.sleep(0.1)
    procs[killed].send_signal(signal.SIGKILL)
    outputs = finish(procs, timeout=60)
    survivor = 1 - killed
    rc, out = outputs[survivor]
    assert outputs[killed][0] == -signal.SIGKILL
    assert rc == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"rank {survivor} of 2 lost its peers at step" in errors[0], out[-3000:]
    assert "Traceback" not in out
    named = errors[0].split("the last checkpoint is ")[1].split(" ")[0]
    state = load_checkpoint(tmp_path / named)  # the checkpoint the message names loads (checksum verified)
    # rank 0 names the newest it wrote; rank 1 the newest whose write rank 0 confirmed (rank 0 may
    # die between writing step 4 and confirming it)
    assert state["step"] >= (4 if survivor == 0 else 2)
    assert load_checkpoint(tmp_path)["step"] >= state["step"]  # and so does the newest in the index
    if survivor == 0:
        assert not (tmp_path / ".mtcore-train.lock").exists()  # released (a killed rank 0 leaves a stale one)


# the pieces, in one process ------------------------------------------------------------------
def test_rank_slices_cover_the_summed_draw_and_wrap_round_when_a_system_is_short():
    from mtcore.train.distributed import rank_positions

    assert [list(rank_positions(6, 3, r, 2)) for r in (0, 1)] == [[0, 1, 2], [3, 4, 5]]
    assert [list(rank_positions(4, 3, r, 2)) for r in (0, 1)] == [[0, 1, 2], [3, 0, 1]]  # 4 frames < 2·3
    assert [list(rank_positions(2, 3, r, 2)) for r in (0, 1)] == [[0, 1], [0, 1]]


def test_a_single_process_is_left_alone_and_a_half_torchrun_environment_is_one_line(monkeypatch):
    from mtcore.errors import MtcoreError
    from mtcore.train import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group, device = distributed.setup("cpu")
    assert (group.rank, group.world, group.enabled, device) == (0, 1, False, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(MtcoreError, match="MASTER_ADDR is not set"):
        distributed.setup("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(MtcoreError, match="WORLD_SIZE: expected an integer"):
        distributed.setup("cpu")
    assert not distributed.current().enabled


def test_rank_slices_of_a_data_set_are_the_summed_batch_of_one_process():
    """DataSet.set_ranks: N data sets of batch b fed the same stream hold, together, exactly the
    frames one data set of batch N·b draws (two systems with prob_sys_size: also the same system)."""
    import numpy as np

    from mtcore.data.loading import load_dataset
    from mtcore.data.neighbors import NeighborCache
    from mtcore.plugins import get_registry

    def data(batch: int):
        section = {"systems": [str(WATER / "data_0"), str(WATER / "data_1")], "batch_size": batch,
                   "auto_prob": "prob_sys_size"}
        return load_dataset(section, ["O", "H"], [], NeighborCache(4.0), get_registry(), "t")

    whole, ranks = data(4), [data(2), data(2)]
    for rank, ds in enumerate(ranks):
        ds.set_ranks(rank, 2)
        assert np.allclose(ds.probs, whole.probs, rtol=0, atol=1e-15)
    streams = [np.random.default_rng(5) for _ in range(3)]
    for _ in range(30):  # several passes through the shuffled orders
        summed = whole.sample(streams[0])
        parts = [ds.sample(rng) for ds, rng in zip(ranks, streams[1:])]
        assert {p.system for p in parts} == {summed.system}
        assert torch.equal(torch.cat([p.coord for p in parts]), summed.coord)  # the same frames, copied
