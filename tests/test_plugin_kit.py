"""The plugin test kit (mtcore.testing): every built-in passes it, and plugins with a known flaw
fail it with a message naming the property that is broken (so the kit can fail)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from dargs import Argument

from mtcore.errors import MtcoreError
from mtcore.hookspecs import DataLoaderRegistration, DescriptorRegistration, FittingRegistration
from mtcore.model.descriptor import Descriptor
from mtcore.model.fitting import Fitting, OutputDef
from mtcore.plugins import get_registry
from mtcore.testing import PluginCheckError, check_descriptor, check_fitting, check_loader

# small nets: the kit's cost is the network, not the checks
DESCRIPTORS = {
    "se_e2_a": {"rcut": 4.0, "neuron": [4, 8], "axis_neuron": 4, "seed": 1},
    "se_e2_r": {"rcut": 4.0, "neuron": [4, 8]},  # no seed: the kit must not depend on one
    "se_e3": {"rcut": 3.5, "neuron": [2, 4], "seed": 1},
    # the default (non-smooth) attention jumps at rcut as in DeePMD-kit; the kit says so (below)
    "se_atten": {"rcut": 4.0, "neuron": [4, 8], "attn": 8, "attn_layer": 1, "smooth_type_embdding": True, "seed": 1},
    "se_atten_v2": {"rcut": 4.0, "neuron": [4, 8], "attn": 8, "attn_layer": 1, "seed": 1},
    "hybrid": {"list": [{"type": "se_e2_a", "rcut": 3.5, "neuron": [4, 8], "seed": 1},
                        {"type": "se_e2_r", "rcut": 4.0, "neuron": [4, 8], "seed": 2}]},
}
FITTINGS = {
    "ener": {"neuron": [8, 8], "seed": 2},
    "dipole": {"neuron": [8, 8], "sel_type": [1]},  # no seed; output zero on type 0
    "polar": {"neuron": [8, 8], "seed": 2},
}


@pytest.mark.parametrize("name", list(DESCRIPTORS))
def test_builtin_descriptors_pass(name):
    report = check_descriptor(name, DESCRIPTORS[name])
    # hybrid has no default member list, so it cannot be built from its schema defaults alone
    expect_skipped = ["builds from its schema defaults"] if name == "hybrid" else []
    assert report.ok and [p for p, _ in report.skipped] == expect_skipped, str(report)
    assert len(report.passed) == 13 - len(expect_skipped), str(report)


@pytest.mark.parametrize("name", list(FITTINGS))
def test_builtin_fittings_pass(name):
    report = check_fitting(name, FITTINGS[name])
    assert report.ok and not report.skipped, str(report)
    expected = {"ener": "invariance", "dipole": "covariance (vector)", "polar": "covariance (matrix)"}[name]
    assert any(expected in p for p in report.passed), report.passed


def test_energy_fitting_with_frame_and_atomic_parameters_passes():
    check_fitting("ener", dict(FITTINGS["ener"], numb_fparam=2, numb_aparam=1))


def test_deepmd_npy_loader_passes(tmp_path):
    system = _npy_system(tmp_path / "sys")
    report = check_loader("deepmd/npy", system, type_map=["A", "B"])
    assert report.ok and len(report.passed) == 6, str(report)


def test_non_smooth_se_atten_is_reported():
    report = check_descriptor("se_atten", dict(DESCRIPTORS["se_atten"], smooth_type_embdding=False), raise_on_failure=False)
    assert report.failed_properties() == ["smooth at rcut"], str(report)
    assert "not continuous at rcut" in report.failed[0][1]


def test_a_known_gap_can_be_skipped_with_its_reason():
    threads = torch.get_num_threads()
    report = check_descriptor(_toy_descriptor_registration(), {"rcut": 3.0, "flaw": "hard_cutoff"},
                              skip={"smooth at rcut": "hard cut-off on purpose"})
    assert report.ok and report.skipped == [("smooth at rcut", "hard cut-off on purpose")], str(report)
    assert torch.get_num_threads() == threads  # the kit runs on one thread and restores the setting


# --------------------------------------------------------------------------------------------
# An outside descriptor and fitting, correct and with flaws
# --------------------------------------------------------------------------------------------


class ToyDescriptor(Descriptor):
    """Per neighbour type: Σ_j s(r_ij) e^{-r_ij}, s = (1 - r/rcut)^3 (C2 at rcut)."""

    def __init__(self, ntypes: int, rcut: float, flaw: str):
        super().__init__()
        self.ntypes = ntypes
        self.rcut = rcut
        self.flaw = flaw
        self.register_buffer("scale", torch.ones(ntypes, dtype=torch.float64))

    def get_rcut(self) -> float:
        return self.rcut

    def get_ntypes(self) -> int:
        return self.ntypes

    def get_dim_out(self) -> int:
        return self.ntypes

    def compute_input_stats(self, samples: list) -> None:
        self.scale.fill_(1.0 / (1.0 + len(samples)))

    def forward(self, coord, atype, center, neighbor, shift) -> Dict[str, torch.Tensor]:
        r = coord.index_select(0, neighbor) - coord.index_select(0, center) + shift
        if self.flaw == "detach":
            r = torch.cat([r[:, :1].detach(), r[:, 1:]], dim=1)
        d = torch.linalg.vector_norm(r, dim=1)
        inside = (d < self.rcut).to(d.dtype)
        if self.flaw == "hard_cutoff":
            weight = inside * torch.exp(-d)
        else:
            weight = inside * torch.clamp(1.0 - d / self.rcut, min=0.0) ** 3 * torch.exp(-d)
        if self.flaw == "rotation":
            weight = weight * (1.0 + 0.1 * r[:, 0])
        onehot = torch.nn.functional.one_hot(atype.index_select(0, neighbor), self.ntypes).to(d.dtype)
        feat = torch.zeros(coord.shape[0], self.ntypes, dtype=d.dtype).index_add(0, center, onehot * weight.unsqueeze(1))
        return {"descriptor": feat * self.scale}


class UnscriptableToy(ToyDescriptor):
    def forward(self, coord, atype, center, neighbor, shift) -> Dict[str, torch.Tensor]:
        return super().forward(coord, atype, center, neighbor, shift)  # super() does not script


def _toy_descriptor_registration() -> DescriptorRegistration:
    def build(params, ctx):
        cls = UnscriptableToy if params["flaw"] == "unscriptable" else ToyDescriptor
        return cls(ctx.ntypes, params["rcut"], params["flaw"])

    return DescriptorRegistration(
        name="toy", build=build,
        arguments=lambda ctx: [Argument("rcut", float, optional=True, default=4.0),
                               Argument("flaw", str, optional=True, default="")])


class ToyFitting(Fitting):
    """E_i = Σ_k w_k tanh(D_ik); flaws: part of D detached, or a 'vector' along a fixed axis."""

    def __init__(self, dim: int, flaw: str):
        super().__init__()
        self.flaw = flaw
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, dim, dtype=torch.float64))

    def output_def(self) -> OutputDef:
        if self.flaw == "fixed_axis":
            return OutputDef("dipole", 3, "dipole", "atomic_dipole")
        return OutputDef("energy", 1, "energy", "atom_ener", conservative=True)

    def forward(self, descriptor: Dict[str, torch.Tensor], atype: torch.Tensor) -> torch.Tensor:
        d = descriptor["descriptor"]
        if self.flaw == "detach":
            d = d + 0.5 * d.detach() ** 2
        e = (torch.tanh(d) * self.w).sum(1, keepdim=True)
        if self.flaw == "fixed_axis":
            return e * torch.tensor([[1.0, 0.0, 0.0]], dtype=e.dtype)
        return e


def _toy_fitting_registration() -> FittingRegistration:
    return FittingRegistration(
        name="toy_fit", build=lambda params, ctx: ToyFitting(ctx.descriptor.get_dim_out(), params["flaw"]),
        arguments=lambda ctx: [Argument("flaw", str, optional=True, default="")])


def test_outside_plugins_pass_and_report_what_does_not_apply():
    check_descriptor(_toy_descriptor_registration(), {"rcut": 3.0})
    # a package's own descriptor, not installed as an entry point, can carry its head
    report = check_fitting(_toy_fitting_registration(), {}, descriptor=(_toy_descriptor_registration(), {"rcut": 3.0}))
    assert report.skipped == [("layer sharing by layer_name", "the schema has no 'layer_name' argument")]


@pytest.mark.parametrize("flaw, failed", [
    ("rotation", ["rotation/translation invariance"]),
    ("detach", ["forces = -dE/dx (finite differences)", "virial = -dE/dstrain (finite differences)"]),
    ("hard_cutoff", ["smooth at rcut"]),
    ("unscriptable", ["TorchScript-scriptable"]),
])
def test_flawed_descriptor_fails_naming_the_property(flaw, failed):
    with pytest.raises(PluginCheckError) as info:
        check_descriptor(_toy_descriptor_registration(), {"rcut": 3.0, "flaw": flaw})
    message = str(info.value)
    assert message.startswith(f"descriptor 'toy': {len(failed)} propert"), message
    assert [p for p, _ in info.value.failures] == failed, message
    for prop in failed:
        assert f"  - {prop}: " in message
    assert len(message.splitlines()) == 1 + len(failed)  # one line per failed property
    if flaw == "unscriptable":  # TorchScript's complaint and the plugin's line, not torch's internals
        assert "torch.jit.script fails" in message and "test_plugin_kit.py:" in message and "super()" in message, message


def test_flawed_fittings_fail_naming_the_property():
    with pytest.raises(PluginCheckError) as info:
        check_fitting(_toy_fitting_registration(), {"flaw": "detach"}, descriptor={"type": "se_e2_r", "rcut": 3.5,
                                                                                     "neuron": [4], "seed": 1})
    assert [p for p, _ in info.value.failures][0] == "forces = -dE/dx (finite differences)", str(info.value)
    assert "finite differences is" in str(info.value)
    report = check_fitting(_toy_fitting_registration(), {"flaw": "fixed_axis"}, raise_on_failure=False)
    assert report.failed_properties() == ["rotation/translation covariance (vector)"], str(report)
    # accepts layer_name but builds its own layers: equal names would not share
    ignores = FittingRegistration(
        name="toy_fit", build=lambda params, ctx: ToyFitting(ctx.descriptor.get_dim_out(), ""),
        arguments=lambda ctx: [Argument("neuron", list, optional=True, default=[4]),
                               Argument("layer_name", [list, None], optional=True, default=None)])
    report = check_fitting(ignores, {}, raise_on_failure=False)
    assert report.failed_properties() == ["layer sharing by layer_name"], str(report)
    assert "asked ctx.layers for no layer" in report.failed[0][1]


def test_loader_that_writes_or_detects_everything_fails(tmp_path):
    npy = get_registry().get("data_loader", "deepmd/npy")

    def load(path, type_map, requirements, set_prefix):
        (Path(path) / "cache.npy").write_bytes(b"x")  # a loader must only read
        return npy.load(path, type_map, requirements, set_prefix)

    broken = DataLoaderRegistration(name="greedy", detect=lambda path: True, load=load)
    system = _npy_system(tmp_path / "sys")
    report = check_loader(broken, system, raise_on_failure=False)
    assert report.failed_properties() == ["detects its format (and nothing else)", "only reads"], str(report)
    assert "empty folder" in dict(report.failed)["detects its format (and nothing else)"]


def test_loader_with_a_multi_line_error_for_a_missing_label_fails(tmp_path):
    npy = get_registry().get("data_loader", "deepmd/npy")

    def load(path, type_map, requirements, set_prefix):
        if any(r.must for r in requirements):
            raise KeyError("missing")
        return npy.load(path, type_map, requirements, set_prefix)

    report = check_loader(DataLoaderRegistration(name="rude", detect=npy.detect, load=load), _npy_system(tmp_path / "s"),
                          raise_on_failure=False)
    assert report.failed_properties() == ["missing labels: optional left out, required is a one-line error"]
    assert "KeyError, not MtcoreError" in report.failed[0][1]


def _npy_system(path: Path) -> Path:
    """A tiny deepmd/npy system: 2 sets of 2 frames, 6 atoms of 2 types, energies and forces."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    (path / "type.raw").write_text("0 1 1 0 1 1\n")
    (path / "type_map.raw").write_text("A\nB\n")
    for k in range(2):
        folder = path / f"set.00{k}"
        folder.mkdir()
        np.save(folder / "coord.npy", rng.uniform(0, 5, (2, 18)))
        np.save(folder / "box.npy", np.tile(np.eye(3).reshape(9) * 5.0, (2, 1)))
        np.save(folder / "energy.npy", rng.normal(size=2))
        np.save(folder / "force.npy", rng.normal(size=(2, 18)))
    return path


def test_loader_check_refuses_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        check_loader("deepmd/npy", tmp_path / "nothing")
    assert issubclass(PluginCheckError, AssertionError) and not issubclass(PluginCheckError, MtcoreError)
