"""mtcore.infer runs a frozen file as the eager model it records (mtcore.eager_twin): the same
numbers as the scripted module for every kind of file (one head, a tensor head, a united file, a
compressed file), the C paths really taken, the scripted module kept wherever the twin cannot
be made; and the tables' C loop (mtcore.model.table_kernel) gives the module's G and dG/dx."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SE_E2_A, model_with_stats, two_head_input, water_frame
from mtcore import infer
from mtcore.compress import compress
from mtcore.freeze import _save_script, head_metadata
from mtcore.model import frozen, neighbor_list, pair_contraction, table_contraction, table_kernel, tangent_embedding
from mtcore.model.frozen import FrozenModel, UnitedModel
from mtcore.model.mlp import EmbeddingNet, new_generator
from mtcore.model.tabulate import TabulatedEmbedding

KERNELS_ON = all(m.status() == "on" for m in (tangent_embedding, pair_contraction, table_kernel, table_contraction))
needs_kernels = pytest.mark.skipif(not KERNELS_ON, reason="mtcore's C kernels are not built here (no C compiler?)")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """One file per head, a united file and the compressed water head (random weights with the
    data's statistics: no training needed for equal-numbers checks)."""
    workdir = tmp_path_factory.mktemp("twin")
    model, config = model_with_stats(two_head_input(10, dict(SE_E2_A, neuron=[8, 16])))
    model.eval()
    out = {}
    for head in model.heads:
        text = json.dumps(head_metadata(model, config.document, head, True))
        out[head] = workdir / f"{head}.pth"
        _save_script(FrozenModel(model.descriptor, model.heads[head], model.type_map, head, text), out[head], text)
    meta = {"format": "mtcore-frozen", "kind": "united", "type_map": model.type_map, "rcut": model.rcut,
            "config": config.document, "heads": {h: head_metadata(model, config.document, h, True) for h in model.heads}}
    text = json.dumps(meta)
    out["united"] = workdir / "united.pth"
    _save_script(UnitedModel(model.descriptor, dict(model.heads.items()), model.type_map, text), out["united"], text)
    out["compressed"] = workdir / "water_compressed.pth"
    compress(out["water"], out["compressed"])
    return out


def _frames():
    coord, atype, box = water_frame(0, "data_3")
    small, small_types, _ = water_frame(2, "data_1")
    return [(coord, atype, box), (small[:60], small_types[:60], None)]  # periodic; an open cluster


def _scripted(path: Path, head, monkeypatch) -> infer.DeepPotential:
    with monkeypatch.context() as m:
        m.setenv("MTCORE_INFER_SCRIPTED", "1")
        return infer.load(path, head=head)


CASES = [("water", None), ("dipole", None), ("united", "water"), ("united", "dipole"), ("compressed", None)]


@pytest.mark.parametrize("name,head", CASES)
def test_twin_gives_the_scripted_numbers(files, name, head, monkeypatch):
    monkeypatch.setattr(infer, "EAGER_MIN_ATOMS", 1)  # the twin for the 60-atom cluster too
    twin, scripted = infer.load(files[name], head=head), _scripted(files[name], head, monkeypatch)
    assert twin.eager and not scripted.eager
    assert not isinstance(twin.runner, torch.jit.ScriptModule) and isinstance(twin.module, torch.jit.ScriptModule)
    for coord, atype, box in _frames():
        args = (coord.numpy(), None if box is None else box.numpy(), atype.numpy())
        a, b = twin.evaluate(*args), scripted.evaluate(*args)
        assert sorted(a) == sorted(b)
        for key in a:
            scale = max(1.0, float(np.abs(b[key]).max()))
            assert np.abs(a[key] - b[key]).max() <= 1e-11 * scale, (name, head, key)


@needs_kernels
@pytest.mark.parametrize("name,expected", [
    ("water", {"contract_with_tangent": 1, "fused tables": 0, "vesin": 1}),
    ("compressed", {"contract_with_tangent": 0, "fused tables": 2, "vesin": 1}),  # forward and backward
])
def test_twin_takes_the_c_paths(files, name, expected, monkeypatch):
    """Fails if the twin quietly ran the plain path: the fused contraction (compressed: the
    tables and the contraction in one C loop, mtcore.model.table_contraction) and the frame's
    vesin list must be called; the scripted module calls none of them."""
    calls = dict.fromkeys(expected, 0)

    def counting(module, attribute, label):
        original = getattr(module, attribute)

        def counted(*args, **kwargs):
            calls[label] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attribute, counted)

    counting(pair_contraction, "contract_with_tangent", "contract_with_tangent")
    counting(table_contraction, "_run", "fused tables")
    counting(frozen, "frame_pairs_in_c", "vesin")
    coord, atype, box = water_frame(0, "data_3")
    _scripted(files[name], None, monkeypatch).evaluate(coord.numpy(), box.numpy(), atype.numpy())
    assert calls == dict.fromkeys(expected, 0)
    twin = infer.load(files[name])
    calls.update(dict.fromkeys(expected, 0))  # not the load's probe
    twin.evaluate(coord.numpy(), box.numpy(), atype.numpy())
    assert calls == expected


@pytest.mark.parametrize("name", ["water", "compressed"])
def test_twin_in_chunks_gives_the_scripted_numbers(files, name, monkeypatch):
    """A frame larger than a chunk: the twin takes each chunk's pairs from the frame's vesin
    list (neighbor_list.pairs_of_centres), the scripted module from its cell lists; the same
    energy, forces and virial, with atoms given outside the cell (moved by whole cell vectors)."""
    twin, scripted = infer.load(files[name]), _scripted(files[name], None, monkeypatch)
    twin.runner.set_chunk_atoms(50)
    scripted.module.set_chunk_atoms(50)
    coord, atype, box = water_frame(0, "data_3")
    moved = coord + torch.randint(-1, 2, coord.shape, generator=torch.Generator().manual_seed(5)).double() @ box
    args = (moved.numpy(), box.numpy(), atype.numpy())
    a, b = twin.evaluate(*args), scripted.evaluate(*args)
    whole = infer.load(files[name]).evaluate(coord.numpy(), box.numpy(), atype.numpy())
    # above WHOLE_FRAME_ATOMS a frame keeps the chunked cell lists (memory bounded by the chunk)
    monkeypatch.setattr(neighbor_list, "WHOLE_FRAME_ATOMS", 100)
    assert neighbor_list.frame_pairs_in_c(moved, atype, box, 6.0) is None
    cells = twin.evaluate(*args)
    for key in a:
        scale = max(1.0, float(np.abs(b[key]).max()))
        assert np.abs(a[key] - b[key]).max() <= 1e-11 * scale, key
        assert np.abs(a[key] - whole[key]).max() <= 1e-10 * scale, key
        assert np.abs(cells[key] - b[key]).max() <= 1e-11 * scale, key


def test_small_calls_run_the_scripted_module(files, monkeypatch):
    """Below EAGER_MIN_ATOMS the scripted module is faster (Python overhead): it runs there."""
    pot = infer.load(files["water"])
    seen = []
    twin = pot.runner

    def spy(*args):
        seen.append(len(args[1]) if args[1].dim() == 1 else args[1].numel())
        return twin(*args)

    pot.runner = spy
    coord, atype, _ = water_frame(0, "data_3")
    small = pot.evaluate(coord[:6].numpy(), None, atype[:6].numpy())
    assert seen == []
    pot.evaluate(coord[:infer.EAGER_MIN_ATOMS].numpy(), None, atype[:infer.EAGER_MIN_ATOMS].numpy())
    assert seen == [infer.EAGER_MIN_ATOMS]
    monkeypatch.setattr(infer, "EAGER_MIN_ATOMS", 1)
    assert np.abs(pot.evaluate(coord[:6].numpy(), None, atype[:6].numpy())["force"] - small["force"]).max() <= 1e-12


def test_scripted_module_kept_where_no_twin_can_be_made(files, monkeypatch):
    import mtcore.compress

    coord, atype, box = water_frame(0, "data_3")
    args = (coord.numpy(), box.numpy(), atype.numpy())
    reference = infer.load(files["water"]).evaluate(*args)

    def broken(*_args, **_kwargs):
        raise RuntimeError("a plugin this file needs is not installed")

    monkeypatch.setattr(mtcore.compress, "rebuild", broken)
    kept = infer.load(files["water"])
    assert not kept.eager and kept.runner is kept.module and isinstance(kept.module, torch.jit.ScriptModule)
    result = kept.evaluate(*args)
    assert np.abs(result["force"] - reference["force"]).max() <= 1e-11


def test_twin_wanted_on_the_cpu_only(monkeypatch):
    from mtcore.eager_twin import wanted

    assert wanted("cpu") and not wanted("cuda") and not wanted("cuda:0")
    monkeypatch.setenv("MTCORE_INFER_SCRIPTED", "1")
    assert not wanted("cpu")


def _table(dtype=torch.float64) -> TabulatedEmbedding:
    net = EmbeddingNet(1, [6, 12, 24], "tanh", True, torch.float64, new_generator(5))
    table = TabulatedEmbedding.from_net(net, -1.3, 4.2, step=0.01, extrapolate=3.0)
    return TabulatedEmbedding(table.coef.to(dtype), table.lower, table.upper, table.step, table.n_coarse)


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-5)])
def test_table_loop_gives_the_module_value_and_slope(dtype, tol):
    table = _table(dtype)
    start, lower, upper, end = table.table_range()
    knots = torch.cat([lower + 0.01 * torch.arange(0, 50, dtype=torch.float64), torch.tensor([start, end, upper])])
    x = torch.cat([torch.linspace(start - 5, end + 5, 4001, dtype=torch.float64), knots]).to(dtype).unsqueeze(1)
    g_c, t_c = table_kernel.value_and_slope([table], x, [(0, x.shape[0])], c_only=True)
    g_t, t_t = table.value_and_slope(x)  # the module's torch code
    assert (g_c - g_t).abs().max() <= tol * g_t.abs().max() and (t_c - t_t).abs().max() <= tol * t_t.abs().max()
    # two tables on blocks of one input, rows outside every block zero
    other = _table(dtype)
    g2, t2 = table_kernel.value_and_slope([table, other], x, [(0, 100), (150, 300)], c_only=True)
    assert torch.equal(g2[:100], g_c[:100]) and torch.equal(g2[150:300], g_c[150:300])
    assert not g2[100:150].any() and not t2[100:150].any() and not g2[300:].any()


@needs_kernels
def test_table_loop_keeps_nan_and_its_gradient_is_the_slope():
    table = _table()
    x = torch.tensor([[0.3], [float("nan")], [7.0]], dtype=torch.float64)
    g, _ = table_kernel.value_and_slope([table], x, [(0, 3)], c_only=True)
    assert torch.isnan(g[1]).all() and torch.isfinite(g[[0, 2]]).all()
    x = torch.linspace(-3, 9, 301, dtype=torch.float64).unsqueeze(1).requires_grad_(True)
    weights = torch.randn(301, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (eager,) = torch.autograd.grad((table(x) * weights).sum(), x)  # the C loop's Function
    (scripted,) = torch.autograd.grad((torch.jit.script(table)(x) * weights).sum(), x)  # torch code
    assert (eager - scripted).abs().max() <= 1e-12 * scripted.abs().max()


SMALL_FIT = {"type": "ener", "neuron": [16, 16], "seed": 2, "precision": "float64"}
SE_A = {"type": "se_e2_a", "sel": [46, 92], "rcut": 6.0, "rcut_smth": 0.5, "neuron": [8, 16], "axis_neuron": 4, "seed": 1}
DESCRIPTORS = {
    "se_e2_a one side, excluded pair": dict(SE_A, type_one_side=True, exclude_types=[[0, 0]]),
    "se_e2_a float32": dict(SE_A, precision="float32"),
    "se_e2_r": {"type": "se_e2_r", "sel": [46, 92], "rcut": 6.0, "rcut_smth": 0.5, "neuron": [8, 16], "seed": 1},
    "se_e3": {"type": "se_e3", "sel": [20, 40], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8], "seed": 1},
    "se_atten": {"type": "se_atten", "sel": 120, "rcut": 6.0, "rcut_smth": 0.5, "neuron": [8, 16], "axis_neuron": 4,
                 "attn": 8, "attn_layer": 1, "seed": 1},
    "hybrid": {"type": "hybrid", "list": [dict(SE_A), {"type": "se_e2_r", "sel": [20, 40], "rcut": 4.0,
                                                       "rcut_smth": 0.5, "neuron": [4, 8], "seed": 3}]},
}


@pytest.mark.parametrize("name", list(DESCRIPTORS))
def test_every_descriptor_twin_gives_the_scripted_numbers(name, tmp_path, monkeypatch):
    from helpers import small_input

    model, config = model_with_stats(small_input(tmp_path, descriptor=DESCRIPTORS[name], fitting=SMALL_FIT))
    model.eval()
    text = json.dumps(head_metadata(model, config.document, "default", False))
    path = tmp_path / "frozen.pth"
    _save_script(FrozenModel(model.descriptor, model.heads["default"], model.type_map, "default", text), path, text)
    twin, scripted = infer.load(path), _scripted(path, None, monkeypatch)
    assert twin.eager and not scripted.eager
    coord, atype, box = water_frame(0, "data_3")
    a = twin.evaluate(coord.numpy(), box.numpy(), atype.numpy())
    b = scripted.evaluate(coord.numpy(), box.numpy(), atype.numpy())
    rel = 1e-5 if "float32" in name else 1e-11
    for key in a:
        assert np.abs(a[key] - b[key]).max() <= rel * max(1.0, float(np.abs(b[key]).max())), (name, key)


def test_a_twin_that_disagrees_with_the_file_is_not_used(files, monkeypatch):
    """The twin is checked against the scripted module on a probe frame at load: a rebuild that
    does not reproduce the file (here: one weight changed, as a file frozen by an mtcore whose
    code has since changed would behave) keeps the scripted module."""
    import mtcore.compress

    rebuild = mtcore.compress.rebuild

    def drifted(*args, **kwargs):
        model = rebuild(*args, **kwargs)
        with torch.no_grad():
            next(model.heads["water"].parameters()).add_(1e-3)
        return model

    monkeypatch.setattr(mtcore.compress, "rebuild", drifted)
    pot = infer.load(files["water"])
    assert not pot.eager and pot.runner is pot.module
    monkeypatch.setattr(mtcore.compress, "rebuild", rebuild)
    assert infer.load(files["water"]).eager
