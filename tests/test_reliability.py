"""Training outputs survive misuse and kills: checkpoints in subfolders never touch another run's
files, one run per folder, restarts after kills are clean, corrupted checkpoints are noticed,
SIGTERM saves, non-finite steps are skipped and never saved, read-only folders fail at once."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from helpers import small_input, write_input
from mtcore.config import load_config
from mtcore.errors import MtcoreError
from mtcore.train.checkpoint import load_checkpoint, read_index
from mtcore.train.outdir import LOCK_NAME, FolderLock
from mtcore.train.trainer import MAX_NONFINITE_STEPS, Trainer

QUIET = Console(file=io.StringIO())
MTCORE = [sys.executable, "-m", "mtcore.cli"]
TINY_DESCRIPTOR = {"type": "se_e2_a", "sel": [46, 92], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8],
                   "axis_neuron": 2, "seed": 1, "precision": "float64"}
TINY_FITTING = {"type": "ener", "neuron": [8, 8], "seed": 2, "precision": "float64"}


def tiny_input(workdir: Path, numb_steps: int = 6, **training) -> dict:
    training.setdefault("disp_freq", 1)
    training.setdefault("save_freq", 2)
    return small_input(workdir, TINY_DESCRIPTOR, TINY_FITTING, numb_steps=numb_steps, **training)


def make_trainer(workdir: Path, doc: dict, **kwargs) -> Trainer:
    workdir.mkdir(parents=True, exist_ok=True)
    return Trainer(load_config(write_input(workdir, doc)), workdir, QUIET, **kwargs)


def lcurve_steps(path: Path) -> list[int]:
    return [int(line.split()[0]) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())


# 1. save_ckpt in a subfolder ------------------------------------------------------------------
@pytest.mark.parametrize("folder_exists", [True, False])
def test_subfolder_checkpoints_never_delete_an_earlier_runs_files(tmp_path, folder_exists):
    """Regression: a run with save_ckpt ckpts/model.ckpt and max_ckpt_keep 1 deleted an earlier
    run's ./model.ckpt-*.pt in the parent folder (and without ckpts/ it was a traceback)."""
    make_trainer(tmp_path, tiny_input(tmp_path, numb_steps=4, disp_freq=4)).run()
    if folder_exists:
        (tmp_path / "ckpts").mkdir()
    earlier = {p.name: p.read_bytes() for p in tmp_path.glob("model.ckpt-*.pt")}
    assert sorted(earlier) == ["model.ckpt-2.pt", "model.ckpt-4.pt"]
    earlier_index = (tmp_path / "checkpoint").read_text()

    doc = tiny_input(tmp_path, numb_steps=6, disp_freq=6, save_ckpt="ckpts/model.ckpt", max_ckpt_keep=1)
    make_trainer(tmp_path, doc).run()
    for name, data in earlier.items():  # untouched, byte for byte
        assert (tmp_path / name).read_bytes() == data, name
    assert (tmp_path / "checkpoint").read_text() == earlier_index
    ckpts = tmp_path / "ckpts"
    assert sorted(p.name for p in ckpts.glob("model.ckpt-*.pt")) == ["model.ckpt-6.pt"]  # max_ckpt_keep 1
    assert read_index(ckpts / "checkpoint") == ["model.ckpt-6.pt"]
    assert os.readlink(ckpts / "model.ckpt.pt") == "model.ckpt-6.pt"
    # freeze -c . and --restart . find them through out.json's save_ckpt
    found = load_checkpoint(tmp_path)
    assert found["step"] == 6 and Path(found["path"]).parent == ckpts


def test_pruning_keeps_max_ckpt_keep_and_moves_a_foreign_file_aside(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "model.ckpt-4.pt").write_bytes(b"someone else's file")  # not in any index of this run
    doc = tiny_input(tmp_path, numb_steps=8, disp_freq=8, save_freq=2, save_ckpt="ckpts/model.ckpt", max_ckpt_keep=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, doc).run()
    backups = list(ckpts.glob("model.ckpt.backup-*/model.ckpt-4.pt"))
    assert len(backups) == 1 and backups[0].read_bytes() == b"someone else's file"
    assert read_index(ckpts / "checkpoint") == ["model.ckpt-8.pt", "model.ckpt-6.pt"]
    assert sorted(p.name for p in ckpts.glob("model.ckpt-*.pt")) == ["model.ckpt-6.pt", "model.ckpt-8.pt"]


def test_restart_prunes_only_checkpoints_of_the_run_it_continues(tmp_path):
    """An index naming other files (hand-edited, another tool's) never makes pruning delete them."""
    make_trainer(tmp_path, tiny_input(tmp_path, numb_steps=4, disp_freq=4, save_freq=2, max_ckpt_keep=1)).run()
    (tmp_path / "user.pt").write_bytes(b"mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.ckpt-1.pt").write_bytes(b"mine too")
    (tmp_path / "checkpoint").write_text("model.ckpt-4.pt\nuser.pt\nsub/model.ckpt-1.pt\n")
    state = load_checkpoint(tmp_path)
    state["config"]["training"]["numb_steps"] = 8  # continue further
    Trainer(None, tmp_path, QUIET, restart=state).run()
    assert read_index(tmp_path / "checkpoint") == ["model.ckpt-8.pt"]
    assert (tmp_path / "user.pt").read_bytes() == b"mine" and (tmp_path / "sub" / "model.ckpt-1.pt").read_bytes() == b"mine too"
    assert sorted(p.name for p in tmp_path.glob("model.ckpt-*.pt")) == ["model.ckpt-8.pt"]


# 2. one run per folder -------------------------------------------------------------------------
def plant_lock(folder: Path, pid: int, host: str = None) -> None:
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                "since": "2026-01-01 00:00:00 UTC"}))


def test_a_live_lock_refuses_naming_the_other_run(tmp_path):
    trainer = make_trainer(tmp_path, tiny_input(tmp_path, numb_steps=2))
    plant_lock(tmp_path, os.getppid())
    with pytest.raises(MtcoreError, match=rf"pid {os.getppid()} on {socket.gethostname()} since 2026-01-01") as err:
        trainer.run()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "lcurve.out").exists() and not list(tmp_path.glob("model.ckpt*"))
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getppid()  # not ours to remove


def test_a_stale_lock_is_taken_over_and_the_lock_released_at_exit(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trainer = make_trainer(tmp_path, tiny_input(tmp_path, numb_steps=2))
    plant_lock(tmp_path, dead.pid)
    with pytest.warns(UserWarning, match=rf"taking over the lock of a run that is gone \(pid {dead.pid}"):
        trainer.run()
    assert load_checkpoint(tmp_path)["step"] == 2
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_is_reentrant_in_one_process_and_released_on_error(tmp_path):
    with FolderLock(tmp_path):
        with FolderLock(tmp_path):
            pass
        assert (tmp_path / LOCK_NAME).exists()
        with pytest.raises(RuntimeError):
            with FolderLock(tmp_path / "."):
                raise RuntimeError("boom")
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


# 3. after kills --------------------------------------------------------------------------------
def test_restart_after_a_kill_keeps_each_lcurve_row_once(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    doc = tiny_input(tmp_path, numb_steps=6, disp_freq=1, save_freq=3)
    make_trainer(full, doc).run()
    make_trainer(killed, doc).run()
    # as if killed after step 5: the last checkpoint is step 3, lcurve has rows up to 5 and a torn line
    lines = (full / "lcurve.out").read_text().splitlines(keepends=True)
    (killed / "lcurve.out").write_text("".join(lines[:-1]) + lines[-1][:9])
    (killed / "model.ckpt-6.pt").unlink()
    (killed / "checkpoint").write_text("model.ckpt-3.pt\n")
    state = load_checkpoint(killed / "model.ckpt-3.pt")
    Trainer(None, killed, QUIET, restart=state).run()
    assert lcurve_steps(killed / "lcurve.out") == [0, 1, 2, 3, 4, 5, 6]
    assert (killed / "lcurve.out").read_text() == (full / "lcurve.out").read_text()  # header once, same rows


def test_leftover_temp_files_of_our_own_names_are_removed(tmp_path):
    doc = tiny_input(tmp_path, numb_steps=2, disp_freq=2)
    make_trainer(tmp_path, doc).run()
    ours = [".model.ckpt-4.pt.ab12cd_3.tmp", ".checkpoint.zz99yy88.tmp", ".model.ckpt.pt.12345.lnk",
            ".lcurve.out.q1w2e3r4.tmp", ".out.json.abcdefgh.tmp"]
    users = [".mydata.abcdefgh.tmp", "notes.tmp", ".other.ckpt-4.pt.ab12cd34.tmp"]
    for name in ours + users:
        (tmp_path / name).write_text("x")
    Trainer(None, tmp_path, QUIET, restart=load_checkpoint(tmp_path)).run()
    assert [n for n in ours if (tmp_path / n).exists()] == []
    assert [n for n in users if (tmp_path / n).exists()] == users


class Killed(BaseException):
    """Stands for SIGKILL at one point of a checkpoint save."""


@pytest.mark.parametrize("stage", ["atomic_text", "_atomic_symlink", "prune"])
def test_a_kill_during_a_save_never_leaves_an_index_naming_a_missing_file(tmp_path, monkeypatch, stage):
    import mtcore.train.checkpoint as ckpt

    doc = tiny_input(tmp_path, numb_steps=6, disp_freq=6, save_freq=2, max_ckpt_keep=1)
    trainer = make_trainer(tmp_path, doc)
    real = {"atomic_text": ckpt.atomic_text, "_atomic_symlink": ckpt._atomic_symlink}

    def killing(name):
        def wrapped(*args, **kwargs):
            if trainer.step == 4:
                raise Killed(name)
            return real[name](*args, **kwargs)
        return wrapped

    if stage == "prune":
        real_unlink = Path.unlink

        def unlink(self, *args, **kwargs):
            if trainer.step == 4 and self.name == "model.ckpt-2.pt":
                raise Killed("prune")
            return real_unlink(self, *args, **kwargs)

        monkeypatch.setattr(Path, "unlink", unlink)
    else:
        monkeypatch.setattr(ckpt, stage, killing(stage))
    with pytest.raises(Killed):
        trainer.run()
    monkeypatch.undo()
    names = read_index(tmp_path / "checkpoint")
    assert names and all((tmp_path / n).is_file() for n in names)
    assert (tmp_path / "model.ckpt.pt").resolve().is_file()
    assert load_checkpoint(tmp_path / "model.ckpt.pt")["step"] in (2, 4)
    (tmp_path / LOCK_NAME).unlink(missing_ok=True)  # a real kill leaves the lock: stale, taken over
    Trainer(None, tmp_path, QUIET, restart=load_checkpoint(tmp_path)).run()
    assert read_index(tmp_path / "checkpoint") == ["model.ckpt-6.pt"]
    assert load_checkpoint(tmp_path)["step"] == 6


# 4. checksums -----------------------------------------------------------------------------------
def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path):
    make_trainer(tmp_path, tiny_input(tmp_path, numb_steps=4, disp_freq=4, save_freq=2)).run()
    newest = tmp_path / "model.ckpt-4.pt"
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle - 2048 : middle + 2048] = bytes(4096)
    newest.write_bytes(bytes(data))
    for source in (tmp_path, newest, tmp_path / "model.ckpt.pt"):
        with pytest.warns(UserWarning, match=r"model\.ckpt-4\.pt\)?: unusable .*previous checkpoint .*model\.ckpt-2\.pt"):
            assert load_checkpoint(source)["step"] == 2
    older = tmp_path / "model.ckpt-2.pt"
    older.write_bytes(older.read_bytes()[:1000])
    with pytest.raises(MtcoreError, match="no intact checkpoint") as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


def test_the_checksum_catches_a_changed_value_and_old_checkpoints_still_load(tmp_path):
    make_trainer(tmp_path, tiny_input(tmp_path, numb_steps=2, disp_freq=2)).run()
    path = tmp_path / "model.ckpt-2.pt"
    state = torch.load(path, weights_only=False)
    assert len(state["sha256"]) == 64
    key = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel())
    tampered = dict(state, model=dict(state["model"]))
    tampered["model"][key] = state["model"][key].clone()
    tampered["model"][key].view(-1)[0] += 1e-12
    torch.save(tampered, tmp_path / "tampered.pt")
    with pytest.raises(MtcoreError, match="checksum mismatch"):
        load_checkpoint(tmp_path / "tampered.pt")
    legacy = {k: v for k, v in state.items() if k != "sha256"}
    torch.save(legacy, tmp_path / "legacy.pt")
    assert load_checkpoint(tmp_path / "legacy.pt")["step"] == 2


# 5. SIGTERM, and a second run in the same folder (real processes) -------------------------------
def _start(args, cwd: Path) -> subprocess.Popen:
    """Output goes to files: a full pipe would block the run we are waiting for."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    n = len(list(cwd.glob("stdout-*")))
    out, err = open(cwd / f"stdout-{n}", "w"), open(cwd / f"stderr-{n}", "w")
    proc = subprocess.Popen(MTCORE + args, cwd=cwd, stdout=out, stderr=err, env=env)
    proc.files = (Path(out.name), Path(err.name))
    out.close()
    err.close()
    return proc


def _terminate_after(proc: subprocess.Popen, lcurve: Path, past_step: int, timeout: float = 120) -> tuple[int, str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if lcurve.is_file() and any(s > past_step for s in lcurve_steps(lcurve)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.files[1].read_text()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    return proc.returncode, proc.files[0].read_text(), proc.files[1].read_text()


def test_sigterm_saves_the_step_and_restart_continues_while_a_second_run_is_refused(tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    write_input(case, tiny_input(tmp_path, numb_steps=100000, disp_freq=1, save_freq=100000))
    first = _start(["train", "input.json"], case)
    deadline = time.monotonic() + 60
    while not (case / "lcurve.out").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(MTCORE + ["train", "input.json"], cwd=case, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert f"pid {first.pid} on {socket.gethostname()} since" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr

    rc, out, err = _terminate_after(first, case / "lcurve.out", 1)
    assert rc == 143, err
    assert "interrupted (SIGTERM)" in out
    steps = lcurve_steps(case / "lcurve.out")
    stopped = load_checkpoint(case)["step"]
    assert stopped == steps[-1] >= 2 and steps == list(range(stopped + 1))
    assert not (case / LOCK_NAME).exists()

    resumed = _start(["train", "--restart", "."], case)
    rc, out, err = _terminate_after(resumed, case / "lcurve.out", stopped + 1)
    assert rc == 143, err
    steps = lcurve_steps(case / "lcurve.out")
    assert steps == list(range(steps[-1] + 1)) and steps[-1] > stopped + 1  # continued, no row twice
    assert load_checkpoint(case)["step"] == steps[-1]


# 6. non-finite steps ----------------------------------------------------------------------------
def test_a_nan_label_batch_is_skipped_with_a_warning(tmp_path):
    trainer = make_trainer(tmp_path, tiny_input(tmp_path, numb_steps=6, disp_freq=6, save_freq=3))
    data = trainer.heads["default"].train
    real_sample, real_step = data.sample, trainer.train_step
    snapshots = {}

    def sample(rng):
        batch = real_sample(rng)
        if trainer.step == 2:  # the batch of step 3
            batch.labels["energy"] = torch.full_like(batch.labels["energy"], float("nan"))
        return batch

    def step(head):
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        updated = real_step(head)
        snapshots[trainer.step + 1] = (updated, all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items()))
        return updated

    data.sample, trainer.train_step = sample, step
    with pytest.warns(UserWarning, match=r"step 3, head 'default': non-finite loss"):
        trainer.run()
    assert snapshots[3] == (False, True)  # skipped: nothing moved
    assert snapshots[2] == (True, False) and snapshots[4] == (True, False)
    assert all_finite(load_checkpoint(tmp_path)) and load_checkpoint(tmp_path)["step"] == 6


def test_a_nan_gradient_is_skipped(tmp_path):
    trainer = make_trainer(tmp_path, tiny_input(tmp_path, numb_steps=3, disp_freq=3, save_freq=3))
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    param.register_hook(lambda g: g * float("nan") if trainer.step == 1 else g)
    with pytest.warns(UserWarning, match=r"step 2, head 'default': non-finite gradient"):
        trainer.run()
    assert all_finite(load_checkpoint(tmp_path))


def test_only_nan_labels_stop_training_without_a_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, tiny_input(tmp_path, numb_steps=20, disp_freq=20, save_freq=100))
    for system in trainer.heads["default"].train.systems:
        system.labels["energy"] = np.full_like(system.labels["energy"], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MtcoreError, match=rf"stopped at step {MAX_NONFINITE_STEPS}: {MAX_NONFINITE_STEPS} steps in a row") as err:
            trainer.run()
    assert "\n" not in str(err.value) and "'default'" in str(err.value)
    assert not list(tmp_path.glob("model.ckpt*")) and not (tmp_path / LOCK_NAME).exists()


def test_non_finite_parameters_are_never_saved_over_a_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, tiny_input(tmp_path, numb_steps=6, disp_freq=6, save_freq=2))
    real_step = trainer.train_step

    def step(head):
        updated = real_step(head)
        if trainer.step == 2:  # becomes step 3
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("inf")
        return updated

    trainer.train_step = step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MtcoreError, match=r"step 4: .* is not finite; no checkpoint written .*model\.ckpt-2\.pt"):
            trainer.run()
    assert read_index(tmp_path / "checkpoint") == ["model.ckpt-2.pt"]
    assert not (tmp_path / "model.ckpt-4.pt").exists()
    assert all_finite(load_checkpoint(tmp_path))


# 7. read-only output folder ---------------------------------------------------------------------
def _unprivileged() -> list[str]:
    """A command prefix under which a chmod 0555 folder really refuses writes. As root, drop the
    capabilities that bypass file permissions (setpriv); skip only when that is impossible."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a chmod 0555 folder cannot be made to refuse writes")
    return [setpriv, "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def test_read_only_folder_fails_before_loading_anything(tmp_path):
    prefix = _unprivileged()
    folder = Path(tempfile.mkdtemp(dir=tmp_path)) / "ro"
    folder.mkdir()
    write_input(folder, tiny_input(tmp_path, numb_steps=2))
    folder.chmod(0o555)
    try:
        probe = subprocess.run(prefix + [sys.executable, "-c", f"open({str(folder / 'x')!r}, 'w')"], capture_output=True)
        if probe.returncode == 0:
            pytest.skip("this file system lets the test write into a chmod 0555 folder")
        # the three commands in one process (one torch import), stderr of each separated
        script = (
            "import sys\nfrom mtcore.cli import app\n"
            "for args in (['train', 'input.json'], ['train', '--restart', 'model.ckpt.pt'], ['freeze']):\n"
            "    try:\n        app(args)\n    except SystemExit as exc:\n"
            "        sys.stderr.flush(); sys.stderr.write(f'@@ exit {exc.code}\\n'); sys.stderr.flush()\n"
        )
        done = subprocess.run(prefix + [sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, timeout=120)
        parts = re.split(r"@@ exit (\S+)\n", done.stderr)
        assert len(parts) == 7, done.stderr
        for text, code in zip(parts[0:6:2], parts[1:6:2]):
            assert code == "1", done.stderr
            lines = text.strip().splitlines()
            assert len(lines) == 1 and str(folder) in lines[0] and "not writable" in lines[0], done.stderr
        assert sorted(p.name for p in folder.iterdir()) == ["input.json"]
    finally:
        folder.chmod(0o755)


def test_read_only_checkpoint_subfolder_fails_before_training(tmp_path, monkeypatch):
    """In process: the probe is a real write, so a folder that refuses it stops the run."""
    import mtcore.train.outdir as outdir

    trainer = make_trainer(tmp_path, tiny_input(tmp_path, numb_steps=2, save_ckpt="ckpts/model.ckpt"))
    real_open = os.open

    def refusing(path, flags, *args):
        if "ckpts" in str(path) and outdir.PROBE_PREFIX in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(outdir.os, "open", refusing)
    with pytest.raises(MtcoreError, match=r"ckpts: the output folder is not writable"):
        trainer.run()
    assert not (tmp_path / "lcurve.out").exists()
