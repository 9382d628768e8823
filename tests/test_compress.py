"""mtcore compress: tabulated embedding nets give the frozen model's energies, forces and virials
(issue 17: ≤ 1e-7 eV/atom, ≤ 1e-6 eV/Å) for se_e2_a, se_e2_r, se_e3 and se_atten (stripped), the
file loads in plain torch, inputs outside the table stay finite and continuous, bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import WATER, model_with_stats, predict, small_input, water_frame, write_input
from mtcore import infer
from mtcore.cli import app
from mtcore.compress import compress
from mtcore.errors import MtcoreError
from mtcore.freeze import _save_script, head_metadata
from mtcore.model.frozen import FrozenModel
from mtcore.model.mlp import EmbeddingNet, new_generator
from mtcore.model.tabulate import TabulatedEmbedding

E_TOL = 1e-7  # eV per atom (issue 17)
F_TOL = 1e-6  # eV/Å

FITTING = {"type": "ener", "neuron": [16, 16], "seed": 2, "precision": "float64"}
DESCRIPTORS = {
    "se_e2_a": {"type": "se_e2_a", "sel": [46, 92], "rcut": 6.0, "rcut_smth": 0.5, "neuron": [8, 16],
                "axis_neuron": 4, "seed": 1},
    "se_e2_r": {"type": "se_e2_r", "sel": [46, 92], "rcut": 6.0, "rcut_smth": 0.5, "neuron": [8, 16], "seed": 1,
                "type_one_side": True},
    "se_e3": {"type": "se_e3", "sel": [20, 40], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8], "seed": 1},
    "se_atten": {"type": "se_atten", "sel": 120, "rcut": 6.0, "rcut_smth": 0.5, "neuron": [8, 16], "axis_neuron": 4,
                 "attn": 8, "attn_layer": 1, "stripped_type_embedding": True, "seed": 1},
}


def frozen(workdir: Path, descriptor: dict, name: str) -> Path:
    """A frozen file of a random-weight model with statistics from the water data (no training:
    the weights are N(0, 1/√(fan)) and biases N(0, 1), non-trivial for a table)."""
    model, config = model_with_stats(small_input(workdir, descriptor=descriptor, fitting=FITTING))
    model.eval()
    text = json.dumps(head_metadata(model, config.document, "default", False))
    path = workdir / f"{name}.pth"
    _save_script(FrozenModel(model.descriptor, model.heads["default"], model.type_map, "default", text), path, text)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compress")
    out = {}
    for name, descriptor in DESCRIPTORS.items():
        plain = frozen(workdir, descriptor, name)
        packed = workdir / f"{name}_compressed.pth"
        info = compress(plain, packed)
        out[name] = (plain, packed, info)
    return out


def _frames():
    frames = [water_frame(0, "data_3")]
    coord, atype, box = water_frame(2, "data_1")
    frames.append((coord[:60], atype[:60], None))  # open boundaries, a cluster
    return frames


@pytest.mark.parametrize("name", list(DESCRIPTORS))
def test_compressed_equals_frozen(models, name):
    plain, packed, info = models[name]
    a, b = infer.load(plain), infer.load(packed)
    for coord, atype, box in _frames():
        natoms = atype.shape[0]
        args = (coord.numpy(), None if box is None else box.numpy(), atype.numpy())
        ra, rb = a.evaluate(*args), b.evaluate(*args)
        assert np.abs(ra["energy"] - rb["energy"]).max() / natoms <= E_TOL
        assert np.abs(ra["atom_energy"] - rb["atom_energy"]).max() <= E_TOL
        assert np.abs(ra["force"] - rb["force"]).max() <= F_TOL
        assert np.abs(ra["virial"] - rb["virial"]).max() / natoms <= E_TOL
    # the tables are really used: no embedding weights of a tabulated net remain in the file
    keys = torch.jit.load(str(packed)).state_dict().keys()
    for table in info["tables"]:
        assert f"descriptor.{table['path']}.coef" in keys
        assert not any(k.startswith(f"descriptor.{table['path']}.blocks.") for k in keys)
    assert b.metadata["compressed"]["step"] == 0.01 and b.metadata["compressed"]["min_distance"] > 0.5


@pytest.mark.parametrize("name", list(DESCRIPTORS))
def test_compressed_twin_gives_the_scripted_numbers(models, name, monkeypatch):
    """The compressed file run eagerly (tables inside the contraction for se_e2_a, se_e2_r and
    se_e3: mtcore.model.table_contraction) and as its TorchScript module (embedding_bag): the
    same numbers to rounding."""
    _, packed, _ = models[name]
    twin = infer.load(packed)
    with monkeypatch.context() as m:
        m.setenv("MTCORE_INFER_SCRIPTED", "1")
        scripted = infer.load(packed)
    assert twin.eager and not scripted.eager
    coord, atype, box = water_frame(0, "data_3")
    a = twin.evaluate(coord.numpy(), box.numpy(), atype.numpy())
    b = scripted.evaluate(coord.numpy(), box.numpy(), atype.numpy())
    for key in a:
        assert np.abs(a[key] - b[key]).max() <= 1e-11 * max(1.0, float(np.abs(b[key]).max())), key


def test_a_coarse_table_is_detected(tmp_path, models):
    """The comparison above can fail: a 10x coarser step than sensible shows errors it would catch
    at a tolerance 10⁴ tighter (quintic error ~ step⁶)."""
    plain = models["se_e2_a"][0]
    coarse = tmp_path / "coarse.pth"
    compress(plain, coarse, step=0.5, extrapolate=2.0)
    coord, atype, box = water_frame(0, "data_3")
    ra = infer.load(plain).evaluate(coord.numpy(), box.numpy(), atype.numpy())
    rb = infer.load(coarse).evaluate(coord.numpy(), box.numpy(), atype.numpy())
    assert np.abs(ra["force"] - rb["force"]).max() > F_TOL * 1e-4


def test_plain_torch_loads_the_compressed_file(models, tmp_path):
    plain, packed, _ = models["se_e2_a"]
    coord, atype, box = water_frame(0, "data_3")
    np.save(tmp_path / "c.npy", coord.numpy())
    np.save(tmp_path / "b.npy", box.numpy())
    np.save(tmp_path / "t.npy", atype.numpy())
    script = f"""
import sys, json
for name in ("mtcore", "mtcore_builtins"):
    sys.modules[name] = None  # any import of mtcore would now fail
import numpy as np, torch
folder = {str(tmp_path)!r}
extra = {{"mtcore.json": ""}}
m = torch.jit.load({str(packed)!r}, _extra_files=extra)
out = m(torch.tensor(np.load(folder + "/c.npy")), torch.tensor(np.load(folder + "/t.npy")), torch.tensor(np.load(folder + "/b.npy")))
print(repr(float(out["energy"][0])), json.loads(extra["mtcore.json"])["compressed"]["step"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    energy, step = result.stdout.split()
    ref = infer.load(plain).evaluate(coord.numpy(), box.numpy(), atype.numpy())["energy"][0]
    assert abs(float(energy) - float(ref)) / 192 <= E_TOL and float(step) == 0.01


def _net(activation: str = "tanh", resnet_dt: bool = True) -> EmbeddingNet:
    return EmbeddingNet(1, [6, 12, 24], activation, resnet_dt, torch.float64, new_generator(5))


@pytest.mark.parametrize("activation", ["tanh", "gelu", "softplus", "sigmoid"])
def test_table_matches_net_and_its_slope(activation):
    net = _net(activation)
    table = TabulatedEmbedding.from_net(net, -1.3, 4.2, step=0.01, extrapolate=3.0)
    start, lower, upper, end = table.table_range()
    assert start < lower == -1.3 and upper >= 4.2 and end > upper
    # fine region (step 0.01) and the whole table (coarse steps 0.1 at both ends)
    for lo, hi, tol_v, tol_d in [(lower, upper, 1e-10, 1e-8), (start, end, 1e-8, 1e-6)]:
        x = torch.linspace(lo, hi, 20001, dtype=torch.float64).unsqueeze(1).requires_grad_(True)
        ref = net(x)
        (dref,) = torch.autograd.grad(ref.sum(), x)
        got = table(x)
        (dgot,) = torch.autograd.grad(got.sum(), x)
        assert (ref - got).abs().max() <= tol_v and (dref - dgot).abs().max() <= tol_d
    scripted = torch.jit.script(table)
    x = torch.linspace(start - 3, end + 3, 997, dtype=torch.float64).unsqueeze(1)
    assert torch.allclose(scripted(x), table(x), rtol=0, atol=1e-12)


def test_outside_the_table_is_finite_continuous_and_linear():
    net = _net()
    table = TabulatedEmbedding.from_net(net, 0.0, 2.0, step=0.01, extrapolate=2.0)
    start, _, _, end = table.table_range()
    for edge, sign in [(start, -1.0), (end, 1.0)]:
        x = torch.tensor([[edge], [edge + sign * 1e-9], [edge + sign * 10.0], [edge + sign * 1e6]], dtype=torch.float64)
        x.requires_grad_(True)
        y = table(x)
        assert torch.isfinite(y).all()
        assert (y[1] - y[0]).abs().max() <= 1e-6  # continuous at the end of the table
        slope = torch.stack([torch.autograd.grad(y[:, m].sum(), x, retain_graph=True)[0][:, 0] for m in range(y.shape[1])])
        assert torch.allclose(slope[:, 2], slope[:, 0], rtol=0, atol=1e-9)  # linear beyond: constant slope
        assert torch.allclose(y[2], y[0] + sign * 10.0 * slope[:, 0], rtol=1e-9, atol=1e-9)


def test_overflow_check_warns_every_n_calls():
    table = torch.jit.script(TabulatedEmbedding.from_net(_net(), 0.0, 1.0, check_frequency=2))
    inside = torch.full((4, 1), 0.5, dtype=torch.float64)
    outside = torch.tensor([[3.0], [0.5]], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table(outside)  # call 1: not checked
        table(inside)  # call 2: checked, nothing outside
        table(outside)  # call 3
        table(outside)  # call 4: checked
    messages = [str(w.message) for w in caught if "compressed embedding" in str(w.message)]
    assert len(messages) == 1 and "1 inputs outside the training range" in messages[0]


def test_range_from_another_training_script(models, tmp_path):
    """-t: the range comes from that input's training data (here a single system, fewer close pairs
    cannot widen it), and the result still matches."""
    plain = models["se_e2_r"][0]
    script = write_input(tmp_path, small_input(tmp_path, descriptor=DESCRIPTORS["se_e2_r"], fitting=FITTING,
                                               train_systems=[str(WATER / "data_2")]))
    info = compress(plain, tmp_path / "t.pth", training_script=script)
    assert info["data"] == [str(WATER / "data_2")] and info["min_distance"] > 0.5
    coord, atype, box = water_frame(1, "data_3")
    ra = infer.load(plain).evaluate(coord.numpy(), box.numpy(), atype.numpy())
    rb = infer.load(tmp_path / "t.pth").evaluate(coord.numpy(), box.numpy(), atype.numpy())
    assert np.abs(ra["force"] - rb["force"]).max() <= F_TOL


def _invoke(args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, args, env={"MTCORE_DEBUG": ""})


def test_bad_inputs_are_one_line(models, tmp_path, monkeypatch):
    plain, packed, _ = models["se_e2_a"]
    not_stripped = frozen(tmp_path, dict(DESCRIPTORS["se_atten"], stripped_type_embedding=False), "atten_plain")
    (tmp_path / "junk.pth").write_text("not a model")
    cases = [
        (["-i", str(tmp_path / "missing.pth"), "-o", "x.pth"], "missing.pth: frozen model file not found"),
        (["-i", str(tmp_path / "junk.pth"), "-o", "x.pth"], "not a frozen mtcore model"),
        (["-i", str(packed), "-o", "x.pth"], "already compressed"),
        (["-i", str(plain), "-o", str(plain)], "is the input file"),
        (["-i", str(plain), "-o", "x.pth", "--step", "0"], "--step: must be a positive number"),
        (["-i", str(plain), "-o", "x.pth", "--extrapolate", "0.5"], "--extrapolate: must be at least 1"),
        (["-i", str(not_stripped), "-o", "x.pth"], "only stripped type embedding"),
    ]
    for args, expected in cases:
        result = _invoke(["compress", *args], tmp_path, monkeypatch)
        lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("warning:")]
        assert result.exit_code == 1 and len(lines) == 1 and expected in lines[0], (args, result.output)
    assert not (tmp_path / "x.pth").exists()


def test_missing_training_data_names_the_way_out(models, tmp_path):
    plain = models["se_e2_r"][0]
    extra = {"mtcore.json": ""}
    module = torch.jit.load(str(plain), _extra_files=extra)
    meta = json.loads(extra["mtcore.json"])
    meta["config"]["training"]["training_data"]["systems"] = [str(tmp_path / "gone")]
    moved = tmp_path / "moved.pth"
    torch.jit.save(module, str(moved), _extra_files={"mtcore.json": json.dumps(meta)})
    with pytest.raises(MtcoreError, match="give the training data with -t input.json"):
        compress(moved, tmp_path / "x.pth")


def test_descriptors_without_tables_are_refused(tmp_path):
    hybrid = {"type": "hybrid", "list": [dict(DESCRIPTORS["se_e2_a"]), dict(DESCRIPTORS["se_e2_r"])]}
    path = frozen(tmp_path, hybrid, "hybrid")
    with pytest.raises(MtcoreError, match="'hybrid' cannot be compressed"):
        compress(path, tmp_path / "x.pth")


def test_cli_writes_the_file(models, tmp_path, monkeypatch):
    plain = models["se_e2_r"][0]
    result = _invoke(["compress", "-i", str(plain), "-o", "c.pth", "-s", "0.02", "-e", "3"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "wrote c.pth" in result.output
    meta = infer.load(tmp_path / "c.pth").metadata["compressed"]
    assert meta["step"] == 0.02 and meta["extrapolate"] == 3.0 and len(meta["tables"]) == 2
    from mtcore.show import describe

    assert describe(tmp_path / "c.pth")["notes"] == ["compressed: 2 embedding table(s), step 0.02, extrapolate 3.0 (inference only)"]
    assert describe(plain)["notes"] == []


def test_united_file_keeps_every_head(tmp_path):
    """A united (multi-head) file: one descriptor tabulated once, every head still matches."""
    from helpers import multi_task_input
    from mtcore.model.frozen import UnitedModel

    doc = multi_task_input(tmp_path, descriptor=DESCRIPTORS["se_e2_a"], layer_name=["l0", None, None])
    for head in doc["model"]["fitting_net_dict"].values():
        head["neuron"] = [16, 16]
    model, config = model_with_stats(doc)
    model.eval()
    meta = {"format": "mtcore-frozen", "kind": "united", "type_map": model.type_map, "rcut": model.rcut,
            "config": config.document, "heads": {h: head_metadata(model, config.document, h, True) for h in model.heads}}
    text = json.dumps(meta)
    plain = tmp_path / "united.pth"
    _save_script(UnitedModel(model.descriptor, dict(model.heads.items()), model.type_map, text), plain, text)
    info = compress(plain, tmp_path / "united_c.pth")
    assert len(info["tables"]) == 4
    coord, atype, box = water_frame(0, "data_3")
    for head in model.heads:
        # against the eager model the file was frozen from (frozen = eager is test_freeze's)
        ref = predict(model, head, coord, atype, box)
        rb = infer.load(tmp_path / "united_c.pth", head=head).evaluate(coord.numpy(), box.numpy(), atype.numpy())
        assert np.abs(ref["energy"].detach().numpy().reshape(-1) - rb["energy"]).max() / 192 <= E_TOL
        assert np.abs(ref["force"].detach().numpy() - rb["force"]).max() <= F_TOL
        assert np.abs(ref["virial"].detach().numpy() - rb["virial"]).max() / 192 <= E_TOL
        assert infer.load(tmp_path / "united_c.pth", head=head).head_metadata["compressed"]["tables"] == info["tables"]


def test_a_table_too_large_is_refused_before_it_is_built():
    with pytest.raises(MtcoreError, match=r"--step 1e-07: a table of .* would take .* GB"):
        TabulatedEmbedding.from_net(_net(), -1.0, 3.0, step=1e-7)
