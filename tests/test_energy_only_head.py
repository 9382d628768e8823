"""A head trained on energies alone: frames without force.npy and ``start/limit_pref_f`` 0.

Why: the most common scarce level of theory (CCSD(T), RPA) has energies only, and
benchmarks/scarce_head.py ``--scarce-labels energy`` measures that regime. Checked: such a system
loads (forces absent, not required), the head's loss is the energy term alone and its steps
compute no forces, the step moves the descriptor and the head (a plain head and a Δ head with a
fixed base), and a short run validates it on fully labelled frames without a force metric.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import multi_task_input
from mtcore.train.trainer import labels_on
from test_training import lcurve_rows, make_trainer

NO_SHARING = [None, None, None, None]
ENERGY_ONLY = {"type": "ener", "start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 0, "limit_pref_f": 0}


def energy_only_input(workdir: Path, delta: bool, **training) -> dict:
    """'ccsd' on full labels; 'wb97m' on a copy of its data without force.npy, energies only
    (validated on the fully labelled data, as the benchmark does)."""
    doc = multi_task_input(workdir, layer_name=NO_SHARING, **training)
    full = Path(doc["training"]["data_dict"]["wb97m"]["training_data"]["systems"][0])
    energies = workdir / "energy_only"
    if not energies.exists():
        shutil.copytree(full, energies)
        for force in energies.glob("set.*/force.npy"):
            force.unlink()
    doc["training"]["data_dict"]["wb97m"]["training_data"]["systems"] = [str(energies)]
    doc["loss_dict"]["wb97m"] = dict(ENERGY_ONLY)
    if delta:
        doc["model"]["fitting_net_dict"]["wb97m"].update(base_head="ccsd", base_trainable=False)
    return doc


@pytest.mark.parametrize("delta", [False, True], ids=["plain", "delta_fixed_base"])
def test_an_energy_only_step_trains_on_energies_alone(tmp_path, delta):
    trainer = make_trainer(tmp_path, energy_only_input(tmp_path, delta, numb_steps=4, weights={"ccsd": 1, "wb97m": 1}))
    runtime = trainer.heads["wb97m"]
    assert not runtime.loss.needs_force()
    batch = runtime.train.sample(np.random.default_rng(0))
    assert "force" not in batch.labels and batch.find.get("force", 0.0) == 0.0
    pred = trainer._predict("wb97m", batch, create_graph=False)
    assert "force" not in pred  # an energy-only step skips the force backward pass
    # the loss is pref_e/N·ΔE² and nothing else (pref_e is 1 at every learning rate)
    natoms = batch.atype.shape[1]
    labels = labels_on(batch, trainer.device)
    loss, _ = runtime.loss(pred, labels, batch.find, batch.atype, 0.3)
    expected = float(torch.mean((pred["energy"].detach() - labels["energy"]) ** 2)) / natoms
    assert abs(float(loss.detach()) - expected) <= 1e-10 * max(expected, 1e-30)
    assert expected > 0
    own = trainer.model.heads["wb97m"].correction if delta else trainer.model.heads["wb97m"]
    before = {"descriptor": [p.detach().clone() for p in trainer.model.descriptor.parameters()],
              "head": [p.detach().clone() for p in own.parameters()]}
    assert trainer.train_step("wb97m")
    for part, params in (("descriptor", trainer.model.descriptor.parameters()), ("head", own.parameters())):
        moved = max(float((a - b.detach()).abs().max()) for a, b in zip(before[part], params))
        assert moved > 1e-8, f"{part} did not move on an energy-only step"


def test_a_short_run_validates_the_energy_only_head_without_a_force_metric(tmp_path):
    doc = energy_only_input(tmp_path, True, numb_steps=6, weights={"ccsd": 1, "wb97m": 1}, disp_freq=3, save_freq=6)
    trainer = make_trainer(tmp_path, doc)
    assert trainer.heads["wb97m"].loss.metric_names() == ["rmse", "rmse_e"]
    trainer.run()
    header = [line for line in (tmp_path / "lcurve.out").read_text().splitlines() if line.startswith("#")][0]
    assert "rmse_f_val_wb97m" not in header and "rmse_e_val_wb97m" in header and "rmse_f_val_ccsd" in header
    rows = lcurve_rows(tmp_path / "lcurve.out")
    assert rows and all(np.isfinite(v) for row in rows for v in row)
