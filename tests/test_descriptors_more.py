"""se_e2_r, se_e3 and hybrid: formulas against direct (slot-by-slot) evaluations, hybrid =
concatenation of its members, rotation matrices for tensor heads, exclude_types, float32,
statistics for a type without centres, training (single- and multi-task) and freezing.

The physics checks (forces, virials, invariances, smoothness) live in ``test_physics.py``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from helpers import WATER, model_with_stats, predict, random_rotation, small_input, water_frame
from mtcore.config import normalize
from mtcore.errors import MtcoreError
from mtcore.hookspecs import FittingRegistration
from mtcore.model.build import build_descriptor, build_model
from mtcore.model.descriptor import StatSample
from mtcore.model.fitting import Fitting, OutputDef
from mtcore.model.frozen import FrozenModel
from mtcore.model.neighbor_list import build_neighbor_list
from mtcore.plugins import PluginSource, Registered, Registry, get_registry
from mtcore.train.trainer import Trainer

SE_R = {"type": "se_e2_r", "sel": [46, 92], "rcut": 6.0, "rcut_smth": 0.5, "neuron": [4, 8, 16], "seed": 11}
SE_T = {"type": "se_e3", "sel": [20, 40], "rcut": 4.5, "rcut_smth": 0.5, "neuron": [2, 4, 8], "seed": 12}
SE_A = {"type": "se_e2_a", "sel": [20, 40], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8, 16], "axis_neuron": 4,
        "seed": 13}
HYBRID = {"type": "hybrid", "list": [SE_A, SE_R, dict(SE_T, rcut=3.5, sel=[12, 24])]}
SMALL_FIT = {"type": "ener", "neuron": [16, 16], "seed": 2}
TYPE_MAP = ["O", "H"]


def frame_pairs(coord, atype, box, rcut):
    """Flat pair list of one frame as a descriptor receives it: (center, neighbor, shift)."""
    center, neighbor, image = build_neighbor_list(coord, atype, box, rcut, 2)
    shift = image.to(torch.float64) @ box if box is not None else torch.zeros(center.shape[0], 3, dtype=torch.float64)
    return center, neighbor, shift


def descriptor_of(model, coord, atype, box):
    return model.descriptor(coord, atype, *frame_pairs(coord, atype, box, model.rcut))


def slot_rows(desc, coord, atype, box):
    """Un-normalised rows in DeePMD-kit's dense layout [n, Σsel, 4] (empty slots 0) and slot types."""
    center, neighbor, shift = frame_pairs(coord, atype, box, desc.rcut)
    rij = coord[neighbor] - coord[center] + shift
    r = rij.norm(dim=1)
    n, sel = coord.shape[0], desc.sel_list
    rows = torch.zeros(n, sum(sel), 4, dtype=torch.float64)
    filled = torch.zeros(n, len(sel), dtype=torch.long)
    for p in range(center.shape[0]):  # test-only reference: plain loops over pairs
        i, j = int(center[p]), int(neighbor[p])
        t = int(atype[j])
        if r[p] >= desc.rcut or bool(desc.excluded[atype[i], t]) or filled[i, t] >= sel[t]:
            continue
        sw = torch.ones(()) if r[p] < desc.rcut_smth else None
        u = (r[p] - desc.rcut_smth) / (desc.rcut - desc.rcut_smth)
        sw = sw if sw is not None else u**3 * (-6 * u**2 + 15 * u - 10) + 1
        s = sw / r[p]
        rows[i, sum(sel[:t]) + filled[i, t]] = torch.cat([s.view(1), s * rij[p] / r[p]])
        filled[i, t] += 1
    slot_type = torch.cat([torch.full((s,), t) for t, s in enumerate(sel)])
    return rows, slot_type


# ------------------------------------------------------------------------------------------
# formulas
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stat_models(tmp_path_factory):
    out = {}
    for name, desc in {"se_e2_r": SE_R, "se_e2_r_one_side": dict(SE_R, type_one_side=True, exclude_types=[[0, 1]]),
                       "se_e3": SE_T, "hybrid": HYBRID}.items():
        doc = small_input(tmp_path_factory.mktemp(name), descriptor=desc, fitting=SMALL_FIT)
        out[name] = model_with_stats(doc)[0]
    return out


@pytest.mark.parametrize("name", ["se_e2_r", "se_e2_r_one_side"])
def test_se_e2_r_equals_slot_by_slot_mean_with_one_fifth(stat_models, name):
    """D_i = (1/5)(1/N_c) Σ_slots G_j over every slot, empty ones (R̃ = -davg/dstd) included."""
    desc = stat_models[name].descriptor
    coord, atype, box = water_frame(1)
    coord, atype = coord[:40], atype[:40]  # a slab of the frame keeps the loops short
    rows, slot_type = slot_rows(desc, coord, atype, box)
    got = desc(coord, atype, *frame_pairs(coord, atype, box, desc.rcut))["descriptor"]
    want = torch.zeros_like(got)
    for i in range(coord.shape[0]):
        ti = int(atype[i])
        normed = (rows[i, :, :1] - desc.davg[ti]) / desc.dstd[ti]
        for t in range(2):
            if bool(desc.excluded[ti, t]):
                continue
            group = t if desc.type_one_side else ti * 2 + t
            net = desc.nets[desc.net_groups.index(group)]
            want[i] += net(normed[slot_type == t]).sum(0)
    want = want / 5.0 / sum(desc.sel_list)
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)


def test_se_e3_equals_all_slot_pairs_per_block(stat_models):
    """D_i = Σ_{p≤q} 1/(sel_p sel_q) Σ_{j∈p,k∈q} θ_jk N_pq(θ_jk) over all slots, empty ones included."""
    desc = stat_models["se_e3"].descriptor
    coord, atype, box = water_frame(2)
    coord, atype = coord[:64], atype[:64]  # a slab of the frame keeps the loops short
    rows, slot_type = slot_rows(desc, coord, atype, box)
    ti = atype
    ang = (rows[:, :, 1:] - desc.davg[ti][:, None, 1:]) / desc.dstd[ti][:, None, 1:]  # empty slots: -0/dstd = 0
    want = torch.zeros(coord.shape[0], desc.dim_emb, dtype=torch.float64)
    for b, net in enumerate(desc.nets):
        p, q = desc.block_p[b], desc.block_q[b]
        theta = torch.einsum("njc,nkc->njk", ang[:, slot_type == p], ang[:, slot_type == q])
        want += (theta.unsqueeze(-1) * net(theta.unsqueeze(-1))).sum((1, 2)) / (desc.sel_list[p] * desc.sel_list[q])
    got = desc(coord, atype, *frame_pairs(coord, atype, box, desc.rcut))["descriptor"]
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)


def test_hybrid_is_the_concatenation_of_standalone_members(stat_models):
    hybrid = stat_models["hybrid"].descriptor
    registry = get_registry()
    coord, atype, box = water_frame(3)
    parts, rots = [], []
    for params, member in zip(HYBRID["list"], hybrid.members):
        alone = build_descriptor(normalised(params), TYPE_MAP, registry)
        alone.davg.copy_(member.davg)
        alone.dstd.copy_(member.dstd)
        # the standalone member has the same initial weights (same seed), so everything matches
        for (k, a), (_, b) in zip(alone.state_dict().items(), member.state_dict().items()):
            assert torch.equal(a, b), k
        out = alone(coord, atype, *frame_pairs(coord, atype, box, alone.get_rcut()))  # its own neighbour list
        parts.append(out["descriptor"])
        if "rot_mat" in out:
            rots.append(out["rot_mat"])
    got = hybrid(coord, atype, *frame_pairs(coord, atype, box, hybrid.get_rcut()))
    assert hybrid.get_rcut() == 6.0
    assert got["descriptor"].shape[1] == hybrid.get_dim_out() == sum(p.shape[1] for p in parts)
    assert torch.allclose(got["descriptor"], torch.cat(parts, 1), atol=1e-12, rtol=0)
    assert hybrid.get_dim_rot() == 16 and torch.allclose(got["rot_mat"], torch.cat(rots, 1), atol=1e-12, rtol=0)


def normalised(desc: dict) -> dict:
    """A descriptor section normalised by the schema (defaults filled), as a builder receives it."""
    return normalize(small_input(Path("/"), descriptor=desc, fitting=SMALL_FIT), Path("/")).model["descriptor"]


def test_hybrid_statistics_are_each_members_own(stat_models, tmp_path):
    """Each member's davg/dstd equal those it gets when it is the whole descriptor."""
    hybrid = stat_models["hybrid"].descriptor
    for params, member in zip(HYBRID["list"], hybrid.members):
        alone = model_with_stats(small_input(tmp_path, descriptor=params, fitting=SMALL_FIT))[0].descriptor
        assert torch.allclose(alone.davg, member.davg, atol=1e-12) and torch.allclose(alone.dstd, member.dstd, atol=1e-12)


# ------------------------------------------------------------------------------------------
# schema, sel, rotation matrices
# ------------------------------------------------------------------------------------------


def test_schema_defaults_and_aliases():
    doc = small_input(Path("/"), descriptor={"type": "se_r"}, fitting=SMALL_FIT)
    d = normalize(doc, Path("/")).model["descriptor"]
    assert d["type"] == "se_e2_r" and d["sel"] == "auto" and d["neuron"] == [10, 20, 40] and d["exclude_types"] == []
    assert d["rcut"] == 6.0 and d["rcut_smth"] == 0.5 and d["type_one_side"] is False and "axis_neuron" not in d
    for alias in ("se_at", "se_a_3be", "se_t"):
        doc = small_input(Path("/"), descriptor={"type": alias}, fitting=SMALL_FIT)
        d = normalize(doc, Path("/")).model["descriptor"]
        assert d["type"] == "se_e3" and d["exclude_types"] == [] and "type_one_side" not in d


@pytest.mark.parametrize("desc", [SE_R, SE_T, HYBRID], ids=["se_e2_r", "se_e3", "hybrid"])
def test_seed_fixes_the_weights_and_trainable_false_freezes_them(desc):
    def build(**changes):
        d = copy.deepcopy(desc)
        for m in d.get("list", [d]):
            m.update(changes)
        return build_descriptor(normalised(d), TYPE_MAP, get_registry())

    a, b, c = build(), build(), build(seed=99)
    for (key, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), key
    assert any(not torch.equal(x, z) for x, z in zip(a.parameters(), c.parameters()))
    assert all(p.requires_grad for p in a.parameters())
    frozen = build(trainable=False)
    assert len(list(frozen.parameters())) > 0 and not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize(
    "members, message",
    [([], "at least one"), ([{"type": "hybrid", "list": [SE_R]}], "hybrid"), ([dict(SE_R, axis_neuron=4)], "axis_neuron")],
)
def test_hybrid_rejects_empty_nested_and_unknown_keys(members, message):
    doc = small_input(Path("/"), descriptor={"type": "hybrid", "list": members}, fitting=SMALL_FIT)
    with pytest.raises(MtcoreError, match=message):
        config = normalize(doc, Path("/"))
        build_model(config)


def test_hybrid_update_sel_resolves_each_member_with_its_own_rcut():
    from mtcore_builtins.descriptors.hybrid import update_sel  # the registration's function

    class Stat:
        ntypes = 2

        @staticmethod
        def max_count(rcut, mixed):
            return [int(rcut * 10), int(rcut * 20)]

    params = {"type": "hybrid", "list": [dict(SE_A, sel="auto"), dict(SE_R, sel="auto:1.0")]}
    out = update_sel(params, Stat())
    assert out["list"][0]["sel"] == [44, 88] and out["list"][1]["sel"] == [60, 120]
    assert params["list"][0]["sel"] == "auto"  # the input is not modified


class FakeTensorFitting(Fitting):
    """A minimal head that needs the rotation matrix: atomic vector = Σ_m Q_i[m, :]."""

    def output_def(self) -> OutputDef:
        return OutputDef("dipole", 3, "dipole", "atomic_dipole")

    def needs_rot_mat(self) -> bool:
        return True

    def forward(self, descriptor: dict, atype: torch.Tensor) -> torch.Tensor:
        return descriptor["rot_mat"].sum(1).to(torch.float64)


def fake_tensor_registry() -> Registry:
    reg = FittingRegistration(name="fake_tensor", arguments=lambda ctx: [], build=lambda p, ctx: FakeTensorFitting())
    return Registry(get_registry().entries() + [Registered("fitting_net", reg, PluginSource("tests", "0", "fake"))])


@pytest.mark.parametrize("desc", [SE_R, SE_T, {"type": "hybrid", "list": [SE_R, SE_T]}])
def test_tensor_head_needs_a_rotation_matrix(desc):
    registry = fake_tensor_registry()
    doc = small_input(Path("/"), descriptor=desc, fitting={"type": "fake_tensor"})
    with pytest.raises(MtcoreError, match="rotation matrix"):
        build_model(normalize(doc, Path("/"), registry), registry)


def test_tensor_head_works_with_a_hybrid_containing_se_e2_a():
    registry = fake_tensor_registry()
    doc = small_input(Path("/"), descriptor={"type": "hybrid", "list": [SE_R, SE_A]}, fitting={"type": "fake_tensor"})
    model = build_model(normalize(doc, Path("/"), registry), registry)
    assert model.descriptor.get_dim_rot() == 16
    coord, atype, box = water_frame(0)
    rot = random_rotation(3)
    ref = predict(model, "default", coord, atype, box)["atomic_dipole"]
    out = predict(model, "default", coord @ rot, atype, box @ rot)["atomic_dipole"]
    assert ref.abs().max() > 1e-3 and torch.allclose(out, ref @ rot, atol=1e-10)


# ------------------------------------------------------------------------------------------
# exclude_types, float32, statistics
# ------------------------------------------------------------------------------------------

EXCLUDED = {
    "se_e2_r": dict(SE_R, exclude_types=[[0, 1]]),
    "se_e2_r_one_side": dict(SE_R, exclude_types=[[0, 1]], type_one_side=True),
    "se_e3": dict(SE_T, exclude_types=[[0, 1]]),
    "hybrid": {"type": "hybrid", "list": [dict(SE_R, exclude_types=[[0, 1]]), dict(SE_T, exclude_types=[[1, 0]])]},
}


def two_oxygens_and_a_hydrogen(x: float):
    coord = torch.tensor([[0.0, 0.0, 0.0], [2.6, 0.3, 0.0], [x, 1.1, 0.4]], dtype=torch.float64)
    return coord, torch.tensor([0, 0, 1])


@pytest.mark.parametrize("name", list(EXCLUDED))
def test_excluded_pair_does_not_interact(name, tmp_path):
    """O-H excluded: moving the only H around two O changes nothing; without exclusion it does."""
    for desc, independent in ((EXCLUDED[name], True), (_without_exclusion(EXCLUDED[name]), False)):
        model = model_with_stats(small_input(tmp_path, descriptor=desc, fitting=SMALL_FIT), nbatch=1)[0]
        energies = []
        for x in (0.5, 1.2, 2.0):
            out = predict(model, "default", *two_oxygens_and_a_hydrogen(x), None)
            energies.append(out["energy"].item())
            if independent:
                assert out["force"][0, 2].abs().max() < 1e-12
        spread = max(energies) - min(energies)
        assert (spread < 1e-10) if independent else (spread > 1e-6), (desc, energies)


def _without_exclusion(desc: dict) -> dict:
    desc = copy.deepcopy(desc)
    for d in desc.get("list", [desc]):
        d["exclude_types"] = []
    return desc


@pytest.mark.parametrize("name", ["se_e2_r", "se_e3", "hybrid"])
def test_float32_matches_float64(name, tmp_path):
    """Same seeds, same statistics: float32 differs from float64 by rounding only (looser tolerances)."""
    base = {"se_e2_r": SE_R, "se_e3": SE_T, "hybrid": HYBRID}[name]

    def with_precision(d: dict, prec: str) -> dict:
        d = copy.deepcopy(d)
        for m in d.get("list", [d]):
            m["precision"] = prec
        return d

    outs = {}
    coord, atype, box = water_frame(0)
    for prec in ("float64", "float32"):
        doc = small_input(tmp_path, descriptor=with_precision(base, prec), fitting=dict(SMALL_FIT, precision=prec))
        model = model_with_stats(doc, nbatch=1)[0]
        outs[prec] = predict(model, "default", coord[:96], atype[:96], box)  # a slab keeps it short
        assert descriptor_of(model, coord[:96], atype[:96], box)["descriptor"].dtype == getattr(torch, prec)
    e64, e32 = outs["float64"]["energy"].item(), outs["float32"]["energy"].item()
    assert abs(e64 - e32) < 1e-5 * abs(e64)
    f64, f32 = outs["float64"]["force"], outs["float32"]["force"]
    assert f64.abs().max() > 1e-4 and (f64 - f32).abs().max() < 1e-3 * f64.abs().max()
    assert (outs["float64"]["virial"] - outs["float32"]["virial"]).abs().max() < 1e-3 * outs["float64"]["virial"].abs().max()


@pytest.mark.parametrize("desc", [SE_R, SE_T, HYBRID], ids=["se_e2_r", "se_e3", "hybrid"])
def test_statistics_of_a_type_without_centres_use_the_1_over_rcut_guard(desc):
    """Frames made of oxygens only: the H rows get davg 0 and dstd 1/rcut, never NaN."""
    descriptor = build_descriptor(normalised(desc), TYPE_MAP, get_registry())
    coord, _, box = water_frame(0)
    atype = torch.zeros(coord.shape[0], dtype=torch.long)
    center, neighbor, shift = frame_pairs(coord, atype, box, descriptor.get_rcut())
    sample = StatSample(coord, atype, center, neighbor, shift, 1, coord.shape[0], {}, {})
    descriptor.compute_input_stats([sample])
    members = list(descriptor.members) if desc["type"] == "hybrid" else [descriptor]
    for member in members:
        assert torch.isfinite(member.davg).all() and torch.isfinite(member.dstd).all()
        assert torch.all(member.davg[1] == 0) and torch.allclose(member.dstd[1], torch.full_like(member.dstd[1], 1.0 / member.rcut))
        assert member.dstd[0, 0] != 1.0 / member.rcut and member.davg[0, 0] > 0
    water_coord, water_type, _ = water_frame(1)
    out = descriptor(water_coord, water_type, *frame_pairs(water_coord, water_type, box, descriptor.get_rcut()))
    assert torch.isfinite(out["descriptor"]).all()


# ------------------------------------------------------------------------------------------
# training and freezing
# ------------------------------------------------------------------------------------------

TRAIN = {
    "se_e2_r": dict(SE_R, rcut=5.0, sel=[36, 72]),
    "se_e3": dict(SE_T, rcut=4.0, sel=[16, 32]),
    "hybrid": {"type": "hybrid", "list": [SE_A, dict(SE_R, rcut=5.0, sel=[36, 72])]},
}


def validation_errors(model, head: str, system: str = "data_3", frames: int = 2) -> tuple[float, float]:
    """(mean (ΔE/N)², mean ΔF²) on fixed validation frames: the energy loss at prefactors 1."""
    atype = torch.tensor(np.loadtxt(WATER / system / "type.raw", dtype=np.int64))

    def label(key: str) -> torch.Tensor:
        return torch.tensor(np.load(WATER / system / "set.000" / f"{key}.npy")[:frames].astype(np.float64))

    out = predict(model, head, label("coord"), atype, label("box"), want_virial=False)
    d_energy = (out["energy"].detach().reshape(-1) - label("energy").reshape(-1)) / atype.shape[0]
    d_force = out["force"].detach().reshape(frames, -1) - label("force")
    return float((d_energy**2).mean()), float((d_force**2).mean())


def assert_learned(before: tuple[float, float], after: tuple[float, float]) -> None:
    """The validation loss falls; its energy part at least halves and its force part does not grow
    (forces need more than a few dozen steps to improve much, energies do not)."""
    assert sum(after) < 0.9 * sum(before), (before, after)
    assert after[0] < 0.5 * before[0] and after[1] < 1.01 * before[1], (before, after)


def descriptor_weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.descriptor.parameters()]


def moved(before: list[torch.Tensor], model) -> bool:
    return all(not torch.equal(a, b) for a, b in zip(before, model.descriptor.parameters()))


LEARNING_RATE = {"type": "exp", "start_lr": 1e-2, "stop_lr": 1e-3, "decay_steps": 10}


@pytest.mark.parametrize("name", list(TRAIN))
def test_short_single_task_training_lowers_validation_loss(name, tmp_path):
    doc = small_input(tmp_path, descriptor=TRAIN[name], fitting=SMALL_FIT, numb_steps=30)
    doc["learning_rate"] = dict(LEARNING_RATE)
    doc["model"]["data_stat_nbatch"] = 2
    trainer = Trainer(normalize(doc, Path("/")), tmp_path, Console(file=open(os.devnull, "w")))
    before, weights = validation_errors(trainer.model, "default"), descriptor_weights(trainer.model)
    for _ in range(30):
        trainer.train_step("default")
        trainer.step += 1
    assert_learned(before, validation_errors(trainer.model, "default"))
    assert moved(weights, trainer.model)  # the descriptor learns too, not only the fitting net


@pytest.mark.parametrize("name", list(TRAIN))
def test_short_two_head_training_lowers_both_heads_validation_losses(name, tmp_path):
    data = {
        h: {"training_data": {"systems": [str(WATER / s)], "batch_size": 1}}
        for h, s in (("water_a", "data_0"), ("water_b", "data_2"))
    }
    loss = {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1}
    doc = {
        "model": {"type_map": TYPE_MAP, "descriptor": copy.deepcopy(TRAIN[name]), "data_stat_nbatch": 2,
                  "fitting_net_dict": {"water_a": dict(SMALL_FIT, seed=3), "water_b": dict(SMALL_FIT, seed=4)}},
        "learning_rate": dict(LEARNING_RATE),
        "loss_dict": {"water_a": loss, "water_b": dict(loss)},
        "training": {"data_dict": data, "numb_steps": 40, "seed": 3, "disp_freq": 10, "save_freq": 10},
    }
    trainer = Trainer(normalize(doc, Path("/")), tmp_path, Console(file=open(os.devnull, "w")))
    before = {h: validation_errors(trainer.model, h) for h in ("water_a", "water_b")}
    weights = descriptor_weights(trainer.model)
    drawn = []
    for _ in range(40):
        drawn.append(trainer.draw_head())
        trainer.train_step(drawn[-1])
        trainer.step += 1
    assert set(drawn) == {"water_a", "water_b"}
    for h in ("water_a", "water_b"):
        assert_learned(before[h], validation_errors(trainer.model, h))
    assert moved(weights, trainer.model)


@pytest.mark.parametrize("name", ["se_e2_r", "se_e3", "hybrid", "hybrid_float32"])
def test_frozen_model_equals_in_memory_model(stat_models, name, tmp_path):
    if name == "hybrid_float32":
        desc = copy.deepcopy(HYBRID)
        for m in desc["list"]:
            m["precision"] = "float32"
        model = model_with_stats(small_input(tmp_path, descriptor=desc, fitting=SMALL_FIT), nbatch=1)[0]
        tol = 1e-6
    else:
        model, tol = stat_models[name], 1e-10
    frozen = torch.jit.script(FrozenModel(model.descriptor, model.heads["default"], TYPE_MAP, "default", "{}"))
    coord, atype, box = water_frame(4)
    ref = predict(model, "default", coord, atype, box)
    out = frozen(coord, atype, box)
    assert abs(out["energy"].item() - ref["energy"].item()) < tol * max(1.0, abs(ref["energy"].item()))
    assert torch.allclose(out["force"], ref["force"], atol=tol, rtol=0)
    assert torch.allclose(out["virial"].reshape(-1), ref["virial"].reshape(-1), atol=10 * tol, rtol=0)
    cluster, types = coord[:20] - coord[:20].mean(0), atype[:20]  # and without a cell
    ref = predict(model, "default", cluster, types, None)
    out = frozen(cluster, types, None)
    assert torch.allclose(out["force"], ref["force"], atol=tol, rtol=0)
