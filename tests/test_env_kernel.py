"""mtcore/model/env_kernel.py: the environment rows from one C loop are env_rows' to the bit
(float64 and float32, full and radial), their derivative in the coordinates and the shifts is
autograd's of env_rows (forces, virials), and a force loss's parameter gradient through them is
the same as through the torch code."""

from __future__ import annotations

import pytest
import torch

from helpers import water_frame
from mtcore.model import env_kernel
from mtcore.model.env import env_rows
from mtcore.model.neighbor_list import build_neighbor_list

pytestmark = pytest.mark.skipif(env_kernel.status() != "on", reason=f"environment loop: {env_kernel.status()}")


def _pairs():
    coord, atype, box = water_frame(0, "data_3")
    center, neighbor, image = build_neighbor_list(coord, atype, box, 6.0, 2)
    shift = image.to(torch.float64) @ box
    return coord, center, neighbor, shift


def _dist(coord, shift, center, neighbor):
    with torch.no_grad():
        return torch.linalg.vector_norm(coord.index_select(0, neighbor) - coord.index_select(0, center) + shift, dim=1)


def _torch_rows(coord, shift, center, neighbor, radial, dtype):
    rij = coord.index_select(0, neighbor) - coord.index_select(0, center) + shift
    r = torch.linalg.vector_norm(rij, dim=1)
    return env_rows(rij.to(dtype), r.to(dtype), 0.5, 6.0, radial)


@pytest.mark.parametrize("radial", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_rows_and_their_derivatives_are_env_rows(radial, dtype, tol):
    coord, center, neighbor, shift = _pairs()
    x1, h1 = coord.clone().requires_grad_(True), shift.clone().requires_grad_(True)
    x2, h2 = coord.clone().requires_grad_(True), shift.clone().requires_grad_(True)
    mine = env_kernel.rows(x1, h1, center, neighbor, _dist(coord, shift, center, neighbor), 0.5, 6.0, radial, dtype)
    theirs = _torch_rows(x2, h2, center, neighbor, radial, dtype)
    assert mine.dtype == dtype and mine.shape == theirs.shape == (center.shape[0], 1 if radial else 4)
    # the same operations in the same order and precision: equal to rounding (bit-equal here)
    eps = torch.finfo(dtype).eps
    assert (mine - theirs).abs().max() <= 8 * eps * theirs.abs().max()
    weights = torch.randn(mine.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(dtype)
    g_mine = torch.autograd.grad((mine * weights).sum(), [x1, h1])
    g_theirs = torch.autograd.grad((theirs * weights).sum(), [x2, h2])
    for a, b in zip(g_mine, g_theirs):
        assert a.dtype == torch.float64
        assert (a - b).abs().max() <= tol * b.abs().max()


def test_forces_against_finite_differences():
    """dE/dx of a smooth function of the rows, against central differences of that function."""
    coord, center, neighbor, shift = _pairs()
    weights = torch.randn(center.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def energy(x):
        rows = env_kernel.rows(x, shift, center, neighbor, _dist(x, shift, center, neighbor), 0.5, 6.0, False,
                               torch.float64)
        return (torch.tanh(rows) * weights).sum()

    x = coord.clone().requires_grad_(True)
    (force,) = torch.autograd.grad(energy(x), x)
    h = 1e-5
    for atom, axis in [(0, 0), (5, 1), (17, 2), (100, 0)]:
        plus, minus = coord.clone(), coord.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        numeric = (energy(plus) - energy(minus)) / (2 * h)
        assert abs(float(force[atom, axis]) - float(numeric)) <= 1e-7 * max(1.0, abs(float(numeric)))


def test_a_force_loss_parameter_gradient_is_the_torch_codes():
    """Force training differentiates the forces again in the parameters: here w stands for them."""
    coord, center, neighbor, shift = _pairs()
    w = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    target = torch.randn(coord.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = []
    for make in (lambda x: env_kernel.rows(x, shift, center, neighbor, _dist(x, shift, center, neighbor), 0.5, 6.0,
                                           False, torch.float64),
                 lambda x: _torch_rows(x, shift, center, neighbor, False, torch.float64)):
        x = coord.clone().requires_grad_(True)
        energy = (torch.tanh(make(x) @ w) ** 2).sum()
        (force,) = torch.autograd.grad(energy, x, create_graph=True)
        (g,) = torch.autograd.grad(((force - target) ** 2).sum(), w)
        grads.append(g)
    assert (grads[0] - grads[1]).abs().max() <= 1e-12 * grads[1].abs().max()
