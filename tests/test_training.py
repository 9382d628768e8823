"""Training end to end (in-process): the error goes down, runs are reproducible, checkpoints
restart exactly, --init-model starts from the weights, nothing of an earlier run is lost."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from helpers import WATER, small_input, write_input
from mtcore.config import load_config
from mtcore.train.checkpoint import load_checkpoint
from mtcore.train.trainer import Trainer, labels_on

QUIET = Console(file=io.StringIO())


def make_trainer(workdir: Path, doc: dict, **kwargs) -> Trainer:
    return Trainer(load_config(write_input(workdir, doc)), workdir, QUIET, **kwargs)


def fixed_validation_loss(trainer: Trainer, head: str = "default", nframes: int = 6) -> float:
    """The head's loss at the starting prefactors on the same validation frames every time."""
    runtime = trainer.heads[head]
    total = 0.0
    for frame in range(nframes):
        batch = runtime.valid.batch(0, np.array([frame]))
        pred = trainer._predict(head, batch, create_graph=False)
        loss, _ = runtime.loss(pred, labels_on(batch, trainer.device), batch.find, batch.atype, 1.0)
        total += float(loss.detach())
    return total / nframes


def lcurve_rows(path: Path) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in path.read_text().splitlines() if not line.startswith("#")]


def test_fifty_steps_lower_the_validation_loss(tmp_path):
    doc = small_input(tmp_path, numb_steps=50, train_systems=[str(WATER / f"data_{i}") for i in range(3)])
    doc["learning_rate"] = {"start_lr": 5e-3, "stop_lr": 1e-3, "decay_steps": 10}
    trainer = make_trainer(tmp_path, doc)
    before = fixed_validation_loss(trainer)
    trainer.run()
    after = fixed_validation_loss(trainer)
    assert after < 0.5 * before, (before, after)
    rows = lcurve_rows(tmp_path / "lcurve.out")
    assert [r[0] for r in rows] == [0, 10, 20, 30, 40, 50]


def test_same_seed_same_run(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        make_trainer(tmp_path / name, small_input(tmp_path, numb_steps=10, disp_freq=5)).run()
    assert (tmp_path / "a" / "lcurve.out").read_text() == (tmp_path / "b" / "lcurve.out").read_text()


def test_restart_reproduces_the_uninterrupted_run(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir()
    resumed.mkdir()
    doc = small_input(tmp_path, numb_steps=20, disp_freq=5, save_freq=10)
    make_trainer(full, doc).run()
    shutil.copy(full / "model.ckpt-10.pt", resumed / "start.pt")
    state = load_checkpoint(resumed / "start.pt")
    assert state["step"] == 10
    Trainer(None, resumed, QUIET, restart=state).run()
    reference = [r for r in lcurve_rows(full / "lcurve.out") if r[0] > 10]
    assert lcurve_rows(resumed / "lcurve.out") == reference
    a, b = load_checkpoint(full / "model.ckpt-20.pt"), load_checkpoint(resumed / "model.ckpt-20.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_restart_uses_the_stored_configuration(tmp_path):
    doc = small_input(tmp_path, numb_steps=10, save_freq=5)
    make_trainer(tmp_path, doc).run()
    state = load_checkpoint(tmp_path / "model.ckpt-5.pt")
    (tmp_path / "input.json").write_text("{ not even json")  # whatever lies beside it is not read
    trainer = Trainer(None, tmp_path / "..", QUIET, restart=state)
    assert trainer.step == 5 and trainer.config.training["numb_steps"] == 10


def test_init_model_starts_from_the_checkpoint_weights(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    make_trainer(first, small_input(tmp_path, numb_steps=10)).run()
    state = load_checkpoint(first / "model.ckpt.pt")
    second = tmp_path / "second"
    second.mkdir()
    trainer = make_trainer(second, small_input(tmp_path, numb_steps=5), init_model=state)
    assert trainer.step == 0
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key


def test_checkpoints_are_kept_atomic_and_never_overwrite_an_earlier_run(tmp_path):
    doc = small_input(tmp_path, numb_steps=12, save_freq=3, disp_freq=6, max_ckpt_keep=2)
    make_trainer(tmp_path, doc).run()
    names = sorted(p.name for p in tmp_path.glob("model.ckpt*"))
    assert names == ["model.ckpt-12.pt", "model.ckpt-9.pt", "model.ckpt.pt"]
    assert os.readlink(tmp_path / "model.ckpt.pt") == "model.ckpt-12.pt"
    assert (tmp_path / "checkpoint").read_text().split() == ["model.ckpt-12.pt", "model.ckpt-9.pt"]
    assert not list(tmp_path.glob(".*tmp"))
    first_run = (tmp_path / "model.ckpt-12.pt").read_bytes()
    make_trainer(tmp_path, doc).run()
    backup = tmp_path / "model.ckpt.backup-1"
    assert (backup / "model.ckpt-12.pt").read_bytes() == first_run
    assert (backup / "lcurve.out").is_file()


def test_final_checkpoint_even_off_the_save_grid(tmp_path):
    make_trainer(tmp_path, small_input(tmp_path, numb_steps=7, save_freq=5, disp_freq=100)).run()
    assert load_checkpoint(tmp_path / "model.ckpt.pt")["step"] == 7
    assert (tmp_path / "model.ckpt-5.pt").is_file()


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    import signal

    trainer = make_trainer(tmp_path, small_input(tmp_path, numb_steps=10, save_freq=100, disp_freq=5))
    original = trainer.train_step

    def step_then_interrupt(head):
        original(head)
        if trainer.step == 2:  # becomes step 3 after this call returns
            os.kill(os.getpid(), signal.SIGINT)

    trainer.train_step = step_then_interrupt
    summary = trainer.run()
    assert summary["interrupted"] and trainer.step == 3
    state = load_checkpoint(tmp_path / "model.ckpt.pt")
    assert state["step"] == 3
    resumed = Trainer(None, tmp_path, QUIET, restart=state)
    assert resumed.run()["steps"] == 7
    assert load_checkpoint(tmp_path / "model.ckpt.pt")["step"] == 10
