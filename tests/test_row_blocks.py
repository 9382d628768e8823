"""mtcore/model/row_blocks.py: joining the per-type nets' rows is torch.cat in value and in every
derivative order, and its second derivative is one concatenation (no zero-filled full-size tensors)."""

from __future__ import annotations

import torch

from mtcore.model.row_blocks import join_rows


def parts(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True) for n in (3, 0, 5, 2)]


def test_value_is_torch_cat():
    blocks = parts()
    assert torch.allclose(join_rows(blocks), torch.cat(blocks, dim=0), rtol=1e-15, atol=0.0)  # a copy: same numbers
    assert join_rows(blocks[:1]) is blocks[0]


def test_derivatives_of_every_order_match_finite_differences():
    blocks = [b for b in parts() if b.shape[0] > 0]

    def cubic(*xs):
        return join_rows(list(xs)) ** 3

    assert torch.autograd.gradcheck(cubic, tuple(blocks))
    assert torch.autograd.gradgradcheck(cubic, tuple(blocks))

    def only_some_rows(*xs):  # parts whose gradient is None in the first backward
        return join_rows(list(xs))[:3] ** 2

    assert torch.autograd.gradgradcheck(only_some_rows, tuple(blocks))

    def gradient(*xs):  # third order
        (g,) = torch.autograd.grad((join_rows(list(xs)) ** 4).sum(), xs[0], create_graph=True)
        return g

    assert torch.autograd.gradgradcheck(gradient, tuple(blocks))


def test_second_derivative_fills_no_full_size_zeros():
    blocks = parts(1)
    joined = join_rows(blocks)
    (g0,) = torch.autograd.grad((joined ** 3).sum(), blocks[0], create_graph=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        g0.sum().backward()
    # torch.cat's narrow would come back as slice_backward: zeros of the joined shape, slice copied in
    full_size_zeros = [e.name for e in prof.events() if e.name in ("aten::slice_backward", "aten::zero_")
                       and e.input_shapes and list(e.input_shapes[0]) in ([], list(joined.shape))]
    assert full_size_zeros == []
    expected = 6 * torch.cat(blocks).detach()  # d/dx_j Σ 3x_0² = 6x_0 on block 0's rows only
    assert torch.allclose(blocks[0].grad, expected[:3], rtol=1e-15, atol=0.0)
    assert all(b.grad is None or float(b.grad.abs().sum()) == 0.0 for b in blocks[1:])
