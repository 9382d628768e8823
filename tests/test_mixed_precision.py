"""training/mixed_precision: network layers compute narrow, weights and reductions stay wide.

The policy (mtcore.model.precision): components are built in output_prec; each network casts its
input to compute_prec once, runs every layer narrow and returns output_prec (a lone Dense layer
casts around its own product and activation).
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from helpers import ENER, model_with_stats, multi_task_input, predict, small_input, water_frame, write_input
from mtcore import infer
from mtcore.config import load_config, normalize
from mtcore.errors import MtcoreError
from mtcore.freeze import freeze
from mtcore.model.build import build_model
from mtcore.model.fast_tanh import fast_tanh
from mtcore.model.mlp import Dense, new_generator
from mtcore.show import describe
from mtcore.train.checkpoint import load_checkpoint
from mtcore.train.trainer import Trainer

QUIET = Console(file=io.StringIO())
MIXED = {"output_prec": "float64", "compute_prec": "float32"}
TINY_DESCRIPTOR = {"type": "se_e2_a", "sel": [46, 92], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8],
                   "axis_neuron": 2, "seed": 1, "precision": "float64"}
TINY_FITTING = {"type": "ener", "neuron": [8, 8], "seed": 2, "precision": "float64"}

SE_A = {"type": "se_e2_a", "sel": [20, 40], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8], "axis_neuron": 4,
        "seed": 1, "precision": "float64"}
SE_R = {"type": "se_e2_r", "sel": [20, 40], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8], "seed": 2}
SE_T = {"type": "se_e3", "sel": [12, 24], "rcut": 3.5, "rcut_smth": 0.5, "neuron": [2, 4], "seed": 3}
SE_ATTEN = {"type": "se_atten", "sel": 60, "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8], "axis_neuron": 4,
            "attn": 8, "attn_layer": 1, "seed": 4}
DESCRIPTORS = {"se_e2_a": SE_A, "se_e2_r": SE_R, "se_e3": SE_T, "se_atten": SE_ATTEN,
               "hybrid": {"type": "hybrid", "list": [SE_A, SE_R]}}
FITTINGS = {
    "ener": {"type": "ener", "neuron": [8, 8], "seed": 5},
    "dipole": {"type": "dipole", "sel_type": [0], "neuron": [8, 8], "seed": 6},
    "polar": {"type": "polar", "sel_type": [0], "neuron": [8, 8], "seed": 7},
}


@pytest.fixture(autouse=True)
def _one_thread(single_torch_thread):
    """Tiny models: thread barriers would cost more than they save (and the CI machine is shared)."""
    yield


def mixed_input(workdir: Path, mixed: dict | None = MIXED, **kwargs) -> dict:
    """The tiny water model of tests/test_best_checkpoint.py, with ``mixed`` as mixed_precision."""
    kwargs.setdefault("descriptor", TINY_DESCRIPTOR)
    kwargs.setdefault("fitting", TINY_FITTING)
    doc = small_input(workdir, **kwargs)
    doc["training"]["validation_data"]["numb_btch"] = 1
    if mixed is not None:
        doc["training"]["mixed_precision"] = dict(mixed)
    return doc


def dense_layers(module: torch.nn.Module) -> list[Dense]:
    return [m for m in module.modules() if isinstance(m, Dense)]


# (1) one layer: exactly the computation done by hand with casts ------------------------------


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_mixed_layer_is_the_hand_cast_computation_bit_for_bit(compute):
    dense = Dense(5, 7, "tanh", torch.float64, new_generator(3))
    dense.compute_dtype, dense.mixed = compute, True
    w, b = dense.weight.detach().to(compute), dense.bias.detach().to(compute)
    x2 = torch.randn(11, 5, dtype=torch.float64, generator=new_generator(4))
    x3 = torch.randn(2, 6, 5, dtype=torch.float64, generator=new_generator(5))
    by_hand2 = fast_tanh(x2.to(compute) @ w + b).to(torch.float64)
    by_hand3 = fast_tanh(x3.to(compute) @ w + b).to(torch.float64)
    scripted = torch.jit.script(dense)
    for layer in (dense, scripted):
        y2, y3 = layer(x2), layer(x3)
        assert y2.dtype == y3.dtype == torch.float64
        assert torch.equal(y2, by_hand2) and torch.equal(y3, by_hand3)  # same ops, same dtypes: identical bits
    # it is really narrower than the float64 layer (the cast is not a no-op)
    dense.mixed = False
    assert not torch.equal(dense(x2), by_hand2)
    # gradients reach the float64 master weights
    dense.mixed = True
    dense(x2).sum().backward()
    assert dense.weight.grad is not None and dense.weight.grad.dtype == torch.float64


def test_a_mixed_network_casts_once_in_and_once_out_bit_for_bit():
    """DeePMD-kit v2 casts at a network's input and output, not around every layer: the residual
    sums stay narrow too (and the casts per layer, 14 % of a mixed step, are gone)."""
    from mtcore.model.mlp import EmbeddingNet
    from mtcore.model.precision import MixedPrecision, apply_compute_precision

    net = EmbeddingNet(1, [4, 8, 16], "tanh", True, torch.float64, new_generator(6))  # plain, doubling, doubling; resnet_dt
    apply_compute_precision(net, MixedPrecision("float64", "float32"))
    assert net.mixed and net.compute_dtype == torch.float32
    x = torch.rand(13, 1, dtype=torch.float64, generator=new_generator(7))
    h = x.to(torch.float32)
    for block in net.blocks:
        d = block.dense
        y = fast_tanh(h @ d.weight.detach().float() + d.bias.detach().float())
        if d.idt is not None:
            y = y * d.idt.detach().float()
        h = y if block.mode == 0 else torch.cat([h, h], -1) + y
    by_hand = h.to(torch.float64)
    for network in (net, torch.jit.script(net)):
        out = network(x)
        assert out.dtype == torch.float64 and torch.equal(out, by_hand)
    # casting around every layer instead rounds differently: the network path is really taken
    per_layer = x
    for block in net.blocks:
        per_layer = block(per_layer)
    assert not torch.equal(per_layer, by_hand)


# every descriptor and fitting: all layers narrowed, weights in output_prec -----------------


@pytest.mark.parametrize("desc", list(DESCRIPTORS))
def test_every_descriptor_builds_mixed(desc):
    doc = small_input(Path("/tmp"), descriptor=DESCRIPTORS[desc], fitting=FITTINGS["ener"])
    doc["training"]["mixed_precision"] = {"output_prec": "float32", "compute_prec": "bfloat16"}
    model = build_model(normalize(doc, Path("/")))
    layers = dense_layers(model)
    assert layers and all(d.mixed and d.compute_dtype == torch.bfloat16 for d in layers)
    params = dict(model.named_parameters())
    # se_atten without model/type_embedding builds DeePMD-kit's automatic one in its own precision
    wide = [n for n, p in params.items() if p.dtype != torch.float32 and not n.startswith("descriptor.type_embedding.")]
    assert not wide, wide
    coord, atype, box = water_frame(0, "data_0")
    out = predict(model, "default", coord, atype, box)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["force"]).all()


@pytest.mark.parametrize("fit", ["dipole", "polar"])
def test_tensor_fittings_build_mixed(fit):
    doc = small_input(Path("/tmp"), descriptor=SE_A, fitting=FITTINGS[fit])
    doc["loss"] = {"type": "tensor", "pref": 1.0, "pref_atomic": 1.0}
    doc["training"]["mixed_precision"] = dict(MIXED)
    model = build_model(normalize(doc, Path("/")))
    fitting_layers = dense_layers(model.heads["default"])
    assert fitting_layers and all(d.mixed and d.compute_dtype == torch.float32 for d in fitting_layers)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    coord, atype, box = water_frame(0, "data_0")
    out = predict(model, "default", coord, atype, box)
    assert all(torch.isfinite(v).all() for v in out.values() if isinstance(v, torch.Tensor))


def test_multi_task_heads_and_shared_layers_are_narrowed(tmp_path):
    doc = multi_task_input(tmp_path, descriptor=TINY_DESCRIPTOR)
    doc["training"]["mixed_precision"] = {"output_prec": "float32", "compute_prec": "float16"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(normalize(doc, Path("/")))
    lines = [str(w.message) for w in caught if "mixed_precision" in str(w.message)]
    assert len(lines) == 1 and "model/fitting_net_dict/ccsd/precision=float64" in lines[0], lines
    assert model.shared_layers and all(d.mixed for d in dense_layers(model.shared_layers))
    for head in ("ccsd", "wb97m"):
        layers = dense_layers(model.heads[head])
        assert layers and all(d.mixed and d.compute_dtype == torch.float16 for d in layers)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_without_the_key_nothing_is_narrowed():
    model = build_model(normalize(small_input(Path("/tmp")), Path("/")))
    assert not any(d.mixed for d in dense_layers(model))


# (2) forces are still −∇E -------------------------------------------------------------------


def test_forces_are_minus_the_energy_gradient_with_float32_compute():
    """Tolerance: the float32 products round each atomic energy by ~2^-24 relative; summed over
    192 atoms that is ~1e-6 in E, so central differences with h = 1e-2 Å carry a few 1e-5 eV/Å
    of rounding (measured worst 2.8e-5; the float64 model's truncation error is 6.5e-6). 2e-4
    eV/Å is 0.3 % of the largest force here (0.06); forces detached from the narrowed layers
    (zero) or a wrong chain rule would miss by the force itself."""
    wide, _ = model_with_stats(mixed_input(Path("/tmp"), None))
    model, _ = model_with_stats(mixed_input(Path("/tmp")))
    coord, atype, box = water_frame(0, "data_0")
    force = predict(model, "default", coord, atype, box, want_virial=False)["force"].detach().reshape(-1, 3)
    force_wide = predict(wide, "default", coord, atype, box, want_virial=False)["force"].detach().reshape(-1, 3)
    scale = float(force_wide.abs().max())
    assert scale > 1e-3
    # same weights: float32 products change forces only at float32 rounding level
    assert 0 < float((force - force_wide).abs().max()) < 1e-5 * scale

    def energy(c: torch.Tensor) -> float:
        return float(predict(model, "default", c, atype, box, want_virial=False)["energy"].detach().sum())

    h = 1e-2
    for atom in (0, 150):
        for axis in range(3):
            plus, minus = coord.clone(), coord.clone()
            plus[atom, axis] += h
            minus[atom, axis] -= h
            fd = -(energy(plus) - energy(minus)) / (2 * h)
            assert abs(fd - float(force[atom, axis])) < 2e-4, (atom, axis, fd, float(force[atom, axis]))


# (3) a short training run follows the float64 run -----------------------------------------


def lcurve_rows(path: Path) -> np.ndarray:
    return np.array([[float(v) for v in line.split()] for line in path.read_text().splitlines()
                     if not line.startswith("#")])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """20 steps each: float64, and float32 compute / float64 output; same seeds and data."""
    out = {}
    for name, mixed in (("wide", None), ("mixed", MIXED)):
        workdir = tmp_path_factory.mktemp(name)
        doc = mixed_input(workdir, mixed, numb_steps=20, disp_freq=5, save_freq=10)
        Trainer(load_config(write_input(workdir, doc)), workdir, QUIET).run()
        out[name] = workdir
    return out


def test_twenty_steps_follow_the_float64_run(runs):
    wide, mixed = lcurve_rows(runs["wide"] / "lcurve.out"), lcurve_rows(runs["mixed"] / "lcurve.out")
    assert wide.shape == mixed.shape and wide.shape[0] == 5
    assert np.isfinite(mixed).all()
    assert np.array_equal(wide[:, 0], mixed[:, 0])
    relative = np.abs(mixed - wide) / np.maximum(np.abs(wide), 1e-12)
    assert relative.max() < 1e-3, relative.max()
    # lcurve.out prints 3 digits, so compare the weights too: float32 rounding apart, not equal
    a = load_checkpoint(runs["wide"] / "model.ckpt.pt")["model"]
    b = load_checkpoint(runs["mixed"] / "model.ckpt.pt")["model"]
    weights = [k for k in a if a[k].is_floating_point() and k.endswith(("weight", "bias"))]
    gap = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in weights)
    assert 0 < gap < 1e-3, gap


# (4) checkpoints, restart, freeze, show -----------------------------------------------------


def test_restart_and_freeze_keep_the_compute_precision(runs):
    workdir = runs["mixed"]
    state = load_checkpoint(workdir / "model.ckpt.pt")
    assert state["config"]["training"]["mixed_precision"] == MIXED
    model = Trainer(None, workdir, QUIET, restart=state).model.eval()
    layers = dense_layers(model)
    assert layers and all(d.mixed and d.compute_dtype == torch.float32 for d in layers)
    path = freeze(state, workdir / "frozen.pth")[0]
    scripted = torch.jit.load(str(path))
    codes = {m.compute_dtype for name, m in scripted.named_modules() if hasattr(m, "mixed") and m.mixed}
    assert codes == {6}  # torch.float32's ScalarType code, stored in the file
    pot = infer.load(path)
    for frame, box_on in [(0, True), (1, False)]:
        coord, atype, box = water_frame(frame, "data_3")
        if not box_on:
            coord, atype, box = coord[:60], atype[:60], None
        ref = predict(model, "default", coord, atype, box)
        got = pot.evaluate(coord.numpy(), None if box is None else box.numpy(), atype.numpy())
        # the forward pass rounds exactly as in training: energies to float64 identity
        assert np.allclose(got["energy"], ref["energy"].detach().numpy().reshape(-1), atol=1e-10, rtol=0)
        # the backward pass is TorchScript's autodiff (tanh' as separate float32 ops, not eager's
        # fused kernel): forces agree to float32 rounding of the gradient, 1e-6 of the largest
        # (measured 2.4e-10 eV/Å on forces of 5e-3)
        force = ref["force"].detach().numpy()
        assert np.abs(got["force"] - force).max() <= 1e-6 * np.abs(force).max()
    shown = describe(path)
    assert shown["descriptor"].startswith("se_e2_a") and describe(workdir / "model.ckpt.pt")["heads"][0]["name"] == "default"


def test_frozen_file_differs_from_a_float64_freeze_of_the_same_weights(runs, tmp_path):
    state = load_checkpoint(runs["mixed"] / "model.ckpt.pt")
    plain = copy.deepcopy(state)
    del plain["config"]["training"]["mixed_precision"]
    narrow = infer.load(freeze(state, tmp_path / "narrow.pth")[0])
    wide = infer.load(freeze(plain, tmp_path / "wide.pth")[0])
    coord, atype, box = water_frame(0, "data_3")
    a = narrow.evaluate(coord.numpy(), box.numpy(), atype.numpy())["energy"]
    b = wide.evaluate(coord.numpy(), box.numpy(), atype.numpy())["energy"]
    assert 0 < abs(float(a[0]) - float(b[0])) < 1e-3


# (5) one-line errors and the override warning -------------------------------------------------


@pytest.mark.parametrize(
    "mixed, words",
    [
        ({"output_prec": "float16", "compute_prec": "float16"}, ["training/mixed_precision/output_prec", "'float16'"]),
        ({"output_prec": "float64", "compute_prec": "int8"}, ["training/mixed_precision/compute_prec", "'int8'"]),
        ({"output_prec": "float32", "compute_prec": "float64"}, ["compute_prec", "wider than output_prec"]),
        ({"output_prec": "float64", "compute_prec": "float64"}, ["compute_prec", "not one of"]),
        ({"output_prec": "float32"}, ["compute_prec"]),
        ({"compute_prec": "float16", "output": "float32"}, ["output"]),
        ({"compute_prec": 16}, ["compute_prec"]),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(mixed, words):
    doc = mixed_input(Path("/tmp"), mixed)
    with pytest.raises(MtcoreError) as err:
        normalize(doc, Path("/"))
    text = str(err.value)
    assert "\n" not in text and all(w in text for w in words), text


def test_default_output_prec_is_float32_and_explicit_precisions_are_overridden_with_one_warning():
    doc = mixed_input(Path("/tmp"), {"compute_prec": "bfloat16"}, fitting=dict(ENER, precision="float64"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = normalize(doc, Path("/"))
    lines = [str(w.message) for w in caught if "mixed_precision" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "model/descriptor/precision=float64" in lines[0] and "model/fitting_net/precision=float64" in lines[0]
    assert config.training["mixed_precision"] == {"output_prec": "float32", "compute_prec": "bfloat16"}
    model = build_model(config)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # matching precisions (or "default") are not warned about
    doc = mixed_input(Path("/tmp"), MIXED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        normalize(doc, Path("/"))
    assert not [w for w in caught if "mixed_precision" in str(w.message)]
    assert json.dumps(doc)  # the user's document is not changed by normalising
    assert doc["model"]["descriptor"]["precision"] == "float64"
