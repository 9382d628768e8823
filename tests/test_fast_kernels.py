"""The faster stand-ins for torch kernels a training step uses: tanh as 2·σ(2x) − 1 on the CPU
(mtcore.model.fast_tanh) and fused Adam (mtcore.train.trainer.new_adam). Each must compute what
it replaces, to rounding, including the derivatives force training differentiates twice."""

from __future__ import annotations

import pytest
import torch

from mtcore.model.fast_tanh import Tanh, fast_tanh
from mtcore.model.mlp import Dense, EmbeddingNet, new_generator
from mtcore.train.trainer import new_adam


@pytest.mark.parametrize("dtype, bound", [(torch.float64, 4.5e-16), (torch.float32, 2.4e-7)])
def test_tanh_equals_torch_tanh_to_rounding(dtype, bound):
    x = torch.cat([torch.linspace(-30, 30, 20001, dtype=dtype), torch.tensor([0.0, 1e-30, -1e-8], dtype=dtype)])
    y = fast_tanh(x)
    assert y.dtype == dtype
    assert (y - torch.tanh(x)).abs().max().item() <= bound
    assert y.abs().max().item() <= 1.0  # never beyond ±1
    assert abs(y[0].item() + 1.0) <= bound and abs(y[20000].item() - 1.0) <= bound  # saturates at ±30


def test_tanh_keeps_non_finite_values():
    x = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=torch.float64)
    y = fast_tanh(x)
    assert abs(y[0].item() - 1.0) <= 1e-15 and abs(y[1].item() + 1.0) <= 1e-15 and torch.isnan(y[2])


def test_half_precision_keeps_torch_tanh():
    """There the −1 would cancel real accuracy away near 0: torch's kernel, bit for bit."""
    x = torch.linspace(-3, 3, 101).to(torch.bfloat16)
    assert torch.equal(fast_tanh(x), torch.tanh(x))


def test_derivatives_to_second_order():
    """Forces are a first derivative and their loss is differentiated again."""
    x = torch.randn(30, dtype=torch.float64, generator=new_generator(1), requires_grad=True)
    assert torch.autograd.gradcheck(fast_tanh, (x,))
    assert torch.autograd.gradgradcheck(fast_tanh, (x,))
    (g,) = torch.autograd.grad(fast_tanh(x).sum(), x, create_graph=True)
    assert torch.allclose(g, 1 - torch.tanh(x) ** 2, rtol=0, atol=1e-15)


def test_scripted_forward_is_bit_for_bit_and_its_gradient_equal_to_rounding():
    """A frozen model computes the same activation values as training did (the scripted path
    cannot call the autograd function, so it spells the same operators out)."""
    act, scripted = Tanh(), torch.jit.script(Tanh())
    for dtype in (torch.float64, torch.float32):
        x = (torch.randn(4000, dtype=torch.float64, generator=new_generator(3)) * 4).to(dtype).requires_grad_()
        eager, frozen = act(x), scripted(x)
        assert torch.equal(eager, frozen)
        (g1,) = torch.autograd.grad(eager.sum(), x)
        (g2,) = torch.autograd.grad(frozen.sum(), x)
        assert (g1 - g2).abs().max().item() <= 4 * torch.finfo(dtype).eps
    net = EmbeddingNet(1, [8, 16, 32], "tanh", True, torch.float64, new_generator(2))
    x = torch.rand(50, 1, dtype=torch.float64, generator=new_generator(3))
    assert torch.allclose(net(x), torch.jit.script(net)(x), rtol=0, atol=1e-14)


def test_layers_use_it():
    dense = Dense(3, 4, "tanh", torch.float64, new_generator(4))
    assert isinstance(dense.activation, Tanh)


def test_fused_adam_takes_the_steps_plain_adam_takes():
    gen = new_generator(5)
    shapes = [(7, 5), (5,), (1600, 24)]
    start = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes] for _ in range(5)]
    params = {}
    for kind in ("fused", "plain"):
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = new_adam(ps, 1e-2) if kind == "fused" else torch.optim.Adam(ps, lr=1e-2)
        assert opt.defaults["fused"] is (True if kind == "fused" else None)
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        params[kind] = ps
    assert not torch.equal(params["fused"][0], start[0])
    for a, b in zip(params["fused"], params["plain"]):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)
