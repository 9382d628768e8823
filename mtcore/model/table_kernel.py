"""A compressed embedding's value G and slope T = dG/dx, evaluated by a C loop over the inputs.

Why: :class:`mtcore.model.tabulate.TabulatedEmbedding` evaluates its quintics with one
``embedding_bag`` (TorchScript needs plain torch), which in float64 PyTorch runs row by row at
about the cost of the net it replaces. Here each input reads its interval's 6 coefficient rows
once and writes both G and T, the pair the contraction that takes the nets' derivative wants
(mtcore.model.pair_contraction.contract_with_tangent): a compressed model's eager call then
never runs an embedding forward or backward at all. Same grid, clamping and linear continuation
as the module (tests/test_compress.py compares the two); off with ``MTCORE_PLAIN_TABLES=1``
and without a C compiler (then the module's torch code gives the same G and T).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional, Sequence, Tuple

import torch

from mtcore import native

#: C shared by the tables' loops (here and mtcore.model.table_contraction): an input's interval
#: on a table's grid with its offset t, linear continuation d and 1/width, as
#: TabulatedEmbedding.forward computes them (``grid_f64``/``grid_f32``), and the quintic's value
#: and slope in column m of an interval's 6 × M coefficient rows (``MT_QUINTIC``). A NaN input
#: reads interval 0 and gives NaN.
GRID = r"""
#include <math.h>
#define GRID(SUF, T)                                                                             \
static inline long grid_##SUF(T xv, long nint, long n_coarse, long n_fine, T start, T lower,     \
                              T upper, T end, T inv_step, T inv_coarse, T *t, T *d, T *w) {      \
  T xc = xv < start ? start : (xv > end ? end : xv);                                             \
  T pos;                                                                                         \
  if (xc < lower) pos = (xc - start) * inv_coarse;                                               \
  else if (xc > upper) pos = (xc - upper) * inv_coarse + (T)(n_coarse + n_fine);                 \
  else pos = (xc - lower) * inv_step + (T)n_coarse;                                              \
  T fl = floor(pos);                                                                             \
  if (!(fl >= 0)) fl = 0;                                                                        \
  if (fl > (T)(nint - 1)) fl = (T)(nint - 1);                                                    \
  long i = (long)fl;                                                                             \
  T inv_w = (i < n_coarse || i >= n_coarse + n_fine) ? inv_coarse : inv_step;                    \
  *t = pos - fl; *d = (xv - xc) * inv_w; *w = inv_w;                                             \
  return i;                                                                                      \
}
GRID(f64, double)
GRID(f32, float)
#define MT_QUINTIC(T, c, M, m, t, value, slope)                                                  \
  T a0 = c[m], a1 = c[M + m], a2 = c[2 * M + m], a3 = c[3 * M + m], a4 = c[4 * M + m],            \
    a5 = c[5 * M + m];                                                                           \
  T value = a0 + t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))));                              \
  T slope = a1 + t * (2 * a2 + t * (3 * a3 + t * (4 * a4 + t * 5 * a5)));
"""

# Rows [lo, hi) of x. Interval and offset t on the grid (GRID); the value and slope by Horner's
# rule, then G = value + slope·(x - x̂)/width (x̂ the input clamped to the table) and
# T = slope/width. The rows are
# visited in interval order (a counting sort of their intervals): a table of ~1,000 intervals
# × 6 × M coefficients does not fit in the core's cache, and rows of one interval then read its
# coefficients once from memory instead of once each (11 → 4 ms for se_e2_a water's 17,000 pairs).
SOURCE = native.CLONES + native.PARALLEL + GRID + r"""
#include <stdlib.h>
#define TABLE(SUF, T)                                                                            \
MTCORE_CLONES static void rows_##SUF(long n, const long *perm, const long *idx, const T *tt,     \
                                     const T *dd, const T *ww, long M,                           \
                                     const T *restrict coef, T *restrict G, T *restrict D) {     \
  MTCORE_PARALLEL_FOR for (long q = 0; q < n; ++q) {                                             \
    long p = perm ? perm[q] : q;                                                                 \
    T t = tt[p], d = dd[p], inv_w = ww[p];                                                       \
    const T *restrict c = coef + idx[p] * 6 * M;                                                 \
    T *restrict g = G + p * M, *restrict s = D + p * M;                                          \
    for (long m = 0; m < M; ++m) {                                                               \
      MT_QUINTIC(T, c, M, m, t, value, slope)                                                    \
      g[m] = value + slope * d;                                                                  \
      s[m] = slope * inv_w;                                                                      \
    }                                                                                            \
  }                                                                                              \
}                                                                                                \
int table_##SUF(long lo, long hi, long M, long nint, long n_coarse, long n_fine,                 \
                double start, double lower, double upper, double end, double step,               \
                double coarse, const T *x, const T *coef, T *G, T *D) {                          \
  const T inv_step = (T)(1.0 / step), inv_coarse = (T)(1.0 / coarse);                           \
  long n = hi - lo;                                                                              \
  if (n <= 0) return 0;                                                                          \
  long *idx = malloc(sizeof(long) * (2 * n + nint + 1));                                         \
  T *tt = malloc(sizeof(T) * 3 * n);                                                             \
  if (!idx || !tt) { free(idx); free(tt); return 1; }                                            \
  long *perm = idx + n, *count = idx + 2 * n;                                                    \
  T *dd = tt + n, *ww = tt + 2 * n;                                                              \
  for (long k = 0; k <= nint; ++k) count[k] = 0;                                                 \
  for (long k = 0; k < n; ++k) {                                                                 \
    long i = grid_##SUF(x[lo + k], nint, n_coarse, n_fine, (T)start, (T)lower, (T)upper, (T)end,  \
                        inv_step, inv_coarse, tt + k, dd + k, ww + k);                           \
    idx[k] = i;                                                                                  \
    count[i + 1]++;                                                                              \
  }                                                                                              \
  for (long k = 0; k < nint; ++k) count[k + 1] += count[k];                                      \
  for (long k = 0; k < n; ++k) perm[count[idx[k]]++] = k;                                        \
  rows_##SUF(n, perm, idx, tt, dd, ww, M, coef, G + lo * M, D + lo * M);                         \
  free(idx); free(tt);                                                                           \
  return 0;                                                                                      \
}
TABLE(f64, double)
TABLE(f32, float)
"""
FLAGS = ("-O3",)
SIGNATURES = {f"table_{suffix}": [ctypes.c_long] * 6 + [ctypes.c_double] * 6 + [ctypes.c_void_p] * 4
              for suffix in ("f64", "f32")}
#: inputs per thread below which the loop runs on the calling thread only
MIN_ROWS_PER_THREAD = 4096

KERNELS = native.KernelLibrary("table_kernel", SOURCE, FLAGS, SIGNATURES, "MTCORE_PLAIN_TABLES")


def status() -> str:
    """Whether the C loop is available, and if not, why (loads the library on first call)."""
    KERNELS.load()
    return KERNELS.status


def value_and_slope(tables: Sequence[torch.nn.Module], x: torch.Tensor, bounds: Sequence[Tuple[int, int]],
                    c_only: bool = False) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(G, dG/dx) [P, M] of ``tables[k]`` on rows ``bounds[k]`` of x [P, 1] (rows outside every
    block stay zero), as constants: the tables are not trained. None where the tables differ in
    width or precision from x, and with ``c_only`` where the C loop is not available."""
    from mtcore.model.tabulate import TabulatedEmbedding

    if not tables or any(not isinstance(t, TabulatedEmbedding) for t in tables):
        return None
    widths = {int(t.coef.shape[2]) for t in tables}
    if len(widths) != 1 or any(t.coef.dtype != x.dtype or t.coef.device != x.device for t in tables):
        return None
    library = KERNELS.load() if x.device.type == "cpu" and x.dtype in (torch.float64, torch.float32) else None
    if library is None and c_only:
        return None
    M = widths.pop()
    P = x.shape[0]
    covered = sum(hi - lo for lo, hi in bounds if hi > lo)
    fresh = x.new_empty if covered == P else x.new_zeros  # blocks tile the rows: nothing to clear
    G = fresh(P, M)
    T = fresh(P, M)
    flat = x.detach().reshape(-1).contiguous()
    for table, (lo, hi) in zip(tables, bounds):
        if hi <= lo:
            continue
        if library is None:
            G[lo:hi], T[lo:hi] = table.value_and_slope(x[lo:hi])
            continue
        if table.check_frequency > 0:
            table._check(x[lo:hi])  # noqa: SLF001  the module's own overflow warning
        _run(library, table, flat, G, T, lo, hi)
    return G, T


def _run(library, table, x: torch.Tensor, G: torch.Tensor, T: torch.Tensor, lo: int, hi: int) -> None:
    fn = getattr(library, f"table_{'f64' if x.dtype == torch.float64 else 'f32'}")
    fn.restype = ctypes.c_int  # 1: its work arrays could not be allocated
    coef = table.coef.contiguous()
    start, lower, upper, end = table.table_range()
    settings = (int(coef.shape[2]), int(coef.shape[0]), table.n_coarse, table.n_fine,
                start, lower, upper, end, table.step, table.coarse,
                x.data_ptr(), coef.data_ptr(), G.data_ptr(), T.data_ptr())

    def rows(a: int, b: int) -> None:
        if fn(a, b, *settings) != 0:
            raise MemoryError(f"compressed embedding: no memory for the work arrays of {b - a} inputs")

    threads = 1 if KERNELS.parallel else min(torch.get_num_threads(), (hi - lo) // MIN_ROWS_PER_THREAD)
    if threads <= 1:  # one call (with OpenMP, the loop over rows is split over torch's threads)
        rows(lo, hi)
        return
    cuts = [lo + (hi - lo) * k // threads for k in range(threads + 1)]
    native.run_together([functools.partial(rows, a, b) for a, b in zip(cuts[:-1], cuts[1:])])
