"""TypeFittingNet, the public per-type fitting MLP (issue 14).

The reference for "nothing changed" is built here the way the fittings built their nets before
the helper existed (FittingMLP + SharedLayerManager with the per-type key suffixes, the
index_put loop over types), so the checks do not depend on files written by an old version
(those were too large for tests/data: checkpoints and frozen files of 8 small examples ~2.7 MB).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from torch import nn

from helpers import ENER, SE_E2_A, predict, water_frame
from mtcore.config import normalize
from mtcore.errors import MtcoreError
from mtcore.hookspecs import FittingContext
from mtcore.model.build import build_model
from mtcore.model.fitting import Fitting, OutputDef
from mtcore.model.fitting_net import TypeFittingNet
from mtcore.model.mlp import FittingMLP, dtype_of, new_generator
from mtcore.model.model import MultiHeadModel
from mtcore.model.shared_layers import SharedLayerManager
from mtcore.plugins import get_registry

SMALL_SE = dict(SE_E2_A, neuron=[4, 8, 16], axis_neuron=4)
TOL = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the previous construction, written out (what ener.py / tensor_common.py did before)
# ---------------------------------------------------------------------------------------------


class OldStyleNets(nn.Module):
    def __init__(self, head, layers, n_in, n_out, neuron, activation, precision, resnet_dt, names, seed,
                 net_types: List[int], trainable: Optional[List[bool]] = None, sel_mask=None):
        super().__init__()
        dtype = dtype_of(precision)
        gen = new_generator(seed)
        nets = []
        for t in net_types:
            suffix = "" if t < 0 else f"/type_{t}"

            def factory(index, width, n_layer_out, act, suffix=suffix):
                name = names[index] if names else None
                return layers.dense(head, index, name, suffix, width, n_layer_out, act or activation, dtype, gen)

            nets.append(FittingMLP(n_in, neuron, n_out, resnet_dt, gen, factory))
        self.nets = nn.ModuleList(nets)
        for net in self.nets:
            for block, flag in zip(net.blocks, trainable or [True] * (len(neuron) + 1)):
                for p in block.parameters():
                    p.requires_grad_(flag)
        self.net_types, self.n_out, self.dtype, self.sel_mask = net_types, n_out, dtype, sel_mask

    def forward(self, x, atype):
        if self.net_types == [-1] and self.sel_mask is None:  # ener: every atom
            return self.nets[0](x)
        if self.net_types == [-1]:  # tensor heads: the selected atoms only
            out = torch.zeros(x.shape[0], self.n_out, dtype=self.dtype)
            idx = torch.nonzero(self.sel_mask.index_select(0, atype)).squeeze(1)
            return out.index_put((idx,), self.nets[0](x.index_select(0, idx)))
        out = torch.zeros(x.shape[0], self.n_out, dtype=self.dtype)
        for k, net in enumerate(self.nets):
            idx = torch.nonzero(atype == self.net_types[k]).squeeze(1)
            if idx.numel() > 0:
                out = out.index_put((idx,), net(x.index_select(0, idx)))
        return out


def pair(ntypes=3, n_in=7, n_out=2, neuron=(6, 6, 5), precision="float64", names=None, seed=11,
         mixed=False, sel_types=None, trainable=None, heads=("a",)):
    """The same nets built both ways, each with its own manager, for every head in ``heads``."""
    new_layers, old_layers = SharedLayerManager(), SharedLayerManager()
    new, old = {}, {}
    net_types = [-1] if mixed else list(sel_types if sel_types is not None else range(ntypes))
    for k, head in enumerate(heads):
        kw = dict(n_in=n_in, n_out=n_out, neuron=list(neuron), precision=precision, resnet_dt=True,
                  seed=seed + k)
        new[head] = TypeFittingNet(head=head, layers=new_layers, ntypes=ntypes, activation_function="tanh",
                                   layer_name=names, mixed_types=mixed, sel_types=sel_types,
                                   trainable=trainable if trainable is not None else True, **kw)
        sel_mask = None if sel_types is None else torch.isin(torch.arange(ntypes), torch.tensor(sel_types))
        old[head] = OldStyleNets(head, old_layers, activation="tanh", names=names, net_types=net_types,
                                 trainable=trainable, sel_mask=sel_mask, **kw)
    return new, old, new_layers, old_layers


CASES = {
    "per-type": {},
    "per-type-shared-float32": dict(precision="float32", names=["s0", None, "s2", "out"], heads=("a", "b")),
    "mixed-types-shared": dict(mixed=True, names=[None, "m1", "m2", None], heads=("a", "b")),
    "selected-types": dict(sel_types=[0, 2], names=["t0", None, None, None], heads=("a", "b")),
    "mixed-selected": dict(mixed=True, sel_types=[1]),
    "trainable-flags": dict(trainable=[True, False, True, False]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_parameters_keys_and_outputs_as_the_previous_construction(case):
    new, old, new_layers, old_layers = pair(**CASES[case])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    atype = torch.randint(0, 3, (40,), generator=gen)
    atype[:3] = torch.tensor([0, 1, 2])
    for head in new:
        # same init draws in the same order: equal tensors, not just close ones
        old_state = {k.split(".", 1)[1]: v for k, v in old[head].state_dict().items()}
        assert list(new[head].state_dict()) == list(old_state)
        for key, value in new[head].state_dict().items():
            assert torch.equal(value, old_state[key]), key
        assert [p.requires_grad for p in new[head].parameters()] == [p.requires_grad for p in old[head].parameters()]
        xh = x.to(new[head].dtype)
        a, b = new[head](xh, atype), old[head](xh, atype)
        assert a.dtype == new[head].dtype
        torch.testing.assert_close(a, b, rtol=1e-10 if a.dtype == torch.float64 else 1e-6, atol=0)
        if CASES[case].get("sel_types") is not None:
            unselected = ~torch.isin(atype, torch.tensor(CASES[case]["sel_types"]))
            assert unselected.any() and bool((a[unselected] == 0).all())
    assert list(new_layers.layers) == list(old_layers.layers)
    assert new_layers.users == old_layers.users


@pytest.mark.parametrize("counts", [(5, 9, 6), (7, 0, 13)], ids=["three-blocks", "a-type-absent"])
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "torchscript"])
def test_atoms_sorted_by_type_take_blocks_with_the_same_numbers(counts, scripted):
    """Atoms sorted by type run each net on its block of rows (views, no gathers): outputs and
    the gradients of the input and of every parameter equal the gather-and-scatter path's."""
    new, old, _, _ = pair()
    net, reference = new["a"], old["a"]
    atype = torch.cat([torch.full((n,), t) for t, n in enumerate(counts)])
    x = torch.randn(len(atype), 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    run = torch.jit.script(net) if scripted else net

    def outputs_and_gradients(module, params):
        xg = x.clone().requires_grad_(True)
        out = module(xg, atype)
        loss = (out ** 2).sum()
        return (out.detach(), *torch.autograd.grad(loss, [xg, *params], allow_unused=True))

    mine = outputs_and_gradients(run, list(net.parameters()))
    theirs = outputs_and_gradients(reference, list(reference.parameters()))
    for a, b in zip(mine, theirs):
        if b is None:
            assert a is None or not bool(a.any())
        else:
            torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b, rtol=1e-13, atol=1e-15)


def test_shared_keys_follow_the_documented_suffix_rule():
    _, _, per_type, _ = pair(names=["h0", None, None, "o"], heads=("a", "b"))
    assert sorted(per_type.layers) == sorted(f"{n}/type_{t}" for n in ("h0", "o") for t in range(3))
    _, _, mixed, _ = pair(mixed=True, names=["h0", None, None, "o"], heads=("a", "b"))
    assert sorted(mixed.layers) == ["h0", "o"]
    assert per_type.users["h0/type_1"] == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# built-in heads: the state-dict layout of older checkpoints, the old forward
# ---------------------------------------------------------------------------------------------


def _config(fitting_net_dict: Dict[str, dict], descriptor: dict = SMALL_SE):
    doc = {"model": {"type_map": ["O", "H"], "descriptor": copy.deepcopy(descriptor),
                     "fitting_net_dict": copy.deepcopy(fitting_net_dict)},
           "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 10},
           "loss_dict": {h: {"type": "ener" if f["type"] == "ener" else "tensor", **({} if f["type"] == "ener" else
                                                                                     {"pref": 1.0, "pref_atomic": 1.0})}
                         for h, f in fitting_net_dict.items()},
           "training": {"data_dict": {h: {"training_data": {"systems": ["/nonexistent"]}} for h in fitting_net_dict},
                        "numb_steps": 1}}
    return normalize(doc, Path("/"), get_registry())


def _old_keys(nets: int, neuron: List[int], resnet_dt: bool = True) -> List[str]:
    keys = []
    for k in range(nets):
        for i in range(len(neuron) + 1):
            keys += [f"nets.{k}.blocks.{i}.dense.weight", f"nets.{k}.blocks.{i}.dense.bias"]
            if resnet_dt and 1 <= i < len(neuron) and neuron[i] == neuron[i - 1]:
                keys.append(f"nets.{k}.blocks.{i}.dense.idt")
    return keys


BUILTIN = {
    "ccsd": dict(ENER, neuron=[16, 16, 16], seed=11, layer_name=["l0", None, "l2", None], atom_ener=[None, -0.3]),
    "wb97m": dict(ENER, neuron=[16, 16, 16], seed=12, layer_name=["l0", None, "l2", None]),
    "dip": {"type": "dipole", "sel_type": [0], "neuron": [16, 16], "seed": 3, "precision": "float64"},
    "pol": {"type": "polar", "sel_type": [0, 1], "fit_diag": False, "neuron": [16, 8], "seed": 4,
            "precision": "float64", "layer_name": ["l0", None, None]},
}


@pytest.fixture(scope="module")
def builtin_model():
    return build_model(_config(BUILTIN), get_registry())


def test_builtin_heads_keep_their_state_dict_keys_and_initial_weights(builtin_model):
    model = builtin_model
    old_layers = SharedLayerManager()
    for head, spec in BUILTIN.items():
        fitting = model.heads[head]
        net_types = [0, 1] if spec["type"] != "dipole" else [0]
        n_in = model.descriptor.get_dim_out()
        m = model.descriptor.get_dim_rot()
        n_out = {"ener": 1, "dipole": m, "polar": m * m}[spec["type"]]
        old = OldStyleNets(head, old_layers, n_in, n_out, spec["neuron"], "tanh", "float64", True,
                           spec.get("layer_name"), spec["seed"], net_types)
        keys = [k for k in fitting.state_dict() if k.startswith("nets.")]
        assert keys == _old_keys(len(net_types), spec["neuron"]), head
        old_state = old.state_dict()
        for key in keys:
            assert torch.equal(fitting.state_dict()[key], old_state[key]), (head, key)
    # the model-level keys of the shared layers are as before too
    assert sorted(k.split(".")[0] for k in model.state_dict() if k.startswith("shared_layers.")) == ["shared_layers"] * 10
    assert sorted({k.split(".")[1] for k in model.state_dict() if k.startswith("shared_layers.")}) == [
        "l0__type_0", "l0__type_1", "l2__type_0", "l2__type_1"]


def _old_ener_forward(fitting, descriptor: Dict[str, torch.Tensor], atype: torch.Tensor) -> torch.Tensor:
    """ener.py's forward before the helper (loop over types, vacuum energy subtracted per type)."""
    x = fitting._net_input(descriptor)
    if fitting.dim_type_embedding > 0:
        net = fitting.nets[0]
        out = net(x)
        if fitting.has_atom_ener:
            mask = fitting.atom_ener_mask.index_select(0, atype).to(fitting.dtype).unsqueeze(1)
            out = out - net(fitting._isolated(x)) * mask
    else:
        out = torch.zeros(x.shape[0], 1, dtype=fitting.dtype)
        for t, net in enumerate(fitting.nets):
            idx = torch.nonzero(atype == t).squeeze(1)
            if idx.numel() > 0:
                xt = x.index_select(0, idx)
                y = net(xt)
                if fitting.has_atom_ener and bool(fitting.atom_ener_mask[t]):
                    y = y - net(fitting._isolated(xt))
                out = out.index_put((idx,), y)
    return out.to(torch.float64) + fitting.bias_atom_e.index_select(0, atype).unsqueeze(1)


SE_ATTEN = {"type": "se_atten", "sel": 120, "rcut": 6.0, "rcut_smth": 0.5, "neuron": [8, 16], "axis_neuron": 4,
            "attn": 8, "attn_layer": 1, "seed": 1, "precision": "float64"}


@pytest.mark.parametrize("descriptor", [SMALL_SE, SE_ATTEN], ids=["per-type", "type-embedding"])
def test_ener_forward_and_forces_equal_the_previous_forward(descriptor):
    spec = {"e": dict(ENER, neuron=[8, 8], seed=5, atom_ener=[-0.4] if descriptor is SE_ATTEN else [None, -0.4])}
    model = build_model(_config(spec, descriptor), get_registry())
    fitting = model.heads["e"]
    with torch.no_grad():
        fitting.bias_atom_e.copy_(torch.tensor([-93.5, -187.1], dtype=torch.float64))
    coord, atype, box = water_frame(0)
    new = predict(model, "e", coord, atype, box)
    new_forward = fitting.forward
    try:
        fitting.forward = lambda d, a: _old_ener_forward(fitting, d, a)
        old = predict(model, "e", coord, atype, box)
    finally:
        fitting.forward = new_forward
    for key in ("energy", "atom_ener", "force", "virial"):
        torch.testing.assert_close(new[key], old[key], **TOL)


# ---------------------------------------------------------------------------------------------
# a head from outside (defined here) shares tensors with the built-in ener head
# ---------------------------------------------------------------------------------------------


class ToyFitting(Fitting):
    """An outside fitting: atomic 'toy' values from the public helper, nothing else."""

    def __init__(self, ctx: FittingContext, **net_args):
        super().__init__()
        desc = ctx.descriptor
        self.net = TypeFittingNet(head=ctx.head, layers=ctx.layers, ntypes=ctx.ntypes,
                                  n_in=desc.get_dim_out() + desc.get_dim_type_embedding(), n_out=1,
                                  mixed_types=desc.get_dim_type_embedding() > 0, **net_args)
        self.dtype = self.net.dtype

    def output_def(self) -> OutputDef:
        return OutputDef("toy", 1, "toy", "atom_toy")

    def forward(self, descriptor: Dict[str, torch.Tensor], atype: torch.Tensor) -> torch.Tensor:
        x = descriptor["descriptor"]
        if self.net.mixed_types:  # one net for all types: the type embedding appended (as in docs/plugins.md)
            x = torch.cat([x, descriptor["type_embedding"]], dim=1)
        return self.net(x, atype).to(torch.float64)


def _ener_and_toy(ener_names, toy_names, toy_kwargs=None):
    config = _config({"ener": dict(ENER, neuron=[8, 8], seed=5, layer_name=ener_names)})
    descriptor = build_model(config, get_registry()).descriptor
    manager = SharedLayerManager()
    ener = get_registry().get("fitting_net", "ener").build(
        config.heads["ener"].fitting, FittingContext("ener", ["O", "H"], descriptor, manager))
    toy_args = {"neuron": [8, 8], "precision": "float64", "seed": 9, "layer_name": toy_names, **(toy_kwargs or {})}
    toy = ToyFitting(FittingContext("toy", ["O", "H"], descriptor, manager), **toy_args)
    heads = {"ener": ener, "toy": toy}
    manager.check_usage(heads)
    return MultiHeadModel(descriptor, heads, ["O", "H"], manager.module_dict(), manager.users), manager


def test_outside_fitting_and_builtin_ener_share_the_same_tensors():
    model, manager = _ener_and_toy(["h0", None, "out"], ["h0", None, "out"])
    ener, toy = model.heads["ener"], model.heads["toy"]
    for t in range(2):
        for layer in (0, 2):
            a, b = ener.nets[t].blocks[layer].dense, toy.net[t].blocks[layer].dense
            assert a is b and a.weight.data_ptr() == b.weight.data_ptr()
        assert ener.nets[t].blocks[1].dense.weight.data_ptr() != toy.net[t].blocks[1].dense.weight.data_ptr()
    assert manager.users["h0/type_0"] == ["ener", "toy"]
    coord, atype, box = water_frame(0)
    before = predict(model, "ener", coord, atype, box)["energy"].detach().clone()
    # one optimiser step on the outside head's loss moves the built-in head's output
    optimizer = torch.optim.Adam(model.heads["toy"].parameters(), lr=1e-2)
    loss = predict(model, "toy", coord, atype, box)["toy"].square().sum()
    loss.backward()
    optimizer.step()
    after = predict(model, "ener", coord, atype, box)["energy"].detach()
    assert float((after - before).abs().max()) > 1e-6
    # and with the names dropped, the heads hold no tensor in common
    model, manager = _ener_and_toy(None, None)
    assert not manager.layers
    ids = {id(p) for p in model.heads["ener"].parameters()}
    assert not any(id(p) in ids for p in model.heads["toy"].parameters())


@pytest.mark.parametrize("toy_kwargs, names, message", [
    (dict(neuron=[8, 6]), ["h0", "h1", None], r"^shared layer 'h1': head 'ener' layer 1 has shape 8x8 but head 'toy' layer 1 has shape 8x6$"),
    (dict(precision="float32"), ["h0", None, None], r"^shared layer 'h0': head 'ener' uses precision float64 but head 'toy' uses float32$"),
    (dict(activation_function="relu"), ["h0", None, None], r"^shared layer 'h0': head 'ener' layer 0 uses activation_function 'tanh'"),
    (dict(trainable=[False, True, True]), ["h0", None, None], r"^shared layer 'h0': head 'ener' trains it but head 'toy' freezes it"),
    (dict(resnet_dt=False), [None, "h1", None], r"^shared layer 'h1': head 'ener' scales it by a resnet timestep"),
    ({}, ["h0", None], r"^fitting net 'toy': layer_name has 2 entries; expected len\(neuron\)\+1 = 3"),
])
def test_mismatched_sharing_is_a_one_line_error(toy_kwargs, names, message):
    ener_names = names if len(names) == 3 else None
    with pytest.raises(MtcoreError, match=message) as info:
        _ener_and_toy(ener_names, names, toy_kwargs)
    assert "\n" not in str(info.value)


def test_bad_settings_are_one_line_errors():
    base = dict(head="h", layers=SharedLayerManager(), ntypes=2, n_in=3, n_out=1)
    for kwargs, message in [
        (dict(neuron=[4, 0]), r"fitting net 'h': neuron must be a list of positive integers"),
        (dict(neuron=[4], trainable=[True]), r"fitting net 'h': trainable has 1 entries; expected len\(neuron\)\+1"),
        (dict(neuron=[4], precision="float8"), r"precision 'float8' is not one of"),
        (dict(neuron=[4], activation_function="swish"), r"activation_function 'swish' is not one of"),
        (dict(neuron=[4], sel_types=[2]), r"fitting net 'h': sel_types \[2\] must be type indices in 0..1"),
        (dict(neuron=[4], layer_name=["a/b", None]), r"layer_name entry 'a/b' must be a non-empty name without '/'"),
    ]:
        with pytest.raises(MtcoreError, match=message) as info:
            TypeFittingNet(**{**base, **kwargs})
        assert "\n" not in str(info.value)
    with pytest.raises(MtcoreError, match="needs the model's shared-layer manager"):
        TypeFittingNet(**{**base, "layers": None}, neuron=[4], layer_name=["x", None])
    private = TypeFittingNet(**{**base, "layers": None}, neuron=[4])
    assert len(private) == 2


def test_schema_keys_of_the_helper():
    names = [a.name for a in TypeFittingNet.arguments()]
    assert names == ["neuron", "activation_function", "precision", "resnet_dt", "trainable", "seed", "layer_name"]
    assert TypeFittingNet.arguments(neuron_default=[8])[0].default == [8]
    registry = get_registry()
    from mtcore.schema import schema_context

    for fitting in ("ener", "dipole", "polar"):
        keys = {a.name for a in registry.get("fitting_net", fitting).arguments(schema_context(registry))}
        assert set(names) <= keys, fitting


# ---------------------------------------------------------------------------------------------
# TorchScript
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["per-type", "mixed-types-shared", "selected-types", "mixed-selected"])
def test_scripted_net_equals_eager(case):
    new, _, _, _ = pair(**CASES[case])
    net = new["a"]
    scripted = torch.jit.script(net)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(25, 7, generator=gen, dtype=torch.float64)
    atype = torch.randint(0, 3, (25,), generator=gen)
    torch.testing.assert_close(scripted(x, atype), net(x, atype), **TOL)
    assert list(scripted.state_dict()) == list(net.state_dict())


def test_scripted_outside_fitting_equals_eager():
    model, _ = _ener_and_toy(["h0", None, "out"], ["h0", None, "out"])
    toy = model.heads["toy"]
    scripted = torch.jit.script(toy)
    x = torch.randn(6, model.descriptor.get_dim_out(), dtype=torch.float64)
    atype = torch.tensor([0, 1, 1, 0, 1, 1])
    torch.testing.assert_close(scripted({"descriptor": x}, atype), toy({"descriptor": x}, atype), **TOL)
