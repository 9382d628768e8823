"""fitting_weight "auto" and extending a trained multi-task model with new heads: old heads keep
their weights (and, with --init-optimizer, their Adam state), new heads take their bias from
their own data, and forgetting.json reports each old head's validation error before and after."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from mtcore.config import load_config, normalize
from mtcore.errors import MtcoreError
from mtcore.evaluate import run_test
from mtcore.freeze import freeze
from mtcore.train.checkpoint import load_checkpoint
from mtcore.train.init_source import load_init_source
from mtcore.train.plan import plan_table
from mtcore.train.trainer import Trainer

from helpers import ENER, WATER, multi_task_input, small_input, transformed_system, write_input

QUIET = Console(file=io.StringIO())


def make_trainer(workdir: Path, doc: dict, **kwargs) -> Trainer:
    workdir.mkdir(parents=True, exist_ok=True)
    return Trainer(load_config(write_input(workdir, doc)), workdir, QUIET, **kwargs)


def plan_rows(trainer: Trainer) -> tuple[str, dict]:
    out = io.StringIO()
    Console(file=out, width=300).print(plan_table(trainer, trainer.bias_source))
    text = out.getvalue()
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines()
            if line.startswith("│")}
    return " ".join(text.split()), rows  # the title wraps: compare it with single spaces


def few_frames(source: Path, target: Path, nframes: int) -> Path:
    """The first ``nframes`` frames of a system's first set: validation frames that are cheap to
    evaluate (the forgetting report evaluates ALL of them, twice)."""
    (target / "set.000").mkdir(parents=True)
    for name in ("type.raw", "type_map.raw"):
        (target / name).write_text((source / name).read_text())
    for array in (source / "set.000").glob("*.npy"):
        np.save(target / "set.000" / array.name, np.load(array)[:nframes])
    return target


def cheap(doc: dict) -> dict:
    """Fewer statistics batches: the tests check weights and bookkeeping, not fit quality."""
    doc["model"]["data_stat_nbatch"] = 1
    doc["model"]["descriptor"].update(rcut=3.0, rcut_smth=0.5, sel=[16, 32])  # few neighbours: fast steps
    return doc


def lcurve_comments(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("#")]


# fitting_weight ------------------------------------------------------------------------------
def test_auto_weights_follow_training_frames_in_plan_and_lcurve(tmp_path):
    doc = cheap(multi_task_input(tmp_path, numb_steps=0, weights="auto", disp_freq=1, save_freq=0))
    doc["training"]["data_dict"]["wb97m"]["training_data"]["systems"].append(str(WATER / "data_2"))
    for entry in doc["training"]["data_dict"].values():
        entry.pop("validation_data")
    trainer = make_trainer(tmp_path / "auto", doc)
    frames = {h: sum(s.nframes for s in trainer.heads[h].train.systems) for h in ("ccsd", "wb97m")}
    n = {d: sum(len(np.load(f)) for f in (WATER / d).glob("set.*/energy.npy")) for d in ("data_0", "data_1", "data_2")}
    assert frames == {"ccsd": n["data_0"], "wb97m": n["data_1"] + n["data_2"]}  # counted from the files
    total = frames["ccsd"] + frames["wb97m"]
    expected = {h: frames[h] / total for h in frames}
    for h, p in zip(trainer.trained, trainer.weights):
        assert abs(p - expected[h]) < 1e-12
    assert trainer.config.training["fitting_weight"] == "auto"  # stored as asked; resolved per run
    text, rows = plan_rows(trainer)
    assert rows["ccsd"][2] == f"{100 * expected['ccsd']:.1f}%" and rows["wb97m"][2] == f"{100 * expected['wb97m']:.1f}%"
    assert "head draws: auto (∝ training frames)" in text
    trainer.run()
    comments = lcurve_comments(tmp_path / "auto" / "lcurve.out")
    assert comments[-1] == ("# head draw probabilities, auto (∝ training frames): "
                            f"ccsd {expected['ccsd']:.6g}, wb97m {expected['wb97m']:.6g}")
    table = np.loadtxt(tmp_path / "auto" / "lcurve.out")  # columns unchanged: still one numeric row per step
    assert table.ndim == 1 and table[0] == 0 and comments[0].split()[1] == "step"


def test_explicit_and_default_weights_are_reported_too(tmp_path):
    doc = cheap(multi_task_input(tmp_path, numb_steps=0, weights={"ccsd": 3, "wb97m": 1}, disp_freq=1, save_freq=0))
    for entry in doc["training"]["data_dict"].values():
        entry.pop("validation_data")
    trainer = make_trainer(tmp_path / "w", doc)
    text, rows = plan_rows(trainer)
    assert rows["ccsd"][2] == "75.0%" and "head draws: fitting_weight (normalised)" in text
    trainer.run()
    assert lcurve_comments(tmp_path / "w" / "lcurve.out")[-1] == (
        "# head draw probabilities, fitting_weight (normalised): ccsd 0.75, wb97m 0.25")
    trainer = make_trainer(tmp_path / "eq", cheap(multi_task_input(tmp_path, numb_steps=1)))
    assert "head draws: equal (no fitting_weight)" in plan_rows(trainer)[0]


@pytest.mark.parametrize(
    "weights, message",
    [
        ("Auto", r'^training/fitting_weight: expected a dict head → weight or "auto".*got str \'Auto\'$'),
        ({"ccsd": 1, "wb97m": -2}, r"^training/fitting_weight/wb97m: -2 is negative; give a weight ≥ 0"),
        ({"ccsd": 0, "wb97m": 0}, r"^training/fitting_weight: no head has a positive weight"),
        ({"ccsd": 1, "pbe": 1}, r"^training/fitting_weight: key\(s\) 'pbe' are not heads"),
        (3, r"^training/fitting_weight: expected a dict head → weight or \"auto\""),
    ],
)
def test_bad_fitting_weight_is_one_line(tmp_path, weights, message):
    doc = multi_task_input(tmp_path, weights=weights)
    with pytest.raises(MtcoreError, match=message) as info:
        normalize(doc, tmp_path)
    assert "\n" not in str(info.value)


# extending a trained model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder with the transformed systems and small validation systems of both old heads."""
    folder = tmp_path_factory.mktemp("data")
    few_frames(WATER / "data_3", folder / "valid_ccsd", 3)
    few_frames(transformed_system(folder), folder / "valid_wb97m", 4)
    return folder


@pytest.fixture(scope="module")
def source_path(data) -> Path:
    """A trained 2-head checkpoint, shared by the tests of this module (never written to)."""
    folder = data / "old"
    make_trainer(folder, old_input(data, numb_steps=3, disp_training=False, save_freq=0)).run()
    return folder / "model.ckpt.pt"


def old_input(data: Path, **training) -> dict:
    doc = cheap(multi_task_input(data, **training))
    for head in ("ccsd", "wb97m"):
        doc["training"]["data_dict"][head]["validation_data"] = {"systems": [str(data / f"valid_{head}")], "batch_size": 2}
    return doc


def extended_input(data: Path, numb_steps: int = 4, **training) -> dict:
    """The old input plus a third head 'pbe' on its own data (another level of theory)."""
    doc = old_input(data, numb_steps=numb_steps, **training)
    third = transformed_system(data, "data_2", scale=0.97, shift_per_atom=0.8)
    doc["model"]["fitting_net_dict"]["pbe"] = dict(ENER, seed=13, layer_name=["l0", None, "l2", None])
    doc["loss_dict"]["pbe"] = copy.deepcopy(doc["loss_dict"]["ccsd"])
    doc["training"]["data_dict"]["pbe"] = {"training_data": {"systems": [str(third)], "batch_size": 1}}
    return doc


def test_extending_keeps_old_heads_and_fits_the_new_bias_to_its_own_data(data, source_path, tmp_path):
    source = load_checkpoint(source_path)
    doc = extended_input(data)
    plain = make_trainer(tmp_path / "plain", doc, init_model=load_init_source(source_path))
    carried = make_trainer(tmp_path / "carried", doc, init_model=load_init_source(source_path), init_optimizer=True)
    for trainer in (plain, carried):
        own = trainer.model.state_dict()
        for key, value in source["model"].items():  # descriptor and both old heads, at step 0
            assert own[key].shape == value.shape, key
            if value.is_floating_point():
                assert float((own[key] - value).abs().sum()) <= 1e-12 * max(1, value.numel()), key
            else:
                assert torch.equal(own[key], value), key
        assert trainer.bias_source["pbe"] == "own training data"
    # the new head's bias: what a run on pbe's data alone computes (same seed, same stat frames)
    third = extended_input(data)["training"]["data_dict"]["pbe"]
    alone = cheap(small_input(tmp_path, train_systems=third["training_data"]["systems"], seed=9))
    reference = make_trainer(tmp_path / "alone", alone).model.heads["default"].bias_atom_e
    old_bias = source["model"]["heads.ccsd.bias_atom_e"]
    assert (plain.model.heads["pbe"].bias_atom_e - reference).abs().max().item() <= 1e-10
    assert (plain.model.heads["pbe"].bias_atom_e - old_bias).abs().max().item() > 0.1  # not an old head's
    # optimiser state: carried for old heads only when asked
    for head in ("ccsd", "wb97m"):
        stored = source["optimizers"][head]["state"]
        assert stored and not plain.heads[head].optimizer.state_dict()["state"]
        mine = carried.heads[head].optimizer.state_dict()["state"]
        assert set(mine) == set(stored)
        for index, slot in stored.items():
            assert float(mine[index]["step"]) == float(slot["step"]) > 0
            for key in ("exp_avg", "exp_avg_sq"):
                assert (mine[index][key] - slot[key]).abs().max().item() <= 1e-12
    assert not carried.heads["pbe"].optimizer.state_dict()["state"]
    assert carried.carried_optimizers == ["ccsd", "wb97m"]
    assert "optimiser state from --init-model: ccsd, wb97m" in plan_rows(carried)[0]


def test_extending_refuses_another_descriptor_and_optimizer_without_state(data, source_path, tmp_path):
    doc = extended_input(data)
    doc["model"]["descriptor"]["neuron"] = [8, 16, 24]
    with pytest.raises(MtcoreError, match=r"^model/descriptor/neuron: \[8, 16, 24\] here but \[8, 16, 32\] in the "
                                          r"--init-model source; extending") as info:
        make_trainer(tmp_path / "d", doc, init_model=load_init_source(source_path))
    assert "\n" not in str(info.value)
    state = load_init_source(source_path)
    state.pop("optimizers")  # what a frozen model or a best-model file gives
    with pytest.raises(MtcoreError, match=r"--init-optimizer: .* holds no optimiser state"):
        make_trainer(tmp_path / "o", extended_input(data), init_model=state, init_optimizer=True)


def test_forgetting_report_matches_an_independent_mtcore_test(data, source_path, tmp_path):
    work = tmp_path / "new"
    work.mkdir()
    (work / "forgetting.json").write_text("a user's file\n")  # an earlier file: moved aside, never overwritten
    # wb97m is kept without training data (no replay): only its validation frames are given
    doc = extended_input(data, numb_steps=2, disp_training=False, save_freq=0)
    doc["training"]["data_dict"]["wb97m"].pop("training_data")
    with pytest.warns(UserWarning, match="wb97m.*will not be trained"):
        trainer = make_trainer(work, doc, init_model=load_init_source(source_path))
    assert trainer.trained == ["ccsd", "pbe"] and trainer.forgetting_heads == ["ccsd", "wb97m"]
    trainer.run()
    report = json.loads((work / "forgetting.json").read_text())
    assert [p.read_text() for p in work.rglob("forgetting.json") if p.parent != work] == ["a user's file\n"]
    assert set(report["heads"]) == {"ccsd", "wb97m"} and report["step"] == 2
    assert report["heads"]["ccsd"]["trained"] and not report["heads"]["wb97m"]["trained"]
    final = load_checkpoint(work / "model.ckpt.pt")
    for state, when in ((load_checkpoint(source_path), "before"), (final, "after")):
        [frozen] = freeze(state, tmp_path / f"{when}.pth", united=True)
        for head, system in (("ccsd", data / "valid_ccsd"), ("wb97m", data / "valid_wb97m")):
            _, combined = run_test(frozen, [str(system)], head=head)
            entry = report["heads"][head]
            assert entry["validation_frames"] == {"ccsd": 3, "wb97m": 4}[head]
            assert abs(entry[when]["rmse_e"] - combined["Energy/atom"].rmse) <= 1e-8
            assert abs(entry[when]["rmse_f"] - combined["Force"].rmse) <= 1e-8
    assert math.isfinite(report["heads"]["ccsd"]["after"]["rmse_f"])
    assert report["heads"]["ccsd"]["after"]["rmse_f"] != report["heads"]["ccsd"]["before"]["rmse_f"]  # it trained
    # --restart keeps the "before" values of the run it continues (and reads wb97m's validation frames again)
    again = Trainer(None, work, QUIET, restart=load_checkpoint(work / "model.ckpt.pt"))
    assert again.forgetting_heads == ["ccsd", "wb97m"]
    for head in ("ccsd", "wb97m"):
        for metric, value in report["heads"][head]["before"].items():
            assert again.forgetting_before[head]["metrics"][metric] == pytest.approx(value, rel=1e-12, abs=0)
