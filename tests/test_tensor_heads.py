"""Tensor heads (dipole, polar) and the tensor loss, single- and multi-task.

Dipoles rotate as vectors and polarizabilities as R·α·Rᵀ; both are translation and permutation
invariant; the loss follows DeePMD-kit v2's normalisation; atomic labels load from both layouts
on disk; the polar diagonal shift is per type index over all frames; short trainings learn;
frozen heads equal the in-memory model; ``mtcore test`` reports tensor errors.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from helpers import ROOT, SE_E2_A, WATER, model_with_stats, predict, random_rotation, small_input, water_frame, write_input
from mtcore.config import load_config, normalize
from mtcore.data.loading import load_dataset, load_system
from mtcore.data.neighbors import NeighborCache
from mtcore.data.requirements import DataRequirement
from mtcore.errors import MtcoreError
from mtcore.hookspecs import DescriptorRegistration, LossContext
from mtcore.model.build import build_model
from mtcore.model.descriptor import Descriptor
from mtcore.model.fitting import OutputDef
from mtcore.plugins import PluginSource, Registered, Registry, get_registry
from mtcore.train.trainer import Trainer, labels_on

QUIET = Console(file=open(os.devnull, "w"))
TENSOR = ROOT / "examples" / "water_tensor"
V3_DIPOLE = ROOT / "tests" / "data" / "water_tensor_v3layout" / "dipole"

SMALL_SE = dict(SE_E2_A, neuron=[4, 8, 16], axis_neuron=4)
DIPOLE = {"type": "dipole", "sel_type": [0], "neuron": [16, 16], "seed": 3, "precision": "float64"}
POLAR = {"type": "polar", "sel_type": [0], "neuron": [16, 16], "seed": 4, "precision": "float64"}
TENSOR_LOSS = {"type": "tensor", "pref": 1.0, "pref_atomic": 1.0}
HEADS = {
    "dipole": DIPOLE,
    "polar_diag": POLAR,
    "polar_full_scaled_all_types": dict(POLAR, fit_diag=False, scale=[2.0, 0.5], sel_type=None, shift_diag=False),
}


def tensor_systems(kind: str, part: str = "training") -> list[str]:
    return [str(TENSOR / kind / f"{part}_data" / name) for name in ("atomic_system", "global_system")]


def tensor_input(fitting: dict, kind: str, tmp: Path = Path("/tmp"), **training) -> dict:
    doc = small_input(tmp, descriptor=SMALL_SE, fitting=fitting, train_systems=tensor_systems(kind),
                      valid_systems=tensor_systems(kind, "validation"), **training)
    doc["loss"] = dict(TENSOR_LOSS)
    return doc


def kind_of(fitting: dict) -> str:
    return "dipole" if fitting["type"] == "dipole" else "polar"


# ---------------------------------------------------------------------------------------------
# symmetry
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(HEADS))
def tensor_model(request):
    fitting = HEADS[request.param]
    model, _ = model_with_stats(tensor_input(fitting, kind_of(fitting)), nbatch=1)
    return model, model.heads["default"].output_def()


def atomic_tensor(model, odef, coord, atype, box) -> torch.Tensor:
    out = predict(model, "default", coord, atype, box)
    atomic = out[odef.atomic_key][0].detach()
    assert torch.allclose(out[odef.global_key][0].detach(), atomic.sum(0), atol=1e-12)
    return atomic


def test_rotation_covariance(tensor_model):
    model, odef = tensor_model
    coord, atype, box = water_frame(0)
    rot = random_rotation(3)
    a = atomic_tensor(model, odef, coord, atype, box)
    b = atomic_tensor(model, odef, coord @ rot, atype, box @ rot)
    assert a.abs().max() > 1e-3
    if odef.size == 3:  # row vectors: μ ↦ μ R
        expected = a @ rot
    else:  # α ↦ Rᵀ α R in the row-vector convention (R·α·Rᵀ for column vectors)
        expected = (rot.T @ a.reshape(-1, 3, 3) @ rot).reshape(-1, 9)
    assert torch.allclose(b, expected, atol=1e-10), (b - expected).abs().max()
    unselected = ~torch.isin(atype, torch.tensor(odef.sel_types))
    assert torch.all(a[unselected] == 0)


def test_translation_and_permutation_invariance(tensor_model):
    model, odef = tensor_model
    coord, atype, box = water_frame(1)
    a = atomic_tensor(model, odef, coord, atype, box)
    shifted = atomic_tensor(model, odef, coord + torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64), atype, box)
    assert torch.allclose(shifted, a, atol=1e-10)
    perm = torch.from_numpy(np.random.default_rng(5).permutation(atype.shape[0]))
    permuted = atomic_tensor(model, odef, coord[perm], atype[perm], box)
    assert torch.allclose(permuted, a[perm], atol=1e-10)


OTHER_ROT_DESCRIPTORS = {
    # type embedding: one net for all types, fed [D_i, T[t_i]]
    "se_atten": {"type": "se_atten", "sel": 120, "rcut": 6.0, "rcut_smth": 0.5, "neuron": [4, 8, 16],
                 "axis_neuron": 4, "attn": 8, "attn_layer": 1, "seed": 1, "precision": "float64"},
    # rotation matrix of the se_e2_a member only
    "hybrid": {"type": "hybrid", "list": [SMALL_SE, {"type": "se_e2_r", "sel": [46, 92], "rcut": 6.0,
                                                      "rcut_smth": 0.5, "neuron": [4, 8], "seed": 2,
                                                      "precision": "float64"}]},
}


@pytest.mark.parametrize("descriptor", list(OTHER_ROT_DESCRIPTORS))
@pytest.mark.parametrize("fitting", [DIPOLE, dict(POLAR, fit_diag=False)], ids=["dipole", "polar"])
def test_rotation_covariance_with_other_descriptors(descriptor, fitting):
    params = OTHER_ROT_DESCRIPTORS[descriptor]
    doc = tensor_input(fitting, kind_of(fitting))
    doc["model"]["descriptor"] = copy.deepcopy(params)
    model, _ = model_with_stats(doc, nbatch=1)
    odef = model.heads["default"].output_def()
    coord, atype, box = water_frame(0)
    rot = random_rotation(4)
    a = atomic_tensor(model, odef, coord, atype, box)
    b = atomic_tensor(model, odef, coord @ rot, atype, box @ rot)
    expected = a @ rot if odef.size == 3 else (rot.T @ a.reshape(-1, 3, 3) @ rot).reshape(-1, 9)
    assert a.abs().max() > 1e-3
    assert torch.allclose(b, expected, atol=1e-10), (b - expected).abs().max()
    assert torch.all(a[atype == 1] == 0)


# ---------------------------------------------------------------------------------------------
# the tensor loss
# ---------------------------------------------------------------------------------------------


class _FakeFitting:
    def output_def(self) -> OutputDef:
        return OutputDef("dipole", 3, "dipole", "atomic_dipole", sel_types=(0,))


def tensor_loss(pref: float, pref_atomic: float):
    registration = get_registry().get("loss", "tensor")
    return registration.build({"type": "tensor", "pref": pref, "pref_atomic": pref_atomic},
                              LossContext("h", _FakeFitting(), 1e-3))


def test_tensor_loss_matches_hand_computed_value():
    rng = np.random.default_rng(0)
    atype = np.array([[0, 1, 0, 1], [0, 1, 0, 1]])  # B = 2 frames, N = 4 atoms, n_s = 2 of type 0
    sel = atype == 0
    pred_atomic = rng.normal(size=(2, 4, 3)) * sel[..., None]  # the head predicts 0 on H
    label_atomic = rng.normal(size=(2, 4, 3)) * sel[..., None]
    label_global = rng.normal(size=(2, 3))
    pred = {"atomic_dipole": torch.tensor(pred_atomic), "dipole": torch.tensor(pred_atomic.sum(1))}
    pref, pref_atomic, n_s = 3.0, 0.5, 2
    # v2: L_lc = mean over the B·n_s·3 selected components; L_gl = mean over B·3; L_gl enters / n_s
    l_lc = np.sum((pred_atomic - label_atomic)[sel] ** 2) / (2 * n_s * 3)
    l_gl = np.mean((pred_atomic.sum(1) - label_global) ** 2)
    loss = tensor_loss(pref, pref_atomic)
    atype_t = torch.tensor(atype)

    both = {"atomic_dipole": torch.tensor(label_atomic), "dipole": torch.tensor(label_global)}
    value, metrics = loss(pred, both, {"atomic_dipole": 1.0, "dipole": 1.0}, atype_t, 0.3, metrics=True)
    assert value.item() == pytest.approx(pref_atomic * l_lc + pref * l_gl / n_s, rel=1e-12)
    assert metrics["rmse"] == pytest.approx(math.sqrt(pref_atomic * l_lc + pref * l_gl / n_s), rel=1e-12)
    assert metrics["rmse_lc"] == pytest.approx(math.sqrt(l_lc), rel=1e-12)
    assert metrics["rmse_gl"] == pytest.approx(math.sqrt(l_gl) / n_s, rel=1e-12)
    assert loss.metric_weight(atype_t, pred) == n_s

    # a system with only atomic labels trains only the atomic term (and the other metric is NaN)
    value, metrics = loss(pred, {"atomic_dipole": torch.tensor(label_atomic)}, {"atomic_dipole": 1.0}, atype_t, 1.0, True)
    assert value.item() == pytest.approx(pref_atomic * l_lc, rel=1e-12)
    assert math.isnan(metrics["rmse_gl"])
    # ... and one with only global labels only the global term
    value, metrics = loss(pred, {"dipole": torch.tensor(label_global)}, {"dipole": 1.0}, atype_t, 1.0, True)
    assert value.item() == pytest.approx(pref * l_gl / n_s, rel=1e-12)
    assert math.isnan(metrics["rmse_lc"])
    # pref_atomic = 0 switches the atomic term off entirely
    off = tensor_loss(pref, 0.0)
    assert [r.key for r in off.requirements()] == ["dipole"]
    assert off.metric_names() == ["rmse", "rmse_gl"]
    assert off(pred, both, {"atomic_dipole": 1.0, "dipole": 1.0}, atype_t, 1.0)[0].item() == pytest.approx(pref * l_gl / n_s)


def test_tensor_loss_checks_its_prefs():
    with pytest.raises(MtcoreError, match="both 0"):
        tensor_loss(0.0, 0.0)
    with pytest.raises(MtcoreError, match=">= 0"):
        tensor_loss(-1.0, 1.0)
    doc = tensor_input(DIPOLE, "dipole")
    doc["loss"] = {"type": "tensor", "pref": 1.0}
    with pytest.raises(MtcoreError, match="pref_atomic"):
        normalize(doc, Path("/"))


def test_head_without_loss_section_gets_default_tensor_loss():
    doc = tensor_input(DIPOLE, "dipole")
    del doc["loss"]
    config = normalize(doc, Path("/"))
    assert config.heads["default"].loss == {"type": "tensor", "pref": 1.0, "pref_atomic": 1.0}


# ---------------------------------------------------------------------------------------------
# atomic labels on disk: v2 (selected atoms only) and v3 (every atom) layouts
# ---------------------------------------------------------------------------------------------

V2_ATOMIC = TENSOR / "dipole" / "training_data" / "atomic_system"
V3_ATOMIC = V3_DIPOLE / "training_data_reformat" / "atomic_system"
ATOMIC_DIPOLE_O = DataRequirement("atomic_dipole", 3, atomic=True, sel_types=(0,))


def load(path: Path, req: DataRequirement = ATOMIC_DIPOLE_O):
    return load_system(path, ["O", "H"], [req], "set", get_registry())


def test_both_atomic_label_layouts_load_the_same(tmp_path):
    v2, v3 = load(V2_ATOMIC), load(V3_ATOMIC)
    assert np.array_equal(v2.coords, v3.coords)  # the same frames, so the labels must agree
    assert v2.labels["atomic_dipole"].shape == (80, 192, 3)
    assert np.array_equal(v2.labels["atomic_dipole"], v3.labels["atomic_dipole"])
    hydrogens = np.asarray(v2.atypes[0]) == 1
    assert np.all(v2.labels["atomic_dipole"][:, hydrogens] == 0)
    assert np.abs(v2.labels["atomic_dipole"][:, ~hydrogens]).max() > 0
    # v3 rows of unselected atoms are ignored, whatever they hold
    noisy = tmp_path / "noisy"
    shutil.copytree(V3_ATOMIC, noisy)
    raw = np.load(noisy / "set.000" / "atomic_dipole.npy").reshape(80, 192, 3)
    raw[:, hydrogens] = 9.0
    np.save(noisy / "set.000" / "atomic_dipole.npy", raw.reshape(80, -1))
    assert np.array_equal(load(noisy).labels["atomic_dipole"], v2.labels["atomic_dipole"])


def test_atomic_label_of_wrong_shape_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(V2_ATOMIC, bad)
    np.save(bad / "set.000" / "atomic_dipole.npy", np.zeros((80, 7 * 3)))
    with pytest.raises(MtcoreError) as info:
        load(bad)
    message = str(info.value)
    assert "\n" not in message
    assert str(bad / "set.000" / "atomic_dipole.npy") in message
    assert "576" in message and "192" in message  # both layouts it would have accepted


def test_label_requirements_are_per_head(tmp_path):
    """Two dipole heads with different sel_type read the same file name in different layouts."""
    doc = {
        "model": {
            "type_map": ["O", "H"],
            "descriptor": SMALL_SE,
            "fitting_net_dict": {"o_only": DIPOLE, "all": dict(DIPOLE, sel_type=None, seed=5)},
        },
        "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 10},
        "loss_dict": {"o_only": TENSOR_LOSS, "all": TENSOR_LOSS},
        "training": {
            "data_dict": {
                "o_only": {"training_data": {"systems": [str(V2_ATOMIC)], "batch_size": 1}},  # 64 rows: O only
                "all": {"training_data": {"systems": [str(V3_ATOMIC)], "batch_size": 1}},  # 192 rows
            },
            "numb_steps": 0, "seed": 1, "disp_freq": 1, "save_freq": 1,
        },
    }
    doc["model"]["data_stat_nbatch"] = 1
    trainer = Trainer(load_config(write_input(tmp_path, doc)), tmp_path, QUIET)
    o_only = trainer.heads["o_only"].train.systems[0].labels["atomic_dipole"]
    every = trainer.heads["all"].train.systems[0].labels["atomic_dipole"]
    assert np.array_equal(o_only, every)  # the v3 file holds zeros on H, so both read the same values
    assert trainer.model.heads["all"].output_def().sel_types == (0, 1)
    with pytest.raises(MtcoreError, match="atomic_dipole.npy"):  # the O-only file cannot serve sel_type null
        load(V2_ATOMIC, DataRequirement("atomic_dipole", 3, atomic=True, sel_types=(0, 1)))


# ---------------------------------------------------------------------------------------------
# polar: diagonal shift per type index, from every frame
# ---------------------------------------------------------------------------------------------


def write_polar_systems(root: Path, rng: np.random.Generator) -> list[str]:
    """Water frames with made-up H polarizabilities: an atomic (v3 layout) and a global system."""
    source = WATER / "data_0"
    coord = np.load(source / "set.000" / "coord.npy")[:6]
    box = np.load(source / "set.000" / "box.npy")[:6]
    types = np.loadtxt(source / "type.raw", dtype=np.int64)
    paths = []
    for name in ("atomic", "global"):
        system = root / name
        (system / "set.000").mkdir(parents=True)
        shutil.copy(source / "type.raw", system / "type.raw")
        shutil.copy(source / "type_map.raw", system / "type_map.raw")
        np.save(system / "set.000" / "coord.npy", coord)
        np.save(system / "set.000" / "box.npy", box)
        frame_scale = rng.uniform(0.5, 3.0, size=(6, 1, 1))  # frames differ: the first one alone is not enough
        if name == "atomic":
            atomic = (rng.normal(size=(6, types.size, 9)) + 4.0 * np.eye(3).reshape(1, 1, 9)) * frame_scale.reshape(6, 1, 1)
            atomic[:, types == 0] = 0.0
            np.save(system / "set.000" / "atomic_polarizability.npy", atomic.reshape(6, -1))
        else:
            np.save(system / "set.000" / "polarizability.npy",
                    rng.normal(size=(6, 9)) + 600.0 * frame_scale.reshape(6, 1) * np.eye(3).reshape(1, 9))
        paths.append(str(system))
    return paths


def test_polar_shift_diag_is_per_type_index_over_all_frames(tmp_path):
    systems = write_polar_systems(tmp_path, np.random.default_rng(1))
    fitting = dict(POLAR, sel_type=[1])  # H only: type index 1 is position 0 in sel_type
    doc = small_input(tmp_path, descriptor=SMALL_SE, fitting=fitting, train_systems=systems, valid_systems=systems)
    doc["loss"] = dict(TENSOR_LOSS)
    config = normalize(doc, Path("/"))
    model = build_model(config)
    head = model.heads["default"]
    ds = load_dataset(config.heads["default"].training_data, config.type_map, head.stat_requirements(),
                      NeighborCache(model.rcut), get_registry(), "t")
    batches = [ds.batch(i, np.arange(s.nframes)) for i, s in enumerate(ds.systems)]  # every frame
    head.compute_output_stats([b.stat_sample() for b in batches])

    # numpy least squares: atomic frames give n_H·x = Σ_H α*, global frames give n_H·x = α*
    rows, rhs = [], []
    for s in ds.systems:
        is_h = np.asarray(s.atypes[0]) == 1
        for f in range(s.nframes):
            rows.append([is_h.sum()])
            if "atomic_polarizability" in s.labels:
                rhs.append(s.labels["atomic_polarizability"][f][is_h].sum(0))
            else:
                rhs.append(s.labels["polarizability"][f])
    x = np.linalg.lstsq(np.array(rows, dtype=float), np.array(rhs), rcond=None)[0][0]
    expected = np.mean(np.diagonal(x.reshape(3, 3)))
    shift = head.constant_matrix.numpy()
    assert shift[0] == 0.0  # O is not selected
    assert shift[1] == pytest.approx(expected, rel=1e-10)
    first_frames_only = np.mean(np.diagonal((np.array(rhs)[[0, 6]].sum(0) / (2 * rows[0][0])).reshape(3, 3)))
    assert abs(first_frames_only - expected) > 0.05 * abs(expected)  # v2's first-frame estimate differs

    # the forward pass reads the shift by type index too: with scale 0 an H atom is exactly c_H·I
    head.scale.zero_()
    coord, atype, box = water_frame(0)
    out = predict(model, "default", coord, atype, box)["atomic_polarizability"][0].detach().reshape(-1, 3, 3)
    assert torch.allclose(out[atype == 1], torch.eye(3, dtype=torch.float64) * shift[1], atol=1e-12)
    assert torch.all(out[atype == 0] == 0)


def test_polar_scale_is_per_type_index():
    from mtcore_builtins.fittings.polar import per_type_scale

    assert per_type_scale(2.0, [1], 3, "h") == [2.0, 2.0, 2.0]
    assert per_type_scale([1.0, 2.0, 3.0], [1], 3, "h") == [1.0, 2.0, 3.0]
    assert per_type_scale([5.0], [1], 3, "h") == [1.0, 5.0, 1.0]  # v2 style: one per sel_type entry
    with pytest.raises(MtcoreError, match="scale has 2 values"):
        per_type_scale([1.0, 2.0], [1], 3, "h")


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


FAST_SE = dict(SMALL_SE, rcut=4.0, rcut_smth=3.5, sel=[20, 40])  # fewer pairs: quick training tests


def validation_errors(trainer: Trainer, head: str, nframes: int = 2) -> dict[str, float]:
    """The head's loss (starting prefactors) and metrics, averaged over the same validation frames
    of every validation system (a metric whose label a system lacks is left out)."""
    runtime = trainer.heads[head]
    values: dict[str, list] = {}
    for index, system in enumerate(runtime.valid.systems):
        for frame in range(min(nframes, system.nframes)):
            batch = runtime.valid.batch(index, np.array([frame]))
            pred = trainer._predict(head, batch, create_graph=False)
            loss, metrics = runtime.loss(pred, labels_on(batch, trainer.device), batch.find, batch.atype, 1.0, True)
            values.setdefault("loss", []).append(float(loss.detach()))
            for key, value in metrics.items():
                if not math.isnan(value):
                    values.setdefault(key, []).append(value)
    return {key: float(np.mean(v)) for key, v in values.items()}


def test_single_task_dipole_training_learns(tmp_path):
    doc = tensor_input(DIPOLE, "dipole", tmp_path, numb_steps=30, disp_freq=10, save_freq=30)
    doc["model"]["descriptor"] = dict(FAST_SE)
    doc["learning_rate"] = {"start_lr": 1e-2, "stop_lr": 1e-3, "decay_steps": 10}
    trainer = Trainer(load_config(write_input(tmp_path, doc)), tmp_path, QUIET)
    before = validation_errors(trainer, "default")
    trainer.run()
    after = validation_errors(trainer, "default")
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    assert after["rmse_lc"] < 0.7 * before["rmse_lc"], (before, after)
    header = (tmp_path / "lcurve.out").read_text().splitlines()[0]
    assert "rmse_lc" in header and "rmse_gl" in header


def test_multi_task_ener_dipole_training_lowers_both_validation_errors(tmp_path):
    """The shipped v2 example input (paths, weights 10:20, losses), with small nets and 30 steps."""
    base = ROOT / "examples" / "water_multi_task" / "ener_dipole"
    doc = json.loads((base / "input.json").read_text())
    for entry in doc["training"]["data_dict"].values():
        for part in ("training_data", "validation_data"):
            entry[part]["systems"] = [str((base / s).resolve()) for s in entry[part]["systems"]]
    doc["model"]["descriptor"].update(FAST_SE)
    doc["model"]["fitting_net_dict"]["water_dipole"]["neuron"] = [16, 16]
    doc["model"]["fitting_net_dict"]["water_ener"]["neuron"] = [16, 16]
    doc["model"]["data_stat_nbatch"] = 2
    doc["learning_rate"] = {"type": "exp", "start_lr": 5e-3, "stop_lr": 1e-3, "decay_steps": 10}
    doc["training"].update(numb_steps=30, disp_freq=15, save_freq=30)
    trainer = Trainer(load_config(write_input(tmp_path, doc)), tmp_path, QUIET)
    heads = ("water_dipole", "water_ener")
    before = {h: validation_errors(trainer, h) for h in heads}
    trainer.run()
    after = {h: validation_errors(trainer, h) for h in heads}
    dipole, ener = (before["water_dipole"], after["water_dipole"]), (before["water_ener"], after["water_ener"])
    assert dipole[1]["loss"] < 0.8 * dipole[0]["loss"], dipole
    assert dipole[1]["rmse_lc"] < 0.8 * dipole[0]["rmse_lc"], dipole
    # 20-odd energy steps fit the energy (per atom) well; forces need far more steps, so only
    # ask that the force-dominated loss does not get worse
    assert ener[1]["rmse_e"] < 0.5 * ener[0]["rmse_e"], ener
    assert ener[1]["loss"] < ener[0]["loss"], ener


# ---------------------------------------------------------------------------------------------
# freeze, inference API, mtcore test
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """A three-head model (ener, dipole, polar) with statistics, frozen one file per head."""
    from mtcore.freeze import freeze

    tmp = tmp_path_factory.mktemp("frozen")
    doc = {
        "model": {
            "type_map": ["O", "H"],
            "descriptor": SMALL_SE,
            "fitting_net_dict": {
                "ener": {"type": "ener", "neuron": [16, 16], "seed": 1, "precision": "float64",
                         "layer_name": ["shared0", None, None]},
                "dipole": dict(DIPOLE, layer_name=["shared0", None, None]),
                "polar": dict(POLAR, fit_diag=False),
            },
        },
        "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 10},
        "loss_dict": {"ener": {"type": "ener"}},  # the tensor heads get the default tensor loss
        "training": {
            "data_dict": {
                "ener": {"training_data": {"systems": [str(WATER / "data_0")], "batch_size": 1}},
                "dipole": {"training_data": {"systems": tensor_systems("dipole"), "batch_size": 1}},
                "polar": {"training_data": {"systems": tensor_systems("polar"), "batch_size": 1}},
            },
            "numb_steps": 1, "seed": 1,
        },
    }
    model, config = model_with_stats(doc, nbatch=1)
    assert model.heads["dipole"].nets[0].blocks[0].dense is model.heads["ener"].nets[0].blocks[0].dense
    files = freeze({"config": config.document, "model": model.state_dict()}, tmp / "frozen.pth")
    united = freeze({"config": config.document, "model": model.state_dict()}, tmp / "united.pth", united=True)[0]
    return model, {p.stem.replace("frozen_", ""): p for p in files}, united


@pytest.mark.parametrize("head", ["dipole", "polar"])
def test_frozen_tensor_heads_equal_the_in_memory_model(frozen, head):
    from mtcore.infer import load as load_frozen

    model, files, united = frozen
    odef = model.heads[head].output_def()
    coord, atype, box = water_frame(2)
    expected = predict(model, head, coord, atype, box)
    for pot in (load_frozen(files[head]), load_frozen(united, head=head)):
        for cell in (box, None):
            out = pot.evaluate(coord.numpy(), None if cell is None else cell.numpy(), atype.numpy())
            ref = expected if cell is not None else predict(model, head, coord, atype, None)
            for key in (odef.global_key, odef.atomic_key):
                assert out[key].shape == tuple(ref[key].shape)
                np.testing.assert_allclose(out[key], ref[key].detach().numpy(), rtol=0, atol=1e-10)


def test_mtcore_test_reports_dipole_errors(frozen):
    from mtcore.cli import app
    from mtcore.infer import load as load_frozen

    _, files, _ = frozen
    atomic = TENSOR / "dipole" / "validation_data" / "atomic_system"
    result = CliRunner().invoke(app, ["test", "-m", str(files["dipole"]), "-s", str(atomic),
                                      "-s", str(atomic.parent / "global_system"), "-n", "3"])
    assert result.exit_code == 0, result.output
    for title in ("Dipole", "Dipole/atom", "Atomic dipole"):
        assert title in result.output
    result = CliRunner().invoke(app, ["test", "-m", str(files["dipole"]), "-s", str(atomic), "-n", "3", "--json"])
    errors = json.loads(result.stdout)["combined"]
    # the atomic error is over the selected (O) atoms only, as the v2 label holds only those
    system = load(atomic)
    out = load_frozen(files["dipole"]).evaluate(system.coords[:3], None, np.asarray(system.atypes[0]))
    oxygen = np.asarray(system.atypes[0]) == 0
    diff = (out["atomic_dipole"] - system.labels["atomic_dipole"][:3])[:, oxygen]
    assert errors["Atomic dipole"]["rmse"] == pytest.approx(np.sqrt(np.mean(diff**2)), rel=1e-9)
    assert errors["Atomic dipole"]["mae"] == pytest.approx(np.mean(np.abs(diff)), rel=1e-9)


def test_mtcore_test_detail_files_for_a_dipole_head(frozen, tmp_path):
    from mtcore.cli import app

    _, files, _ = frozen
    atomic = TENSOR / "dipole" / "validation_data" / "atomic_system"
    glob = atomic.parent / "global_system"
    prefix = tmp_path / "dip"
    args = ["test", "-m", str(files["dipole"]), "-s", str(atomic), "-s", str(glob), "-n", "3"]
    result = CliRunner().invoke(app, args + ["-d", str(prefix)])
    assert result.exit_code == 0, result.output
    errors = json.loads(CliRunner().invoke(app, args + ["--json"]).stdout)["combined"]
    nsel = int((np.asarray(load(atomic).atypes[0]) == 0).sum())
    atomic_rows = np.loadtxt(tmp_path / "dip.atomic.out")
    assert atomic_rows.shape == (3 * nsel, 6)  # one row per selected (O) atom
    assert (tmp_path / "dip.atomic.out").read_text().splitlines()[0].endswith("data_x data_y data_z pred_x pred_y pred_z")
    for name, title in (("dip.atomic.out", "Atomic dipole"), ("dip.out", "Dipole"), ("dip.peratom.out", "Dipole/atom")):
        table = np.loadtxt(tmp_path / name, ndmin=2)
        diff = table[:, 3:] - table[:, :3]
        assert np.sqrt(np.mean(diff**2)) == pytest.approx(errors[title]["rmse"], rel=1e-6), title


# ---------------------------------------------------------------------------------------------
# a tensor head needs a rotation matrix
# ---------------------------------------------------------------------------------------------


class _NoRotation(Descriptor):
    """A descriptor without rotation matrix (like se_e2_r), for the error message."""

    def get_rcut(self) -> float:
        return 4.0

    def get_ntypes(self) -> int:
        return 2

    def get_dim_out(self) -> int:
        return 8


def _registry_with_fake_descriptor() -> Registry:
    fake = DescriptorRegistration(name="no_rotation", arguments=lambda ctx: [], build=lambda p, ctx: _NoRotation())
    entries = get_registry().entries() + [Registered("descriptor", fake, PluginSource("tests", "0", "no_rotation"))]
    return Registry(entries)


@pytest.mark.parametrize("descriptor", ["no_rotation", "se_e2_r"])
@pytest.mark.parametrize("fitting", [DIPOLE, POLAR], ids=["dipole", "polar"])
def test_tensor_head_without_rotation_matrix_is_a_clear_error(descriptor, fitting):
    registry = _registry_with_fake_descriptor()
    params = {"type": descriptor} if descriptor == "no_rotation" else {"type": descriptor, "sel": [46, 92], "neuron": [4, 8]}
    doc = tensor_input(fitting, kind_of(fitting))
    doc["model"]["descriptor"] = params
    config = normalize(doc, Path("/"), registry)
    with pytest.raises(MtcoreError, match="rotation matrix") as info:
        build_model(config, registry)
    assert f"'{fitting['type']}' head" in str(info.value)
