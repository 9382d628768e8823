"""The environment rows of the kept pairs and their derivative in r_ij, from one C loop.

Why: in torch the rows R = (s, s·x/r, s·y/r, s·z/r), s = sw(r)/r, take a dozen element-wise
operations over the pairs, and autograd runs the backward of each (and, in force training, the
backward of that backward): about 3 ms of small passes for 192 water atoms, a seventh of a
compressed model's call. Here one loop writes the rows and J = dR/dr_ij [P, ncol, 3] together,
and one more (in the backward) forms dE/dr_ij = Σ_c dE/dR_c J_c and adds it to the two atoms
(and gives it to the shift, for the virial). That backward is itself a Function linear in dE/dR
whose derivative is J again, so a force loss differentiates it in the parameters (J is a
constant of the geometry there, as in DeePMD-kit's environment-matrix operator).

The rows are :func:`mtcore.model.env.env_rows`' to the bit (its operations, order and
precision, from the distances the caller measured with torch); the derivative is evaluated in
float64 and stored in the descriptor's precision. Taken on the CPU outside TorchScript, off
with ``MTCORE_PLAIN_ENV=1`` and without a C compiler.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from mtcore import native

# Pair p: r_ij = x[neighbor] - x[center] + shift in double, r as the caller's torch.linalg.vector_norm
# gave it (its rounding depends on the processor's fused multiply-add); the rows by env_rows' own
# operations in T (r_ij and r rounded to T first; no contraction into fused multiply-adds, so
# the rows have env_rows' bits and a frozen file's TorchScript module computes the same); J in
# double, rounded once. ds/dr = (sw'(r) - s)/r, and with û = r_ij/r
#   dR_0/dr_ij = ds/dr û,   dR_a/dr_ij = û_a (ds/dr û) + (s/r)(e_a - û_a û).
SOURCE = native.CLONES + native.PARALLEL + r"""
#include <math.h>
#define ENV(SUF, T)                                                                              \
MTCORE_CLONES void env_##SUF(long P, long ncol, double rcut_smth, double rcut, const double *x,  \
                             const long *center, const long *neighbor, const double *shift,      \
                             const double *dist, T *rows, T *jac) {                              \
  const double width = rcut - rcut_smth;                                                         \
  MTCORE_PARALLEL_FOR for (long p = 0; p < P; ++p) {                                             \
    const double *a = x + 3 * center[p], *b = x + 3 * neighbor[p], *h = shift + 3 * p;           \
    double v[3] = {b[0] - a[0] + h[0], b[1] - a[1] + h[1], b[2] - a[2] + h[2]};                  \
    double r = dist[p];                                                                          \
    /* the rows: env_rows' operations in its order and precision */                              \
    T rt = (T)r, vt[3] = {(T)v[0], (T)v[1], (T)v[2]};                                            \
    T ut = (rt - (T)rcut_smth) / (T)width;                                                       \
    ut = ut < 0 ? 0 : (ut > 1 ? 1 : ut);                                                         \
    T swt = ut * ut * ut * ((T)-6.0 * ut * ut + (T)15.0 * ut - (T)10.0) + (T)1.0;               \
    T st = swt / rt;                                                                             \
    T *row = rows + p * ncol, *J = jac + p * ncol * 3;                                           \
    row[0] = st;                                                                                 \
    if (ncol == 4) for (int c = 0; c < 3; ++c) row[1 + c] = st * vt[c] / rt;                     \
    /* J in double, rounded once */                                                              \
    double u = (r - rcut_smth) / width;                                                          \
    u = u < 0 ? 0 : (u > 1 ? 1 : u);                                                             \
    double sw = u * u * u * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0;                              \
    double dsw = (u > 0 && u < 1) ? -30.0 * u * u * (u - 1) * (u - 1) / width : 0.0;             \
    double s = sw / r, ds = (dsw - s) / r, hat[3] = {v[0] / r, v[1] / r, v[2] / r};              \
    for (int k = 0; k < 3; ++k) J[k] = (T)(ds * hat[k]);                                         \
    if (ncol == 1) continue;                                                                     \
    double sr = s / r;                                                                           \
    for (int c = 0; c < 3; ++c)                                                                  \
      for (int k = 0; k < 3; ++k)                                                                \
        J[(1 + c) * 3 + k] = (T)(hat[c] * ds * hat[k] + sr * ((c == k ? 1.0 : 0.0) - hat[c] * hat[k])); \
  }                                                                                              \
}                                                                                                \
/* dE/dr_ij = Σ_c g_c J_c per pair, and its sum over the pairs of each atom (+ as neighbour, - as
   centre) in double: one pass instead of a batched product and two index_add. */          \
MTCORE_CLONES void grad_##SUF(long P, long ncol, const T *g, const T *jac, const long *center,   \
                              const long *neighbor, T *g_rij, double *g_x) {                     \
  for (long p = 0; p < P; ++p) {                                                                 \
    const T *gp = g + p * ncol, *J = jac + p * ncol * 3;                                         \
    T v[3] = {0, 0, 0};                                                                          \
    for (long c = 0; c < ncol; ++c)                                                              \
      for (int k = 0; k < 3; ++k) v[k] += gp[c] * J[c * 3 + k];                                  \
    double *a = g_x + 3 * center[p], *b = g_x + 3 * neighbor[p];                                 \
    for (int k = 0; k < 3; ++k) { g_rij[p * 3 + k] = v[k]; b[k] += v[k]; a[k] -= v[k]; }         \
  }                                                                                              \
}
ENV(f64, double)
ENV(f32, float)
"""
FLAGS = ("-O3", "-ffp-contract=off")
SIGNATURES = {**{f"env_{suffix}": [ctypes.c_long] * 2 + [ctypes.c_double] * 2 + [ctypes.c_void_p] * 7
                 for suffix in ("f64", "f32")},
              **{f"grad_{suffix}": [ctypes.c_long] * 2 + [ctypes.c_void_p] * 6 for suffix in ("f64", "f32")}}

KERNELS = native.KernelLibrary("env_kernel", SOURCE, FLAGS, SIGNATURES, "MTCORE_PLAIN_ENV")


def status() -> str:
    """Whether the loop is available, and if not, why (loads the library on first call)."""
    KERNELS.load()
    return KERNELS.status


class _EnvRows(torch.autograd.Function):
    """Rows [P, ncol] of the pairs (center, neighbor, shift) from coord [N, 3] and shift [P, 3]."""

    @staticmethod
    def forward(ctx, coord: torch.Tensor, shift: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor,
                dist: torch.Tensor, ncol: int, rcut_smth: float, rcut: float, dtype: torch.dtype) -> torch.Tensor:
        x = coord.detach().to(torch.float64).contiguous()
        h = shift.detach().to(torch.float64).contiguous()
        r = dist.detach().to(torch.float64).contiguous()
        center, neighbor = center.contiguous(), neighbor.contiguous()
        P = center.shape[0]
        rows = torch.empty(P, ncol, dtype=dtype)
        jac = torch.empty(P, ncol, 3, dtype=dtype)
        if P > 0:
            getattr(KERNELS.library, f"env_{'f64' if dtype == torch.float64 else 'f32'}")(
                P, ncol, rcut_smth, rcut, x.data_ptr(), center.data_ptr(), neighbor.data_ptr(), h.data_ptr(),
                r.data_ptr(), rows.data_ptr(), jac.data_ptr())
        ctx.save_for_backward(jac, center, neighbor)
        ctx.natoms, ctx.coord_dtype = coord.shape[0], coord.dtype
        return rows

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        jac, center, neighbor = ctx.saved_tensors
        g_coord, g_rij = _EnvGrad.apply(grad, jac, center, neighbor, ctx.natoms)
        g_coord = g_coord.to(ctx.coord_dtype) if ctx.needs_input_grad[0] else None
        g_shift = g_rij.to(ctx.coord_dtype) if ctx.needs_input_grad[1] else None
        return g_coord, g_shift, None, None, None, None, None, None, None


class _EnvGrad(torch.autograd.Function):
    """(dE/dx [N, 3] in float64, dE/dr_ij [P, 3]) from dE/dR [P, ncol] and J; linear in dE/dR,
    so its own derivative (a force loss's parameter gradient) is J applied to the incoming
    gradients' pair differences."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, jac: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor,
                natoms: int):
        grad = grad.contiguous()
        P, ncol = grad.shape
        g_rij = grad.new_empty(P, 3)
        g_x = torch.zeros(natoms, 3, dtype=torch.float64)
        if P > 0:
            getattr(KERNELS.library, f"grad_{'f64' if grad.dtype == torch.float64 else 'f32'}")(
                P, ncol, grad.data_ptr(), jac.data_ptr(), center.data_ptr(), neighbor.data_ptr(), g_rij.data_ptr(),
                g_x.data_ptr())
        ctx.save_for_backward(jac, center, neighbor)
        return g_x, g_rij

    @staticmethod
    def backward(ctx, gg_x: Optional[torch.Tensor], gg_rij: Optional[torch.Tensor]):
        jac, center, neighbor = ctx.saved_tensors
        v = torch.zeros(jac.shape[0], 3, dtype=jac.dtype)
        if gg_x is not None:
            v = v + (gg_x.index_select(0, neighbor) - gg_x.index_select(0, center)).to(jac.dtype)
        if gg_rij is not None:
            v = v + gg_rij.to(jac.dtype)
        return torch.bmm(jac, v.unsqueeze(2)).squeeze(2), None, None, None, None


def rows(coord: torch.Tensor, shift: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor, dist: torch.Tensor,
         rcut_smth: float, rcut: float, radial: bool, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Un-normalised rows [P, 4] (or [P, 1], ``radial``) of the pairs at distances ``dist`` (|r_ij|
    from torch.linalg.vector_norm, as env_rows gets them), differentiable in coord and shift, or
    None where the loop does not apply (the caller runs mtcore.model.env's torch code)."""
    if coord.device.type != "cpu" or dtype not in (torch.float64, torch.float32) or \
            coord.dtype not in (torch.float64, torch.float32) or KERNELS.load() is None:
        return None
    ncol = 1 if radial else 4
    return _EnvRows.apply(coord, shift, center, neighbor, dist, ncol, float(rcut_smth), float(rcut), dtype)
