"""The order of a frame's neighbour pairs that mtcore's models expect, found per centre in C.

Why: a training frame's pairs are sorted by (centre, neighbour type, distance, neighbour index),
the order :mod:`mtcore.model.neighbor_list` gives frozen models. ``numpy.lexsort`` over the four
keys sorts the whole list four times: 2.7 ms of the 5 ms a 192-atom water frame's list costs,
paid for every frame the first time it is drawn (and again for frames a bounded neighbour cache
evicted). Here a counting sort groups the pairs by centre in one pass, and then only each
centre's ~100 pairs are sorted (a merge sort per centre): 0.1 ms.

The order is the one ``lexsort`` gives, ties included (the sort is stable, as lexsort is);
tests/test_pair_order.py compares them on periodic boxes small enough for one neighbour to
appear through several images. Without a C compiler, or with ``MTCORE_PLAIN_PAIR_ORDER=1``:
``lexsort``.
"""

from __future__ import annotations

import ctypes

import numpy as np

from mtcore import native

# Pairs p in [0, P), centres i[p] in [0, natoms). A counting sort groups them by centre (stably;
# after it, start[c] is where centre c's pairs end), then each centre's pairs are sorted by
# (t[p], d[p], j[p]) with a stable bottom-up merge sort (insertion sort below RUN).
SOURCE = r"""
#include <string.h>
#define RUN 16
static int before(long a, long b, const long *t, const double *d, const long *j) {
  if (t[a] != t[b]) return t[a] < t[b];
  if (d[a] != d[b]) return d[a] < d[b];
  return j[a] < j[b];
}
void pair_order(long P, long natoms, const long *i, const long *j, const long *t, const double *d, long *order,
                long *scratch, long *start) {
  for (long a = 0; a <= natoms; ++a) start[a] = 0;
  for (long p = 0; p < P; ++p) ++start[i[p] + 1];
  for (long a = 0; a < natoms; ++a) start[a + 1] += start[a];
  for (long p = 0; p < P; ++p) scratch[start[i[p]]++] = p;  /* grouped by centre, stably */
  memcpy(order, scratch, P * sizeof(long));
  for (long c = 0; c < natoms; ++c) {
    long lo = c ? start[c - 1] : 0, n = start[c] - lo, *a = order + lo, *b = scratch + lo;
    for (long s = 0; s < n; s += RUN) {
      long e = s + RUN < n ? s + RUN : n;
      for (long k = s + 1; k < e; ++k) {
        long v = a[k], m = k;
        while (m > s && before(v, a[m - 1], t, d, j)) { a[m] = a[m - 1]; --m; }
        a[m] = v;
      }
    }
    for (long width = RUN; width < n; width *= 2) {
      for (long s = 0; s < n; s += 2 * width) {
        long mid = s + width < n ? s + width : n, e = s + 2 * width < n ? s + 2 * width : n;
        long x = s, y = mid, k = s;
        while (x < mid && y < e) b[k++] = before(a[y], a[x], t, d, j) ? a[y++] : a[x++];
        while (x < mid) b[k++] = a[x++];
        while (y < e) b[k++] = a[y++];
      }
      long *swap = a; a = b; b = swap;
    }
    if (a != order + lo) memcpy(order + lo, a, n * sizeof(long));
  }
}
"""
FLAGS = ("-O2",)
SIGNATURES = {"pair_order": [ctypes.c_long] * 2 + [ctypes.c_void_p] * 7}

KERNELS = native.KernelLibrary("pair_order", SOURCE, FLAGS, SIGNATURES, "MTCORE_PLAIN_PAIR_ORDER")


def pair_order(i: np.ndarray, j: np.ndarray, t: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Indices sorting the pairs by (i, t, d, j), stably: ``np.lexsort((j, d, t, i))``."""
    P = i.shape[0]
    library = KERNELS.load() if P > 1 else None
    if library is None:
        return np.lexsort((j, d, t, i))
    i64, j64, t64 = (np.ascontiguousarray(a, dtype=np.int64) for a in (i, j, t))
    d64 = np.ascontiguousarray(d, dtype=np.float64)
    natoms = int(i64.max()) + 1
    if int(i64.min()) < 0:
        return np.lexsort((j, d, t, i))
    order, scratch, start = np.empty(P, np.int64), np.empty(P, np.int64), np.empty(natoms + 1, np.int64)
    library.pair_order(P, natoms, *(a.ctypes.data for a in (i64, j64, t64, d64, order, scratch, start)))
    return order
