"""Δ-learning heads (``base_head``): a scarce head = a rich head's atomic output + a correction.

Checked: forces are −∇E of the Δ sum, the correction's bias starts from the residual against the
base's bias, the scarce loss trains the base only when asked, frozen files (the Δ head alone and
united) equal the checkpoint, --restart reproduces the run, and bad base heads are one line.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import ENER, WATER, model_with_stats, multi_task_input, predict, water_frame
from mtcore import infer
from mtcore.cli import app
from mtcore.config import config_from_document, load_config
from mtcore.model.build import build_model
from mtcore.plugins import get_registry
from mtcore.train.init_source import load_init_source
from mtcore.errors import MtcoreError
from mtcore.freeze import freeze
from mtcore.model.delta import DeltaFitting
from mtcore.train.checkpoint import load_checkpoint
from mtcore.train.trainer import Trainer
from test_training import QUIET, lcurve_rows, make_trainer

NO_SHARING = [None, None, None, None]


def delta_input(workdir, base_trainable: bool = True, **kwargs) -> dict:
    """'wb97m' (transformed data_1) as a Δ head on 'ccsd' (data_0); no shared fitting layers."""
    doc = multi_task_input(workdir, layer_name=NO_SHARING, **kwargs)
    doc["model"]["fitting_net_dict"]["wb97m"].update(base_head="ccsd", base_trainable=base_trainable)
    return doc


def test_forces_are_minus_the_gradient_of_the_delta_energy(tmp_path):
    model, _ = model_with_stats(delta_input(tmp_path))
    head = model.heads["wb97m"]
    assert isinstance(head, DeltaFitting) and head.base is model.heads["ccsd"]  # the same module, not a copy
    with torch.no_grad():  # a correction far from its initial values, so it matters in the sum
        for p in head.correction.parameters():
            p.add_(0.3 * torch.randn_like(p))
    coord, atype, box = water_frame(3)
    out = predict(model, "wb97m", coord, atype, box)
    base = predict(model, "ccsd", coord, atype, box)
    assert abs(float((out["energy"] - base["energy"]).detach())) > 1e-3  # the correction contributes
    h = 1e-5
    rng = np.random.default_rng(0)
    for atom in rng.choice(atype.shape[0], 4, replace=False):
        for axis in range(3):
            plus, minus = coord.clone(), coord.clone()
            plus[atom, axis] += h
            minus[atom, axis] -= h
            numeric = -(predict(model, "wb97m", plus, atype, box, False)["energy"]
                        - predict(model, "wb97m", minus, atype, box, False)["energy"]) / (2 * h)
            assert abs(float(numeric.detach()) - float(out["force"][0, atom, axis].detach())) < 1e-6


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("delta")
    doc = delta_input(workdir, numb_steps=12, weights={"ccsd": 1, "wb97m": 1}, disp_freq=3, save_freq=6)
    trainer = make_trainer(workdir, doc)
    trainer.run()
    return workdir, trainer, doc


def test_correction_bias_is_the_residual_against_the_base(trained, tmp_path):
    workdir, trainer, _ = trained
    head = trainer.model.heads["wb97m"]  # biases are buffers: training leaves them as the statistics set them
    plain = make_trainer(tmp_path, multi_task_input(workdir, numb_steps=0, layer_name=NO_SHARING, weights={"ccsd": 1, "wb97m": 1}))
    system = workdir / "data_1_transformed"
    counts = np.bincount(np.loadtxt(system / "type.raw", dtype=int), minlength=2)
    # the Δ head starts at its statistics frames' mean energy, as the same head without a base does
    expected = float(counts @ plain.model.heads["wb97m"].bias_atom_e.numpy())
    total = float(counts @ (head.base.bias_atom_e + head.correction.bias_atom_e).numpy())
    assert abs(total - expected) < 1e-10 * abs(expected)
    # and the correction alone is the residual: small next to the base's energy (data 1.05·E − 0.3 eV/atom)
    base = float(counts @ head.base.bias_atom_e.numpy())
    assert abs(total - base) > 100 and abs(total - base) < 0.1 * abs(base)


@pytest.mark.parametrize("base_trainable", [True, False])
def test_the_scarce_loss_trains_the_base_only_when_asked(tmp_path, base_trainable):
    doc = delta_input(tmp_path, base_trainable=base_trainable, numb_steps=3, weights={"ccsd": 0, "wb97m": 1})
    with pytest.warns(UserWarning):
        trainer = make_trainer(tmp_path, doc)
    base = {k: v.clone() for k, v in trainer.model.heads["ccsd"].state_dict().items()}
    correction = {k: v.clone() for k, v in trainer.model.heads["wb97m"].correction.state_dict().items()}
    assert trainer.train_step("wb97m")
    # no gradient is left behind for the next step of another head (the base's, outside this optimiser)
    assert all(p.grad is None for p in trainer.model.parameters())
    moved = any(not torch.equal(v, trainer.model.heads["ccsd"].state_dict()[k]) for k, v in base.items())
    assert moved == base_trainable
    assert any(not torch.equal(v, trainer.model.heads["wb97m"].correction.state_dict()[k]) for k, v in correction.items())


def test_frozen_delta_head_alone_and_united_equal_the_checkpoint(trained, tmp_path):
    workdir, trainer, _ = trained
    model = trainer.model.eval()
    state = load_checkpoint(workdir / "model.ckpt.pt")
    alone = freeze(state, tmp_path / "scarce.pth", head="wb97m")[0]
    united = freeze(state, tmp_path / "united.pth", united=True)[0]
    coord, atype, box = water_frame(5, "data_3")
    ref = predict(model, "wb97m", coord, atype, box)
    for pot in (infer.load(alone), infer.load(united, head="wb97m"), infer.load(workdir / "model.ckpt.pt", head="wb97m")):
        out = pot.evaluate(coord.numpy(), box.numpy(), atype.numpy())
        for key in ("energy", "force", "virial"):
            assert np.allclose(out[key], ref[key].detach().numpy().reshape(out[key].shape), atol=1e-10, rtol=0), key
    # the file of the Δ head alone records its base's settings, and its input rebuilds the same model
    meta = infer.load(alone).metadata
    fitting = meta["config"]["model"]["fitting_net"]
    assert fitting["base_head"] == "ccsd" and fitting["base_fitting_net"]["seed"] == 11 and \
        fitting["base_fitting_net"]["neuron"] == ENER["neuron"]
    source = load_init_source(alone)  # what compress, change-bias and --init-model rebuild from
    rebuilt = build_model(config_from_document(source["config"], get_registry()))
    # strict: the base's tensors have their place (the file names its head; a single-task model calls it default)
    rebuilt.load_state_dict({k.replace("heads.wb97m.", "heads.default."): v for k, v in source["model"].items()})
    again = predict(rebuilt.eval(), "default", coord, atype, box)
    assert np.allclose(again["force"].detach().numpy(), ref["force"].detach().numpy(), atol=1e-10, rtol=0)
    result = CliRunner().invoke(app, ["test", "-m", str(alone), "-s", str(WATER / "data_3"), "-n", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["combined"]["Force"]["rmse"] > 0
    shown = CliRunner().invoke(app, ["show", str(alone)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    assert "ener (Δ on head 'ccsd')" in shown.output


def test_restart_reproduces_the_delta_run(trained, tmp_path):
    workdir, _, _ = trained
    shutil.copy(workdir / "model.ckpt-6.pt", tmp_path / "mid.pt")
    Trainer(None, tmp_path, QUIET, restart=load_checkpoint(tmp_path / "mid.pt")).run()
    assert lcurve_rows(tmp_path / "lcurve.out") == [r for r in lcurve_rows(workdir / "lcurve.out") if r[0] > 6]


DIPOLE = {"type": "dipole", "sel_type": [0], "neuron": [16, 16], "seed": 3, "precision": "float64"}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["model"]["fitting_net_dict"]["wb97m"].update(base_head="dft"), "wb97m/base_head: 'dft' is not a head"),
        (lambda d: d["model"]["fitting_net_dict"]["wb97m"].update(base_head="wb97m"), "cannot be its own base"),
        (lambda d: d["model"]["fitting_net_dict"]["ccsd"].update(base_head="wb97m"), "chains of Δ heads are not supported"),
        (lambda d: d["model"]["fitting_net_dict"].update(ccsd=copy.deepcopy(DIPOLE)), "a base of the same output kind"),
    ],
    ids=["unknown", "self", "cycle", "other-kind"],
)
def test_bad_base_heads_are_one_line(tmp_path, mutate, message):
    doc = delta_input(tmp_path)
    mutate(doc)
    path = tmp_path / "input.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(MtcoreError, match=message) as info:
        build_model(load_config(path))
    assert "\n" not in str(info.value)


def test_single_task_base_head_is_one_line(tmp_path):
    from helpers import small_input

    doc = small_input(tmp_path, fitting=dict(ENER, base_head="dft"))
    path = tmp_path / "input.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(MtcoreError, match="model/fitting_net/base_head"):
        build_model(load_config(path))


def test_draw_weights_move_linearly_to_fitting_weight_final(tmp_path):
    doc = multi_task_input(tmp_path, numb_steps=10, weights={"ccsd": 4, "wb97m": 1})
    doc["training"]["fitting_weight_final"] = {"ccsd": 1, "wb97m": 4}
    trainer = make_trainer(tmp_path, doc)
    assert "fitting_weight_final" in trainer.weight_rule
    for step, expected in ((0, 0.2), (5, 0.5), (10, 0.8)):
        trainer.step = step
        assert abs(trainer.draw_weights()[trainer.trained.index("wb97m")] - expected) < 1e-12
    trainer.step = 10  # the draws follow the weights of the step
    drawn = sum(trainer.draw_head() == "wb97m" for _ in range(2000))
    assert abs(drawn / 2000 - 0.8) < 4 * (0.8 * 0.2 / 2000) ** 0.5


@pytest.mark.parametrize(
    "final, message",
    [
        ({"ccsd": 1}, "fitting_weight_final/wb97m: expected a number"),
        ({"ccsd": 1, "wb97m": -1}, "fitting_weight_final/wb97m: expected a number"),
        ({"ccsd": 1, "wb97m": 1, "dft": 1}, "dft"),
        ({"ccsd": 0, "wb97m": 0}, "every weight is 0"),
        ([1, 2], "expected a dict"),
    ],
)
def test_bad_fitting_weight_final_is_one_line(tmp_path, final, message):
    doc = multi_task_input(tmp_path, numb_steps=10, weights={"ccsd": 1, "wb97m": 1})
    doc["training"]["fitting_weight_final"] = final
    path = tmp_path / "input.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(MtcoreError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_plan_names_the_base_and_counts_only_the_correction(trained):
    import io

    from rich.console import Console

    from mtcore.train.plan import plan_table

    _, trainer, _ = trained
    out = io.StringIO()
    Console(file=out, width=400).print(plan_table(trainer, trainer.bias_source))
    row = next(line for line in out.getvalue().splitlines() if "wb97m" in line and "ener" in line)
    assert "Δ on head 'ccsd' (trained by this loss)" in row
    correction = sum(p.numel() for p in trainer.model.heads["wb97m"].correction.parameters())
    assert f"{correction:,}" in row or str(correction) in row
