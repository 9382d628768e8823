"""Pseudo-labels when extending a model: an old head whose data is gone trains on frames labelled
by its own --init-model predictions (labels equal the teacher's predictions; at step 0 its loss on
them is zero; a restart relabels with the same teacher, not with the weights trained since)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtcore.errors import MtcoreError
from mtcore.train.checkpoint import load_checkpoint
from mtcore.train.init_source import load_init_source
from mtcore.train.trainer import Trainer

from helpers import predict
from test_extend_model import QUIET, extended_input, few_frames, make_trainer
from test_extend_model import data, source_path  # noqa: F401 (pytest fixtures used by name)


@pytest.fixture(scope="module")
def unlabelled(data) -> Path:
    """Frames without any label file: only coordinates, cells and types (the old data is gone)."""
    from helpers import WATER

    folder = few_frames(WATER / "data_2", data / "unlabelled", 5)
    for name in ("energy.npy", "force.npy", "virial.npy"):
        (folder / "set.000" / name).unlink(missing_ok=True)
    return folder


def pseudo_input(data: Path, **training) -> dict:
    """The extended input where old head 'ccsd' replays unlabelled frames with pseudo-labels."""
    doc = extended_input(data, **training)
    doc["training"]["data_dict"]["ccsd"]["training_data"] = {
        "systems": [str(data / "unlabelled")], "batch_size": 2, "pseudo_labels": True,
    }
    doc["loss_dict"]["ccsd"].update(start_pref_v=0.02, limit_pref_v=1)  # the virial is labelled too
    return doc


def frames_of(system: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    coord = torch.tensor(np.load(system / "set.000" / "coord.npy"), dtype=torch.float64)
    box = torch.tensor(np.load(system / "set.000" / "box.npy"), dtype=torch.float64)
    atype = torch.tensor(np.loadtxt(system / "type.raw", dtype=np.int64))
    return coord, atype, box


def test_labels_are_the_init_models_predictions_and_its_loss_starts_at_zero(data, source_path, unlabelled, tmp_path):
    trainer = make_trainer(tmp_path / "p", pseudo_input(data), init_model=load_init_source(source_path))
    labels = trainer.heads["ccsd"].train.systems[0].labels
    assert {"energy", "force", "virial"} <= set(labels)  # what the head's loss reads
    # the teacher, independently: the --init-model weights in a plain extension (no pseudo-labels)
    plain = make_trainer(tmp_path / "plain", extended_input(data), init_model=load_init_source(source_path))
    coord, atype, box = frames_of(data / "unlabelled")
    expected = predict(plain.model, "ccsd", coord, atype, box)
    n = coord.shape[0]
    assert np.abs(labels["energy"].reshape(n) - expected["energy"].detach().numpy().reshape(n)).max() <= 1e-10
    assert np.abs(labels["force"].reshape(n, -1) - expected["force"].detach().numpy().reshape(n, -1)).max() <= 1e-10
    assert np.abs(labels["virial"].reshape(n, 9) - expected["virial"].detach().numpy().reshape(n, 9)).max() <= 1e-10
    assert float(np.abs(labels["force"]).max()) > 0.01  # real forces, not zeros
    metrics, _ = trainer.evaluate_batch("ccsd", trainer.heads["ccsd"].train.sample(np.random.default_rng(0)))
    assert metrics["rmse_e"] <= 1e-10 and metrics["rmse_f"] <= 1e-10
    # the new head keeps its own labels from its files
    pbe = trainer.heads["pbe"].train.systems[0]
    assert np.abs(np.asarray(pbe.labels["force"]) - np.asarray(plain.heads["pbe"].train.systems[0].labels["force"])).max() == 0


def test_restart_relabels_with_the_same_teacher(data, source_path, unlabelled, tmp_path):
    work = tmp_path / "r"
    first = make_trainer(work, pseudo_input(data, numb_steps=3, disp_training=False, save_freq=3),
                         init_model=load_init_source(source_path))
    before = {k: np.array(v, copy=True) for k, v in first.heads["ccsd"].train.systems[0].labels.items()}
    first.run()
    state = load_checkpoint(work / "model.ckpt.pt")
    moved = max(float((state["model"][k] - v).abs().max()) for k, v in state["pseudo_teachers"]["ccsd"].items()
                if v.is_floating_point() and v.numel())
    assert moved > 1e-8  # the trained weights differ from the teacher's: relabelling with them would differ
    again = Trainer(None, work, QUIET, restart=state)
    after = again.heads["ccsd"].train.systems[0].labels
    for key, value in before.items():
        assert np.abs(np.asarray(after[key]) - value).max() <= 1e-12, key


def test_pseudo_labels_need_an_old_head_and_an_init_model(data, source_path, unlabelled, tmp_path):
    with pytest.raises(MtcoreError, match=r"^training/data_dict/ccsd/training_data/pseudo_labels: needs --init-model") as info:
        make_trainer(tmp_path / "a", pseudo_input(data))
    assert "\n" not in str(info.value)
    doc = extended_input(data)
    doc["training"]["data_dict"]["pbe"]["training_data"]["pseudo_labels"] = True
    with pytest.raises(MtcoreError, match=r"pbe/training_data/pseudo_labels: head 'pbe' is not a head of the --init-model"):
        make_trainer(tmp_path / "b", doc, init_model=load_init_source(source_path))
