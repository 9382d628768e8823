"""se_atten / se_atten_v2: equal to DeePMD-kit's sel-wide computation, mixed-type data, float32,
freezing, exclusions, virtual atoms, training (single- and multi-task), the v2.2.9 example inputs."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, WATER, model_with_stats, multi_task_input, predict, small_input, water_frame
from mtcore.config import normalize
from mtcore.model.env import smooth_weight
from mtcore.model.frozen import FrozenModel
from mtcore.model.neighbor_list import build_neighbor_list
from mtcore.plugins import get_registry
from test_training import lcurve_rows, make_trainer

SE_ATTEN = {"type": "se_atten", "sel": 120, "rcut": 6.0, "rcut_smth": 0.5, "neuron": [8, 16], "axis_neuron": 4,
            "attn": 16, "attn_layer": 2, "seed": 1, "precision": "float64"}
SMALL_FIT = {"type": "ener", "neuron": [16, 16], "seed": 2, "precision": "float64"}
EXAMPLES = ROOT / "tests" / "data" / "deepmd-v2.2.9"  # DeePMD-kit v2.2.9 example inputs, byte for byte

VARIANTS = {
    # set_davg_zero false everywhere so that empty slots carry a non-zero row
    "plain": dict(SE_ATTEN, set_davg_zero=False),
    "v2": dict(SE_ATTEN, type="se_atten_v2"),
    "stripped_one_side_mask_nodotr": dict(SE_ATTEN, stripped_type_embedding=True, type_one_side=True, attn_mask=True,
                                          attn_dotr=False, set_davg_zero=False, seed=5),
    "smooth_concat_one_side_excl": dict(SE_ATTEN, smooth_type_embdding=True, type_one_side=True, set_davg_zero=False,
                                        exclude_types=[[0, 1]], seed=6),
    "v2_truncated_sel": dict(SE_ATTEN, type="se_atten_v2", sel=40, attn_mask=True, seed=7),
}


def built(desc: dict, fitting: dict = SMALL_FIT):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = model_with_stats(small_input(Path("."), descriptor=desc, fitting=fitting), nbatch=1)
    return model


# ------------------------------------------------------------------------------------------
# An independent, literal sel-wide implementation (DeePMD-kit's layout: every slot computed)
# ------------------------------------------------------------------------------------------


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True).clamp_min(1e-12))


def reference_descriptor(d, coord: torch.Tensor, atype: torch.Tensor, box) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptor and rotation matrix over all ``sel`` slots, empty ones included."""
    nt, sel, n = d.ntypes, d.nnei, coord.shape[0]
    c, nb, img = build_neighbor_list(coord, atype, box, d.rcut, nt)
    rij = coord[nb] - coord[c] + (img @ box if box is not None else 0.0)
    r = rij.norm(dim=1)
    rows = torch.zeros(n, sel, 4, dtype=torch.float64)
    ntype = torch.full((n, sel), nt)
    for i in range(n):  # build the slot table (test only)
        mine = torch.nonzero((c == i) & (r < d.rcut) & ~d.excluded[atype[i], atype[nb]]).squeeze(1)
        mine = mine[torch.argsort(r[mine], stable=True)][:sel]
        s = smooth_weight(r[mine], d.rcut_smth, d.rcut) / r[mine]
        rows[i, : len(mine)] = torch.cat([s[:, None], s[:, None] * rij[mine] / r[mine, None]], 1)
        ntype[i, : len(mine)] = atype[nb[mine]]
    real = (ntype < nt).to(torch.float64)  # m_j
    davg, dstd = d.davg[atype][:, None, :], d.dstd[atype][:, None, :]
    normed = (rows - davg) / dstd  # empty slots: -davg/dstd
    table = d.type_embedding()
    tj, ti = table[ntype], table[atype][:, None, :].expand(n, sel, -1)
    pair = tj if d.type_one_side else torch.cat([tj, ti], -1)
    recovered = normed[..., 0:1] * dstd[..., 0:1] + davg[..., 0:1]
    w = (1 - (1 - d.rcut_smth * recovered) ** 3).clamp(0, 1)[..., 0]  # 0 for empty slots
    if d.stripped:
        g = d.net(normed[..., 0:1])
        tau = d.type_net(pair)
        if d.smooth:
            tau = tau * w[..., None]
        g = g * tau + g
    else:
        g = d.net(torch.cat([normed[..., 0:1], pair], -1))
    rhat = unit(normed[..., 1:4])
    for layer in d.layers:
        q = unit(layer.query(g))
        k = unit(layer.key(g))
        v = unit(layer.value(g))
        att = q @ k.transpose(1, 2)
        if d.smooth:
            ww = w[:, :, None] * w[:, None, :]
            att = torch.softmax((att + 20) * ww - 20, -1) * ww
        else:
            att = att * real[:, None, :] - 2.0**33 * (1 - real[:, None, :])
            att = torch.softmax(att, -1) * real[:, :, None]
        if d.attn_dotr:
            att = att * (rhat @ rhat.transpose(1, 2))
        if d.attn_mask:
            att = att * (1 - torch.eye(sel, dtype=torch.float64))
        g = torch.nn.functional.layer_norm(g + layer.out(att @ v), [g.shape[-1]], layer.ln_weight, layer.ln_bias, 1e-3)
    a = normed.transpose(1, 2) @ g / sel
    return (a.transpose(1, 2) @ a[:, :, : d.axis_neuron]).reshape(n, -1), a[:, 1:4, :].transpose(1, 2)


def descriptor_of(d, coord, atype, box):
    c, nb, img = build_neighbor_list(coord, atype, box, d.rcut, d.ntypes)
    shift = img @ box if box is not None else torch.zeros_like(img)
    return d(coord, atype, c, nb, shift)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_equals_the_sel_wide_computation(name):
    """Only real neighbours are computed; empty slots are added in closed form — same numbers."""
    d = built(VARIANTS[name]).descriptor
    assert d.davg[:, 0].abs().min() > 0  # so empty slots carry -davg/dstd ≠ 0
    coord, atype, box = water_frame(3)
    with torch.no_grad():
        out = descriptor_of(d, coord, atype, box)
        ref, rot = reference_descriptor(d, coord, atype, box)
    assert torch.allclose(out["descriptor"], ref, atol=1e-10, rtol=1e-9), (out["descriptor"] - ref).abs().max()
    assert torch.allclose(out["rot_mat"], rot, atol=1e-10, rtol=1e-9)
    assert torch.equal(out["type_embedding"], d.type_embedding()[atype])


def test_layout_buckets_atoms_by_neighbour_count():
    """Attention pads each bucket of atoms to its own widest, not all to the widest atom."""
    d = built(VARIANTS["v2"]).descriptor  # smooth: a bucket gets one column for its slots not laid out
    counts = torch.tensor([5, 1, 9, 3] * 16)  # 64 atoms: two buckets of 32
    order, first_row, bounds, widths, extras, total = d._layout(counts)
    assert bounds == [0, 32, 64] and widths == [3 + 1, 9 + 1] and extras == [120 - 3, 120 - 9]
    assert sorted(counts[order[:32]].tolist()) == [1] * 16 + [3] * 16
    assert torch.equal(first_row[order], torch.cat([torch.arange(32) * 4, 128 + torch.arange(32) * 10]))
    assert total == 32 * 4 + 32 * 10
    assert d._layout(counts[:40])[3] == [10]  # fewer than two buckets' worth of atoms: one layout


@pytest.mark.parametrize("name", ["plain", "v2"])
def test_bucketed_layout_equals_one_layout(name):
    """Energy and forces of a 192-atom frame (4 buckets) equal those of one layout."""
    model = built(VARIANTS[name])
    coord, atype, box = water_frame(3)
    results = []
    for buckets in (4, 1):
        model.descriptor.layout_buckets = buckets
        results.append(predict(model, "default", coord, atype, box))
    for key in ("energy", "force", "virial"):
        assert torch.allclose(results[0][key], results[1][key], rtol=1e-10, atol=1e-10), key


def test_empty_slots_only_rescale_when_davg_is_zero():
    """set_davg_zero, non-smooth: empty rows are 0 and masked, so sel 140 only changes 1/N_c."""
    small = built(SE_ATTEN).descriptor
    large = built(dict(SE_ATTEN, sel=140)).descriptor
    for (key, p), q in zip(small.named_parameters(), large.parameters()):
        assert torch.equal(p, q), key  # same seed, same weights
    large.dstd.copy_(small.dstd)
    coord, atype, box = water_frame(0)
    with torch.no_grad():
        a = descriptor_of(small, coord, atype, box)["descriptor"]
        b = descriptor_of(large, coord, atype, box)["descriptor"]
    assert torch.allclose(b * (140 / 120) ** 2, a, atol=1e-12, rtol=1e-10)


def test_non_smooth_attention_jumps_at_rcut_like_deepmd():
    """Documented behaviour, not a wish: a neighbour at rcut still takes part in the softmax of
    the non-smooth attention, so the energy jumps when it leaves; the smooth variant does not."""
    atype = torch.tensor([0, 1, 1])

    def jump(desc):
        model = built(desc)
        e = []
        for x in (5.0 - 1e-6, 5.0 + 1e-6):
            frame = torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [0.0, x, 0.0]], dtype=torch.float64)
            e.append(predict(model, "default", frame, atype, None, want_virial=False)["energy"].item())
        return abs(e[1] - e[0])

    assert jump(dict(SE_ATTEN, rcut=5.0)) > 1e-6
    assert jump(dict(SE_ATTEN, rcut=5.0, type="se_atten_v2")) < 1e-9
    assert jump(dict(SE_ATTEN, rcut=5.0, attn_layer=0)) < 1e-9


def test_non_smooth_attention_forces_are_energy_gradients():
    """test_physics covers the smooth variants; the masked (non-smooth) path gets its own check."""
    model = built(VARIANTS["plain"])
    coord, atype, _ = water_frame(0)
    cluster, types = coord[:36] - coord[:36].mean(0), atype[:36]
    force = predict(model, "default", cluster, types, None)["force"][0]
    h = 1e-5
    for atom, axis in [(0, 0), (7, 1), (20, 2)]:
        plus, minus = cluster.clone(), cluster.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        e = [predict(model, "default", x, types, None, want_virial=False)["energy"].item() for x in (plus, minus)]
        fd = -(e[0] - e[1]) / (2 * h)
        assert abs(fd - force[atom, axis].item()) < 1e-6 * max(1.0, abs(fd)), (atom, axis, fd)


def test_excluded_pairs_do_not_see_each_other():
    """exclude_types [[1, 1]]: moving one H changes no other H atom's descriptor."""
    d = built(dict(SE_ATTEN, exclude_types=[[1, 1]])).descriptor
    coord, atype, box = water_frame(1)
    moved = coord.clone()
    k = int(torch.nonzero(atype == 1)[0])
    moved[k] += torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    with torch.no_grad():
        a = descriptor_of(d, coord, atype, box)["descriptor"]
        b = descriptor_of(d, moved, atype, box)["descriptor"]
    others = (atype == 1) & (torch.arange(len(atype)) != k)
    assert torch.allclose(a[others], b[others], atol=1e-12)
    assert not torch.allclose(a[atype == 0], b[atype == 0], atol=1e-6)


def test_virtual_atoms_are_invisible():
    """Atoms of type -1 (mixed-type padding) neither see nor are seen; their rows are zero."""
    d = built(VARIANTS["v2"]).descriptor
    coord, atype, _ = water_frame(0)
    cluster, types = coord[:30] - coord[:30].mean(0), atype[:30]
    extra = cluster[:5] + 0.7
    with torch.no_grad():
        ref = descriptor_of(d, cluster, types, None)
        out = descriptor_of(d, torch.cat([cluster, extra]), torch.cat([types, torch.full((5,), -1)]), None)
    for key in ("descriptor", "rot_mat", "type_embedding"):
        assert torch.allclose(out[key][:30], ref[key], atol=1e-12), key
        assert torch.all(out[key][30:] == 0), key


def test_float32_follows_float64():
    coord, atype, box = water_frame(2)
    wide = built(VARIANTS["v2"])
    narrow = built(dict(VARIANTS["v2"], precision="float32"), fitting=dict(SMALL_FIT, precision="float32"))
    narrow.load_state_dict(wide.state_dict())  # same numbers, stored in float32
    out = predict(narrow, "default", coord, atype, box)
    ref = predict(wide, "default", coord, atype, box)
    assert narrow.descriptor.net.blocks[0].dense.weight.dtype == torch.float32
    assert abs(out["energy"].item() - ref["energy"].item()) < 1e-4 * abs(ref["energy"].item())
    assert torch.allclose(out["force"], ref["force"], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["plain", "v2"])
def test_frozen_model_equals_in_memory_model(name):
    model = built(VARIANTS[name])
    coord, atype, box = water_frame(1)
    ref = predict(model, "default", coord, atype, box)
    frozen = torch.jit.script(FrozenModel(model.descriptor, model.heads["default"], model.type_map, "default", "{}"))
    out = frozen(coord, atype, box)
    assert torch.allclose(out["energy"], ref["energy"].reshape(-1), atol=1e-10, rtol=0)
    assert torch.allclose(out["force"], ref["force"], atol=1e-10)
    assert torch.allclose(out["virial"], ref["virial"], atol=1e-10)


# ------------------------------------------------------------------------------------------
# Mixed-type data and training
# ------------------------------------------------------------------------------------------


def mixed_type_system(workdir: Path, nframes: int = 12) -> tuple[Path, np.ndarray]:
    """Water frames in the mixed-type layout: type.raw all 0, real_atom_types.npy per frame, and
    the atoms of every frame shuffled differently (coordinates, forces and types alike), so the
    types really vary per frame while the labels stay physical."""
    src, target = WATER / "data_0", Path(workdir) / "mixed"
    (target / "set.000").mkdir(parents=True)
    types = np.loadtxt(src / "type.raw", dtype=np.int64)
    (target / "type.raw").write_text("\n".join("0" for _ in types) + "\n")
    shutil.copy(src / "type_map.raw", target / "type_map.raw")
    natoms = len(types)
    coord = np.load(src / "set.000" / "coord.npy")[:nframes].reshape(nframes, natoms, 3)
    force = np.load(src / "set.000" / "force.npy")[:nframes].reshape(nframes, natoms, 3)
    rng = np.random.default_rng(0)
    orders = np.stack([rng.permutation(natoms) for _ in range(nframes)])
    frames = np.arange(nframes)[:, None]
    np.save(target / "set.000" / "coord.npy", coord[frames, orders].reshape(nframes, -1))
    np.save(target / "set.000" / "force.npy", force[frames, orders].reshape(nframes, -1))
    for key in ("box", "energy"):
        np.save(target / "set.000" / f"{key}.npy", np.load(src / "set.000" / f"{key}.npy")[:nframes])
    real = types[orders]
    np.save(target / "set.000" / "real_atom_types.npy", real)
    return target, real


def test_mixed_type_data_trains_with_per_frame_types(tmp_path):
    system, real = mixed_type_system(tmp_path)
    doc = small_input(tmp_path, descriptor=dict(SE_ATTEN, sel="auto", attn_layer=1), fitting=SMALL_FIT, numb_steps=20,
                      train_systems=[str(system)], valid_systems=[str(system)], disp_freq=20, save_freq=20)
    doc["learning_rate"] = {"start_lr": 5e-3, "stop_lr": 1e-3, "decay_steps": 10}
    trainer = make_trainer(tmp_path, doc)
    assert isinstance(trainer.config.model["descriptor"]["sel"], int)  # one total from the statistics
    data = trainer.heads["default"].train
    original = water_frame()  # frame 0 of data_0 in its own atom order
    for f in (0, 5):
        batch = data.batch(0, np.array([f]))
        assert np.array_equal(batch.atype[0].numpy(), real[f])
        pred = trainer._predict("default", batch, create_graph=False)
        direct = predict(trainer.model, "default", batch.coord[0], batch.atype[0], batch.box[0])
        assert torch.allclose(pred["energy"], direct["energy"], atol=1e-9)
        other = predict(trainer.model, "default", batch.coord[0], torch.tensor(real[f + 1]), batch.box[0])
        assert abs(other["energy"].item() - direct["energy"].item()) > 1e-6  # the types matter
    # frame 0 shuffled with its per-frame types is the very same structure as data_0's frame 0
    batch = data.batch(0, np.array([0]))
    shuffled = predict(trainer.model, "default", batch.coord[0], batch.atype[0], batch.box[0])
    plain = predict(trainer.model, "default", *original)
    assert torch.allclose(shuffled["energy"], plain["energy"], atol=1e-9)
    trainer.run()
    rows = lcurve_rows(tmp_path / "lcurve.out")
    assert rows[-1][3] < 0.5 * rows[0][3], rows  # rmse_e_val
    # mtcore test reads mixed-type systems: the shuffled frames give data_0's errors
    from typer.testing import CliRunner

    from mtcore.cli import app

    frozen = tmp_path / "model.pth"
    result = CliRunner().invoke(app, ["freeze", "-c", str(tmp_path / "model.ckpt-20.pt"), "-o", str(frozen)])
    assert result.exit_code == 0, result.output
    errors = {}
    for name, path in (("mixed", system), ("plain", WATER / "data_0")):
        result = CliRunner().invoke(app, ["test", "-m", str(frozen), "-s", str(path), "-n", "12", "--json"])
        assert result.exit_code == 0, result.output
        errors[name] = json.loads(result.stdout)["combined"]
    for title in ("Energy", "Force"):
        assert errors["mixed"][title]["rmse"] == pytest.approx(errors["plain"][title]["rmse"], rel=1e-8), title


def energy_rmse(trainer, head: str = "default", nframes: int = 6) -> float:
    """RMSE of the energy per atom on the same validation frames every time.

    se_atten learns forces slowly at first (DeePMD-kit 3.2.0 on the water example: force RMSE
    still 0.78 eV/Å after 100 steps, like ours), so a short run is judged on the energy."""
    runtime = trainer.heads[head]
    errors = []
    for frame in range(nframes):
        batch = runtime.valid.batch(0, np.array([frame]))
        pred = trainer._predict(head, batch, create_graph=False)
        errors.append(float((pred["energy"].detach().reshape(-1) - batch.labels["energy"].reshape(-1))[0]) / batch.natoms)
    return float(np.sqrt(np.mean(np.square(errors))))


def test_short_training_lowers_the_validation_loss(tmp_path):
    doc = small_input(tmp_path, descriptor=dict(VARIANTS["v2"], attn_layer=1), fitting=SMALL_FIT, numb_steps=20,
                      disp_freq=20, save_freq=20)
    doc["learning_rate"] = {"start_lr": 5e-3, "stop_lr": 1e-3, "decay_steps": 10}
    trainer = make_trainer(tmp_path, doc)
    before = energy_rmse(trainer)
    trainer.run()
    assert energy_rmse(trainer) < 0.5 * before


def test_two_heads_learn_with_a_shared_se_atten(tmp_path):
    doc = multi_task_input(tmp_path, numb_steps=30, descriptor=dict(SE_ATTEN, attn_layer=1), disp_freq=30, save_freq=30)
    for head in doc["model"]["fitting_net_dict"].values():
        head["neuron"] = [16, 16, 16]
    trainer = make_trainer(tmp_path, doc)
    assert trainer.model.heads["ccsd"].dim_type_embedding == 8  # T[type_i] goes into every head
    before = {h: energy_rmse(trainer, h) for h in ("ccsd", "wb97m")}
    trainer.run()
    for head in ("ccsd", "wb97m"):
        assert energy_rmse(trainer, head) < 0.5 * before[head], head


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["water_se_atten.json", "water_se_atten_compressible.json",
                                  "water_se_atten_dpa1_compat.json"])
def test_deepmd_v2_examples_normalise_and_build(name, tmp_path):
    doc = json.loads((EXAMPLES / name).read_text())
    config = normalize(doc, EXAMPLES, get_registry())
    params = config.model["descriptor"]
    assert params["sel"] == 120 and params["attn"] == 128
    from mtcore.model.build import build_descriptor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = build_descriptor(params, config.type_map, get_registry(), config.model.get("type_embedding"))
    assert d.stripped == (params["type"] == "se_atten_v2")
    assert d.get_dim_out() == 100 * 16 and d.get_dim_type_embedding() == 8


def test_unknown_key_is_named():
    doc = small_input(Path("."), descriptor=dict(SE_ATTEN, attn_heads=2))
    with pytest.raises(Exception, match="attn_heads"):
        normalize(doc, Path("."), get_registry())


def test_example_input_is_the_v2_example_with_fewer_steps():
    ours = json.loads((ROOT / "examples" / "water" / "se_atten" / "input.json").read_text())
    theirs = json.loads((EXAMPLES / "water_se_atten.json").read_text())
    assert ours["model"] == theirs["model"]
    assert ours["training"]["numb_steps"] < theirs["training"]["numb_steps"]
    normalize(ours, ROOT / "examples" / "water" / "se_atten", get_registry())
