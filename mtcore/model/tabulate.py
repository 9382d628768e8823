"""Tabulated embedding nets: ``mtcore compress``'s replacement for a one-input embedding net.

An embedding net N: R → R^M (DeePMD-kit's, on s(r) or an angular product) is replaced by a
piecewise quintic polynomial per output column on a grid over the inputs the training data can
produce (DeePMD-kit's ``dp compress`` idea). Each interval's quintic matches the net's value,
first and second derivative at both ends (computed exactly, with forward-mode autograd), so the
table is C² everywhere inside its range and its error on an interval of width h is O(h⁶).

Grid, in the net's input x (the descriptor says what x means and its data range [lower, upper]):

* fine: [lower, upper] in steps of ``step`` (upper rounded up to a whole step);
* coarse (extrapolation): ``10·step`` wide intervals on both sides, each side
  ``(extrapolate - 1)·(upper - lower)`` long, so the table spans ``extrapolate`` times the data
  range beyond each end (for s(r) with lower = s(∞): s up to ``extrapolate``·s(r_min), as
  DeePMD-kit's ``extrapolate`` scales the table's upper bound);
* beyond the table: linear continuation from its end (value and slope of the last interval),
  so inputs far outside the data stay finite and continuous (C¹), though no longer the net's.

Evaluation is vectorised: interval index from the grid formulas, then one ``embedding_bag`` sums
the interval's coefficient rows weighted by [1, t, .., t⁵] (value) and by their t-derivatives
(slope), without materialising a gathered [inputs, 6, M] copy of the table. The
derivative enters autograd through one product (x - x̂)·dG/dx with x̂ the detached input, so
forces and virials cost one multiply-add per output, not a pass back through the net. Second
derivatives through a table are zero: a compressed model is for inference, not training.
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Tuple

import torch
from torch import nn

from mtcore.errors import MtcoreError
from mtcore.model.env import smooth_weight
from mtcore.model.mlp import DOUBLING, RESIDUAL, EmbeddingNet

#: coarse intervals (extrapolation region) are this many fine steps wide, as in DeePMD-kit
COARSE_FACTOR = 10
#: a table larger than this is refused (a tiny step or a huge input range: memory)
MAX_TABLE_BYTES = 2 * 1024**3


def _derivatives(net: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N(x), N'(x), N''(x) at the points x [K, 1], exactly: value, slope and curvature are carried
    through the layers together (forward mode by hand; torch.func would import the compiler)."""
    if not isinstance(net, EmbeddingNet):
        return _derivatives_func(net, x)
    value, slope, curve = x, torch.ones_like(x), torch.zeros_like(x)
    with torch.no_grad():
        for block in net.blocks:
            dense = block.dense
            z = torch.addmm(dense.bias, value, dense.weight)
            dz, sz = slope @ dense.weight, curve @ dense.weight
            a, a1, a2 = _activation_derivatives(dense.activation, z)
            h, dh, sh = a, a1 * dz, a2 * dz * dz + a1 * sz
            if block.use_timestep and dense.idt is not None:
                h, dh, sh = h * dense.idt, dh * dense.idt, sh * dense.idt
            if block.mode == RESIDUAL:
                value, slope, curve = value + h, slope + dh, curve + sh
            elif block.mode == DOUBLING:
                value = torch.cat([value, value], dim=1) + h
                slope = torch.cat([slope, slope], dim=1) + dh
                curve = torch.cat([curve, curve], dim=1) + sh
            else:
                value, slope, curve = h, dh, sh
    return value, slope, curve


def _activation_derivatives(act: nn.Module, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """φ(z), φ'(z), φ''(z) of an elementwise activation, by autograd on the elementwise map."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        a = act(zz)
        if not a.requires_grad:  # a constant map
            return a.detach(), torch.zeros_like(z), torch.zeros_like(z)
        (a1,) = torch.autograd.grad(a.sum(), zz, create_graph=True)
        if a1.requires_grad:
            (a2,) = torch.autograd.grad(a1.sum(), zz, allow_unused=True)
            a2 = torch.zeros_like(z) if a2 is None else a2
        else:  # identity, ReLU: φ'' = 0
            a2 = torch.zeros_like(z)
    return a.detach(), a1.detach(), a2.detach()


def _derivatives_func(net: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Any other one-input module: nested forward-mode autograd (torch.func)."""
    from torch.func import jvp

    ones = torch.ones_like(x)

    def slope(z: torch.Tensor) -> torch.Tensor:
        return jvp(net, (z,), (ones,))[1]

    with torch.no_grad():
        value, d1 = jvp(net, (x,), (ones,))
        _, d2 = jvp(slope, (x,), (ones,))
    return value, d1, d2


def quintic_coefficients(f0, f1, d0, d1, s0, s1) -> torch.Tensor:
    """Coefficients a0..a5 (stacked on dim 1) of p(t) on [0, 1] with p, p', p'' = (f, d, s) at
    t = 0 and t = 1 (derivatives already scaled to t, i.e. times the width, squared for s)."""
    delta = f1 - f0 - d0 - 0.5 * s0
    delta1 = d1 - d0 - s0
    delta2 = s1 - s0
    a3 = 10.0 * delta - 4.0 * delta1 + 0.5 * delta2
    a4 = -15.0 * delta + 7.0 * delta1 - delta2
    a5 = 6.0 * delta - 3.0 * delta1 + 0.5 * delta2
    return torch.stack([f0, d0, 0.5 * s0, a3, a4, a5], dim=1)


class TabulatedEmbedding(nn.Module):
    """Same interface as :class:`mtcore.model.mlp.EmbeddingNet` with one input: x [n, 1] → [n, M].

    Build with :meth:`from_net`; the buffers (``coef`` [intervals, 6, M]) travel with the
    TorchScript file. ``check_frequency`` > 0: every that many calls, a warning counts the inputs
    outside the training range [lower, upper] (DeePMD-kit's overflow check); off by default.
    """

    def __init__(self, coef: torch.Tensor, lower: float, upper: float, step: float, n_coarse: int,
                 check_frequency: int = -1):
        super().__init__()
        self.register_buffer("coef", coef)
        self.n_out = int(coef.shape[2])
        self.lower = float(lower)
        self.upper = float(upper)
        self.step = float(step)
        self.coarse = float(step) * COARSE_FACTOR
        self.n_coarse = int(n_coarse)
        self.n_fine = int(coef.shape[0]) - 2 * int(n_coarse)
        self.lo = self.lower - self.n_coarse * self.coarse
        self.hi = self.upper + self.n_coarse * self.coarse
        self.check_frequency = int(check_frequency)
        self.calls = 0
        self.register_buffer("value_rows", torch.arange(0, 6, dtype=torch.long).unsqueeze(0), persistent=False)
        self.register_buffer("slope_rows", torch.arange(1, 6, dtype=torch.long).unsqueeze(0), persistent=False)
        self.register_buffer("bag_starts", torch.tensor([[0, 6]], dtype=torch.long), persistent=False)

    @classmethod
    def from_net(cls, net: nn.Module, lower: float, upper: float, step: float = 0.01, extrapolate: float = 5.0,
                 check_frequency: int = -1) -> "TabulatedEmbedding":
        """Tabulate ``net`` (one input) for data inputs in [lower, upper]; see the module docstring."""
        if not (math.isfinite(lower) and math.isfinite(upper)) or upper < lower:
            raise MtcoreError(f"table range [{lower}, {upper}] is not a finite interval")
        if not (step > 0 and math.isfinite(step)):
            raise MtcoreError(f"--step: must be a positive number, got {step}")
        if not (extrapolate >= 1 and math.isfinite(extrapolate)):
            raise MtcoreError(f"--extrapolate: must be at least 1, got {extrapolate}")
        n_fine = max(1, math.ceil((upper - lower) / step - 1e-9))
        upper = lower + n_fine * step
        coarse = step * COARSE_FACTOR
        n_coarse = max(1, math.ceil((extrapolate - 1.0) * (upper - lower) / coarse - 1e-9))
        total = n_fine + 2 * n_coarse
        width_out = int(getattr(net, "n_out", 0)) or int(net(torch.zeros(1, 1, dtype=next(iter(net.parameters())).dtype)).shape[1])
        size = total * 6 * width_out * 8
        if size > MAX_TABLE_BYTES:
            raise MtcoreError(f"--step {step}: a table of {total} intervals over [{lower:.4g}, {upper:.4g}] would take "
                              f"{size / 1024**3:.1f} GB (limit {MAX_TABLE_BYTES // 1024**3} GB); use a larger step")
        # knots: coarse below, fine, coarse above; computed from integers, no accumulated rounding
        below = lower - coarse * torch.arange(n_coarse, 0, -1, dtype=torch.float64)
        fine = lower + step * torch.arange(0, n_fine, dtype=torch.float64)
        above = upper + coarse * torch.arange(0, n_coarse + 1, dtype=torch.float64)
        knots = torch.cat([below, fine, above])
        width = (knots[1:] - knots[:-1]).unsqueeze(1)
        dtype = next(iter(net.parameters())).dtype
        net64 = _as_float64(net)
        value, d1, d2 = _derivatives(net64, knots.unsqueeze(1))
        f, d, s = value, d1, d2
        coef = quintic_coefficients(f[:-1], f[1:], d[:-1] * width, d[1:] * width, s[:-1] * width**2, s[1:] * width**2)
        return cls(coef.to(dtype).contiguous(), lower, upper, step, n_coarse, check_frequency)

    @torch.jit.export
    def table_range(self) -> List[float]:
        """[start, data lower, data upper, end] of the table (beyond start/end: linear)."""
        return [self.lo, self.lower, self.upper, self.hi]

    def _check(self, x: torch.Tensor) -> None:
        self.calls += 1
        if self.check_frequency > 0 and self.calls % self.check_frequency == 0:
            outside = int(((x < self.lower) | (x > self.upper)).sum())
            if outside > 0:
                beyond = int(((x < self.lo) | (x > self.hi)).sum())
                message = ("compressed embedding: " + str(outside) + " inputs outside the training range ["
                           + str(self.lower) + ", " + str(self.upper) + "] (" + str(beyond)
                           + " beyond the table, linearly continued); results there are extrapolated")
                warnings.warn(message)

    def _bags(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Value and slope (in t) at x clamped to the table, [n, 2, M]; the clamped x̂ and the
        interval's 1/width, [n, 1] each."""
        xd = x.detach()
        xc = xd.clamp(self.lo, self.hi)
        below = xc < self.lower
        above = xc > self.upper
        inv_coarse = 1.0 / self.coarse
        inv_step = 1.0 / self.step
        pos = torch.where(
            below,
            (xc - self.lo) * inv_coarse,
            torch.where(above, (xc - self.upper) * inv_coarse + float(self.n_coarse + self.n_fine),
                        (xc - self.lower) * inv_step + float(self.n_coarse)),
        )
        idx = pos.floor().clamp(0.0, float(self.coef.shape[0] - 1))
        t = pos - idx  # [n, 1], in [0, 1]
        in_coarse = (idx < float(self.n_coarse)) | (idx >= float(self.n_coarse + self.n_fine))
        inv_width = torch.where(in_coarse, torch.full_like(t, inv_coarse), torch.full_like(t, inv_step))
        n = t.shape[0]
        t2 = t * t
        t3 = t2 * t
        t4 = t3 * t
        # per input two bags of table rows: G = Σ_k t^k C[i, k] (6 rows), dG/dt = Σ_k k t^(k-1) C[i, k] (5 rows);
        # embedding_bag sums the weighted rows without materialising the [n, 6, M] gather
        weights = torch.cat([torch.ones_like(t), t, t2, t3, t4, t4 * t, torch.ones_like(t), 2.0 * t, 3.0 * t2,
                             4.0 * t3, 5.0 * t4], dim=1).to(self.coef.dtype)
        base = idx.to(torch.long) * 6
        rows = torch.cat([base + self.value_rows, base + self.slope_rows], dim=1)  # [n, 11]
        offsets = (torch.arange(0, n, device=x.device, dtype=torch.long) * 11).unsqueeze(1) + self.bag_starts
        table = self.coef.view(-1, self.n_out)
        both = torch.nn.functional.embedding_bag(rows.view(-1), table, offsets.view(-1), mode="sum",
                                                 per_sample_weights=weights.view(-1)).view(n, 2, self.n_out)
        return both, xc, inv_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fast = self._forward_in_c(x)
            if fast is not None:
                return fast
        if self.check_frequency > 0:
            self._check(x)
        both, xc, inv_width = self._bags(x)
        # value at the clamped input plus slope × (x - x̂): exact first derivative inside the
        # table, linear continuation outside it
        return torch.addcmul(both[:, 0], both[:, 1], ((x - xc) * inv_width).to(self.coef.dtype))

    @torch.jit.unused
    def _forward_in_c(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Eager calls: G and dG/dx from one C loop (mtcore.model.table_kernel), x's gradient
        through dG/dx; None where that loop is not available."""
        from mtcore.model import table_kernel

        parts = table_kernel.value_and_slope([self], x, [(0, x.shape[0])], c_only=True) if x.dim() == 2 and x.shape[1] == 1 else None
        if parts is None:
            return None
        return _Tabulated.apply(parts[0], parts[1], x) if x.requires_grad else parts[0]

    @torch.jit.unused
    def value_and_slope(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """G(x) and dG/dx [n, M] as constants (no graph): what forward gives and its derivative."""
        if self.check_frequency > 0:
            self._check(x)
        with torch.no_grad():
            both, xc, inv_width = self._bags(x)
            slope = both[:, 1] * inv_width.to(self.coef.dtype)
            return torch.addcmul(both[:, 0], slope, (x.detach() - xc).to(self.coef.dtype)), slope


class _Tabulated(torch.autograd.Function):
    """G(x) of a table with its derivative: dE/dx = Σ_m dE/dG_m · dG_m/dx (no second derivative
    in x: a table's is zero by construction, as the torch forward's)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, slope: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slope)
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slope,) = ctx.saved_tensors
        return None, None, (grad * slope).sum(1, keepdim=True)


def _as_float64(net: nn.Module) -> nn.Module:
    """A float64 copy of ``net`` (tables are built in float64 whatever the net's precision)."""
    import copy

    twin = copy.deepcopy(net)
    return twin.to(torch.float64).eval()


def normalised_s_range(davg: torch.Tensor, dstd: torch.Tensor, centre_types: List[int], min_distance: float,
                       rcut_smth: float, rcut: float) -> Tuple[float, float]:
    """Range of (s(r) - davg[t]) / dstd[t] over centre types t for r ≥ ``min_distance``.

    s = sw(r)/r decreases with r, from s(min_distance) down to 0 (beyond rcut; also the value of
    an empty neighbour slot), so each type contributes [-davg/dstd, (s_max - davg)/dstd]."""
    s_max = _s_max(min_distance, rcut_smth, rcut)
    mean = davg[centre_types, 0].to(torch.float64)
    std = dstd[centre_types, 0].to(torch.float64)
    return float((-mean / std).min()), float(((s_max - mean) / std).max())


def angular_product_range(davg: torch.Tensor, dstd: torch.Tensor, min_distance: float, rcut_smth: float,
                          rcut: float) -> Tuple[float, float]:
    """Range of e_j·e_k with e = (s·r̂ - davg[t, 1:4]) / dstd[t, 1:4] over all centre types t:
    |e| ≤ B = (s_max + |davg[t, 1:4]|) / min dstd[t, 1:4], so θ ∈ [-B², B²]."""
    s_max = _s_max(min_distance, rcut_smth, rcut)
    shift = davg[:, 1:4].to(torch.float64).norm(dim=1)
    bound = float(((s_max + shift) / dstd[:, 1:4].to(torch.float64).min(dim=1).values).max())
    return -bound * bound, bound * bound


def _s_max(min_distance: float, rcut_smth: float, rcut: float) -> float:
    if not (min_distance > 0 and math.isfinite(min_distance)):
        return 0.0  # no neighbour within rcut in the data: only empty slots (s = 0)
    r = torch.tensor([min_distance], dtype=torch.float64)
    return float(smooth_weight(r, rcut_smth, rcut)[0] / r[0])

