"""Output reductions (sum / mean / none) through the core, and the built-in ``property`` head.

A head declares how its frame value comes from its atomic output (``OutputDef.reduction``); the
model, the frozen files (chunked and extended paths, single and united), ``infer``, ``mtcore
test`` and ``mtcore show`` must all honour it. The property head (DeePMD-kit v3's keys) passes
the plugin kit, initialises its bias from its own data exactly for a property linear in the
composition, trains beside energy and dipole heads, and learns a synthetic intensive label.

Data: small open clusters (8 atoms, four compositions) written into the test's temporary folder,
labelled with the mean over atoms of a smooth function of each atom's environment.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from helpers import ROOT, write_input
from mtcore.config import load_config, normalize
from mtcore.errors import MtcoreError
from mtcore.hookspecs import FittingRegistration
from mtcore.model.build import build_model
from mtcore.model.descriptor import StatSample
from mtcore.model.frozen import FrozenModel, UnitedModel, batch_neighbor_list
from mtcore.model.shared_layers import SharedLayerManager
from mtcore.plugins import PluginSource, Registered, Registry, get_registry
from mtcore.train.trainer import Trainer, labels_on
from mtcore_builtins.fittings import property as prop

QUIET = Console(file=open(os.devnull, "w"))
# frames of 8 atoms: thread barriers cost more than they save
pytestmark = pytest.mark.usefixtures("single_torch_thread")
DIPOLE_DATA = ROOT / "examples" / "water_tensor" / "dipole"

DESCRIPTOR = {"type": "se_e2_a", "sel": [20, 40], "rcut": 4.0, "rcut_smth": 3.5, "neuron": [4, 8],
              "axis_neuron": 4, "seed": 1, "precision": "float64"}
GAP = {"type": "property", "task_dim": 2, "intensive": True, "property_name": "gap", "neuron": [8, 8], "seed": 5,
       "precision": "float64"}
EXT = {"type": "property", "neuron": [8, 8], "seed": 6, "precision": "float64"}

# the synthetic label: g_i = a[t_i] + Σ_j c[t_j] exp(-r_ij²/2) (1 - (r_ij/rc)²)² for r_ij < rc
A_TYPE, C_TYPE, RC = np.array([1.0, -0.5]), np.array([0.8, 0.3]), 3.5


def atom_values(coord: np.ndarray, types: np.ndarray) -> np.ndarray:
    """g_i for frames [B, n, 3] (vectorised over atoms and pairs; the diagonal is excluded)."""
    r = np.linalg.norm(coord[:, :, None, :] - coord[:, None, :, :], axis=-1)
    n = coord.shape[1]
    smooth = np.where(r < RC, np.exp(-(r**2) / 2) * (1 - (r / RC) ** 2) ** 2, 0.0) * (1 - np.eye(n))
    return A_TYPE[types][None, :] + (smooth * C_TYPE[types][None, None, :]).sum(-1)


def cluster_energy_force(coord: np.ndarray, types: np.ndarray, h: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """E = Σ_i g_i and F = -∂E/∂x by central differences (labels for an energy head)."""
    energy = atom_values(coord, types).sum(1)
    force = np.zeros_like(coord)
    for atom in range(coord.shape[1]):
        for axis in range(3):
            step = np.zeros_like(coord)
            step[:, atom, axis] = h
            force[:, atom, axis] = -(atom_values(coord + step, types).sum(1) - atom_values(coord - step, types).sum(1)) / (2 * h)
    return energy, force


def write_clusters(root: Path, seed: int, nframes: int = 16, name: str = "gap", task_dim: int = 2,
                   other_labels: bool = False) -> list[str]:
    """Four open 8-atom systems (2..5 O atoms) on a jittered 2x2x2 grid (1.6 Å apart, atoms at
    least 0.9 Å apart); label ``<name>.npy``: [mean g, mean g²/4] (task_dim 2) or [mean g]; with
    ``other_labels`` also energy/force (E = Σ g) and a dipole (0.1·Σ over O of x - centroid)."""
    rng = np.random.default_rng(seed)
    grid = 1.6 * np.stack(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij"), -1).reshape(8, 3)
    systems = []
    for n_o in (2, 3, 4, 5):
        path = root / f"{name}_{seed}_o{n_o}"
        (path / "set.000").mkdir(parents=True)
        types = np.array([0] * n_o + [1] * (8 - n_o))
        coord = grid[None] + rng.uniform(-0.35, 0.35, size=(nframes, 8, 3))
        g = atom_values(coord, types)
        label = np.stack([g.mean(1), (g**2 / 4).mean(1)], 1)[:, :task_dim]
        (path / "type.raw").write_text(" ".join(map(str, types)) + "\n")
        (path / "type_map.raw").write_text("O\nH\n")
        (path / "nopbc").write_text("")
        np.save(path / "set.000" / "coord.npy", coord.reshape(nframes, -1))
        np.save(path / "set.000" / f"{name}.npy", label)
        if other_labels:
            energy, force = cluster_energy_force(coord, types)
            np.save(path / "set.000" / "energy.npy", energy)
            np.save(path / "set.000" / "force.npy", force.reshape(nframes, -1))
            dipole = 0.1 * (coord[:, types == 0] - coord.mean(1, keepdims=True)).sum(1)
            np.save(path / "set.000" / "dipole.npy", dipole)
        systems.append(str(path))
    return systems


def model_doc(heads: dict, systems: dict) -> dict:
    return {
        "model": {"type_map": ["O", "H"], "descriptor": copy.deepcopy(DESCRIPTOR), "fitting_net_dict": copy.deepcopy(heads)},
        "learning_rate": {"type": "exp", "start_lr": 1e-2, "stop_lr": 1e-3, "decay_steps": 20},
        "loss_dict": {h: {"type": "property"} for h in heads},
        "training": {
            "data_dict": {h: {"training_data": {"systems": systems[h], "batch_size": 2},
                              "validation_data": {"systems": systems[h], "batch_size": 2, "numb_btch": 1}}
                          for h in heads},
            "numb_steps": 4, "seed": 3, "disp_freq": 2, "save_freq": 4,
        },
    }


class NoneFitting(prop.PropertyFitting):
    """A property head whose output is per atom only (reduction 'none')."""

    def output_def(self):
        return dataclasses.replace(super().output_def(), reduction="none")


def predict(model, head, coord, atype, box=None):
    coord = torch.as_tensor(coord, dtype=torch.float64).reshape(-1, atype.shape[-1], 3)
    atype = torch.as_tensor(atype).reshape(1, -1).expand(coord.shape[0], -1)
    center, neighbor, image = batch_neighbor_list(coord, atype, box, model.rcut, model.ntypes)
    return model(head, coord, atype, box, center, neighbor, image, want_force=False)


def script(module):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


@pytest.fixture(autouse=True)
def plain_torchscript():
    """TorchScript's profiling executor spends about a second optimising each loaded module's first
    calls; these tests call many modules a few times each, so they run them unoptimised (the same
    numbers, only sooner)."""
    with torch.jit.optimized_execution(False):
        yield


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    return write_clusters(tmp_path_factory.mktemp("clusters"), seed=0, nframes=4)


@pytest.fixture(scope="module")
def reduction_model(clusters):
    """gap (mean, task_dim 2), ext (sum), atomic (none) and a dipole head on one descriptor."""
    from helpers import model_with_stats

    doc = model_doc({"gap": GAP, "ext": dict(EXT, property_name="gap", task_dim=2)},
                    {"gap": clusters, "ext": clusters})
    model, config = model_with_stats(doc, nbatch=2)
    model.heads["atomic"] = NoneFitting(2, model.descriptor.get_dim_out(), 0, "atomic", SharedLayerManager(),
                                        task_dim=2, property_name="gap", neuron=[8, 8], seed=7, precision="float64")
    return model, doc


@pytest.fixture(scope="module")
def scripted(reduction_model):
    """One scripted single-head file per head (TorchScript compiles slowly: once per module)."""
    model, doc = reduction_model
    return {h: script(FrozenModel(model.descriptor, model.heads[h], model.type_map, h, "{}")) for h in ("gap", "ext", "atomic")}


def frame_of(system: str, index: int = 0):
    coord = np.load(Path(system) / "set.000" / "coord.npy")[index].reshape(-1, 3).astype(np.float64)
    types = np.loadtxt(Path(system) / "type.raw", dtype=np.int64)
    return torch.tensor(coord), torch.tensor(types)


# ---------------------------------------------------------------------------------------------
# reductions through model, frozen files, infer, test, show
# ---------------------------------------------------------------------------------------------


def test_model_reductions_mean_sum_none(reduction_model, clusters):
    model, _ = reduction_model
    coord = np.load(Path(clusters[1]) / "set.000" / "coord.npy")[:3]
    types = torch.tensor(np.loadtxt(Path(clusters[1]) / "type.raw", dtype=np.int64))
    gap, ext, atomic = (predict(model, h, coord, types) for h in ("gap", "ext", "atomic"))
    assert gap["gap"].shape == (3, 2) and gap["atom_gap"].shape == (3, 8, 2)
    torch.testing.assert_close(gap["gap"], gap["atom_gap"].mean(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(ext["gap"], ext["atom_gap"].sum(1), rtol=0, atol=1e-12)
    assert set(atomic) == {"atom_gap"}  # per atom only: no frame key at all
    assert (gap["gap"] - gap["atom_gap"].sum(1)).abs().max() > 1e-3  # mean and sum differ here


def test_frozen_chunked_extended_and_united_follow_the_reduction(reduction_model, scripted, clusters):
    model, _ = reduction_model
    coord, types = frame_of(clusters[2])
    coords = torch.stack([coord, frame_of(clusters[2], 1)[0]])
    eager = {h: predict(model, h, coords, types) for h in ("gap", "ext", "atomic")}
    united = script(UnitedModel(model.descriptor, dict(model.heads.items()), model.type_map, "{}"))
    for head in ("gap", "ext", "atomic"):
        for module, kwargs in ((scripted[head], {}), (united, {"head": head})):
            for chunk in (1024, 3):  # one pass for both frames, then 3-atom chunks within a frame
                module.set_chunk_atoms(chunk)
                out = module(coords, types, None, **kwargs)
                torch.testing.assert_close(out["atom_gap"], eager[head]["atom_gap"], rtol=0, atol=1e-10)
                if head == "atomic":
                    assert "gap" not in out
                else:
                    torch.testing.assert_close(out["gap"], eager[head]["gap"], rtol=0, atol=1e-10)
            # forward_extended: an MD engine's neighbour list (open cluster: no ghosts)
            center, neighbor, _ = batch_neighbor_list(coord.unsqueeze(0), types.unsqueeze(0), None, model.rcut, 2)
            module.set_chunk_atoms(3)
            ext = module.forward_extended(coord, types, 8, torch.arange(8), pairs=torch.stack([center, neighbor], 1),
                                          **kwargs)
            torch.testing.assert_close(ext["atom_gap"], eager[head]["atom_gap"][:1], rtol=0, atol=1e-10)
            assert ("gap" in ext) == (head != "atomic")
            if head == "gap":
                torch.testing.assert_close(ext["gap"], ext["atom_gap"].mean(1), rtol=0, atol=1e-12)


def _frozen_file(model, doc, module, head: str, path: Path, drop_reduction: bool = False) -> Path:
    """``module`` saved as a frozen file with the metadata freezing ``head`` writes."""
    from mtcore.freeze import _write_script, head_metadata

    document = copy.deepcopy(doc)
    document["model"]["fitting_net_dict"].setdefault(head, {"type": "property"})
    meta = head_metadata(model, document, head, True)
    if drop_reduction:  # a file frozen before reductions
        del meta["output"]["reduction"]
    _write_script(module, path, json.dumps(meta))
    return path


def test_infer_test_and_show_honour_the_reduction(reduction_model, scripted, clusters, tmp_path):
    from mtcore.evaluate import run_test
    from mtcore.infer import DeepPotential
    from mtcore.show import describe

    model, doc = reduction_model
    files = {h: _frozen_file(model, doc, scripted[h], h, tmp_path / f"{h}.pth") for h in ("gap", "ext", "atomic")}
    coord, types = frame_of(clusters[0])
    for head, reduction in (("gap", "mean"), ("ext", "sum"), ("atomic", "none")):
        pot = DeepPotential(files[head])
        assert pot.reduction == reduction and pot.output["reduction"] == reduction
        out = pot.evaluate(coord.numpy(), None, types.numpy())
        if reduction == "none":
            assert "gap" not in out
        else:
            want = out["atom_gap"].mean(1) if reduction == "mean" else out["atom_gap"].sum(1)
            np.testing.assert_allclose(out["gap"], want, rtol=0, atol=1e-12)
        assert describe(files[head])["heads"][0]["output"] == f"property ({'per atom only' if reduction == 'none' else reduction})"
    # mtcore test: the intensive value has no /atom row and no _peratom file; the extensive one has both
    for head, rows in (("gap", {"Gap"}), ("ext", {"Gap", "Gap/atom"}), ("atomic", set())):
        prefix = tmp_path / f"detail_{head}"
        _, combined = run_test(files[head], clusters[:2], detail_file=prefix)
        assert set(combined) == rows, combined
        if rows:
            assert combined["Gap"].count == 2 * 4 * 2  # 2 systems x 4 frames x task_dim 2
            data = np.loadtxt(tmp_path / f"detail_{head}.property.out")
            label = np.concatenate([np.load(Path(s) / "set.000" / "gap.npy") for s in clusters[:2]])
            np.testing.assert_allclose(data[:, :2], label, rtol=0, atol=1e-12)
            err = data[:, 2:] - data[:, :2]
            assert combined["Gap"].rmse == pytest.approx(float(np.sqrt((err**2).mean())), rel=1e-10)
        assert (tmp_path / f"detail_{head}.property_peratom.out").exists() == (head == "ext")
    # a file frozen before reductions (no "reduction" in its metadata) and a dipole head: sums
    old = DeepPotential(_frozen_file(model, doc, scripted["ext"], "ext", tmp_path / "old.pth", drop_reduction=True))
    assert old.reduction == "sum" and describe(tmp_path / "old.pth")["heads"][0]["output"] == "property (sum)"


def test_dipole_head_declares_nothing_and_still_sums(tmp_path):
    """A head written before reductions (the built-in dipole, OutputDef without reduction) sums."""
    doc = model_doc({"dip": {"type": "dipole", "sel_type": [0], "neuron": [8], "seed": 2, "precision": "float64"}},
                    {"dip": [str(DIPOLE_DATA / "training_data" / "atomic_system")]})
    model = build_model(normalize(doc, Path("/"), get_registry()))
    coord, types = frame_of(str(DIPOLE_DATA / "training_data" / "atomic_system"))
    box = torch.tensor(np.load(DIPOLE_DATA / "training_data" / "atomic_system" / "set.000" / "box.npy")[0],
                       dtype=torch.float64).reshape(1, 3, 3)
    out = predict(model, "dip", coord, types, box)
    torch.testing.assert_close(out["dipole"], out["atomic_dipole"].sum(1), rtol=0, atol=1e-12)


def test_invalid_reduction_is_one_line_naming_head_and_type(clusters):
    class Avg(prop.PropertyFitting):
        def output_def(self):
            return dataclasses.replace(super().output_def(), reduction="average")

    def build(params, ctx):
        return Avg(ctx.ntypes, ctx.descriptor.get_dim_out(), 0, ctx.head, ctx.layers, neuron=[4])

    entry = Registered("fitting_net", FittingRegistration(name="avg_prop", arguments=lambda ctx: [], build=build),
                       PluginSource("tests", "0", "avg_prop"))
    registry = Registry(get_registry().entries() + [entry])
    doc = model_doc({"band": {"type": "avg_prop"}}, {"band": clusters})
    with pytest.raises(MtcoreError) as info:
        build_model(normalize(doc, Path("/"), registry), registry)
    message = str(info.value)
    assert "\n" not in message and "band" in message and "avg_prop" in message and "'average'" in message


# ---------------------------------------------------------------------------------------------
# the property head: plugin kit, bias initialisation, schema errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("intensive", [False, True])
def test_property_head_passes_the_plugin_kit(intensive):
    from mtcore.testing import check_fitting

    report = check_fitting("property", {"task_dim": 2, "intensive": intensive, "neuron": [6, 6], "seed": 1,
                                        "precision": "float64"})
    reduction = "mean" if intensive else "sum"
    assert f"frame value = {reduction} of the atomic output" in report.passed


def test_plugin_kit_on_a_per_atom_only_head():
    """reduction 'none': no frame key anywhere (model, frozen file), every other property holds."""
    from mtcore.testing import check_fitting

    def build(params, ctx):
        kwargs = {k: v for k, v in params.items() if k != "type"}
        return NoneFitting(ctx.ntypes, ctx.descriptor.get_dim_out(), ctx.descriptor.get_dim_type_embedding(), ctx.head,
                           ctx.layers, **kwargs)

    registration = FittingRegistration(name="charges", arguments=prop.arguments, build=build)
    report = check_fitting(registration, {"task_dim": 1, "neuron": [4, 4], "seed": 2, "precision": "float64"})
    assert not any(name.startswith("frame value") for name in report.passed)


def test_plugin_kit_catches_a_core_that_reduces_wrongly(monkeypatch):
    """The kit recomputes the mean itself: a core that summed an intensive head fails it."""
    import mtcore.model.geometry as geometry
    from mtcore.testing import check_fitting

    monkeypatch.setattr(geometry, "reduce_atomic", lambda atomic, atype, reduction, sel: atomic.sum(1))
    report = check_fitting("property", {"intensive": True, "neuron": [4], "seed": 1, "precision": "float64"},
                           raise_on_failure=False)
    assert "frame value = mean of the atomic output" in report.failed_properties()


@pytest.mark.parametrize("intensive", [False, True])
def test_bias_recovers_a_per_type_linear_property(intensive):
    """Frames of varied composition (three types, per-frame types), label linear in the counts
    (extensive) or fractions (intensive): the least-squares bias is the per-type weight."""
    rng = np.random.default_rng(4)
    weights = np.array([[1.5, -2.0], [-0.25, 0.5], [3.0, 1.0]])  # [ntypes, task_dim]
    samples = []
    for system, (nframes, natoms) in enumerate(((5, 6), (4, 9), (6, 4))):
        atype = torch.as_tensor(rng.integers(0, 3, size=(nframes, natoms)))
        counts = torch.nn.functional.one_hot(atype, 3).sum(1).numpy().astype(float)
        design = counts / natoms if intensive else counts
        samples.append(StatSample(torch.zeros(nframes * natoms, 3), atype.reshape(-1), torch.zeros(0, dtype=torch.long),
                                  torch.zeros(0, dtype=torch.long), torch.zeros(0, 3), nframes, natoms,
                                  {"band": torch.as_tensor(design @ weights)}, {"band": 1.0}, f"s{system}"))
    fitting = prop.PropertyFitting(3, 10, 0, "h", SharedLayerManager(), task_dim=2, intensive=intensive,
                                   property_name="band", neuron=[4], seed=1)
    fitting.compute_output_stats(samples)
    np.testing.assert_allclose(fitting.bias.numpy(), weights, rtol=0, atol=1e-10)
    assert fitting.output_bias() is fitting.bias  # what change-bias edits


def test_property_keys_are_checked():
    registry = get_registry()
    for bad, match in (({"task_dim": 0}, "task_dim must be a positive integer"),
                       ({"property_name": "coord"}, "property_name 'coord'"),
                       ({"property_name": "a/b"}, "property_name 'a/b'")):
        doc = model_doc({"p": dict(EXT, **bad)}, {"p": ["."]})
        with pytest.raises(MtcoreError, match=match):
            build_model(normalize(doc, Path("/"), registry), registry)
    doc = model_doc({"p": EXT}, {"p": ["."]})
    doc["loss_dict"]["p"] = {"type": "property", "loss_func": "huber"}
    config = normalize(doc, Path("/"), registry)
    from mtcore.model.build import build_losses

    with pytest.raises(MtcoreError, match="loss_func 'huber'"):
        build_losses(config, build_model(config, registry), registry)


# ---------------------------------------------------------------------------------------------
# training: beside ener and dipole heads; learning a synthetic intensive label
# ---------------------------------------------------------------------------------------------


def validation_rmse(trainer: Trainer, head: str, key: str) -> float:
    runtime = trainer.heads[head]
    sq, count = 0.0, 0
    for index, system in enumerate(runtime.valid.systems):
        batch = runtime.valid.batch(index, np.arange(system.nframes))
        pred = trainer._predict(head, batch, create_graph=False)
        diff = pred[key].detach() - labels_on(batch, trainer.device)[key].reshape(pred[key].shape)
        sq += float((diff**2).sum())
        count += diff.numel()
    return math.sqrt(sq / count)


def composition_only_rmse(train: list[str], valid: list[str], key: str) -> float:
    """Validation RMSE of the best predictor linear in the atom fractions (what the bias alone
    gives): the part of the label the environment, not the composition, explains."""
    def rows(systems):
        x, y = [], []
        for s in systems:
            types = np.loadtxt(Path(s) / "type.raw", dtype=np.int64)
            label = np.load(Path(s) / "set.000" / f"{key}.npy")
            x.append(np.tile(np.bincount(types, minlength=2) / len(types), (len(label), 1)))
            y.append(label)
        return np.concatenate(x), np.concatenate(y)

    (xt, yt), (xv, yv) = rows(train), rows(valid)
    weights = np.linalg.lstsq(xt, yt, rcond=None)[0]
    return float(np.sqrt(((xv @ weights - yv) ** 2).mean()))


def test_training_lowers_the_property_validation_rmse(tmp_path):
    """An intensive label (mean over atoms of a smooth function of each atom's environment): 100
    steps beat the random start by far, and beat the best composition-only predictor too, so the
    head learned the environment, not just its bias."""
    train = write_clusters(tmp_path / "train", seed=1, nframes=24, name="gap", task_dim=1)
    valid = write_clusters(tmp_path / "valid", seed=2, nframes=6, name="gap", task_dim=1)
    doc = model_doc({"gap": dict(GAP, task_dim=1, neuron=[16, 16])}, {"gap": train})
    doc["training"]["data_dict"]["gap"]["validation_data"]["systems"] = valid
    doc["training"].update(numb_steps=100, disp_freq=50, save_freq=100)
    doc["learning_rate"] = {"type": "exp", "start_lr": 1e-2, "stop_lr": 1e-3, "decay_steps": 15}
    trainer = Trainer(load_config(write_input(tmp_path, doc)), tmp_path, QUIET)
    before = validation_rmse(trainer, "gap", "gap")  # after the bias initialisation
    trainer.run()
    after = validation_rmse(trainer, "gap", "gap")
    baseline = composition_only_rmse(train, valid, "gap")
    assert after < 0.2 * before and after < 0.8 * baseline, (before, after, baseline)
    header = (tmp_path / "lcurve.out").read_text().splitlines()[0]
    assert "rmse_gap" in header and "mae_gap" in header


def test_multi_task_ener_dipole_property_trains_freezes_and_tests(tmp_path):
    """Three heads of three kinds on one descriptor (all on the small clusters, so it is quick):
    trains, freezes one file per head, and ``mtcore test`` / ``show`` read the property head."""
    from typer.testing import CliRunner

    from mtcore.cli import app
    from mtcore.freeze import freeze
    from mtcore.show import describe
    from mtcore.train.checkpoint import load_checkpoint

    clusters = write_clusters(tmp_path / "data", seed=3, nframes=4, other_labels=True)
    doc = model_doc({"gap": GAP}, {"gap": clusters})
    heads = doc["model"]["fitting_net_dict"]
    heads["water_ener"] = {"type": "ener", "neuron": [8, 8], "seed": 2, "precision": "float64"}
    heads["water_dipole"] = {"type": "dipole", "sel_type": [0], "neuron": [8, 8], "seed": 3, "precision": "float64"}
    doc["loss_dict"] = {"water_ener": {"type": "ener"}, "water_dipole": {"type": "tensor", "pref": 1.0, "pref_atomic": 0.0}}
    for head in ("water_ener", "water_dipole"):  # "gap" keeps the property head's default loss
        doc["training"]["data_dict"][head] = copy.deepcopy(doc["training"]["data_dict"]["gap"])
    doc["model"]["data_stat_nbatch"] = 1
    doc["training"].update(numb_steps=6, disp_freq=3, save_freq=6)
    trainer = Trainer(load_config(write_input(tmp_path, doc)), tmp_path, QUIET)
    trainer.run()
    header = (tmp_path / "lcurve.out").read_text().splitlines()[0]
    assert "rmse_gap" in header and "rmse_e" in header and "rmse_gl" in header
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        freeze(load_checkpoint(tmp_path / "model.ckpt-6.pt"), Path("model.pth"))
        runner = CliRunner()
        shown = runner.invoke(app, ["show", "model_gap.pth"])
        assert shown.exit_code == 0 and "property" in shown.output, shown.output
        assert describe(Path("model_gap.pth"))["heads"][0]["output"] == "property (mean)"
        outputs = {h["name"]: h["output"] for h in describe(Path("model.ckpt-6.pt"))["heads"]}
        assert outputs == {"gap": "property (mean)", "water_ener": "energy (sum)", "water_dipole": "dipole (sum)"}
        tested = runner.invoke(app, ["test", "-m", "model_gap.pth", "-s", "data", "--json", "-d", "gap"])
        assert tested.exit_code == 0, tested.output
        table = runner.invoke(app, ["test", "-m", "model_gap.pth", "-s", clusters[0]])
    finally:
        os.chdir(cwd)
    report = json.loads(tested.output)
    assert set(report["combined"]) == {"Gap"}  # intensive: no Gap/atom row
    assert "Gap" in table.output and "Gap/atom" not in table.output
    stat = report["combined"]["Gap"]
    labels = np.concatenate([np.load(Path(s) / "set.000" / "gap.npy") for s in clusters])
    assert 0 < stat["mae"] <= stat["rmse"] < 10 * float(labels.std(0).max())  # near the data thanks to the bias
    assert (tmp_path / "gap.property.out").exists() and not (tmp_path / "gap.property_peratom.out").exists()


def test_mean_reduction_skips_virtual_atoms():
    """Padding atoms of mixed-type data (type -1) are not atoms of the frame: a mean over every
    type divides by the real atoms only, and a frame of padding only gives 0."""
    from mtcore.model.geometry import reduce_atomic

    atomic = torch.tensor([[[1.0], [3.0], [100.0]], [[7.0], [7.0], [7.0]], [[5.0], [5.0], [5.0]]], dtype=torch.float64)
    atype = torch.tensor([[0, 1, -1], [1, 1, 0], [-1, -1, -1]])
    got = reduce_atomic(atomic, atype, "mean", [])
    assert torch.allclose(got, torch.tensor([[2.0], [7.0], [0.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(reduce_atomic(atomic, atype, "mean", [1]), torch.tensor([[3.0], [7.0], [0.0]], dtype=torch.float64))
    assert torch.allclose(reduce_atomic(atomic, atype, "sum", []), atomic.sum(1))


def test_tensor_loss_on_a_per_atom_only_head():
    """The built-in tensor loss trains a 'none' head through its atomic label alone (no frame key
    in the predictions), and refuses a frame weight for it in one line."""
    from types import SimpleNamespace

    from mtcore.errors import MtcoreError
    from mtcore.hookspecs import LossContext
    from mtcore.model.fitting import OutputDef
    from mtcore_builtins.losses.tensor import build

    odef = OutputDef("charge", 3, "charge", "atomic_charge", sel_types=None, reduction="none")
    fitting = SimpleNamespace(output_def=lambda: odef)
    loss = build({"pref": 0.0, "pref_atomic": 1.0}, LossContext("q", fitting, 1e-3))
    atype = torch.tensor([[0, 1, 1]])
    pred = {"atomic_charge": torch.ones(1, 3, 3, dtype=torch.float64)}
    label = {"atomic_charge": torch.zeros(1, 3, 3, dtype=torch.float64)}
    value, metrics = loss(pred, label, {"atomic_charge": 1.0}, atype, 1.0, metrics=True)
    assert abs(float(value) - 1.0) < 1e-12 and abs(metrics["rmse_lc"] - 1.0) < 1e-12
    with pytest.raises(MtcoreError, match="per-atom values only.*set pref to 0") as info:
        build({"pref": 1.0, "pref_atomic": 1.0}, LossContext("q", fitting, 1e-3))
    assert "\n" not in str(info.value)
