"""Row blocks joined with ``torch.cat`` whose derivatives of every order stay one pass.

Why: the per-type embedding nets each return a block of rows, joined by ``torch.cat`` for the
contraction. cat's backward slices the gradient (free views), but force training differentiates
that backward again, and the derivative of a slice is a zero-filled tensor of the whole size with
the slice copied in: one full [pairs × width] zero fill per net and a sum of all of them (water
se_e2_a: four 14 MB fills and three adds a step, for what is a single concatenation). Here
the backward of the join is a split, and the backward of the split is the join again.
"""

from __future__ import annotations

from typing import List, Sequence

import torch


class _JoinRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *parts: torch.Tensor) -> torch.Tensor:
        ctx.sizes = [p.shape[0] for p in parts]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _SplitRows.apply(grad, ctx.sizes)


class _SplitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, whole: torch.Tensor, sizes: Sequence[int]):
        ctx.sizes = list(sizes)
        ctx.template = (whole.shape[1:], whole.dtype, whole.device)
        return tuple(whole.split(ctx.sizes, dim=0))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        shape, dtype, device = ctx.template
        filled = [g if g is not None else torch.zeros((n, *shape), dtype=dtype, device=device)
                  for g, n in zip(grads, ctx.sizes)]
        return _JoinRows.apply(*filled), None


def join_rows(parts: List[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, dim=0)``; its gradient's own gradient is one concatenation, not one
    zero-filled full-size tensor per part."""
    if len(parts) == 1:
        return parts[0]
    return _JoinRows.apply(*parts)
