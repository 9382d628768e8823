"""mtcore/model/table_contraction.py: a compressed model's tables and the contraction in one C
loop give what the tables' own torch code and a plain per-pair sum give: A = Σ R[p]ᵀ G(x_p),
the forces' gradients dE/dR = dE/dA G and dE/dx = R·(dE/dA T), inside and beyond the table,
in float64 and float32, the same bits on one thread or several, NaN kept, and a second
derivative (create_graph) still right."""

from __future__ import annotations

import pytest
import torch

from mtcore.model import table_contraction
from mtcore.model.mlp import EmbeddingNet, new_generator
from mtcore.model.tabulate import TabulatedEmbedding

pytestmark = pytest.mark.skipif(table_contraction.status() != "on",
                                reason=f"fused table loop: {table_contraction.status()}")


def _table(seed: int, width: int, dtype: torch.dtype) -> TabulatedEmbedding:
    net = EmbeddingNet(1, [5, 10, width], "tanh", True, torch.float64, new_generator(seed))
    table = TabulatedEmbedding.from_net(net, -1.1, 3.7, step=0.01, extrapolate=2.0)
    return TabulatedEmbedding(table.coef.to(dtype), table.lower, table.upper, table.step, table.n_coarse)


def _problem(natoms: int, per_atom: int, K: int, width: int, dtype: torch.dtype, seed: int = 0):
    """Pairs sorted by centre, rows R [P, K]; x [P, 1] in a shuffled (group) order with two tables
    on two blocks of it and a few rows beyond both ends of the tables."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 2 * per_atom, (natoms,), generator=gen)
    center = torch.repeat_interleave(torch.arange(natoms), counts)
    P = center.numel()
    order = torch.randperm(P, generator=gen)  # row k of x belongs to pair order[k]
    x = (torch.rand(P, 1, generator=gen, dtype=torch.float64) * 6.0 - 1.5)
    x[:5, 0] = torch.tensor([-40.0, -3.0, 3.7, 9.0, 60.0], dtype=torch.float64)  # beyond the tables
    R = torch.randn(P, K, generator=gen, dtype=torch.float64)
    tables = [_table(1, width, dtype), _table(2, width, dtype)]
    bounds = [(0, P // 3), (P // 3, P)]
    return tables, bounds, x.to(dtype), R.to(dtype), center, order


def _reference(tables, bounds, x, R, center, order, natoms):
    """A by a plain per-pair sum with the tables' torch code (float64), G and T in x's order."""
    G = torch.zeros(x.shape[0], tables[0].coef.shape[2], dtype=torch.float64)
    T = torch.zeros_like(G)
    for table, (lo, hi) in zip(tables, bounds):
        g, t = table.value_and_slope(x[lo:hi])
        G[lo:hi], T[lo:hi] = g.double(), t.double()
    pair_G = torch.empty_like(G).index_copy_(0, order, G)  # G of pair p
    pair_T = torch.empty_like(T).index_copy_(0, order, T)
    A = torch.zeros(natoms, R.shape[1], G.shape[1], dtype=torch.float64)
    A.index_add_(0, center, R.double().unsqueeze(2) * pair_G.unsqueeze(1))
    return A, pair_G, pair_T


@pytest.mark.parametrize("K,width", [(4, 24), (1, 13)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-5)])
def test_forward_and_forces_gradient_match_a_plain_sum(K, width, dtype, tol):
    natoms = 37
    tables, bounds, x, R, center, order = _problem(natoms, 30, K, width, dtype)
    A_ref, pair_G, pair_T = _reference(tables, bounds, x, R, center, order, natoms)
    x = x.clone().requires_grad_(True)
    R = R.clone().requires_grad_(True)
    A = table_contraction.contract(tables, x, bounds, R, center, order, natoms)
    assert A is not None and A.dtype == dtype
    assert (A.double() - A_ref).abs().max() <= tol * A_ref.abs().max()
    W = torch.randn(A.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    gR, gx = torch.autograd.grad((A * W.to(dtype)).sum(), [R, x])
    W_of_pair = W.index_select(0, center)  # dE/dA of each pair's centre
    gR_ref = (W_of_pair * pair_G.unsqueeze(1)).sum(2)
    gx_pair = (R.detach().double() * (W_of_pair * pair_T.unsqueeze(1)).sum(2)).sum(1)
    gx_ref = gx_pair.index_select(0, order).unsqueeze(1)  # back to x's row order
    assert (gR.double() - gR_ref).abs().max() <= tol * gR_ref.abs().max()
    assert (gx.double() - gx_ref).abs().max() <= tol * gx_ref.abs().max()


def test_rows_outside_every_table_add_nothing():
    natoms = 12
    tables, bounds, x, R, center, order = _problem(natoms, 10, 4, 16, torch.float64, seed=3)
    P = x.shape[0]
    gap = [(0, P // 4), (P // 2, P)]  # rows P/4 .. P/2 have no table: G = 0 there
    A_ref, _, _ = _reference(tables, gap, x, R, center, order, natoms)
    A = table_contraction.contract(tables, x, gap, R, center, order, natoms)
    assert (A - A_ref).abs().max() <= 1e-13 * A_ref.abs().max()


def test_the_same_bits_on_one_thread_or_several():
    natoms = 300
    tables, bounds, x, R, center, order = _problem(natoms, 60, 4, 32, torch.float64, seed=5)
    assert x.shape[0] > 2 * table_contraction.MIN_PAIRS_PER_THREAD  # enough pairs to be split
    x.requires_grad_(True)
    R.requires_grad_(True)
    W = torch.randn(natoms, 4, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            A = table_contraction.contract(tables, x, bounds, R, center, order, natoms)
            results.append((A.detach(), *torch.autograd.grad((A * W).sum(), [R, x])))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_nan_stays_nan_and_a_second_derivative_is_right():
    natoms = 9
    tables, bounds, x, R, center, order = _problem(natoms, 8, 4, 16, torch.float64, seed=4)
    poisoned = x.clone()
    poisoned[order.tolist().index(int(torch.nonzero(center == 2)[0, 0])), 0] = float("nan")  # a pair of atom 2
    A = table_contraction.contract(tables, poisoned, bounds, R, center, order, natoms)
    assert torch.isnan(A[2]).all() and torch.isfinite(A[torch.arange(natoms) != 2]).all()
    # the force loss's parameter gradient differentiates dE/dR again (create_graph): W stands for
    # dE/dA's dependence on the fitting's parameters
    W = torch.randn(natoms, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    Rg = R.clone().requires_grad_(True)
    A = table_contraction.contract(tables, x, bounds, Rg, center, order, natoms)
    (gR,) = torch.autograd.grad((A * W).sum(), [Rg], create_graph=True)
    (gW,) = torch.autograd.grad((gR ** 2).sum(), [W])
    A_ref, pair_G, _ = _reference(tables, bounds, x, R, center, order, natoms)
    Wd = W.detach()
    gR_ref = (Wd.index_select(0, center) * pair_G.unsqueeze(1)).sum(2)
    # d/dW of Σ_p |W[c_p] G_p|²  =  Σ_p 2 (W[c_p] G_p) ⊗ G_p, summed per centre
    gW_ref = torch.zeros_like(Wd).index_add_(0, center, 2 * gR_ref.unsqueeze(2) * pair_G.unsqueeze(1))
    assert (gW - gW_ref).abs().max() <= 1e-12 * gW_ref.abs().max()


def test_only_tables_of_one_width_take_the_loop():
    tables, bounds, x, R, center, order = _problem(5, 4, 4, 16, torch.float64)
    net = EmbeddingNet(1, [5, 16], "tanh", True, torch.float64, new_generator(1))
    assert table_contraction.contract([tables[0], net], x, bounds, R, center, order, 5) is None
    other = _table(3, 8, torch.float64)
    assert table_contraction.contract([tables[0], other], x, bounds, R, center, order, 5) is None
    assert table_contraction.contract(tables, x.float(), bounds, R, center, order, 5) is None  # dtype differs
