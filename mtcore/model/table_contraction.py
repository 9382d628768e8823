"""A compressed se_e2_a / se_e2_r: tables and contraction in one C loop, no [pairs × M] tensor.

Why: with the embedding nets replaced by tables (``mtcore compress``), an eager call (a frozen
file's twin, mtcore.eager_twin) still wrote G and T = dG/ds for every pair ([pairs × M], 27 MB
for 192 water atoms in float64), read G back to contract it and read G and T again in the
forces' backward. The arithmetic is small (a quintic per output); those passes over memory were
the cost. Here

    forward   A[i]    = Σ_{p of i} R[p]ᵀ G(x_p)                       [atoms, K, M]
    backward  dE/dR[p] = dE/dA[i] G(x_p)ᵀ,  dE/dx_p = R[p] · (dE/dA[i] T(x_p)ᵀ)

evaluate G(x_p) and T(x_p) from the table into a buffer of M values per pair and use them at
once. Each thread takes a run of centres and visits their pairs in interval order (a stable
counting sort), so an interval's 6 × M coefficients are read once per run while the centres'
[K × M] rows stay in cache; a centre's sum then runs in (interval, pair) order, whatever the
number of threads (the same bits with one thread or many).

The forces' backward is a constant of the tables; a second derivative (``create_graph``, the
parameter gradient of a force loss) takes the tables' G and T as tensors and the contraction's
differentiable kernels instead (mtcore.model.pair_contraction), as before this path existed.
Taken on the CPU in float64 and float32 outside TorchScript; ``MTCORE_PLAIN_TABLES=1`` turns it
off with the tables' C loop (mtcore.model.table_kernel), and without a C compiler it is off.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional, Sequence, Tuple

import torch

from mtcore import native
from mtcore.model import pair_contraction, table_kernel

# Centres [cuts[s], cuts[s+1]) form slice s. Per pair of the slice: its table (the block of G
# rows it falls in) and its place on that table's grid (table_kernel.GRID); then the pairs in
# interval order. LANES partial
# sums let the compiler vectorise the backward's dot products without reordering any one sum.
SOURCE = native.CLONES + native.PARALLEL + table_kernel.GRID + r"""
#include <stdlib.h>
#define LANES 8
#define FUSED(SUF, T)                                                                            \
MTCORE_CLONES static int slice_##SUF(long backward, long ca, long cb, long K, long M, long ntab, \
    const long *block, const long *grid, const double *range, const T *const *coefs,             \
    const long *first, long nkeys, const T *x, const long *off, const long *map, const T *R,     \
    const T *gA, T *A, T *gR, T *gx) {                                                           \
  long p0 = off[ca], n = off[cb] - p0;                                                           \
  if (!backward) for (long k = ca * K * M; k < cb * K * M; ++k) A[k] = 0;                        \
  if (n <= 0) return 0;                                                                          \
  long *key = malloc(sizeof(long) * (3 * n + nkeys + 1));                                        \
  T *buf = malloc(sizeof(T) * (3 * n + 2 * M));                                                  \
  if (!key || !buf) { free(key); free(buf); return 1; }                                          \
  long *perm = key + n, *cen = key + 2 * n, *count = key + 3 * n;                                \
  T *tt = buf, *dd = buf + n, *ww = buf + 2 * n, *g = buf + 3 * n, *s = g + M;                   \
  for (long k = 0; k <= nkeys; ++k) count[k] = 0;                                                \
  for (long i = ca; i < cb; ++i)                                                                 \
    for (long p = off[i]; p < off[i + 1]; ++p) cen[p - p0] = i;                                  \
  for (long q = 0; q < n; ++q) {                                                                 \
    long row = map[p0 + q], k = 0;                                                               \
    while (k < ntab && !(row >= block[2 * k] && row < block[2 * k + 1])) ++k;                    \
    if (k == ntab) { key[q] = -1; continue; }                                                    \
    const long *I = grid + 3 * k; const double *D = range + 6 * k;                               \
    key[q] = first[k] + grid_##SUF(x[row], I[0], I[1], I[2], (T)D[0], (T)D[1], (T)D[2], (T)D[3],  \
                                   (T)(1.0 / D[4]), (T)(1.0 / D[5]), tt + q, dd + q, ww + q);    \
    count[key[q] + 1]++;                                                                         \
  }                                                                                              \
  for (long k = 0; k < nkeys; ++k) count[k + 1] += count[k];                                     \
  long valid = count[nkeys];                                                                     \
  for (long q = 0; q < n; ++q) {                                                                 \
    if (key[q] >= 0) perm[count[key[q]]++] = q;                                                  \
    else if (backward) {                                                                         \
      for (long c = 0; c < K; ++c) gR[(p0 + q) * K + c] = 0;                                     \
      gx[map[p0 + q]] = 0;                                                                       \
    }                                                                                            \
  }                                                                                              \
  long body = M - M % LANES;                                                                     \
  for (long j = 0; j < valid; ++j) {                                                             \
    long q = perm[j], p = p0 + q, kk = key[q], k = 0;                                            \
    while (kk >= first[k + 1]) ++k;                                                              \
    const T *restrict c = coefs[k] + (kk - first[k]) * 6 * M;                                    \
    T t = tt[q], d = dd[q], inv_w = ww[q];                                                       \
    if (!backward && d == 0) { /* inside the table (most pairs): the forward needs no slope */   \
      for (long m = 0; m < M; ++m)                                                               \
        g[m] = c[m] + t * (c[M + m] + t * (c[2 * M + m] + t * (c[3 * M + m] + t * (c[4 * M + m]  \
               + t * c[5 * M + m]))));                                                           \
    } else for (long m = 0; m < M; ++m) {                                                        \
      MT_QUINTIC(T, c, M, m, t, value, slope)                                                    \
      g[m] = value + slope * d;                                                                  \
      s[m] = slope * inv_w;                                                                      \
    }                                                                                            \
    const T *r = R + p * K;                                                                      \
    if (!backward) {                                                                             \
      T *restrict a = A + cen[q] * K * M;                                                        \
      for (long cc = 0; cc < K; ++cc) {                                                          \
        T rc = r[cc]; T *restrict ac = a + cc * M;                                               \
        for (long m = 0; m < M; ++m) ac[m] += rc * g[m];                                         \
      }                                                                                          \
      continue;                                                                                  \
    }                                                                                            \
    const T *a = gA + cen[q] * K * M;                                                            \
    T acc = 0;                                                                                   \
    for (long cc = 0; cc < K; ++cc) {                                                            \
      const T *ac = a + cc * M;                                                                  \
      T pg[LANES] = {0}, ps[LANES] = {0};                                                        \
      for (long m = 0; m < body; m += LANES)                                                     \
        for (long l = 0; l < LANES; ++l) pg[l] += ac[m + l] * g[m + l];                          \
      for (long m = 0; m < body; m += LANES)                                                     \
        for (long l = 0; l < LANES; ++l) ps[l] += ac[m + l] * s[m + l];                          \
      T sg = 0, ss = 0;                                                                          \
      for (long m = body; m < M; ++m) { sg += ac[m] * g[m]; ss += ac[m] * s[m]; }                \
      for (long l = 0; l < LANES; ++l) { sg += pg[l]; ss += ps[l]; }                             \
      gR[p * K + cc] = sg;                                                                       \
      acc += r[cc] * ss;                                                                         \
    }                                                                                            \
    gx[map[p]] = acc;                                                                            \
  }                                                                                              \
  free(key); free(buf);                                                                          \
  return 0;                                                                                      \
}                                                                                                \
int fused_##SUF(long backward, long nslices, const long *cuts, long K, long M, long ntab,        \
    const long *block, const long *grid, const double *range, const T *const *coefs,             \
    const long *first, long nkeys, const T *x, const long *off, const long *map, const T *R,     \
    const T *gA, T *A, T *gR, T *gx) {                                                           \
  int failed = 0;                                                                                \
  MTCORE_PARALLEL_FOR for (long sl = 0; sl < nslices; ++sl)                                      \
    if (slice_##SUF(backward, cuts[sl], cuts[sl + 1], K, M, ntab, block, grid, range, coefs,     \
                    first, nkeys, x, off, map, R, gA, A, gR, gx)) failed = 1;                    \
  return failed;                                                                                 \
}
FUSED(f64, double)
FUSED(f32, float)
"""
FLAGS = ("-O3",)
SIGNATURES = {f"fused_{suffix}": [ctypes.c_long] * 2 + [ctypes.c_void_p] + [ctypes.c_long] * 3
              + [ctypes.c_void_p] * 5 + [ctypes.c_long] + [ctypes.c_void_p] * 8
              for suffix in ("f64", "f32")}
#: pairs per thread below which the loop runs on the calling thread only
MIN_PAIRS_PER_THREAD = 4096
#: pairs per slice at most: a slice's centres' [K × M] rows (~200 water atoms, 0.6 MB for se_e2_a)
#: then stay in the core's cache while its pairs are visited in interval order
PAIRS_PER_SLICE = 16384

KERNELS = native.KernelLibrary("table_contraction", SOURCE, FLAGS, SIGNATURES, "MTCORE_PLAIN_TABLES")


def status() -> str:
    """Whether the fused loop is available, and if not, why (loads the library on first call)."""
    KERNELS.load()
    return KERNELS.status


class TablePlan:
    """The tables of one call as the C loop reads them: each table's block of G rows, its grid
    (intervals, coarse intervals, fine intervals; start, lower, upper, end, step, coarse step),
    its coefficients and the first key of its intervals."""

    def __init__(self, tables: Sequence[torch.nn.Module], bounds: Sequence[Tuple[int, int]]):
        self.tables = list(tables)
        self.bounds = list(bounds)
        self.coefs = [t.coef.contiguous() for t in self.tables]
        self.block = torch.tensor([v for lo_hi in self.bounds for v in lo_hi], dtype=torch.long)
        self.grid = torch.tensor([[c.shape[0], t.n_coarse, t.n_fine] for t, c in zip(self.tables, self.coefs)],
                                 dtype=torch.long)
        self.range = torch.tensor([[*t.table_range(), t.step, t.coarse] for t in self.tables], dtype=torch.float64)
        sizes = [int(c.shape[0]) for c in self.coefs]
        self.first = torch.tensor([0] + sizes, dtype=torch.long).cumsum(0)
        self.pointers = (ctypes.c_void_p * len(self.coefs))(*[c.data_ptr() for c in self.coefs])
        self.width = int(self.coefs[0].shape[2])


def _plan(tables: Sequence[torch.nn.Module], x: torch.Tensor, bounds: Sequence[Tuple[int, int]]) -> Optional[TablePlan]:
    """A plan where every net is a table of one width and x's dtype, on the CPU, else None."""
    from mtcore.model.tabulate import TabulatedEmbedding

    if not tables or any(not isinstance(t, TabulatedEmbedding) for t in tables):
        return None
    if x.device.type != "cpu" or x.dtype not in (torch.float64, torch.float32) or KERNELS.load() is None:
        return None
    if pair_contraction.KERNELS.load() is None:  # a second derivative takes its kernels
        return None
    if len({int(t.coef.shape[2]) for t in tables}) != 1 or any(t.coef.dtype != x.dtype for t in tables):
        return None
    return TablePlan(tables, bounds)


def _cuts(off: torch.Tensor, npairs: int, slices: int) -> torch.Tensor:
    """Centre boundaries that give each slice about the same number of pairs."""
    natoms = off.numel() - 1
    targets = torch.arange(1, slices, dtype=off.dtype) * npairs // slices
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.searchsorted(off, targets),
                      torch.full((1,), natoms, dtype=torch.long)])


def _run(backward: bool, plan: TablePlan, layout: pair_contraction.PairLayout, R: torch.Tensor, x: torch.Tensor,
         gA: Optional[torch.Tensor], A: Optional[torch.Tensor], gR: Optional[torch.Tensor],
         gx: Optional[torch.Tensor]) -> None:
    fn = getattr(KERNELS.library, f"fused_{'f64' if R.dtype == torch.float64 else 'f32'}")
    fn.restype = ctypes.c_int  # 1: a slice's work arrays could not be allocated
    threads = max(1, min(torch.get_num_threads(), layout.npairs // MIN_PAIRS_PER_THREAD))

    def ptr(t: Optional[torch.Tensor]) -> Optional[int]:
        return None if t is None else t.data_ptr()

    def call(cuts: torch.Tensor) -> None:
        status = fn(int(backward), cuts.numel() - 1, cuts.data_ptr(), R.shape[1], plan.width, len(plan.coefs),
                    plan.block.data_ptr(), plan.grid.data_ptr(), plan.range.data_ptr(), plan.pointers,
                    plan.first.data_ptr(), int(plan.first[-1]), x.data_ptr(), layout.off.data_ptr(),
                    layout.map.data_ptr(), R.data_ptr(), ptr(gA), ptr(A), ptr(gR), ptr(gx))
        if status != 0:
            raise MemoryError(f"compressed embedding: no memory for the work arrays of {layout.npairs} pairs")

    slices = max(threads, -(-layout.npairs // PAIRS_PER_SLICE))
    cuts = _cuts(layout.off, layout.npairs, slices)
    if KERNELS.parallel or threads == 1:  # one call; with OpenMP its slices run on torch's threads
        call(cuts)
        return
    share = [slices * k // threads for k in range(threads + 1)]  # consecutive slices per thread
    native.run_together([functools.partial(call, cuts[a : b + 1].contiguous()) for a, b in zip(share[:-1], share[1:])])


class _TabulatedContract(torch.autograd.Function):
    """A [atoms, K, M] = Σ_p R[p]ᵀ G(x[map p]) with G the tables of ``plan``; x [P, 1] in G's
    row order, R [P, K] in centre order."""

    @staticmethod
    def forward(ctx, R: torch.Tensor, x: torch.Tensor, plan: TablePlan,
                layout: pair_contraction.PairLayout) -> torch.Tensor:
        R, flat = R.contiguous(), x.detach().reshape(-1).contiguous()
        A = R.new_empty(layout.natoms, R.shape[1], plan.width)
        _run(False, plan, layout, R, flat, None, A, None, None)
        ctx.plan, ctx.layout = plan, layout
        ctx.save_for_backward(R, x)
        return A

    @staticmethod
    def backward(ctx, gA: torch.Tensor):
        R, x = ctx.saved_tensors
        plan, layout = ctx.plan, ctx.layout
        if torch.is_grad_enabled():  # a second derivative follows: the differentiable kernels
            G, T = table_kernel.value_and_slope(plan.tables, x, plan.bounds)
            gR = pair_contraction._ExpandRight.apply(gA, G, layout)  # noqa: SLF001
            q = pair_contraction._ExpandRight.apply(gA, T, layout)  # noqa: SLF001
            gx = (R * q).sum(1, keepdim=True).index_select(0, layout.order)
            return gR, gx, None, None
        gA = gA.contiguous()
        gR = torch.empty_like(R)
        gx = R.new_zeros(x.shape[0])  # rows of no pair stay zero
        _run(True, plan, layout, R, x.detach().reshape(-1).contiguous(), gA, None, gR, gx)
        return gR, gx.view_as(x), None, None


def contract(tables: Sequence[torch.nn.Module], x: torch.Tensor, bounds: Sequence[Tuple[int, int]],
             rows: torch.Tensor, center: torch.Tensor, order: torch.Tensor, natoms: int) -> Optional[torch.Tensor]:
    """Σ over each atom's pairs of rows[p]ᵀ G(x), [natoms, K, M], with ``tables[k]`` giving G on
    the rows ``bounds[k]`` of x (x [P, 1] in ``order``, as _common.contract_taking_tangent sorts
    it; ``rows`` [P, K] sorted by ``center``); None where this path does not apply."""
    plan = _plan(tables, x, bounds)
    if plan is None or rows.dtype != x.dtype or rows.shape[0] == 0:
        return None
    for table, (lo, hi) in zip(plan.tables, plan.bounds):
        if table.check_frequency > 0 and hi > lo:
            table._check(x[lo:hi])  # noqa: SLF001  the module's own overflow warning
    return _TabulatedContract.apply(rows, x, plan, pair_contraction._layout(center, order, natoms))  # noqa: SLF001
