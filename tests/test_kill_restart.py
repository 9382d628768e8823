"""Crash recovery end to end: a real ``mtcore train`` killed with SIGKILL five times (at seeded
random moments, twice inside a checkpoint save) and re-run each time with the same command line,
``--restart auto``, ends exactly where an uninterrupted run of the same seed ends. Also: what
``--restart auto`` picks (torn newest, unindexed newest, none), and the non-finite limit."""

from __future__ import annotations

import io
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from helpers import small_input, write_input
from mtcore.cli import app
from mtcore.config import load_config
from mtcore.errors import MtcoreError
from mtcore.train.checkpoint import TEST_WRITE_DELAY_ENV, newest_complete, read_checkpoint_file, read_index
from mtcore.train.outdir import LOCK_NAME
from mtcore.train.trainer import Trainer

MTCORE = [sys.executable, "-m", "mtcore.cli"]
COMMAND = ["train", "input.json", "--restart", "auto"]  # one job-script line for every (re)start
TINY_DESCRIPTOR = {"type": "se_e2_a", "sel": [46, 92], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8],
                   "axis_neuron": 2, "seed": 1, "precision": "float64"}
TINY_FITTING = {"type": "ener", "neuron": [8, 8], "seed": 2, "precision": "float64"}
STEPS, SAVE_FREQ, DISP_FREQ = 60, 5, 2
KILL_SEED = 20261202
RTOL, ATOL = 1e-10, 1e-14  # float64 identity; both runs single-threaded


def tiny_input(numb_steps: int = STEPS, **training) -> dict:
    training = {"disp_freq": DISP_FREQ, "save_freq": SAVE_FREQ, "max_ckpt_keep": 3, "save_ckpt": "ckpts/model.ckpt",
                **training}
    return small_input(Path("."), TINY_DESCRIPTOR, TINY_FITTING, numb_steps=numb_steps, **training)


def lcurve_rows(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line for line in path.read_text().splitlines(keepends=True) if line.strip() and not line.startswith("#")]


def last_step(path: Path) -> int:
    complete = [row for row in lcurve_rows(path) if row.endswith("\n")]
    return int(complete[-1].split()[0]) if complete else -1


class Run:
    """One ``mtcore train`` process; output into files (a full pipe would block it)."""

    def __init__(self, case: Path, n: int, env: dict):
        self.out, self.err = case / f"stdout-{n}", case / f"stderr-{n}"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(MTCORE + COMMAND, cwd=case, stdout=out, stderr=err,
                                         env={**os.environ, "OMP_NUM_THREADS": "1", **env})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        assert self.alive(), f"the run ended before it could be killed: {self.err.read_text()}"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def finish(self) -> str:
        self.proc.wait(timeout=300)
        assert self.proc.returncode == 0, self.err.read_text()
        return self.out.read_text()


def wait_until(run: Run, condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.alive(), f"the run ended before the kill moment: {run.err.read_text()}"
        assert time.monotonic() < deadline, "the kill moment never came"
        time.sleep(0.002)


def newest_intact_step(ckpts: Path) -> int:
    """What --restart auto must continue from: the newest checkpoint file that loads intact
    (everything in this folder belongs to the run under test)."""
    steps = []
    for path in ckpts.glob("model.ckpt-*.pt"):
        try:
            steps.append(int(read_checkpoint_file(path)["step"]))
        except MtcoreError:
            pass
    return max(steps, default=-1)


def temp_files(case: Path) -> list[str]:
    """Temporary files of interrupted writes (``.<name>.XXXXXXXX.tmp``, ``.<link>.<pid>.lnk``)."""
    return [p.name for folder in (case, case / "ckpts") for p in folder.iterdir()
            if p.name.startswith(".") and p.name.endswith((".tmp", ".lnk"))]


def assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}/{i}")
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where  # data orders and cursors: integers
    else:
        assert a == b, where


def test_five_sigkills_then_restart_auto_equal_an_uninterrupted_run(tmp_path):
    doc = tiny_input()
    reference, case = tmp_path / "reference", tmp_path / "case"
    for folder in (reference, case):
        folder.mkdir()
        write_input(folder, doc)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the OMP_NUM_THREADS=1 subprocesses (one process start less)
    try:
        Trainer(load_config(reference / "input.json"), reference, Console(file=io.StringIO())).run()
    finally:
        torch.set_num_threads(threads)

    rng = random.Random(KILL_SEED)
    # two of the five kills land inside a checkpoint save: one while the checkpoint's temporary file
    # is written, one while the index's is (the checkpoint is in place, but no index names it yet)
    during = dict(zip(rng.sample(range(1, 5), 2), ("checkpoint file", "index")))
    ckpts = case / "ckpts"
    resumed_from: list[int] = []
    leftover = 0  # temporary files the previous kill left
    for n in range(5):
        resume = newest_intact_step(ckpts)
        earlier_rows = [row for row in lcurve_rows(case / "lcurve.out") if int(row.split()[0]) <= resume]
        low, high = SAVE_FREQ + 1 + 9 * n, SAVE_FREQ + 9 * (n + 1)  # kill n falls in steps [low, high]
        mode = during.get(n, "random")
        if mode == "checkpoint file":
            saves = [s for s in range(max(low, resume + 1), high + 1) if s % SAVE_FREQ == 0]
            target = rng.choice(saves or [(resume // SAVE_FREQ + 1) * SAVE_FREQ])  # (a late previous kill)
            run = Run(case, n, {TEST_WRITE_DELAY_ENV: f"model.ckpt-{target}.pt:2"})
            wait_until(run, lambda: any(ckpts.glob(f".model.ckpt-{target}.pt.*.tmp")))
            run.kill()
            assert any(ckpts.glob(f".model.ckpt-{target}.pt.*.tmp")) and not (ckpts / f"model.ckpt-{target}.pt").exists()
        elif mode == "index":  # the first save of this run
            run = Run(case, n, {TEST_WRITE_DELAY_ENV: "checkpoint:2"})
            wait_until(run, lambda: any(ckpts.glob(".checkpoint.*.tmp")))
            run.kill()
            target = newest_intact_step(ckpts)
            assert target > resume and f"model.ckpt-{target}.pt" not in read_index(ckpts / "checkpoint")
        else:  # a random moment: past a random step of the window, then up to 30 ms more
            first = max(low, last_step(case / "lcurve.out") + 1)  # a row this run writes
            target = rng.randint(first, max(first, high))
            run = Run(case, n, {})
            wait_until(run, lambda: last_step(case / "lcurve.out") >= target)
            time.sleep(rng.uniform(0.0, 0.03))
            run.kill()
        out = run.out.read_text()
        print(f"kill {n}: {mode}, target step {target}, resumed from {resume}, lcurve at {last_step(case / 'lcurve.out')}, "
              f"newest complete now {newest_intact_step(ckpts)}")  # shown when the test fails
        if n == 0:
            assert "--restart auto: no checkpoint index 'ckpts/checkpoint'; starting a fresh run from input.json" in out
        else:  # continued from the newest complete checkpoint; nothing was set aside as a foreign run
            assert f"--restart auto: continuing from ckpts/model.ckpt-{resume}.pt (step {resume})" in out, out
            assert (f"removed {leftover} temporary file(s)" in out if leftover else "temporary file" not in out), out
            resumed_from.append(resume)
            rows = lcurve_rows(case / "lcurve.out")
            assert rows[: len(earlier_rows)] == earlier_rows
        assert not list(ckpts.glob("*.backup-*")) and not list(case.glob("*.backup-*"))
        assert (case / LOCK_NAME).exists()  # a SIGKILL leaves the lock; the next start takes it over
        leftover = len(temp_files(case))
        assert leftover or mode == "random"

    out = Run(case, 5, {}).finish()
    resume = int(re.search(r"continuing from ckpts/model\.ckpt-(\d+)\.pt", out).group(1))
    assert resume >= max(resumed_from) and "finished training" in out
    assert temp_files(case) == []

    # the learning curve and every kept checkpoint equal the uninterrupted run's
    assert (case / "lcurve.out").read_text() == (reference / "lcurve.out").read_text()
    assert [int(r.split()[0]) for r in lcurve_rows(case / "lcurve.out")] == list(range(0, STEPS + 1, DISP_FREQ))
    names = read_index(ckpts / "checkpoint")
    assert names == read_index(reference / "ckpts" / "checkpoint") == [f"model.ckpt-{s}.pt" for s in (60, 55, 50)]
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(p.name for p in (reference / "ckpts").iterdir())
    for name in names:
        mine, theirs = read_checkpoint_file(ckpts / name), read_checkpoint_file(reference / "ckpts" / name)
        assert mine["step"] == theirs["step"]
        for key in ("model", "optimizers", "datasets"):
            assert_same_tensors(mine[key], theirs[key], f"{name}:{key}")
        assert mine["rng"] == theirs["rng"] and torch.equal(mine["torch_rng"], theirs["torch_rng"])
    assert not (case / LOCK_NAME).exists()


# --restart auto: what it picks ----------------------------------------------------------------
def cli(args: list[str]):
    return CliRunner().invoke(app, args, env={"MTCORE_DEBUG": "", "OMP_NUM_THREADS": "1"})


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """A finished 10-step run in ckpts/ (checkpoints at 5 and 10), the working folder the cwd."""
    monkeypatch.chdir(tmp_path)
    write_input(tmp_path, tiny_input(numb_steps=10, validation_data=None))
    result = cli(COMMAND)
    assert result.exit_code == 0, result.output
    return tmp_path


def test_auto_without_an_input_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli(["train", "--restart", "auto"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --restart auto: give the input file too (its training/save_ckpt says where the checkpoints are)"]


def test_auto_says_when_the_input_differs_from_the_checkpoints_configuration(trained):
    doc = tiny_input(numb_steps=10, validation_data=None)
    doc["training"]["numb_steps"] = 20  # raised in the input: a re-run would end at once without a word
    write_input(trained, doc)
    result = cli(COMMAND)
    assert result.exit_code == 0, result.output
    assert "warning: input.json differs from the checkpoint's configuration, which the run continues with: " \
           "training/numb_steps 20 (checkpoint: 10); to train with the input's, start a new run" in result.output
    same = tiny_input(numb_steps=10, validation_data=None, seed=None)
    same["model"]["descriptor"]["sel"] = "auto"  # resolved at the start of a run: no difference
    write_input(trained, same)
    assert "differs" not in cli(COMMAND).output


def test_auto_with_init_model_starts_from_it_once_then_continues(trained, monkeypatch):
    """A fine-tuning job script: the same line starts from the source model and continues after."""
    source = trained / "ckpts" / "model.ckpt-10.pt"
    (trained / "ft").mkdir()
    monkeypatch.chdir(trained / "ft")
    write_input(trained / "ft", tiny_input(numb_steps=4, validation_data=None, save_freq=2))
    line = COMMAND + ["--init-model", str(source)]
    first = cli(line)
    assert first.exit_code == 0, first.output
    assert "starting a fresh run from input.json" in first.output and "not used" not in first.output
    started = read_checkpoint_file(trained / "ft" / "ckpts" / "model.ckpt-4.pt")
    assert started["init_model_path"] == str(source)
    (trained / "ft" / "ckpts" / "checkpoint").write_text("model.ckpt-2.pt\n")  # as if killed after step 2
    (trained / "ft" / "ckpts" / "model.ckpt-4.pt").unlink()
    again = cli(line)
    assert again.exit_code == 0, again.output
    assert "continuing from ckpts/model.ckpt-2.pt (step 2)" in again.output
    assert f"--init-model {source}: not used (the run continues from ckpts/model.ckpt-2.pt)" in again.output
    assert "differs" not in again.output
    resumed = read_checkpoint_file(trained / "ft" / "ckpts" / "model.ckpt-4.pt")
    assert_same_tensors(resumed["model"], started["model"], "model")


def test_auto_skips_a_torn_newest_checkpoint_naming_it(trained):
    newest = trained / "ckpts" / "model.ckpt-10.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # as if cut off (a copy, a full disk)
    with pytest.warns(UserWarning, match=r"model\.ckpt-10\.pt: cannot be read .*; skipped, using the previous checkpoint .*model\.ckpt-5\.pt"):
        state, why = newest_complete(trained / "ckpts", "model.ckpt")
    assert state["step"] == 5 and why == ""
    result = cli(COMMAND)
    assert result.exit_code == 0, result.output
    assert "continuing from ckpts/model.ckpt-5.pt (step 5)" in result.output
    assert read_checkpoint_file(newest)["step"] == 10  # trained again, written whole


def test_auto_takes_a_newer_checkpoint_of_the_same_run_missing_from_the_index(trained):
    ckpts = trained / "ckpts"
    (ckpts / "checkpoint").write_text("model.ckpt-5.pt\n")  # killed between the rename and the index
    assert newest_complete(ckpts, "model.ckpt")[0]["step"] == 10
    foreign = read_checkpoint_file(ckpts / "model.ckpt-10.pt")
    foreign["best"] = dict(foreign["best"], run_id="another run")
    foreign.pop("sha256")
    torch.save(foreign, ckpts / "model.ckpt-10.pt")  # another run's file: not taken, and kept
    assert newest_complete(ckpts, "model.ckpt")[0]["step"] == 5
    result = cli(COMMAND)
    assert result.exit_code == 0, result.output
    assert "continuing from ckpts/model.ckpt-5.pt (step 5)" in result.output
    backups = list(ckpts.glob("model.ckpt.backup-*/model.ckpt-10.pt"))
    assert len(backups) == 1 and torch.load(backups[0], weights_only=False)["best"]["run_id"] == "another run"


def test_auto_with_nothing_complete_starts_fresh_and_keeps_the_old_files(trained):
    ckpts = trained / "ckpts"
    for name in ("model.ckpt-5.pt", "model.ckpt-10.pt"):
        (ckpts / name).write_bytes(b"torn")
    assert newest_complete(ckpts, "model.ckpt")[0] is None
    result = cli(COMMAND)
    assert result.exit_code == 0, result.output
    assert "--restart auto: no complete checkpoint in ckpts/checkpoint" in result.output
    assert "starting a fresh run from input.json" in result.output
    assert sorted(p.name for p in ckpts.glob("model.ckpt.backup-1/*")) == [
        "checkpoint", "lcurve.out", "model.ckpt-10.pt", "model.ckpt-5.pt", "model.ckpt.pt"]
    assert read_checkpoint_file(ckpts / "model.ckpt-10.pt")["step"] == 10


def test_restart_folder_is_its_newest_complete_checkpoint(trained):
    (trained / "ckpts" / "model.ckpt-10.pt").write_bytes(b"torn")
    result = cli(["train", "--restart", "ckpts"])  # the CLI prints warnings as "warning: ..." lines
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: ckpts/model\.ckpt-10\.pt: unusable .*; using the previous checkpoint ckpts/model\.ckpt-5\.pt",
                     result.output)
    assert "lcurve.out: 3 line(s) after step 5 removed" in result.output
    assert read_checkpoint_file(trained / "ckpts" / "model.ckpt-10.pt")["step"] == 10


# the non-finite rule ----------------------------------------------------------------------------
def test_max_nonfinite_steps_is_configurable_and_the_stop_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = tiny_input(numb_steps=20, max_nonfinite_steps=3, validation_data=None, save_freq=4)
    trainer = Trainer(load_config(write_input(tmp_path, doc)), tmp_path)
    data = trainer.heads["default"].train
    real_sample = data.sample

    def sample(rng):
        batch = real_sample(rng)
        if trainer.step >= 4:  # from step 5 on every label is NaN
            batch.labels["energy"] = torch.full_like(batch.labels["energy"], np.nan)
        return batch

    data.sample = sample
    with pytest.warns(UserWarning, match=r"step 5, head 'default': non-finite loss"):
        with pytest.raises(MtcoreError, match=r"stopped at step 7: 3 steps in a row .*head 'default'.*last good checkpoint is .*model\.ckpt-4\.pt") as err:
            trainer.run()
    assert "\n" not in str(err.value)
    assert read_index(tmp_path / "ckpts" / "checkpoint") == ["model.ckpt-4.pt"]
    bad = tiny_input(max_nonfinite_steps=0)
    write_input(tmp_path, bad)
    result = cli(["train", "input.json"])
    assert result.exit_code == 1 and result.output.strip() == \
        "error: training/max_nonfinite_steps: must be an integer of at least 1, got 0"


# best models across a kill ----------------------------------------------------------------------
class Killed(BaseException):
    """Stands for SIGKILL at one point of the run."""


def test_a_best_file_newer_than_the_restart_checkpoint_changes_no_decision(tmp_path, monkeypatch):
    """Killed after a best file of step 8 was written but before checkpoint 8: the continued run
    keeps that file until it reaches step 8 again, and its best-model record (value, step, the
    patience count) and learning curve equal an uninterrupted run's."""
    from mtcore.train.checkpoint import CheckpointManager, load_checkpoint

    doc = tiny_input(numb_steps=12, disp_freq=1, save_freq=4, patience=50, save_ckpt="model.ckpt")
    quiet = Console(file=io.StringIO())
    full, killed = tmp_path / "full", tmp_path / "killed"
    for folder in (full, killed):
        folder.mkdir()
        write_input(folder, doc)
    Trainer(load_config(full / "input.json"), full, quiet).run()
    written = {}
    real_save, real_best = CheckpointManager.save, CheckpointManager.save_best

    def save(self, state, step):
        if step == 8:
            raise Killed
        return real_save(self, state, step)

    def save_best(self, state, head):
        written[state["step"]] = True
        return real_best(self, state, head)

    monkeypatch.setattr(CheckpointManager, "save", save)
    monkeypatch.setattr(CheckpointManager, "save_best", save_best)
    with pytest.raises(Killed):
        Trainer(load_config(killed / "input.json"), killed, quiet).run()
    monkeypatch.undo()
    newest_best = max(written)
    assert 4 < newest_best <= 8  # the case under test: a best file newer than checkpoint 4
    (killed / LOCK_NAME).unlink(missing_ok=True)  # a real kill leaves it (then taken over)
    Trainer(None, killed, quiet, restart=load_checkpoint(killed)).run()
    assert (killed / "lcurve.out").read_text() == (full / "lcurve.out").read_text()
    for step in (8, 12):  # the best-model record of each checkpoint (not the file digests: run ids differ)
        mine, theirs = (read_checkpoint_file(folder / f"model.ckpt-{step}.pt")["best"]["heads"]["default"]
                        for folder in (killed, full))
        assert {k: v for k, v in mine.items() if k != "sha256"} == {k: v for k, v in theirs.items() if k != "sha256"}, step
    assert read_checkpoint_file(killed / "model.best.default.pt")["best_of"]["step"] == \
        read_checkpoint_file(full / "model.best.default.pt")["best_of"]["step"]
