"""Best model per head (issue 15): a fixed set of validation frames evaluated every
validation_freq steps decides model.best.<head>.pt; freeze --best; patience; --restart keeps the
comparison; nothing someone else wrote is overwritten.

Where the question is the bookkeeping (written when the metric improves and not otherwise, when a
head stops), the metric is scripted per step, so the expected steps are known in advance; where
the question is the content (the file holds the model of its step), real models are compared.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from helpers import multi_task_input, predict, small_input, water_frame, write_input
from mtcore.cli import app
from mtcore.config import load_config
from mtcore.errors import MtcoreError
from mtcore.freeze import freeze_best, model_from_checkpoint
from mtcore.infer import load as load_frozen
from mtcore.train.best import default_metric, fixed_frames, pooled_rmse
from mtcore.train.checkpoint import CheckpointManager, load_checkpoint, read_checkpoint_file
from mtcore.train.trainer import Trainer

TINY_DESCRIPTOR = {"type": "se_e2_a", "sel": [46, 92], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8],
                   "axis_neuron": 2, "seed": 1, "precision": "float64"}
TINY_FITTING = {"type": "ener", "neuron": [8, 8], "seed": 2, "precision": "float64"}


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    yield


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200), out


def single(tmp_path: Path, numb_steps: int = 8, **training) -> dict:
    training.setdefault("disp_freq", numb_steps)
    training.setdefault("save_freq", 2)
    training.setdefault("validation_freq", 2)
    training.setdefault("validation_frames", 2)
    training.setdefault("max_ckpt_keep", 50)
    return small_input(tmp_path, TINY_DESCRIPTOR, TINY_FITTING, numb_steps=numb_steps, **training)


def multi(tmp_path: Path, numb_steps: int = 12, **training) -> dict:
    training.setdefault("disp_freq", numb_steps)
    training.setdefault("save_freq", 4)
    training.setdefault("validation_freq", 2)
    training.setdefault("validation_frames", 2)
    doc = multi_task_input(tmp_path, numb_steps=numb_steps, descriptor=TINY_DESCRIPTOR, layer_name=[], **training)
    for head in doc["model"]["fitting_net_dict"].values():
        head.update(neuron=[8, 8])
        head.pop("layer_name")
    return doc


def trainer(workdir: Path, doc: dict, **kwargs) -> Trainer:
    workdir.mkdir(parents=True, exist_ok=True)
    return Trainer(load_config(write_input(workdir, doc)), workdir, kwargs.pop("console", console()[0]), **kwargs)


def script(monkeypatch, values: dict[str, dict[int, float]]) -> list[tuple[str, int]]:
    """Replace the fixed-set evaluation by scripted rmse_f values per head and step; returns the
    list of (head, step) whose best file was written, in order."""
    written: list[tuple[str, int]] = []

    def fake(self, head):
        return {"rmse_f": values[head].get(self.step, math.inf)}

    real_save = CheckpointManager.save_best

    def save_best(self, state, head):
        written.append((head, state["best_of"]["step"]))
        return real_save(self, state, head)

    monkeypatch.setattr(Trainer, "fixed_set_metrics", fake)
    monkeypatch.setattr(CheckpointManager, "save_best", save_best)
    return written


def same_model(a: dict, b: dict, head: str, tol: float = 1e-12) -> None:
    """The models of two checkpoint states predict the same energy and forces on a water frame."""
    coord, atype, box = water_frame(1)
    ma, _, _ = model_from_checkpoint(a)
    mb, _, _ = model_from_checkpoint(b)
    pa, pb = predict(ma, head, coord, atype, box), predict(mb, head, coord, atype, box)
    for key in ("energy", "force"):
        assert float((pa[key] - pb[key]).detach().abs().max()) <= tol, key


# 1. written when the metric improves, and not otherwise --------------------------------------
def test_best_file_is_written_exactly_when_the_metric_improves(tmp_path, monkeypatch):
    values = {"default": {0: 5.0, 2: 3.0, 4: 4.0, 6: 2.0, 8: 2.0, 10: 6.0}}  # 8 equals, not better
    written = script(monkeypatch, values)
    t = trainer(tmp_path, single(tmp_path, numb_steps=10))
    summary = t.run()
    assert written == [("default", 0), ("default", 2), ("default", 6)]
    best = read_checkpoint_file(tmp_path / "model.best.default.pt")
    assert best["step"] == 6 and best["best_of"]["step"] == 6 and best["best_of"]["value"] == 2.0
    assert best["best_of"]["metric"] == "rmse_f" and "optimizers" not in best
    assert summary["best"]["default"]["step"] == 6 and summary["best"]["default"]["since"] == 2
    # the file holds the model at step 6: same predictions as the periodic checkpoint of step 6
    same_model(best, load_checkpoint(tmp_path / "model.ckpt-6.pt"), "default")
    # ... and not the model of step 8 (training moved it)
    later = model_from_checkpoint(load_checkpoint(tmp_path / "model.ckpt-8.pt"))[0]
    coord, atype, box = water_frame(1)
    diff = predict(model_from_checkpoint(best)[0], "default", coord, atype, box)["energy"] - predict(later, "default", coord, atype, box)["energy"]
    assert float(diff.detach().abs().max()) > 1e-9


def test_real_metrics_pick_the_lowest_evaluation_and_the_file_is_that_model(tmp_path, monkeypatch):
    seen: list[tuple[int, float]] = []
    real = Trainer.fixed_set_metrics

    def recording(self, head):
        metrics = real(self, head)
        seen.append((self.step, metrics["rmse_f"]))
        return metrics

    monkeypatch.setattr(Trainer, "fixed_set_metrics", recording)
    t = trainer(tmp_path, single(tmp_path, numb_steps=8, validation_freq=2, save_freq=2))
    t.run()
    assert [s for s, _ in seen] == [0, 2, 4, 6, 8]
    step, value = min(seen, key=lambda sv: sv[1])
    best = read_checkpoint_file(tmp_path / "model.best.default.pt")
    assert best["best_of"]["step"] == step and abs(best["best_of"]["value"] - value) <= 1e-12 * value
    if step > 0:
        same_model(best, load_checkpoint(tmp_path / f"model.ckpt-{step}.pt"), "default")
    # the metric is a pooled RMSE over the fixed frames: recompute it from the file's model
    monkeypatch.setattr(Trainer, "fixed_set_metrics", real)
    again = trainer(tmp_path / "again", single(tmp_path, numb_steps=8))  # same seed: same fixed frames
    again.model.load_state_dict(best["model"])
    again.step = step
    assert abs(real(again, "default")["rmse_f"] - value) <= 1e-10 * value


def test_fixed_frames_are_fixed_seeded_and_do_not_move_training(tmp_path):
    t = trainer(tmp_path, single(tmp_path, numb_steps=0))
    valid = t.heads["default"].valid
    a, total = fixed_frames(valid, 5, 7, "default")
    b, _ = fixed_frames(valid, 5, 7, "default")
    assert total == 80 and sum(len(f) for _, f in a) == 5
    assert [list(f) for _, f in a] == [list(f) for _, f in b]
    other, _ = fixed_frames(valid, 5, 7, "other_head")
    assert [list(f) for _, f in a] != [list(f) for _, f in other]
    every, _ = fixed_frames(valid, None, 7, "default")
    assert sorted(int(x) for _, f in every for x in f) == list(range(80))
    # default: as many frames as the display's numb_btch validation batches (its cost), fixed
    doc = single(tmp_path / "d", numb_steps=0)
    del doc["training"]["validation_frames"]
    doc["training"]["validation_data"].update(numb_btch=3, batch_size=2)
    assert trainer(tmp_path / "d", doc).best.heads["default"].nframes == 6
    # pooled RMSE: exact for per-component errors (weights are atoms); NaN (no label) is skipped
    pooled = pooled_rmse([({"rmse_f": 1.0, "mae_x": 1.0}, 1.0), ({"rmse_f": 3.0, "mae_x": 3.0}, 3.0),
                          ({"rmse_f": math.nan, "mae_x": math.nan}, 9.0)])
    assert pooled["rmse_f"] == pytest.approx(math.sqrt(28 / 4), rel=1e-14)
    assert pooled["mae_x"] == pytest.approx(10 / 4, rel=1e-14)  # a mean absolute error pools linearly
    assert [default_metric(n) for n in (["rmse", "rmse_e", "rmse_f"], ["rmse", "rmse_lc", "rmse_gl"], ["rmse", "rmse_lc"],
                                        ["rmse", "rmse_gap", "mae_gap"], ["rmse", "mae"])] == ["rmse_f", "rmse_gl", "rmse_lc", "rmse_gap", "rmse"]
    # validating more or less often never changes the training itself (its own random stream)
    finals = []
    for freq, sub in ((1, "a"), (3, "b")):
        trainer(tmp_path / sub, single(tmp_path / sub, numb_steps=6, validation_freq=freq, save_freq=6)).run()
        finals.append(load_checkpoint(tmp_path / sub / "model.ckpt-6.pt")["model"])
    for key, value in finals[0].items():
        if value.is_floating_point() and value.numel():
            assert float((value - finals[1][key]).abs().max()) <= 1e-12, key


# 2. freeze --best --------------------------------------------------------------------------------
def test_freeze_best_writes_each_head_from_its_own_best_model(tmp_path, monkeypatch):
    values = {"ccsd": {0: 3.0, 2: 1.0, 4: 2.0, 6: 2.0, 8: 2.0}, "wb97m": {0: 3.0, 2: 2.0, 4: 2.0, 6: 1.0, 8: 1.5}}
    script(monkeypatch, values)
    doc = multi(tmp_path, numb_steps=8, save_freq=2, max_ckpt_keep=10)
    doc["training"]["data_dict"]["wb97m"]["validation_freq"] = 2
    trainer(tmp_path, doc).run()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["freeze", "--best", "-c", "."], env={"MTCORE_DEBUG": ""})
    assert result.exit_code == 0, result.stdout
    assert "frozen_model_ccsd.pth (head ccsd: best rmse_f 1.000e+00 at step 2)" in result.stdout
    assert "frozen_model_wb97m.pth (head wb97m: best rmse_f 1.000e+00 at step 6)" in result.stdout
    coord, atype, box = water_frame(2)
    for head, step in (("ccsd", 2), ("wb97m", 6)):
        frozen = load_frozen(tmp_path / f"frozen_model_{head}.pth")
        got = frozen.evaluate(coord.numpy(), box.numpy(), atype.numpy())
        reference, _, _ = model_from_checkpoint(load_checkpoint(tmp_path / f"model.ckpt-{step}.pt"))
        want = predict(reference, head, coord, atype, box)
        assert np.abs(got["energy"].reshape(-1) - want["energy"].detach().numpy().reshape(-1)).max() <= 1e-10
        assert np.abs(got["force"].reshape(-1) - want["force"].detach().numpy().reshape(-1)).max() <= 1e-10
    # a united file holds one descriptor: refused while the best steps differ
    united = CliRunner().invoke(app, ["freeze", "--best", "--united", "-o", "u.pth"], env={"MTCORE_DEBUG": ""})
    assert united.exit_code == 1 and not (tmp_path / "u.pth").exists()
    assert "different steps (ccsd 2, wb97m 6)" in united.stderr.replace("\n", " ")
    # one head by name, and a best file passed directly
    state = load_checkpoint(tmp_path)
    [(path, mark)] = freeze_best(state, tmp_path / "one.pth", "wb97m")
    assert path == tmp_path / "one.pth" and mark["step"] == 6
    [(path, mark)] = freeze_best(read_checkpoint_file(tmp_path / "model.best.ccsd.pt"), tmp_path / "c.pth")
    assert mark["head"] == "ccsd" and path == tmp_path / "c_ccsd.pth"
    # show says where a best-model file (or a file frozen from one) comes from
    from mtcore.show import describe

    assert describe(tmp_path / "frozen_model_wb97m.pth")["notes"] == [
        "best model of head 'wb97m': rmse_f = 1 at step 6 (model.best.wb97m.pt)"]
    assert describe(tmp_path / "model.best.ccsd.pt")["notes"] == ["best model of head 'ccsd': rmse_f = 1 at step 2"]


def test_freeze_best_united_when_the_best_steps_agree_and_errors_are_one_line(tmp_path, monkeypatch):
    values = {"ccsd": {0: 3.0, 2: 1.0, 4: 2.0}, "wb97m": {0: 3.0, 2: 1.0, 4: 2.0}}
    script(monkeypatch, values)
    trainer(tmp_path, multi(tmp_path, numb_steps=4, save_freq=2)).run()
    state = load_checkpoint(tmp_path)
    [(path, mark)] = freeze_best(state, tmp_path / "u.pth", united=True)
    assert mark["step"] == 2 and load_frozen(path, head="ccsd").united
    with pytest.raises(MtcoreError, match="--head nope: not a head"):
        freeze_best(state, tmp_path / "x.pth", "nope")
    (tmp_path / "model.best.wb97m.pt").write_bytes(b"not ours")
    with pytest.raises(MtcoreError, match="model.best.wb97m.pt: cannot be read"):
        freeze_best(state, tmp_path / "x.pth")


# 3. patience ---------------------------------------------------------------------------------------
def test_patience_stops_a_head_and_the_run_ends_when_no_head_is_left(tmp_path, monkeypatch):
    values = {"ccsd": {0: 1.0, 2: 2.0, 4: 2.0}, "wb97m": {0: 1.0, 2: 0.5, 4: 0.6, 6: 0.7, 8: 0.8, 10: 0.9}}
    script(monkeypatch, values)
    drawn: list[tuple[int, str]] = []
    real_step = Trainer.train_step

    def recording(self, head):
        drawn.append((self.step, head))
        return real_step(self, head)

    monkeypatch.setattr(Trainer, "train_step", recording)
    doc = multi(tmp_path, numb_steps=40, save_freq=100, patience=2)
    doc["training"]["data_dict"]["wb97m"]["patience"] = 3
    out_console, out = console()
    summary = trainer(tmp_path, doc, console=out_console).run()
    # ccsd: no improvement at steps 2 and 4 → stopped at 4; wb97m: best at 2, then 3 worse → stopped at 8
    assert summary["best"]["ccsd"]["stopped"] == 4 and summary["best"]["wb97m"]["stopped"] == 8
    assert summary["steps"] == 8  # the run ended when no head was left, not at numb_steps 40
    assert {h for s, h in drawn if s >= 4} == {"wb97m"}  # a stopped head is no longer drawn
    assert {h for s, h in drawn if s < 4} == {"ccsd", "wb97m"}
    assert load_checkpoint(tmp_path)["step"] == 8  # ended with a checkpoint
    text = out.getvalue()
    assert "head 'ccsd': rmse_f did not improve in 2 evaluations" in text
    assert "every head stopped early (patience) by step 8" in text
    assert read_checkpoint_file(tmp_path / "model.best.ccsd.pt")["best_of"]["step"] == 0
    assert read_checkpoint_file(tmp_path / "model.best.wb97m.pt")["best_of"]["step"] == 2


# 4. --restart keeps best tracking --------------------------------------------------------------------
def test_restart_continues_the_comparison_and_keeps_the_file(tmp_path, monkeypatch):
    values = {"default": {0: 3.0, 2: 1.0, 4: 2.0, 6: 1.5, 8: 1.2, 10: 0.5, 12: 0.7}}
    written = script(monkeypatch, values)
    trainer(tmp_path, single(tmp_path, numb_steps=6)).run()
    assert written == [("default", 0), ("default", 2)]
    before = (tmp_path / "model.best.default.pt").read_bytes()
    state = load_checkpoint(tmp_path)
    assert state["best"]["heads"]["default"]["value"] == 1.0 and state["best"]["heads"]["default"]["since"] == 2
    state["config"]["training"]["numb_steps"] = 8
    Trainer(None, tmp_path, console()[0], restart=state).run()
    assert written == [("default", 0), ("default", 2)]  # 1.2 at step 8 is worse than 1.0 from before the restart
    assert (tmp_path / "model.best.default.pt").read_bytes() == before
    state = load_checkpoint(tmp_path)
    state["config"]["training"]["numb_steps"] = 12
    Trainer(None, tmp_path, console()[0], restart=state).run()
    assert written[-1] == ("default", 10)  # better: replaced in place (this run's own file)
    assert read_checkpoint_file(tmp_path / "model.best.default.pt")["best_of"]["step"] == 10
    assert not list(tmp_path.glob("model.ckpt.backup-*"))
    # a best file has no optimiser state: it is not a restart point
    with pytest.raises(MtcoreError, match="best-model file"):
        Trainer(None, tmp_path, console()[0], restart=read_checkpoint_file(tmp_path / "model.best.default.pt"))


# 5. nothing of anyone else is overwritten ------------------------------------------------------------
def test_a_foreign_best_file_is_never_overwritten(tmp_path, monkeypatch):
    values = {"default": {0: 3.0, 2: 1.0, 4: 2.0, 6: 0.5}}
    script(monkeypatch, values)
    # a fresh run: files of that name from before are moved aside with the earlier run's files
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "model.best.x.pt").write_bytes(b"someone's x")
    (tmp_path / "model.best.default.pt").write_bytes(b"someone's default")
    trainer(tmp_path, single(tmp_path, numb_steps=4)).run()
    backup = tmp_path / "model.ckpt.backup-1"
    assert (backup / "model.best.x.pt").read_bytes() == b"someone's x"
    assert (backup / "model.best.default.pt").read_bytes() == b"someone's default"
    assert read_checkpoint_file(tmp_path / "model.best.default.pt")["best_of"]["step"] == 2
    # a restart that finds another file in place of its best file: not adopted, moved aside at
    # the next write (never overwritten)
    (tmp_path / "model.best.default.pt").write_bytes(b"replaced by hand")
    state = load_checkpoint(tmp_path)
    state["config"]["training"]["numb_steps"] = 6
    out_console, out = console()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(None, tmp_path, out_console, restart=state).run()
    assert "model.best.default.pt is not the best model this run wrote" in out.getvalue()
    moved = list(tmp_path.glob("model.ckpt.backup-*/model.best.default.pt"))
    assert [p.read_bytes() for p in moved if p.parent != backup] == [b"replaced by hand"]
    assert any("not written by this run" in str(w.message) for w in caught)
    assert read_checkpoint_file(tmp_path / "model.best.default.pt")["best_of"]["step"] == 6


# 6. settings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("patience", 0, "training/patience: must be a positive integer or null, got 0"),
    ("validation_freq", -2, "training/validation_freq: must be a positive integer or null, got -2"),
    ("validation_frames", 0, 'training/validation_frames: must be a positive integer, "all" or null, got 0'),
    ("validation_frames", "some", 'training/validation_frames: must be a positive integer, "all" or null, got \'some\''),
    ("best_metric", "rmse_x", "training/best_metric: 'rmse_x' is not a metric of head 'default' (its loss reports rmse, rmse_e, rmse_f)"),
])
def test_bad_settings_are_one_line_naming_the_key(tmp_path, key, value, message):
    with pytest.raises(MtcoreError) as caught:
        trainer(tmp_path, single(tmp_path, numb_steps=2, **{key: value}))
    assert str(caught.value) == message


def test_plan_says_what_decides_the_best_model_and_a_head_without_validation_has_none(tmp_path):
    doc = multi(tmp_path, numb_steps=4, best_metric="rmse_e", validation_freq=4)
    del doc["training"]["data_dict"]["wb97m"]["validation_data"]
    doc["training"]["data_dict"]["ccsd"]["validation_frames"] = "all"
    doc["training"]["data_dict"]["ccsd"]["patience"] = 4
    out_console, out = console()
    summary = trainer(tmp_path, doc, console=out_console).run()
    text = out.getvalue()
    assert "rmse_e every 4 steps on all 80 frames, patience 4" in text
    assert text.count("no validation data: no best model") == 2  # plan and summary
    assert set(summary["best"]) == {"ccsd"} and not (tmp_path / "model.best.wb97m.pt").exists()


def test_a_tensor_head_is_judged_by_its_frame_tensor_rmse(tmp_path):
    from test_tensor_heads import DIPOLE, tensor_input

    doc = tensor_input(DIPOLE, "dipole", tmp_path, numb_steps=2, disp_freq=2, save_freq=2, validation_freq=2,
                       validation_frames=4)
    doc["model"]["descriptor"] = dict(TINY_DESCRIPTOR)
    summary = trainer(tmp_path, doc).run()
    best = summary["best"]["default"]
    assert best["metric"] == "rmse_gl" and math.isfinite(best["value"]) and best["step"] in (0, 2)
    assert read_checkpoint_file(tmp_path / "model.best.default.pt")["best_of"]["metric"] == "rmse_gl"


def test_restart_from_before_a_newer_best_adopts_that_file(tmp_path, monkeypatch):
    """A best model written after the checkpoint a restart starts from (a run killed between
    saves) is this run's: adopted with its value, not overwritten by an equal or worse one."""
    values = {"default": {0: 3.0, 2: 2.0, 4: 2.5, 6: 1.0, 8: 1.5}}
    written = script(monkeypatch, values)
    trainer(tmp_path, single(tmp_path, numb_steps=8, save_freq=4)).run()
    assert written[-1] == ("default", 6)
    before = (tmp_path / "model.best.default.pt").read_bytes()
    state = load_checkpoint(tmp_path / "model.ckpt-4.pt")
    assert state["best"]["heads"]["default"]["step"] == 2
    out_console, out = console()
    Trainer(None, tmp_path, out_console, restart=state).run()
    assert "model.best.default.pt (step 6) adopted as its best model so far" in out.getvalue()
    assert written[-1] == ("default", 6) and len(written) == 3  # 1.0 at step 6 again is not better
    assert (tmp_path / "model.best.default.pt").read_bytes() == before
    assert load_checkpoint(tmp_path)["best"]["heads"]["default"]["step"] == 6


def test_a_default_metric_without_validation_labels_falls_back_and_a_restart_keeps_it(tmp_path):
    from test_tensor_heads import DIPOLE, TENSOR, tensor_input

    doc = tensor_input(DIPOLE, "dipole", tmp_path, numb_steps=2, disp_freq=2, save_freq=2, validation_freq=2,
                       validation_frames=2)
    doc["model"]["descriptor"] = dict(TINY_DESCRIPTOR)
    doc["training"]["validation_data"]["systems"] = [str(TENSOR / "dipole" / "validation_data" / "atomic_system")]
    out_console, out = console()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not finite" warning: the fallback is silent but printed
        summary = trainer(tmp_path, doc, console=out_console).run()
    assert "no label for rmse_gl; its best model is judged by rmse_lc" in out.getvalue()
    assert summary["best"]["default"]["metric"] == "rmse_lc" and math.isfinite(summary["best"]["default"]["value"])
    state = load_checkpoint(tmp_path)
    state["config"]["training"]["numb_steps"] = 4
    again = Trainer(None, tmp_path, console()[0], restart=state)
    assert again.best.heads["default"].metric == "rmse_lc" and again.best.heads["default"].step is not None
