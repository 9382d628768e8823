"""Multi-task mode: heads, weights, shared layers, per-head freeze, restart and fine-tuning."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import ENER, WATER, assert_nested_close, multi_task_input, predict, small_input, water_frame, write_input
from mtcore import infer
from mtcore.cli import app
from mtcore.config import normalize
from mtcore.errors import MtcoreError
from mtcore.freeze import freeze
from mtcore.model.build import build_model
from mtcore.train.checkpoint import load_checkpoint
from mtcore.train.init_source import load_init_source
from mtcore.train.trainer import Trainer
from test_training import QUIET, fixed_validation_loss, lcurve_rows, make_trainer


def dense(model, head: str, type_index: int, layer: int):
    return model.heads[head].nets[type_index].blocks[layer].dense


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An 80-step two-head run, with the fixed validation losses before and after."""
    workdir = tmp_path_factory.mktemp("mt")
    trainer = make_trainer(workdir, multi_task_input(workdir, numb_steps=80, weights={"ccsd": 1, "wb97m": 1}, disp_freq=20))
    before = {h: fixed_validation_loss(trainer, h) for h in ("ccsd", "wb97m")}
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = {h: fixed_validation_loss(trainer, h) for h in ("ccsd", "wb97m")}
    return workdir, trainer, before, after, initial


def test_both_heads_learn(trained):
    _, _, before, after, _ = trained
    for head in ("ccsd", "wb97m"):
        assert after[head] < 0.6 * before[head], (head, before[head], after[head])


def test_shared_layers_are_one_tensor_and_private_ones_differ(trained):
    workdir, trainer, _, _, initial = trained
    model = trainer.model
    for t in range(2):
        for layer in (0, 2):  # layer_name ["l0", null, "l2", null]
            assert dense(model, "ccsd", t, layer) is dense(model, "wb97m", t, layer)
        for layer in (1, 3):
            a, b = dense(model, "ccsd", t, layer), dense(model, "wb97m", t, layer)
            assert a is not b and not torch.equal(a.weight, b.weight)
    assert dense(model, "ccsd", 0, 0) is not dense(model, "ccsd", 1, 0)  # types never share
    key = "heads.ccsd.nets.0.blocks.0.dense.weight"
    assert not torch.equal(model.state_dict()[key], initial[key])  # trained, still shared
    state = load_checkpoint(workdir / "model.ckpt.pt")["model"]
    a, b = state["heads.ccsd.nets.0.blocks.0.dense.weight"], state["heads.wb97m.nets.0.blocks.0.dense.weight"]
    assert a.data_ptr() == b.data_ptr()  # one storage in the checkpoint file
    c, d = state["heads.ccsd.nets.0.blocks.1.dense.weight"], state["heads.wb97m.nets.0.blocks.1.dense.weight"]
    assert c.data_ptr() != d.data_ptr()


def test_lcurve_one_row_per_display_step_with_head_suffixes(trained):
    workdir = trained[0]
    header = (workdir / "lcurve.out").read_text().splitlines()[0].split()[1:]
    assert header[:4] == ["step", "rmse_val_ccsd", "rmse_trn_ccsd", "rmse_e_val_ccsd"]
    assert "rmse_f_val_wb97m" in header and "lr_wb97m" in header
    table = np.loadtxt(workdir / "lcurve.out")
    assert table.shape == (5, len(header)) and list(table[:, 0]) == [0, 20, 40, 60, 80]


def test_head_draws_follow_fitting_weight_and_idle_heads_never_move(tmp_path):
    doc = multi_task_input(tmp_path, numb_steps=3000, weights={"ccsd": 3, "wb97m": 1, "idle": 0, "broken": "x"},
                           disp_training=False, save_freq=0, validation_freq=3000)
    fits = doc["model"]["fitting_net_dict"]
    fits["idle"] = dict(ENER, seed=5)
    fits["broken"] = dict(ENER, seed=6)
    doc["training"]["data_dict"]["idle"] = doc["training"]["data_dict"]["ccsd"]
    doc["training"]["data_dict"]["broken"] = doc["training"]["data_dict"]["ccsd"]
    with pytest.warns(UserWarning) as record:
        trainer = make_trainer(tmp_path, doc)
    messages = " ".join(str(w.message) for w in record)
    assert "'idle'" in messages and "'broken'" in messages
    assert trainer.trained == ["ccsd", "wb97m"]
    assert trainer.heads["idle"].optimizer is None and trainer.heads["broken"].optimizer is None
    drawn = Counter()
    trainer.train_step = lambda head: drawn.update([head])  # count the heads the loop steps
    trainer.run()
    assert set(drawn) == {"ccsd", "wb97m"}
    share = drawn["ccsd"] / 3000
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / 3000) ** 0.5, share


def test_idle_head_parameters_never_change(tmp_path):
    doc = multi_task_input(tmp_path, numb_steps=6, weights={"ccsd": 1, "wb97m": 0})
    with pytest.warns(UserWarning, match="wb97m"):
        trainer = make_trainer(tmp_path, doc)
    private = {k: v.clone() for k, v in trainer.model.state_dict().items() if k.startswith("heads.wb97m.nets.0.blocks.1")}
    shared = {k: v.clone() for k, v in trainer.model.state_dict().items() if k.startswith("heads.wb97m.nets.0.blocks.0")}
    trainer.run()
    now = trainer.model.state_dict()
    assert private and all(torch.equal(now[k], v) for k, v in private.items())
    assert any(not torch.equal(now[k], v) for k, v in shared.items())  # shared with ccsd, which trains


def test_frozen_heads_equal_the_in_memory_model(trained, tmp_path):
    workdir, trainer, *_ = trained
    model = trainer.model.eval()
    state = load_checkpoint(workdir / "model.ckpt.pt")
    paths = freeze(state, tmp_path / "graph.pth")
    assert sorted(p.name for p in paths) == ["graph_ccsd.pth", "graph_wb97m.pth"]
    united = freeze(state, tmp_path / "united.pth", united=True)[0]
    coord, atype, box = water_frame(5, "data_3")
    for head in ("ccsd", "wb97m"):
        ref = predict(model, head, coord, atype, box)
        checkpoint = infer.load(workdir / "model.ckpt.pt", head=head)  # dp test takes a checkpoint too
        for pot in (infer.load(tmp_path / f"graph_{head}.pth"), infer.load(united, head=head), checkpoint):
            out = pot.evaluate(coord.numpy(), box.numpy(), atype.numpy())
            assert np.allclose(out["energy"], ref["energy"].detach().numpy().reshape(-1), atol=1e-10, rtol=0)
            assert np.allclose(out["force"], ref["force"].detach().numpy(), atol=1e-10, rtol=0)
            assert np.allclose(out["virial"], ref["virial"].detach().numpy(), atol=1e-10, rtol=0)
        meta = infer.load(tmp_path / f"graph_{head}.pth").metadata
        assert meta["head"] == head and "fitting_net" in meta["config"]["model"]  # single-task form
    with pytest.raises(MtcoreError, match="multi-task checkpoint; choose a head"):
        infer.load(workdir / "model.ckpt.pt")
    result = CliRunner().invoke(app, ["test", "-m", str(workdir / "model.ckpt.pt"), "--head", "wb97m", "-s",
                                      str(WATER / "data_3"), "-n", "2", "--json"])
    assert result.exit_code == 0, result.output
    frozen = CliRunner().invoke(app, ["test", "-m", str(tmp_path / "graph_wb97m.pth"), "-s", str(WATER / "data_3"),
                                      "-n", "2", "--json"])
    # eager checkpoint module vs TorchScript file: equal within 1e-10, not to the last bit
    assert_nested_close(json.loads(result.stdout)["combined"], json.loads(frozen.stdout)["combined"])
    only = freeze(state, tmp_path / "one.pth", head="wb97m")
    assert [p.name for p in only] == ["one.pth"]
    with pytest.raises(MtcoreError, match="not a head"):
        freeze(state, tmp_path / "x.pth", head="nope")


def test_restart_reproduces_the_multitask_lcurve(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir()
    resumed.mkdir()
    doc = multi_task_input(tmp_path, numb_steps=20, weights={"ccsd": 2, "wb97m": 1}, disp_freq=5, save_freq=10)
    make_trainer(full, doc).run()
    shutil.copy(full / "model.ckpt-10.pt", resumed / "mid.pt")
    Trainer(None, resumed, QUIET, restart=load_checkpoint(resumed / "mid.pt")).run()
    assert lcurve_rows(resumed / "lcurve.out") == [r for r in lcurve_rows(full / "lcurve.out") if r[0] > 10]


def test_fine_tuning_starts_from_the_chosen_head(trained, tmp_path):
    workdir, trainer, *_ = trained
    source = load_init_source(workdir / "model.ckpt.pt")
    coord, atype, box = water_frame(0, "data_3")
    starts = {}
    for head in ("ccsd", "wb97m"):
        folder = tmp_path / head
        folder.mkdir()
        fine = make_trainer(folder, small_input(folder, descriptor=source["config"]["model"]["descriptor"], numb_steps=2),
                            init_model=source, init_head=head)
        starts[head] = predict(fine.model, "default", coord, atype, box)["energy"].item()
        assert abs(starts[head] - predict(trainer.model, head, coord, atype, box)["energy"].item()) < 1e-9
    assert abs(starts["ccsd"] - starts["wb97m"]) > 1e-3  # a different head gives a different start
    # a united frozen model is an --init-model source too
    united = freeze(load_checkpoint(workdir / "model.ckpt.pt"), tmp_path / "united.pth", united=True)[0]
    folder = tmp_path / "from_united"
    folder.mkdir()
    fine = make_trainer(folder, small_input(folder, descriptor=source["config"]["model"]["descriptor"], numb_steps=2),
                        init_model=load_init_source(united), init_head="wb97m")
    assert abs(predict(fine.model, "default", coord, atype, box)["energy"].item() - starts["wb97m"]) < 1e-9


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["loss_dict"].update(dft={}), r"loss_dict: key\(s\) 'dft' are not heads; heads in model/fitting_net_dict: ccsd, wb97m"),
        (lambda d: d["training"]["data_dict"].update(mp2={}), r"training/data_dict: key\(s\) 'mp2' are not heads"),
        (lambda d: d["training"].update(fitting_weight={"ccsd": 0, "wb97m": -1}), r"training/fitting_weight: no head has a positive weight"),
        (lambda d: d.update(learning_rate_dict={"x": {}}), r"learning_rate_dict: key\(s\) 'x' are not heads"),
        (lambda d: d["model"].pop("type_map"), r"model/type_map: required in multi-task mode"),
        (lambda d: d["training"].update(validation_data={"systems": ["x"]}), r"single-task keys \(training/validation_data\) and multi-task keys .* cannot be mixed"),
        (lambda d: d.update(loss={}), r"single-task keys \(loss\) and multi-task keys"),
    ],
)
def test_input_errors_name_the_keys(tmp_path, mutate, message):
    doc = multi_task_input(tmp_path)
    mutate(doc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MtcoreError, match=message) as info:
            normalize(doc, tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "layer_name, neuron, message",
    [
        (["l0", None, "l2"], None, r"fitting net 'ccsd': layer_name has 3 entries; expected len\(neuron\)\+1 = 4"),
        (["l0", None, "l2", None], [16, 32, 32], r"shared layer 'l0': head 'ccsd' layer 0 has shape 128x32 but head 'wb97m' layer 0 has shape 128x16"),
    ],
)
def test_shared_layer_errors(tmp_path, layer_name, neuron, message):
    doc = multi_task_input(tmp_path, layer_name=layer_name)
    if neuron:
        doc["model"]["fitting_net_dict"]["wb97m"]["neuron"] = neuron
    config = normalize(doc, tmp_path)
    with pytest.raises(MtcoreError, match=message):
        build_model(config)


def test_head_without_data_is_not_trained_but_frozen(tmp_path):
    doc = multi_task_input(tmp_path, numb_steps=4)
    del doc["training"]["data_dict"]["wb97m"]
    with pytest.warns(UserWarning, match="'wb97m' has no entry in training/data_dict"):
        trainer = make_trainer(tmp_path, doc)
    assert trainer.trained == ["ccsd"]
    trainer.run()
    paths = freeze(load_checkpoint(tmp_path / "model.ckpt.pt"), tmp_path / "frozen_model.pth")
    assert sorted(p.name for p in paths) == ["frozen_model_ccsd.pth", "frozen_model_wb97m.pth"]


def test_cli_errors_exit_non_zero(tmp_path):
    doc = multi_task_input(tmp_path)
    doc["training"]["fitting_weight"] = {"ccsd": 1, "dft": 1}
    write_input(tmp_path, doc)
    result = subprocess.run([sys.executable, "-m", "mtcore.cli", "train", "input.json"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: training/fitting_weight: key(s) 'dft' are not heads; heads in model/fitting_net_dict: ccsd, wb97m"]


def test_plan_table_says_who_is_drawn_how_often_and_what_is_shared(tmp_path):
    import io

    from rich.console import Console

    from mtcore.config import load_config
    from mtcore.train.trainer import Trainer

    from mtcore.train.plan import plan_table

    doc = multi_task_input(tmp_path, numb_steps=400, weights={"ccsd": 3, "wb97m": 1})
    trainer = Trainer(load_config(write_input(tmp_path, doc)), tmp_path, Console(file=io.StringIO()))
    out = io.StringIO()
    Console(file=out, width=250).print(plan_table(trainer, trainer.bias_source))  # what run() prints first
    text = out.getvalue()
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines()
            if line.startswith("│")}
    frames = {h: sum(s.nframes for s in trainer.heads[h].train.systems) for h in ("ccsd", "wb97m")}
    for head, share in (("ccsd", 0.75), ("wb97m", 0.25)):
        row = rows[head]
        assert row[2] == f"{100 * share:.1f}%"
        assert float(row[4]) == pytest.approx(400 * share * 1 / frames[head], abs=0.0051)  # batch_size 1
        assert row[7] == "l0, l2" and row[8] == "own training data"
    assert "shared fitting layers" in text and "descriptor se_e2_a" in text
