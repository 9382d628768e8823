"""An embedding net's value and its derivative in its scalar input, computed together, for force
training.

Why: force training differentiates the embedding nets twice, once for the forces and once more
for the force loss's parameter gradient. Autograd's graph for that runs about twenty element-wise
passes per layer over [pairs × width] tensors (17,000 × 100 float64 for water se_e2_a: 14 MB
each), and those passes, not the matrix products, take most of the nets' time. The net's input
is one number per pair, s(r), so its derivative T = dG/ds can be carried forward with the value
(one more matrix product per layer), and the parameter gradients of G and T written out by hand:
per layer one fused element-wise pass forward and one backward, in a few lines of C
(:mod:`mtcore.native`). The matrix products stay torch's.

How it joins autograd: the net's output is G, and its derivative in s is T (what
``G + T·(s − s.detach())`` would be; a small Function saves the passes over T·0 that expression
costs), and T carries its own graph back to the weights. So the forces, the virial and the force loss's
parameter gradient come out as autograd's do, to rounding (tests/test_tangent_embedding.py).
What it leaves out is T's own derivative in s, i.e. second derivatives of the energy in the
coordinates. The trainer's losses never need those, so this path is taken only inside
:func:`force_training`, around the training step's prediction; everything else (validation,
inference, frozen files, user code) runs the plain net.

A descriptor's per-type-pair nets run as one Function (:func:`embed_groups`) over the pairs
sorted by type group: each net's last layer writes its block of one joint G and T, so the
blocks are never concatenated (nor, in the second derivative, split and concatenated again).

Taken for nets whose layers are all tanh without a resnet timestep, on the CPU in float64 or
float32, outside mixed precision; anything else runs the plain net. ``MTCORE_PLAIN_EMBEDDING=1``
turns it off; without a C compiler it is off (``status()`` says why).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from mtcore import native

# Layer l maps x [P, m] to out [P, n] = tanh(z) + skip(x), z = x W + b; its tangent tx [P, m] to
# tout = (1 − y²)·tz + skip(tx), tz = tx W. skip: mode 0 none, 1 residual (n = m), 2 width doubling
# (n = 2m, x repeated). Forward (fwdz) is given x·2W, adds 2b and writes y = tanh(z) = 2σ(2z) − 1
# over it, with its own vectorisable e^x; fwd, the former forward, is given σ(2z) from torch's
# addmm and sigmoid (TANH_IN_LOOP = False). Backward, given g_out and g_tout (NULL: zero), writes
# gz, gtz and the skip's share of the input gradients gxs, gtxs (only for modes 1 and 2).
SOURCE = native.CLONES + native.PARALLEL + r"""
#define KERNELS(SUF, T)                                                                          \
MTCORE_CLONES void fwd_##SUF(long P, long n, long m, int mode, T *sg, const T *x, const T *tz, const T *tx,   \
               T *out, T *tout) {                                                                \
  MTCORE_PARALLEL_FOR for (long p = 0; p < P; ++p) {                                             \
    T *yp = sg + p * n, *op = out + p * n, *top = tout + p * n;                                  \
    const T *tzp = tz + p * n, *xp = x + p * m, *txp = tx + p * m;                               \
    if (mode == 0) {                                                                             \
      for (long k = 0; k < n; ++k) {                                                             \
        T y = yp[k] + yp[k] - (T)1; yp[k] = y; op[k] = y; top[k] = ((T)1 - y * y) * tzp[k];     \
      }                                                                                          \
    } else {                                                                                     \
      for (long h = 0; h < n; h += m)                                                            \
        for (long k = 0; k < m; ++k) {                                                           \
          T y = yp[h + k] + yp[h + k] - (T)1; yp[h + k] = y;                                     \
          op[h + k] = xp[k] + y; top[h + k] = ((T)1 - y * y) * tzp[h + k] + txp[k];              \
        }                                                                                        \
    }                                                                                            \
  }                                                                                              \
}                                                                                                \
MTCORE_CLONES void bwd_##SUF(long P, long n, long m, int mode, const T *g_out, const T *g_tout, const T *y,   \
               const T *tz, T *gz, T *gtz, T *gxs, T *gtxs) {                                    \
  MTCORE_PARALLEL_FOR for (long p = 0; p < P; ++p) {                                             \
    const T *gop = g_out + p * n, *yp = y + p * n, *tzp = tz + p * n;                            \
    T *gzp = gz + p * n, *gtzp = gtz + p * n;                                                    \
    if (g_tout) {                                                                                \
      const T *gtp = g_tout + p * n;                                                             \
      for (long k = 0; k < n; ++k) {                                                             \
        T yk = yp[k], d = (T)1 - yk * yk, gt = gtp[k];                                           \
        gzp[k] = (gop[k] - (gt + gt) * yk * tzp[k]) * d; gtzp[k] = gt * d;                       \
      }                                                                                          \
    } else {                                                                                     \
      for (long k = 0; k < n; ++k) gzp[k] = gop[k] * ((T)1 - yp[k] * yp[k]);                     \
    }                                                                                            \
    if (mode == 0) continue;                                                                     \
    T *gxp = gxs + p * m, *gtxp = gtxs + p * m;                                                  \
    for (long k = 0; k < m; ++k) gxp[k] = gop[k];                                                \
    for (long h = m; h < n; h += m)                                                              \
      for (long k = 0; k < m; ++k) gxp[k] += gop[h + k];                                         \
    if (g_tout) {                                                                                \
      const T *gtp = g_tout + p * n;                                                             \
      for (long k = 0; k < m; ++k) gtxp[k] = gtp[k];                                             \
      for (long h = m; h < n; h += m)                                                            \
        for (long k = 0; k < m; ++k) gtxp[k] += gtp[h + k];                                      \
    }                                                                                            \
  }                                                                                              \
}
KERNELS(f64, double)
KERNELS(f32, float)
/* e^x by Cody-Waite reduction (x = k ln2 + r, |r| <= ln2/2), a Taylor polynomial for e^r and 2^k
   written into the exponent bits: plain arithmetic and integer ops, so the compiler vectorises
   it. Relative error below 2 ulp. x is clamped to where e^x is a normal number; comparisons
   that are false for NaN let a NaN through. */
static inline double mt_exp_f64(double x) {
  x = x < -708.0 ? -708.0 : x;
  x = x > 708.0 ? 708.0 : x;
  const double magic = 6755399441055744.0; /* 1.5 * 2^52: adding it rounds to an integer */
  double kb = x * 1.4426950408889634 + magic;
  double k = kb - magic;
  double r = x - k * 6.93147180369123816490e-01 - k * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0; p = p * r + 1.0 / 39916800.0; p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0; p = p * r + 1.0 / 40320.0; p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0; p = p * r + 1.0 / 120.0; p = p * r + 1.0 / 24.0; p = p * r + 1.0 / 6.0;
  p = p * r + 0.5; p = p * r + 1.0; p = p * r + 1.0;
  unsigned long long bits; double scale; /* unsigned: no undefined shift, whatever kb holds */
  __builtin_memcpy(&bits, &kb, 8);
  bits = (bits - 0x4338000000000000ULL + 1023ULL) << 52;
  __builtin_memcpy(&scale, &bits, 8);
  return p * scale;
}
static inline float mt_exp_f32(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 87.0f ? 87.0f : x;
  const float magic = 12582912.0f; /* 1.5 * 2^23 */
  float kb = x * 1.44269504f + magic;
  float k = kb - magic;
  float r = x - k * 0.693145752f - k * 1.42860677e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f; p = p * r + 1.0f / 120.0f; p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f; p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
  unsigned int bits; float scale;
  __builtin_memcpy(&bits, &kb, 4);
  bits = (bits - 0x4B400000U + 127U) << 23;
  __builtin_memcpy(&scale, &bits, 4);
  return p * scale;
}
/* As fwd, but given z = x (2W) without the bias: adds 2b and takes tanh = 2σ − 1 itself, so the
   bias is not first copied into every row and σ is not a pass of its own. */
#define ZKERNEL(SUF, T)                                                                          \
MTCORE_CLONES void fwdz_##SUF(long P, long n, long m, int mode, T *zy, const T *b2, const T *x, const T *tz,  \
               const T *tx, T *out, T *tout) {                                                   \
  MTCORE_PARALLEL_FOR for (long p = 0; p < P; ++p) {                                             \
    T *yp = zy + p * n, *op = out + p * n, *top = tout + p * n;                                  \
    const T *tzp = tz + p * n, *xp = x + p * m, *txp = tx + p * m;                               \
    for (long k = 0; k < n; ++k) {                                                               \
      T sg = (T)1 / ((T)1 + mt_exp_##SUF(-(yp[k] + b2[k])));                                     \
      yp[k] = sg + sg - (T)1;                                                                    \
    }                                                                                            \
    if (mode == 0) {                                                                             \
      for (long k = 0; k < n; ++k) {                                                             \
        T y = yp[k]; op[k] = y; top[k] = ((T)1 - y * y) * tzp[k];                                \
      }                                                                                          \
    } else {                                                                                     \
      for (long h = 0; h < n; h += m)                                                            \
        for (long k = 0; k < m; ++k) {                                                           \
          T y = yp[h + k];                                                                       \
          op[h + k] = xp[k] + y; top[h + k] = ((T)1 - y * y) * tzp[h + k] + txp[k];              \
        }                                                                                        \
    }                                                                                            \
  }                                                                                              \
}
ZKERNEL(f64, double)
ZKERNEL(f32, float)
#define ROWDOT(SUF, T)                                                                           \
MTCORE_CLONES void rowdot_##SUF(long P, long n, const T *a, const T *b, T *out) {                \
  MTCORE_PARALLEL_FOR for (long p = 0; p < P; ++p) {                                             \
    const T *ap = a + p * n, *bp = b + p * n; T s = 0;                                           \
    for (long k = 0; k < n; ++k) s += ap[k] * bp[k];                                             \
    out[p] = s;                                                                                  \
  }                                                                                              \
}
ROWDOT(f64, double)
ROWDOT(f32, float)
"""
FLAGS = ("-O3",)
_SIZES = [ctypes.c_long] * 3 + [ctypes.c_int]
SIGNATURES = {**{f"fwd_{suffix}": _SIZES + [ctypes.c_void_p] * 6 for suffix in ("f64", "f32")},
              **{f"bwd_{suffix}": _SIZES + [ctypes.c_void_p] * 8 for suffix in ("f64", "f32")},
              **{f"fwdz_{suffix}": _SIZES + [ctypes.c_void_p] * 7 for suffix in ("f64", "f32")},
              **{f"rowdot_{suffix}": [ctypes.c_long] * 2 + [ctypes.c_void_p] * 3 for suffix in ("f64", "f32")}}
#: rows per thread below which the kernels run on the calling thread only
MIN_ROWS_PER_THREAD = 4096
#: bytes of the widest layer per thread in a tile that the backward runs through all of a net's
#: layers at once (benchmarks/ab_step.py ``tiles``: 1,024 rows of width 100 in float64)
TILE_BYTES = 1024 * 100 * 8

KERNELS = native.KernelLibrary("embedding_tangent", SOURCE, FLAGS, SIGNATURES, "MTCORE_PLAIN_EMBEDDING")
#: the forward loop takes the bias and tanh itself (fwdz) instead of torch's addmm and sigmoid
TANH_IN_LOOP = True
_active = False


def status() -> str:
    """Whether the fused path is available, and if not, why (loads the library on first call)."""
    KERNELS.load()
    return KERNELS.status


@contextlib.contextmanager
def force_training(enabled: bool = True) -> Iterator[None]:
    """Inside: embedding nets built for it take the fused path (the trainer wraps the training
    step's prediction, whose loss needs only first derivatives in the coordinates)."""
    global _active
    before = _active
    _active = bool(enabled) and KERNELS.load() is not None
    try:
        yield
    finally:
        _active = before


def _run(name: str, dtype: torch.dtype, P: int, n: int, m: int, mode: int,
         tensors: Sequence[Tuple[Optional[torch.Tensor], int]]) -> None:
    """Call kernel ``name`` on rows [0, P), split over torch's thread count when that pays
    (ctypes releases the GIL, so the chunks run in parallel)."""
    fn = getattr(KERNELS.library, f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")
    item = 8 if dtype == torch.float64 else 4
    bases = [(t.data_ptr() if t is not None else None, width) for t, width in tensors]

    def call(lo: int, hi: int) -> None:
        fn(hi - lo, n, m, mode, *[None if base is None else base + lo * width * item for base, width in bases])

    threads = 1 if KERNELS.parallel else min(torch.get_num_threads(), P // MIN_ROWS_PER_THREAD)
    if threads <= 1:  # one call (with OpenMP, the kernel splits its rows over torch's threads)
        call(0, P)
        return
    step = -(-P // threads)
    native.run_together([functools.partial(call, lo, min(P, lo + step)) for lo in range(0, P, step)])


def _tiles(P: int, width: int, itemsize: int) -> List[Tuple[int, int]]:
    """Row ranges [lo, hi) that the backward runs through all a net's layers one after the
    other. A net's [P, width] arrays (14 MB at 17,000 × 100 float64) outgrow the caches, so
    layer by layer over all rows each element-wise pass reads back from memory what the matrix
    product before it has just written; in a tile of TILE_BYTES of the widest layer per thread
    the layers' gradients are tile-sized buffers that stay in cache. Nets whose arrays are no
    more than two tiles anyway run whole (narrow nets such as se_e2_r's would only pay the
    tiles' extra calls). (The forward gains nothing from tiles here: its products lose more on
    short tiles than its passes win.)"""
    rows = max(1, TILE_BYTES // max(1, width * itemsize)) * max(1, torch.get_num_threads())
    if P <= 2 * rows:
        return [(0, P)]
    return [(lo, min(P, lo + rows)) for lo in range(0, P, rows)]


def _net_forward(s: torch.Tensor, modes: Tuple[int, ...], params: Sequence[torch.Tensor],
                 value: torch.Tensor, tangent: torch.Tensor, saved: List[torch.Tensor]) -> None:
    """One net on s [P, 1]: its last layer writes G into ``value`` and T into ``tangent`` (rows of
    the caller's joint outputs); each layer's (x, tx, y, tz) is appended to ``saved``."""
    x, tx = s, torch.ones_like(s)
    for i, mode in enumerate(modes):
        weight, bias = params[2 * i], params[2 * i + 1]
        P, m = x.shape
        n = weight.shape[1]
        last = i + 1 == len(modes)
        tz = torch.mm(tx, weight)
        # the doubling of W and b (tanh(z) = 2σ(2z) − 1) is exact
        if TANH_IN_LOOP:  # z = x (2W); the loop adds 2b and takes tanh itself
            y = torch.mm(x, weight + weight)
            kernel, bias_arg = "fwdz", [(bias + bias, 0)]
        else:  # σ(2z) from torch, as fast_tanh computes it
            y = torch.addmm(bias + bias, x, weight + weight).sigmoid_()
            kernel, bias_arg = "fwd", []
        out = value if last else torch.empty_like(y)
        tout = tangent if last else torch.empty_like(y)
        _run(kernel, y.dtype, P, n, m, mode, [(y, n), *bias_arg, (x, m), (tz, n), (tx, m), (out, n), (tout, n)])
        saved += [x, tx, y, tz]
        x, tx = out, tout


def _net_backward(saved: Sequence[torch.Tensor], modes: Tuple[int, ...], params: Sequence[torch.Tensor],
                  g_out: Optional[torch.Tensor], g_tout: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """One net's parameter gradients [gW, gb, ...] from the gradients of its G and T rows, tile
    by tile (:func:`_tiles`), each tile's gradients summed into the parameters' ones."""
    depth = len(modes)
    grads: List[torch.Tensor] = []
    for i in range(depth):
        grads += [torch.zeros_like(params[2 * i]), torch.zeros_like(params[2 * i + 1])]
    if g_out is None:
        g_out = torch.zeros_like(saved[4 * (depth - 1) + 2])
    width = max(int(params[2 * i].shape[1]) for i in range(depth))
    for lo, hi in _tiles(g_out.shape[0], width, g_out.element_size()):
        g_x = g_out[lo:hi]
        g_tx = g_tout[lo:hi] if g_tout is not None else None
        for i in reversed(range(depth)):
            x, tx, y, tz = (t[lo:hi] for t in saved[4 * i: 4 * i + 4])
            weight, mode = params[2 * i], modes[i]
            P, n = y.shape
            m = x.shape[1]
            gz = torch.empty_like(y)
            gtz = torch.empty_like(y) if g_tx is not None else None
            gxs = y.new_empty(P, m) if mode else None
            gtxs = y.new_empty(P, m) if mode and g_tx is not None else None
            _run("bwd", y.dtype, P, n, m, mode,
                 [(g_x, n), (g_tx, n), (y, n), (tz, n), (gz, n), (gtz, n), (gxs, m), (gtxs, m)])
            grads[2 * i].addmm_(x.t(), gz)
            if gtz is not None:
                grads[2 * i].addmm_(tx.t(), gtz)
            grads[2 * i + 1] += gz.sum(0)
            if i > 0:
                g_x = gxs.addmm_(gz, weight.t()) if gxs is not None else torch.mm(gz, weight.t())
                if gtz is not None:
                    g_tx = gtxs.addmm_(gtz, weight.t()) if gtxs is not None else torch.mm(gtz, weight.t())
    return grads


class _EmbedWithTangent(torch.autograd.Function):
    """(G, T) [P, M] of tanh embedding nets, each on its own block of rows of s [P, 1].

    ``spec`` is per net (first row, end row, skip modes), the blocks tiling [0, P) in order;
    ``params`` are the nets' (W, b) per layer, net after net. The nets' last layers write straight
    into the joint G and T, so no concatenation (and no second derivative of one) is needed."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, spec: Tuple[Tuple[int, int, Tuple[int, ...]], ...], *params: torch.Tensor):
        width = params[-2].shape[1]
        value, tangent = s.new_empty(s.shape[0], width), s.new_empty(s.shape[0], width)
        saved: List[torch.Tensor] = []
        first = 0
        for lo, hi, modes in spec:
            _net_forward(s[lo:hi], modes, params[first: first + 2 * len(modes)], value[lo:hi], tangent[lo:hi], saved)
            first += 2 * len(modes)
        ctx.spec = spec
        ctx.save_for_backward(*saved, *params)
        return value, tangent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_value: Optional[torch.Tensor], g_tangent: Optional[torch.Tensor]):
        saved = ctx.saved_tensors
        nlayers = sum(len(modes) for _, _, modes in ctx.spec)
        params = saved[4 * nlayers:]
        g_value = g_value.contiguous() if g_value is not None else None
        g_tangent = g_tangent.contiguous() if g_tangent is not None else None
        grads: List[torch.Tensor] = []
        layer = 0
        for lo, hi, modes in ctx.spec:
            depth = len(modes)
            grads += _net_backward(saved[4 * layer: 4 * (layer + depth)], modes, params[2 * layer: 2 * (layer + depth)],
                                   g_value[lo:hi] if g_value is not None else None,
                                   g_tangent[lo:hi] if g_tangent is not None else None)
            layer += depth
        return (None, None, *grads)


class _WithTangent(torch.autograd.Function):
    """G as value, with derivative T in s: what ``G + T·(s − s.detach())`` is, without the
    element-wise passes autograd runs for that expression and its derivative (the T·0 terms)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, tangent: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(tangent)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (tangent,) = ctx.saved_tensors
        return grad, None, _RowDot.apply(grad, tangent)


class _RowDot(torch.autograd.Function):
    """Σ_k a[p, k] b[p, k] as [P, 1], one pass (a C loop); its own derivative in torch."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()
        out = a.new_empty(a.shape[0], 1)
        getattr(KERNELS.library, f"rowdot_{'f64' if a.dtype == torch.float64 else 'f32'}")(
            a.shape[0], a.shape[1], a.data_ptr(), b.data_ptr(), out.data_ptr())
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        return grad * b, grad * a


def _fused_layers(net: torch.nn.Module, x: torch.Tensor) -> Optional[Tuple[Tuple[int, ...], List[torch.Tensor]]]:
    """(skip modes, [W, b, ...]) when every layer is a plain tanh layer in x's dtype, else None
    (also for a module that is no embedding net: a table, or a stand-in a benchmark puts there)."""
    if not isinstance(getattr(net, "blocks", None), torch.nn.ModuleList) or getattr(net, "mixed", True):
        return None
    modes: List[int] = []
    params: List[torch.Tensor] = []
    for block in net.blocks:
        dense = block.dense
        if dense.activation_name != "tanh" or dense.mixed or dense.weight.dtype != x.dtype:
            return None
        if block.use_timestep and dense.idt is not None:
            return None
        modes.append(int(block.mode))
        params += [dense.weight, dense.bias]
    return tuple(modes), params


def embed(net: torch.nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``net(x)`` through the fused path, or None where it does not apply (the caller then runs
    the plain net)."""
    return _fused([net], x, [(0, x.shape[0])] if x.dim() > 0 else [])


def embed_groups(nets: Sequence[torch.nn.Module], x: torch.Tensor,
                 bounds: Sequence[Tuple[int, int]]) -> Optional[torch.Tensor]:
    """``cat([nets[k](x[lo_k:hi_k]) for k])`` through the fused path in one Function, where the
    non-empty blocks ``bounds`` tile x's rows in order (a descriptor's per-type-pair nets over its
    pairs sorted by group); None where that does not apply (the caller then runs the nets)."""
    return _fused(nets, x, bounds)


def would_fuse(x: torch.Tensor) -> bool:
    """Whether nets on input ``x`` [P, 1] can take the fused path here (force training on the CPU
    in float64 or float32), before their layers are looked at: a cheap test for callers that
    would otherwise prepare inputs for nothing."""
    if not _active or not torch.is_grad_enabled() or not x.requires_grad:
        return False
    return x.dim() == 2 and x.shape[1] == 1 and x.shape[0] > 0 and x.device.type == "cpu" and \
        x.dtype in (torch.float64, torch.float32)


def embed_group_parts(nets: Sequence[torch.nn.Module], x: torch.Tensor,
                      bounds: Sequence[Tuple[int, int]]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """As :func:`embed_groups`, but (G, T) apart: G with the graph to the nets' parameters only (x
    enters as a constant) and T = dG/dx. For a caller that attaches T to x itself, inside a
    Function of its own (se_e2_a's contraction, mtcore.model.pair_contraction), and so never
    needs the [P, M] gradient of G that :func:`embed_groups`' attachment costs in the forces."""
    if not would_fuse(x):
        return None
    return _fused_parts(nets, x, bounds)


def _fused(net_list: Sequence[torch.nn.Module], x: torch.Tensor,
           bounds: Sequence[Tuple[int, int]]) -> Optional[torch.Tensor]:
    """:func:`embed` and :func:`embed_groups`: the nets' G with T attached to x
    (benchmarks/ab_step.py switches embed_groups off on its own)."""
    if not would_fuse(x):
        return None
    parts = _fused_parts(net_list, x, bounds)
    if parts is None:
        return None
    return _WithTangent.apply(parts[0], parts[1], x)


def _fused_parts(net_list: Sequence[torch.nn.Module], x: torch.Tensor,
                 bounds: Sequence[Tuple[int, int]]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(G, T) of the nets on their blocks of x's rows in one Function, or None where the nets'
    layers or the blocks do not allow it."""
    if len(net_list) != len(bounds) or len(net_list) == 0:
        return None
    spec: List[Tuple[int, int, Tuple[int, ...]]] = []
    params: List[torch.Tensor] = []
    end = 0
    for net, (lo, hi) in zip(net_list, bounds):
        layers = _fused_layers(net, x)
        if layers is None or lo != end or hi <= lo:
            return None
        modes, net_params = layers
        if params and net_params[-2].shape[1] != params[-2].shape[1]:
            return None  # nets of different output widths cannot share one G
        spec.append((int(lo), int(hi), modes))
        params += net_params
        end = hi
    if end != x.shape[0]:
        return None
    s = x.detach().contiguous()
    value, tangent = _EmbedWithTangent.apply(s, tuple(spec), *params)
    return value, tangent
