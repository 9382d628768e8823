"""se_e2_a's per-atom contraction A_i = Σ_j R̃_jᵀ G_j over the real pairs, without a padded layout.

Why: the plain way places the pair rows R̃ [P, 4] and embeddings G [P, M] into zero-filled
[atoms × max neighbours] tensors and contracts them with one batched matrix product. Force
training differentiates that twice, and each pass drags full-size padded tensors through autograd:
zero fills, gathers back to pairs, the sum of two [atoms × max neighbours × M] gradients, a copy
where a gradient comes out transposed (water se_e2_a: 15 MB each, a dozen passes a step). Here
three small C loops over the pairs, sorted by centre, do the work in place:

    contract      A[i]    = Σ_{p of i} R[p]ᵀ G[map p]          [atoms, K, M]
    expand_left   L[map p] = R[p] A[i]                          [P, M]
    expand_right  Q[p]    = A[i] G[map p]ᵀ                      [P, K]

The three are bilinear and each one's derivatives are the other two, so every derivative order
autograd asks for (forces, then the force loss's parameter gradient) runs through the same
loops; the result equals the padded product's to rounding (tests/test_pair_contraction.py).
``map`` lets G stay in the embedding nets' group order: no permutation is written out.

In force training se_e2_a calls :func:`contract_with_tangent` instead: the nets give G and its
derivative T in s apart (mtcore.model.tangent_embedding.embed_group_parts), and the contraction
takes dE/ds = R̃·(dE/dA Tᵀ) through a [P, 4] product, so neither the forces nor their parameter
gradient write a [P, M] row-dot, product or sum (0.915 of the step in benchmarks/ab_step.py).

Taken on the CPU in float64 and float32 outside TorchScript (a frozen model runs the padded
product, which plain ``torch.jit.load`` needs); ``MTCORE_PLAIN_CONTRACTION=1`` turns it off and
without a C compiler it is off (``status()`` says why).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch

from mtcore import native

# Pairs of centre i are off[i] .. off[i+1]-1; G's row of pair p is map[p]. Each kernel runs the
# centres [lo, hi). expand_right keeps 8 partial sums per output so the compiler can vectorise
# the dot products without reordering a single sum (no -ffast-math).
SOURCE = native.CLONES + native.PARALLEL + r"""
#define LANES 8
#define KERNELS(SUF, T)                                                                          \
MTCORE_CLONES void contract_##SUF(long lo, long hi, long K, long M, const long *off, const T *R, const T *G,   \
                    const long *map, T *A) {                                                     \
  MTCORE_PARALLEL_FOR for (long i = lo; i < hi; ++i) {                                           \
    T *a = A + i * K * M;                                                                        \
    for (long k = 0; k < K * M; ++k) a[k] = 0;                                                   \
    for (long p = off[i]; p < off[i + 1]; ++p) {                                                 \
      const T *g = G + map[p] * M, *r = R + p * K;                                               \
      for (long c = 0; c < K; ++c) {                                                             \
        T rc = r[c]; T *ac = a + c * M;                                                          \
        for (long m = 0; m < M; ++m) ac[m] += rc * g[m];                                         \
      }                                                                                          \
    }                                                                                            \
  }                                                                                              \
}                                                                                                \
MTCORE_CLONES void expand_left_##SUF(long lo, long hi, long K, long M, const long *off, const T *R,            \
                       const T *A, const long *map, T *L) {                                      \
  MTCORE_PARALLEL_FOR for (long i = lo; i < hi; ++i) {                                           \
    const T *a = A + i * K * M;                                                                  \
    for (long p = off[i]; p < off[i + 1]; ++p) {                                                 \
      T *l = L + map[p] * M; const T *r = R + p * K;                                             \
      T r0 = r[0];                                                                               \
      for (long m = 0; m < M; ++m) l[m] = r0 * a[m];                                             \
      for (long c = 1; c < K; ++c) {                                                             \
        T rc = r[c]; const T *ac = a + c * M;                                                    \
        for (long m = 0; m < M; ++m) l[m] += rc * ac[m];                                         \
      }                                                                                          \
    }                                                                                            \
  }                                                                                              \
}                                                                                                \
MTCORE_CLONES void expand_right_##SUF(long lo, long hi, long K, long M, const long *off, const T *A,           \
                        const T *G, const long *map, T *Q) {                                     \
  long body = M - M % LANES;                                                                     \
  MTCORE_PARALLEL_FOR for (long i = lo; i < hi; ++i) {                                           \
    const T *a = A + i * K * M;                                                                  \
    for (long p = off[i]; p < off[i + 1]; ++p) {                                                 \
      const T *g = G + map[p] * M;                                                               \
      for (long c = 0; c < K; ++c) {                                                             \
        const T *ac = a + c * M;                                                                 \
        T part[LANES] = {0};                                                                     \
        for (long m = 0; m < body; m += LANES)                                                   \
          for (long j = 0; j < LANES; ++j) part[j] += ac[m + j] * g[m + j];                      \
        T s = 0;                                                                                 \
        for (long m = body; m < M; ++m) s += ac[m] * g[m];                                       \
        for (long j = 0; j < LANES; ++j) s += part[j];                                           \
        Q[p * K + c] = s;                                                                        \
      }                                                                                          \
    }                                                                                            \
  }                                                                                              \
}
KERNELS(f64, double)
KERNELS(f32, float)
"""
FLAGS = ("-O3",)
SIGNATURES = {f"{name}_{suffix}": [ctypes.c_long] * 4 + [ctypes.c_void_p] * 5
              for name in ("contract", "expand_left", "expand_right") for suffix in ("f64", "f32")}
#: pairs per thread below which the kernels run on the calling thread only
MIN_PAIRS_PER_THREAD = 4096

KERNELS = native.KernelLibrary("pair_contraction", SOURCE, FLAGS, SIGNATURES, "MTCORE_PLAIN_CONTRACTION")


def status() -> str:
    """Whether the pair contraction is available, and if not, why (loads the library on first call)."""
    KERNELS.load()
    return KERNELS.status


class PairLayout:
    """Where each atom's pairs are (``off``, centre-sorted) and where each pair's G row is (``map``;
    ``order`` is its inverse, the pair of each G row, where the caller gave it)."""

    def __init__(self, off: torch.Tensor, map_: torch.Tensor, order: Optional[torch.Tensor] = None):
        self.off = off
        self.map = map_
        self.order = order
        self.natoms = off.numel() - 1
        self.npairs = map_.numel()


def _run(name: str, layout: PairLayout, K: int, M: int, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """Kernel ``name`` over all centres, split over torch's thread count when that pays (ctypes
    releases the GIL, so the chunks run in parallel; each chunk writes only its centres' rows)."""
    fn = getattr(KERNELS.library, f"{name}_{'f64' if out.dtype == torch.float64 else 'f32'}")
    args = (layout.off.data_ptr(), a.data_ptr(), b.data_ptr(), layout.map.data_ptr(), out.data_ptr())
    threads = 1 if KERNELS.parallel else min(torch.get_num_threads(), layout.npairs // MIN_PAIRS_PER_THREAD)
    if threads <= 1:  # one call (with OpenMP, the kernel splits its centres over torch's threads)
        fn(0, layout.natoms, K, M, *args)
        return
    # centre boundaries that give each chunk about the same number of pairs
    targets = torch.arange(1, threads, dtype=layout.off.dtype) * layout.npairs // threads
    cuts = [0] + torch.searchsorted(layout.off, targets).tolist() + [layout.natoms]
    native.run_together([functools.partial(fn, lo, hi, K, M, *args) for lo, hi in zip(cuts[:-1], cuts[1:])])


def _kernel_forward(ctx, name: str, layout: PairLayout, a: torch.Tensor, b: torch.Tensor,
                   shape: tuple[int, ...], K: int, M: int) -> torch.Tensor:
    """Kernel ``name`` on (a, b) into a new tensor of ``shape``; (a, b) and the layout are kept
    for the backward."""
    a, b = a.contiguous(), b.contiguous()
    out = a.new_empty(shape)
    _run(name, layout, K, M, a, b, out)
    ctx.layout = layout
    ctx.save_for_backward(a, b)
    return out


class _Contract(torch.autograd.Function):
    """A [atoms, K, M] from R [P, K] and G [P, M]."""

    @staticmethod
    def forward(ctx, R: torch.Tensor, G: torch.Tensor, layout: PairLayout) -> torch.Tensor:
        K, M = R.shape[1], G.shape[1]
        return _kernel_forward(ctx, "contract", layout, R, G, (layout.natoms, K, M), K, M)

    @staticmethod
    def backward(ctx, gA: torch.Tensor):
        R, G = ctx.saved_tensors
        gR = _ExpandRight.apply(gA, G, ctx.layout) if ctx.needs_input_grad[0] else None
        gG = _ExpandLeft.apply(gA, R, ctx.layout) if ctx.needs_input_grad[1] else None
        return gR, gG, None


class _ExpandLeft(torch.autograd.Function):
    """L [P, M] (rows in G's order) from A [atoms, K, M] and R [P, K]."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, R: torch.Tensor, layout: PairLayout) -> torch.Tensor:
        K, M = A.shape[1], A.shape[2]
        return _kernel_forward(ctx, "expand_left", layout, R, A, (layout.npairs, M), K, M)

    @staticmethod
    def backward(ctx, gL: torch.Tensor):
        R, A = ctx.saved_tensors
        gA = _Contract.apply(R, gL, ctx.layout) if ctx.needs_input_grad[0] else None
        gR = _ExpandRight.apply(A, gL, ctx.layout) if ctx.needs_input_grad[1] else None
        return gA, gR, None


class _ExpandRight(torch.autograd.Function):
    """Q [P, K] from A [atoms, K, M] and G [P, M]."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, G: torch.Tensor, layout: PairLayout) -> torch.Tensor:
        K, M = A.shape[1], A.shape[2]
        return _kernel_forward(ctx, "expand_right", layout, A, G, (layout.npairs, K), K, M)

    @staticmethod
    def backward(ctx, gQ: torch.Tensor):
        A, G = ctx.saved_tensors
        gA = _Contract.apply(gQ, G, ctx.layout) if ctx.needs_input_grad[0] else None
        gG = _ExpandLeft.apply(A, gQ, ctx.layout) if ctx.needs_input_grad[1] else None
        return gA, gG, None


def _will_run(node) -> bool:
    """Whether the backward pass under way will run autograd node ``node`` (the grad_fn of an
    input): the force pass (gradient toward the coordinates only) does not run the nets' node,
    and the parameter pass does not run the coordinates' one, so neither needs that input's
    gradient. True where it cannot be told (a leaf, or a torch without the query)."""
    if node is None:
        return True
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


class _ContractTangent(torch.autograd.Function):
    """A [atoms, K, M] = Σ_p R[p]ᵀ G[map p], where G's rows depend on x [P, 1] (G's order) with
    derivative T = dG/dx, and G and T carry their own graphs to the nets' parameters
    (mtcore.model.tangent_embedding.embed_group_parts).

    The plain way attaches T to G first (G + T·(x − x̂)) and contracts that: the forces then
    need dE/dG [P, M] to take its row-dot with T, and the force loss's parameter gradient
    differentiates that row-dot back into two [P, M] products and a [P, M] sum. Here
    dE/dx_p = R[p] · (dE/dA_i T[map p]ᵀ) goes through Q = expand_right(dE/dA, T) [P, K]
    instead, and its derivative is that small product's (a contraction and an expansion):
    no [P, M] tensor except T's own gradient. What it leaves out, as the attachment does, is
    T's own derivative in x."""

    @staticmethod
    def forward(ctx, R: torch.Tensor, G: torch.Tensor, T: torch.Tensor, x: torch.Tensor, layout: PairLayout,
                nodes: tuple) -> torch.Tensor:
        K, M = R.shape[1], G.shape[1]
        R, G, T = R.contiguous(), G.contiguous(), T.contiguous()
        out = R.new_empty(layout.natoms, K, M)
        _run("contract", layout, K, M, R, G, out)
        ctx.layout, ctx.nodes = layout, nodes
        ctx.save_for_backward(R, G, T)
        return out

    @staticmethod
    def backward(ctx, gA: torch.Tensor):
        R, G, T = ctx.saved_tensors
        layout, (node_R, node_G, node_x) = ctx.layout, ctx.nodes
        gR = gG = gx = None
        if ctx.needs_input_grad[0] and _will_run(node_R):
            gR = _ExpandRight.apply(gA, G, layout)
        if ctx.needs_input_grad[1] and _will_run(node_G):
            gG = _ExpandLeft.apply(gA, R, layout)
        if ctx.needs_input_grad[3] and _will_run(node_x):
            q = _ExpandRight.apply(gA, T, layout)  # [P, K], centre order
            gx = (R * q).sum(1, keepdim=True).index_select(0, layout.order)  # to G's row order
        return gR, gG, None, gx, None, None


def takes_tangent(rows: torch.Tensor) -> bool:
    """Whether :func:`contract_with_tangent` runs for pair rows like ``rows`` (asked before the
    nets run, so a caller can choose the embedding path that goes with it)."""
    return rows.device.type == "cpu" and rows.dtype in (torch.float64, torch.float32) and rows.shape[0] > 0 \
        and KERNELS.load() is not None


def contract_with_tangent(rows: torch.Tensor, value: torch.Tensor, tangent: torch.Tensor, x: torch.Tensor,
                          center: torch.Tensor, order: torch.Tensor, natoms: int) -> torch.Tensor:
    """As :func:`contract` with emb = G attached to x through T (``value``, ``tangent`` and ``x``
    in ``order``, as tangent_embedding.embed_group_parts gives them): see _ContractTangent.
    Call only where :func:`takes_tangent` said yes."""
    layout = _layout(center, order, natoms)
    nodes = (rows.grad_fn, value.grad_fn, x.grad_fn)
    return _ContractTangent.apply(rows, value, tangent, x, layout, nodes)


def _layout(center: torch.Tensor, order: torch.Tensor, natoms: int) -> PairLayout:
    counts = torch.bincount(center, minlength=natoms)
    off = torch.zeros(natoms + 1, dtype=torch.long, device=center.device)
    torch.cumsum(counts, 0, out=off[1:])
    map_ = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
    return PairLayout(off, map_, order)


def contract(rows: torch.Tensor, emb: torch.Tensor, center: torch.Tensor, order: torch.Tensor,
             natoms: int) -> Optional[torch.Tensor]:
    """Σ over each atom's pairs of rows[p]ᵀ emb[row of p] as [natoms, K, M], or None where this
    path does not apply (the caller then runs the padded product).

    ``rows`` [P, K] are sorted by ``center``; ``emb`` [P, M] is in ``order`` (emb's row k belongs
    to pair order[k]), the order the embedding nets ran in.
    """
    if rows.device.type != "cpu" or rows.dtype not in (torch.float64, torch.float32) or emb.dtype != rows.dtype:
        return None
    if rows.shape[0] == 0 or KERNELS.load() is None:
        return None
    return _Contract.apply(rows, emb, _layout(center, order, natoms))
