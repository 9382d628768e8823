"""Physics every descriptor + energy head must satisfy (parametrised over descriptors).

Forces are minus the gradient of the energy, virials minus the strain derivative; the energy is
invariant under rotation, translation, permutation of same-type atoms and choice of periodic
image; it is continuous (with its gradient) as an atom crosses rcut.
"""

from __future__ import annotations

import pytest
import torch

from helpers import ENER, SE_E2_A, model_with_stats, predict, random_rotation, small_input, water_frame

DESCRIPTORS = {
    # se_atten's non-smooth attention jumps at rcut as in DeePMD-kit (see test_se_atten.py): smooth variants here
    "se_atten": {"type": "se_atten", "sel": 120, "neuron": [8, 16], "attn": 16, "attn_layer": 2, "axis_neuron": 4,
                 "smooth_type_embdding": True, "seed": 1, "precision": "float64"},
    "se_atten_v2_one_side_excl": {"type": "se_atten_v2", "sel": 120, "neuron": [8, 16], "attn": 16, "attn_layer": 1,
                                  "axis_neuron": 4, "type_one_side": True, "exclude_types": [[0, 1]],
                                  "attn_mask": True, "resnet_dt": True, "seed": 2, "precision": "float64"},
    "se_e2_r": {"type": "se_e2_r", "sel": [46, 92], "rcut": 6.0, "rcut_smth": 0.5, "neuron": [4, 8, 16], "seed": 1},
    "se_e2_r_one_side_excl": {"type": "se_r", "sel": [46, 92], "rcut": 6.0, "rcut_smth": 1.0, "neuron": [4, 8, 16],
                              "type_one_side": True, "exclude_types": [[0, 1]], "resnet_dt": True, "seed": 5},
    "se_e2_r_two_side_excl": {"type": "se_e2_r", "sel": [46, 92], "rcut": 5.0, "neuron": [4, 8, 16],
                              "exclude_types": [[1, 1]], "set_davg_zero": True, "seed": 6},
    "se_e3": {"type": "se_e3", "sel": [20, 40], "rcut": 4.5, "rcut_smth": 0.5, "neuron": [2, 4, 8], "seed": 1},
    "se_e3_excl": {"type": "se_t", "sel": [20, 40], "rcut": 4.5, "rcut_smth": 1.0, "neuron": [2, 4, 8],
                   "exclude_types": [[0, 1]], "resnet_dt": True, "seed": 7},
    "hybrid": {"type": "hybrid", "list": [
        {"type": "se_e2_a", "sel": [20, 40], "rcut": 4.0, "neuron": [4, 8, 16], "axis_neuron": 4, "seed": 8},
        {"type": "se_e2_r", "sel": [46, 92], "rcut": 6.0, "neuron": [4, 8, 16], "seed": 9},
        {"type": "se_e3", "sel": [12, 24], "rcut": 3.5, "neuron": [2, 4, 8], "seed": 10}]},
    "se_e2_a": SE_E2_A,
    "se_e2_a_one_side_excl": dict(SE_E2_A, type_one_side=True, exclude_types=[[0, 0]], resnet_dt=True, seed=3),
    "se_e2_a_two_side_excl": dict(SE_E2_A, exclude_types=[[1, 1]], set_davg_zero=True, seed=4),
}


@pytest.fixture(scope="module", params=list(DESCRIPTORS))
def model(request, tmp_path_factory):
    doc = small_input(tmp_path_factory.mktemp("m"), descriptor=DESCRIPTORS[request.param], fitting=ENER)
    built, _ = model_with_stats(doc)
    return built


def energy(model, coord, atype, box):
    return predict(model, "default", coord, atype, box, want_virial=False)["energy"].sum().item()


def test_force_is_minus_energy_gradient(model):
    coord, atype, box = water_frame(0)
    out = predict(model, "default", coord, atype, box)
    force = out["force"][0]
    h = 1e-5
    for atom, axis in [(0, 0), (5, 1), (70, 2), (150, 0), (191, 1)]:
        plus, minus = coord.clone(), coord.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        fd = -(energy(model, plus, atype, box) - energy(model, minus, atype, box)) / (2 * h)
        assert abs(fd - force[atom, axis].item()) < 1e-6 * max(1.0, abs(fd)), (atom, axis, fd, force[atom, axis])


def test_virial_is_minus_strain_derivative(model):
    coord, atype, box = water_frame(1)
    virial = predict(model, "default", coord, atype, box)["virial"][0].reshape(3, 3)
    h = 1e-6
    for a in range(3):
        for b in range(3):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[a, b] = h
            up = energy(model, coord @ (torch.eye(3) + eps), atype, box @ (torch.eye(3) + eps))
            down = energy(model, coord @ (torch.eye(3) - eps), atype, box @ (torch.eye(3) - eps))
            fd = -(up - down) / (2 * h)
            assert abs(fd - virial[b, a].item()) < 1e-5 * max(1.0, abs(fd)), (a, b, fd, virial[b, a])


def test_rotation_translation_invariance(model):
    coord, atype, box = water_frame(2)
    ref = predict(model, "default", coord, atype, box)
    rot = random_rotation(1)
    moved = coord @ rot + torch.tensor([1.3, -7.2, 0.4], dtype=torch.float64)
    out = predict(model, "default", moved, atype, box @ rot)
    assert torch.allclose(out["energy"], ref["energy"], atol=1e-9, rtol=0)
    assert torch.allclose(out["force"][0], ref["force"][0] @ rot, atol=1e-9)
    assert torch.allclose(out["virial"].reshape(3, 3), rot.T @ ref["virial"].reshape(3, 3) @ rot, atol=1e-8)


def test_permutation_and_periodic_image_invariance(model):
    coord, atype, box = water_frame(3)
    ref = predict(model, "default", coord, atype, box)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(coord.shape[0], generator=gen)
    out = predict(model, "default", coord[perm], atype[perm], box)
    assert torch.allclose(out["energy"], ref["energy"], atol=1e-9, rtol=0)
    assert torch.allclose(out["force"][0], ref["force"][0][perm], atol=1e-9)
    shifted = coord.clone()
    shifted[::3] += box[0] * 2 - box[2]  # move a third of the atoms to other periodic images
    out = predict(model, "default", shifted, atype, box)
    assert torch.allclose(out["energy"], ref["energy"], atol=1e-9, rtol=0)
    assert torch.allclose(out["force"], ref["force"], atol=1e-9)


def test_energy_smooth_across_rcut(model):
    """An H atom moving out of an O atom's cut-off: energy and force continuous at rcut."""
    rcut = model.descriptor.get_rcut()
    atype = torch.tensor([0, 1, 1])

    def frame(x: float) -> torch.Tensor:
        return torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [x, 0.3, 0.0]], dtype=torch.float64)

    def at(x: float):
        out = predict(model, "default", frame(x), atype, None)
        return out["energy"].item(), out["force"][0, 2, 0].item()

    r_cross = (rcut**2 - 0.3**2) ** 0.5  # distance from O equals rcut here
    for delta in (1e-3, 1e-5):
        e_in, f_in = at(r_cross - delta)
        e_out, f_out = at(r_cross + delta)
        # no jump: the change is what the (continuous) force accounts for, to second order
        assert abs((e_out - e_in) + 0.5 * (f_in + f_out) * 2 * delta) < 1e-7 * delta + 1e-11
        assert abs(f_in - f_out) < 10 * delta  # differs only by the (finite) force derivative
    # far beyond every cut-off the third atom no longer matters at all
    assert abs(at(rcut + 0.96 + 1.0)[0] - at(rcut + 0.96 + 2.0)[0]) < 1e-12


def test_non_periodic_equals_periodic_in_a_huge_box(model):
    coord, atype, _ = water_frame(0)
    cluster = coord[:24] - coord[:24].mean(0)
    types = atype[:24]
    open_ = predict(model, "default", cluster, types, None)
    boxed = predict(model, "default", cluster, types, torch.eye(3, dtype=torch.float64) * 60.0)
    assert torch.allclose(open_["energy"], boxed["energy"], atol=1e-10, rtol=0)
    assert torch.allclose(open_["force"], boxed["force"], atol=1e-10)
