"""mtcore change-bias: a per-type energy offset in the data is recovered exactly by the bias shift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import ENER, SE_E2_A, WATER, model_with_stats, small_input
from mtcore import infer
from mtcore.change_bias import change_bias, frame_counts
from mtcore.cli import app
from mtcore.errors import MtcoreError
from mtcore.train.checkpoint import FORMAT, DIGEST_KEY, load_checkpoint, state_digest

# small frames evaluated many times: thread barriers cost more than they save
pytestmark = pytest.mark.usefixtures("single_torch_thread")
SHIFT = np.array([-2.75, 0.4])  # eV per O, per H


def _write_system(folder: Path, coord: np.ndarray, box: np.ndarray, atype: np.ndarray) -> Path:
    (folder / "set.000").mkdir(parents=True)
    np.savetxt(folder / "type.raw", atype, fmt="%d")
    (folder / "type_map.raw").write_text("O\nH\n")
    np.save(folder / "set.000" / "coord.npy", coord.reshape(coord.shape[0], -1))
    np.save(folder / "set.000" / "box.npy", box.reshape(box.shape[0], 9))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small untrained model saved as a checkpoint, and three systems of different
    compositions (atoms dropped from water frames) labelled with its energies + counts·SHIFT."""
    tmp = tmp_path_factory.mktemp("bias")
    desc = dict(SE_E2_A, neuron=[4, 8], axis_neuron=2, rcut=4.0, sel=[16, 32])
    doc = small_input(tmp, descriptor=desc, fitting=dict(ENER, neuron=[8, 8]))
    model, config = model_with_stats(doc, nbatch=1)
    state = {"format": FORMAT, "config": config.document, "multi_task": False, "step": 0, "model": model.state_dict()}
    state[DIGEST_KEY] = state_digest(state)
    ckpt = tmp / "model.ckpt-0.pt"
    torch.save(state, ckpt)
    coord = np.load(WATER / "data_0" / "set.000" / "coord.npy")[:3].reshape(3, -1, 3)
    box = np.load(WATER / "data_0" / "set.000" / "box.npy")[:3]
    atype = np.loadtxt(WATER / "data_0" / "type.raw", dtype=np.int64)
    systems = []
    for k, (n_o, n_h) in enumerate([(8, 20), (16, 10), (4, 24)]):
        keep = np.concatenate([np.flatnonzero(atype == 0)[:n_o], np.flatnonzero(atype == 1)[:n_h]])
        systems.append(_write_system(tmp / f"sys{k}", coord[:, keep], box, atype[keep]))
    _label(infer.load(ckpt), systems, SHIFT)
    return tmp, ckpt, systems


def _label(pot, systems, shift):
    """energy.npy = the model's own prediction + counts·shift: the only error is the offset."""
    for folder in systems:
        coord = np.load(folder / "set.000" / "coord.npy")
        box = np.load(folder / "set.000" / "box.npy")
        atype = np.loadtxt(folder / "type.raw", dtype=np.int64)
        energy = pot.evaluate(coord, box, atype, virial=False)["energy"].reshape(-1)
        counts = frame_counts(np.broadcast_to(atype, (coord.shape[0], atype.size)), 2)
        np.save(folder / "set.000" / "energy.npy", energy + counts @ shift)


def test_change_recovers_a_per_type_offset(setup):
    tmp, ckpt, systems = setup
    pot = infer.load(ckpt)
    old_bias = pot.module.fitting.bias_atom_e.detach().numpy().copy()
    out, summary = change_bias(ckpt, [str(s) for s in systems], output=tmp / "changed.pt")
    assert np.allclose(summary["new"][:, 0] - summary["old"][:, 0], SHIFT, atol=1e-8, rtol=0)
    assert np.allclose(summary["old"][:, 0], old_bias, atol=0, rtol=0)
    assert summary["rmse_before"] > 0.1 and summary["rmse_after"] < 1e-9
    # the written checkpoint predicts the shifted energies (the RMSE is restored)
    state = load_checkpoint(out)  # checksum verified
    assert np.allclose(state["model"]["heads.default.bias_atom_e"].numpy(), old_bias + SHIFT, atol=1e-8, rtol=0)
    changed = infer.load(out)
    for folder in systems:
        coord = np.load(folder / "set.000" / "coord.npy")
        box = np.load(folder / "set.000" / "box.npy")
        atype = np.loadtxt(folder / "type.raw", dtype=np.int64)
        energy = changed.evaluate(coord, box, atype, virial=False)["energy"].reshape(-1)
        assert np.allclose(energy, np.load(folder / "set.000" / "energy.npy"), atol=1e-8, rtol=0)
    # everything else of the checkpoint is unchanged
    before = load_checkpoint(ckpt)
    for key, value in before["model"].items():
        if key != "heads.default.bias_atom_e":
            assert torch.equal(value, state["model"][key]), key


def test_set_mode_and_frozen_file(setup):
    """Mode set fits the labels alone; a frozen file is changed in place of its buffer and the
    result loads in plain torch with the same metadata."""
    from mtcore.freeze import freeze

    tmp, ckpt, systems = setup
    counts, labels = [], []
    for folder in systems:
        atype = np.loadtxt(folder / "type.raw", dtype=np.int64)
        energy = np.load(folder / "set.000" / "energy.npy")
        counts.append(frame_counts(np.broadcast_to(atype, (energy.size, atype.size)), 2))
        labels.append(energy)
    expected = np.linalg.lstsq(np.concatenate(counts), np.concatenate(labels), rcond=None)[0]
    _, summary = change_bias(ckpt, [str(s) for s in systems], mode="set", output=tmp / "set.pt")
    assert np.allclose(summary["new"][:, 0], expected, atol=1e-8, rtol=0)

    frozen = freeze(load_checkpoint(ckpt), tmp / "frozen.pth")[0]
    out, summary = change_bias(frozen, [str(s) for s in systems])
    assert out == tmp / "frozen_bias.pth" and frozen.is_file()
    assert np.allclose(summary["new"][:, 0] - summary["old"][:, 0], SHIFT, atol=1e-8, rtol=0)
    changed = infer.load(out)
    assert changed.metadata == infer.load(frozen).metadata
    folder = systems[1]
    coord = np.load(folder / "set.000" / "coord.npy")
    energy = changed.evaluate(coord, np.load(folder / "set.000" / "box.npy"), np.loadtxt(folder / "type.raw", dtype=np.int64))
    assert np.allclose(energy["energy"].reshape(-1), np.load(folder / "set.000" / "energy.npy"), atol=1e-8, rtol=0)
    # a second run picks the next free name; the first result is kept
    out2, _ = change_bias(frozen, [str(systems[0])])
    assert out2 == tmp / "frozen_bias1.pth" and out.is_file()


def test_cli_and_errors(setup, tmp_path):
    tmp, ckpt, systems = setup
    runner = CliRunner()
    taken = tmp_path / "taken.pt"
    taken.write_text("mine")
    result = runner.invoke(app, ["change-bias", str(ckpt), "-s", str(systems[0]), "-o", str(taken)])
    assert result.exit_code == 1 and "exists" in result.output and taken.read_text() == "mine"
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["change-bias", str(ckpt), "-s", str(systems[0]), "--mode", "add"])
    assert result.exit_code == 1 and "--mode" in result.output
    result = runner.invoke(app, ["change-bias", str(ckpt), "-s", str(systems[0]), "-o", str(tmp_path / "new.pt")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new.pt").is_file() and "bias" in result.output
    unlabelled = tmp_path / "nolabel"
    _write_system(unlabelled, np.load(systems[0] / "set.000" / "coord.npy"), np.load(systems[0] / "set.000" / "box.npy"),
                  np.loadtxt(systems[0] / "type.raw", dtype=np.int64))
    with pytest.raises(MtcoreError, match="no energy labels"):
        change_bias(ckpt, [str(unlabelled)], output=tmp_path / "x.pt")


class _MeanHead:
    """A stand-in for a loaded intensive head (reduction "mean"; only type 1 selected): frame
    value = mean over the H atoms of (a smooth function of the coordinates + bias[H])."""

    head = "gap"
    type_map = ["O", "H"]

    def __init__(self, bias):
        self.bias = np.asarray(bias, dtype=np.float64)
        self.head_metadata = {"output": {"global_key": "gap", "size": 1, "reduction": "mean", "sel_types": [1]}}

    def evaluate(self, coords, box, atypes, **_):
        coords = np.asarray(coords, dtype=np.float64).reshape(len(atypes), -1, 3)
        atypes = np.asarray(atypes)
        h = atypes == 1
        atomic = np.sin(coords.sum(-1)) + self.bias[atypes]
        return {"gap": ((atomic * h).sum(1) / h.sum(1)).reshape(-1, 1)}


def test_mean_head_shift_uses_fractions_of_selected_atoms(setup):
    from mtcore.change_bias import compute_bias

    _, _, systems = setup
    old = np.array([[0.0], [0.3]])
    truth = _MeanHead(old[:, 0] + np.array([5.0, -1.25]))  # the O shift is invisible: O is not selected
    for folder in systems:
        coord = np.load(folder / "set.000" / "coord.npy")
        atype = np.loadtxt(folder / "type.raw", dtype=np.int64)
        types = np.broadcast_to(atype, (coord.shape[0], atype.size))
        np.save(folder / "set.000" / "gap.npy", truth.evaluate(coord, None, types)["gap"])
    new, summary = compute_bias(_MeanHead(old[:, 0]), old, [str(s) for s in systems], "change")
    assert np.allclose(new[:, 0], [0.0, 0.3 - 1.25], atol=1e-10, rtol=0)
    assert summary["absent_types"] == ["O"] and not summary["per_atom"] and summary["rmse_after"] < 1e-10
    for folder in systems:
        (folder / "set.000" / "gap.npy").unlink()


def test_multi_task_checkpoint_changes_only_the_chosen_head(setup, tmp_path):
    from helpers import multi_task_input

    _, _, systems = setup
    doc = multi_task_input(tmp_path, descriptor=dict(SE_E2_A, neuron=[4, 8], axis_neuron=2, rcut=4.0, sel=[16, 32]),
                           layer_name=["l0", None, None])
    for head in doc["model"]["fitting_net_dict"].values():
        head["neuron"] = [8, 8]
    model, config = model_with_stats(doc, nbatch=1)
    state = {"format": FORMAT, "config": config.document, "multi_task": True, "step": 0, "model": model.state_dict()}
    state[DIGEST_KEY] = state_digest(state)
    ckpt = tmp_path / "multi.pt"
    torch.save(state, ckpt)
    data = tmp_path / "data"
    for folder in systems:  # copies labelled with the wb97m head's energies + counts·SHIFT
        target = data / folder.name
        _write_system(target, np.load(folder / "set.000" / "coord.npy"), np.load(folder / "set.000" / "box.npy"),
                      np.loadtxt(folder / "type.raw", dtype=np.int64))
    _label(infer.load(ckpt, head="wb97m"), sorted(data.iterdir()), SHIFT)
    with pytest.raises(MtcoreError, match="choose a head with --head"):
        change_bias(ckpt, [str(data)], output=tmp_path / "x.pt")
    out, summary = change_bias(ckpt, [str(data)], head="wb97m", output=tmp_path / "changed.pt")
    assert summary["frames"] == 9
    assert np.allclose(summary["new"][:, 0] - summary["old"][:, 0], SHIFT, atol=1e-8, rtol=0)
    changed = load_checkpoint(out)["model"]
    for key, value in state["model"].items():
        if key == "heads.wb97m.bias_atom_e":
            assert np.allclose(changed[key].numpy(), value.numpy() + SHIFT, atol=1e-8, rtol=0)
        else:
            assert torch.equal(changed[key], value), key
