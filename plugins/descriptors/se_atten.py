"""se_atten (DPA-1) and se_atten_v2: type-embedded two-body embedding refined by self-attention.

Per atom i (type t_i) with the nearest ``sel`` neighbours of any type (one mixed block, N_c =
sel slots) and normalised rows R̃_j (see :mod:`mtcore.model.env`); T is the type-embedding
table, [ntypes+1, Y] with a zero last row for empty slots (and virtual atoms):

    G⁰_j = N([R̃_j0, T[t_j], T[t_i]])                      (T[t_i] left out if type_one_side)
    stripped (v2): G⁰_j = g_j ⊙ τ_j + g_j,  g_j = N_s(R̃_j0),  τ_j = N_t([T[t_j], T[t_i]])·(w_j if smooth)
    layer l:  Q, K, V = unit rows of G^{l-1} W_{q,k,v} + b       (temperature 1)
              S = Q Kᵀ;  non-smooth: S_jk → -2³³ for empty k, P = softmax_k(S)·m_j
                         smooth:     S → (S + 20) w_j w_k - 20,  P = softmax_k(S)·w_j w_k
              P ⊙= r̂_j·r̂_k (attn_dotr);  P_jj = 0 (attn_mask)
              G^l = LayerNorm(G^{l-1} + (P V) W_o + b_o), eps 1e-3 (post-norm)
    A_i = (1/N_c) Σ_slots R̃_jᵀ G^L_j,  D_i = A_iᵀ A_i[:, :axis_neuron],  Q_i = A_i[1:4]ᵀ

m_j = 1 for a real neighbour, 0 for an empty slot; w_j = clip(1 - (1 - rcut_smth·s_j)³, 0, 1)
with s_j = sw(r)/r the un-normalised first column (0 for an empty slot); r̂_j = R̃_j[1:4] made
unit length (0 for an empty slot). The fitting nets also receive T[t_i] ("type_embedding").

Empty slots, in closed form. DeePMD-kit runs all sel slots; here only real neighbours are laid
out ([atoms × m], zero rows beyond each atom's count; atoms go in up to four buckets of similar
neighbour counts, each with its own m = its widest atom, since attention costs m² per atom), and
the result is the sel-wide one because an empty slot j enters in exactly three ways:

* as a key k: non-smooth, exp(-2³³ - max) is exactly 0 so it drops out of the softmax; smooth,
  w_k = 0 makes its logit -20, so it adds exp(-20) to every denominator and nothing to P V
  (P_jk·w_k = 0). Layout padding has w = 0 too and so adds exp(-20) already; the
  e = sel - m slots not laid out (m = the widest atom's count) share one extra column with
  logit -20 + log(e) and gate 0.
* as a query j: its attention row is 0 (m_j = 0 or w_j = 0), so each layer maps it to
  LayerNorm(G + b_o): a constant per centre type, G^L_pad[t], computed from G⁰_pad[t]
  (R̃_pad0 = -davg/dstd, T row 0, and τ·w = 0 when smooth).
* in the contraction: (sel - n_i) · R̃_pad[t_i]ᵀ G^L_pad[t_i] is added to Σ_real R̃_jᵀ G^L_j.

Layout padding rows have R̃ = 0 and r̂ = 0 and are masked (or weighted 0) as keys, so they add
nothing. Excluded type pairs and virtual atoms (type -1) are dropped before the nearest ``sel``
are chosen, so they behave like empty slots; a virtual centre's descriptor is 0.

Continuity: the non-smooth attention keeps a neighbour at rcut in the softmax, so the energy jumps
when it leaves, as in DeePMD-kit; with set_davg_zero false the embedding of a neighbour at rcut
also differs from an empty slot's. The smooth variant (se_atten_v2) is continuous at rcut.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
from dargs import Argument
from torch import nn

from mtcore.errors import MtcoreError
from mtcore.hookspecs import DescriptorContext, DescriptorRegistration, NeighborStat, SchemaContext, hookimpl
from mtcore.model.descriptor import Descriptor, EmbeddingInput, StatSample
from mtcore.model.env import env_statistics, kept_rows, neighbor_slots, padding_rows, scatter_rows
from mtcore.model.mlp import Dense, EmbeddingNet, dtype_of, new_generator
from mtcore.model.sel import resolve_sel
from mtcore.model.tabulate import normalised_s_range
from mtcore_builtins.descriptors._common import exclusion_matrix as type_pair_exclusions

#: the plugin API this module was written for (mtcore.hookspecs: versions)
MTCORE_PLUGIN_API = 2

DOC = "DPA-1: type-embedded smooth embedding with self-attention over the neighbours (mixed types)."
DOC_V2 = "se_atten with stripped and smooth type embedding (set_davg_zero false by default)."

#: attention layouts: at most this many buckets of atoms with similar neighbour counts ...
LAYOUT_BUCKETS = 4
#: ... of at least this many atoms each (fewer, larger batched products below that)
BUCKET_ATOMS = 32

#: DeePMD-kit's default type embedding when ``model/type_embedding`` is absent
AUTO_TYPE_EMBEDDING = {
    "neuron": [8],
    "activation_function": "None",
    "resnet_dt": False,
    "precision": "default",
    "trainable": True,
    "seed": None,
}


def exclusion_matrix(ntypes: int, exclude_types: list) -> torch.Tensor:
    """[ntypes+1, ntypes+1] table of pairs that do not interact; the extra type (virtual atoms,
    type -1 mapped to ntypes) interacts with nothing."""
    excluded = torch.ones(ntypes + 1, ntypes + 1, dtype=torch.bool)
    excluded[:ntypes, :ntypes] = type_pair_exclusions(ntypes, exclude_types)
    return excluded


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x/|x| along the last axis, with TensorFlow's floor |x|² ≥ 1e-12 (zero rows stay zero)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True).clamp_min(1e-12))


class TypeEmbedding(nn.Module):
    """T = N(one_hot(type)), [ntypes+1, Y], with a zero row for empty slots and virtual atoms."""

    def __init__(self, ntypes: int, neuron: List[int], activation: str, resnet_dt: bool, dtype: torch.dtype,
                 generator: torch.Generator):
        super().__init__()
        self.net = EmbeddingNet(ntypes, neuron, activation, resnet_dt, dtype, generator)
        self.register_buffer("one_hot", torch.eye(ntypes, dtype=dtype))
        self.dim = int(neuron[-1])

    def forward(self) -> torch.Tensor:
        table = self.net(self.one_hot)
        return torch.cat([table, torch.zeros(1, self.dim, dtype=table.dtype, device=table.device)], dim=0)


class AttentionLayer(nn.Module):
    """One gated self-attention layer over an atom's neighbours, post-LayerNorm."""

    def __init__(self, dim: int, attn: int, dtype: torch.dtype, generator: torch.Generator):
        super().__init__()
        self.attn = attn
        self.query = Dense(dim, attn, "none", dtype, generator)
        self.key = Dense(dim, attn, "none", dtype, generator)
        self.value = Dense(dim, attn, "none", dtype, generator)
        self.out = Dense(attn, dim, "none", dtype, generator)
        self.ln_weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.ln_bias = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.dim = dim

    def finish(self, g: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(g + update, [self.dim], self.ln_weight, self.ln_bias, 1e-3)

    def forward(self, g: torch.Tensor, bias: torch.Tensor, row_weight: torch.Tensor, gate: torch.Tensor,
                smooth: bool, use_gate: bool) -> torch.Tensor:
        """g [n, m, M]. Logits are q̂_j·k̂_k + bias (non-smooth; bias -2³³ on empty keys, [n, 1, m])
        or (w_j q̂_j)·(w_k k̂_k) + bias = (S + 20)·w_j·w_k - 20 (smooth; bias = 20·w_j·w_k - 20 and
        row_weight = [w, w, 1] per slot, [n, m, 3, 1]); the softmax output is multiplied by ``gate``
        when ``use_gate``."""
        n, m = g.shape[0], g.shape[1]
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight], dim=1)
        qkv = torch.addmm(torch.cat([self.query.bias, self.key.bias, self.value.bias]), g.reshape(n * m, self.dim), weight)
        qkv = qkv.view(n, m, 3, self.attn)
        # unit rows (TensorFlow's floor |x|² ≥ 1e-12); unbind, not slicing: a cheaper backward
        scale = torch.rsqrt((qkv * qkv).sum(-1, keepdim=True).clamp_min(1e-12))
        if smooth:
            scale = scale * row_weight
        q, k, v = (qkv * scale).unbind(2)
        prob = torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2)), dim=-1)
        if use_gate:
            prob = prob * gate
        update = torch.addmm(self.out.bias, torch.bmm(prob, v).reshape(n * m, self.attn), self.out.weight)
        return self.finish(g, update.view(n, m, self.dim))

    def empty_slot(self, g: torch.Tensor) -> torch.Tensor:
        """The layer applied to an empty slot's row (its attention row is zero)."""
        return self.finish(g, self.out.bias)


class DescrptSeAtten(Descriptor):
    def __init__(
        self,
        ntypes: int,
        sel: int,
        type_embedding: dict,
        rcut: float = 6.0,
        rcut_smth: float = 0.5,
        neuron: Optional[List[int]] = None,
        axis_neuron: int = 4,
        activation_function: str = "tanh",
        resnet_dt: bool = False,
        type_one_side: bool = False,
        precision: str = "default",
        trainable: bool = True,
        seed: Optional[int] = None,
        exclude_types: Optional[list] = None,
        attn: int = 128,
        attn_layer: int = 2,
        attn_dotr: bool = True,
        attn_mask: bool = False,
        stripped_type_embedding: bool = False,
        smooth_type_embdding: bool = False,
        set_davg_zero: bool = True,
    ):
        super().__init__()
        neuron = list(neuron or [10, 20, 40])
        if rcut_smth > rcut:
            raise MtcoreError(f"model/descriptor: rcut_smth ({rcut_smth}) should be no more than rcut ({rcut})")
        if attn_layer < 0 or attn < 1:
            raise MtcoreError("model/descriptor: attn must be positive and attn_layer non-negative")
        self.ntypes = ntypes
        self.rcut = float(rcut)
        self.rcut_smth = float(rcut_smth)
        self.nnei = int(sel)
        self.axis_neuron = int(axis_neuron)
        self.dim_emb = neuron[-1]
        if self.axis_neuron > self.dim_emb:
            raise MtcoreError(f"model/descriptor: axis_neuron ({axis_neuron}) exceeds the last neuron ({self.dim_emb})")
        self.type_one_side = bool(type_one_side)
        self.stripped = bool(stripped_type_embedding)
        self.smooth = bool(smooth_type_embdding)
        self.attn_dotr = bool(attn_dotr)
        self.attn_mask = bool(attn_mask)
        self.set_davg_zero = bool(set_davg_zero)
        self.dtype = dtype_of(precision)
        self.register_buffer("sel", torch.tensor([self.nnei], dtype=torch.long))
        self.register_buffer("excluded", exclusion_matrix(ntypes, exclude_types or []))
        self.register_buffer("davg", torch.zeros(ntypes, 4, dtype=self.dtype))
        self.register_buffer("dstd", torch.ones(ntypes, 4, dtype=self.dtype))
        gen = new_generator(seed)
        te_seed = type_embedding.get("seed")
        if te_seed is None and seed is not None:
            te_seed = int(seed) + 1  # reproducible with the descriptor's seed
        self.type_embedding = TypeEmbedding(
            ntypes,
            list(type_embedding["neuron"]),
            type_embedding["activation_function"],
            bool(type_embedding["resnet_dt"]),
            dtype_of(type_embedding["precision"]),
            new_generator(te_seed),
        )
        self.dim_tebd = self.type_embedding.dim
        pair_width = self.dim_tebd if self.type_one_side else 2 * self.dim_tebd
        if self.stripped:
            self.net = EmbeddingNet(1, neuron, activation_function, resnet_dt, self.dtype, gen)
            self.type_net = EmbeddingNet(pair_width, neuron, activation_function, resnet_dt, self.dtype, gen)
        else:
            self.net = EmbeddingNet(1 + pair_width, neuron, activation_function, resnet_dt, self.dtype, gen)
            self.type_net = EmbeddingNet(0, [], activation_function, resnet_dt, self.dtype, gen)  # unused
        self.layers = nn.ModuleList([AttentionLayer(self.dim_emb, int(attn), self.dtype, gen) for _ in range(attn_layer)])
        self.layout_buckets: int = LAYOUT_BUCKETS
        self.bucket_atoms: int = BUCKET_ATOMS
        for name, p in self.named_parameters():
            if not name.startswith("type_embedding."):
                p.requires_grad_(bool(trainable))
        for p in self.type_embedding.parameters():
            p.requires_grad_(bool(type_embedding["trainable"]))

    def get_rcut(self) -> float:
        return self.rcut

    def get_ntypes(self) -> int:
        return self.ntypes

    def get_dim_out(self) -> int:
        return self.dim_emb * self.axis_neuron

    def get_dim_rot(self) -> int:
        return self.dim_emb

    def get_dim_type_embedding(self) -> int:
        return self.dim_tebd

    def _pairs(
        self, coord: torch.Tensor, atype: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor, shift: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kept pairs (nearest sel of any type, exclusions and virtual atoms removed) and their
        un-normalised rows; ``atype`` has virtual atoms mapped to ntypes."""
        return kept_rows(coord, atype, center, neighbor, shift, self.rcut, self.rcut_smth, self.sel, self.excluded,
                         self.ntypes + 1, True, False, self.dtype)

    def _extended_types(self, atype: torch.Tensor) -> torch.Tensor:
        return torch.where(atype >= 0, atype, torch.full_like(atype, self.ntypes))

    @torch.jit.unused
    def compute_input_stats(self, samples: List[StatSample]) -> None:
        def rows_of(coord, atype, center, neighbor, shift):
            return self._pairs(coord, self._extended_types(atype), center, neighbor, shift)

        davg, dstd = env_statistics(samples, rows_of, self.ntypes, self.nnei, self.rcut, False, self.set_davg_zero)
        self.davg.copy_(davg.to(self.dtype))
        self.dstd.copy_(dstd.to(self.dtype))

    @torch.jit.unused
    def compressible_embeddings(self, min_distance: float) -> List[EmbeddingInput]:
        """Stripped type embedding only: ``net`` takes normalised s(r) alone (the type net runs once
        per type pair and stays); otherwise the net also takes the type embedding: not tabulable."""
        if not self.stripped:
            raise MtcoreError("se_atten: only stripped type embedding (stripped_type_embedding true, or se_atten_v2) "
                              "can be compressed; this embedding net also takes the type embedding as input")
        lower, upper = normalised_s_range(self.davg, self.dstd, list(range(self.ntypes)), min_distance,
                                          self.rcut_smth, self.rcut)
        return [EmbeddingInput("net", lower, upper, "normalised s(r), any type pair")]

    def _smooth_weight(self, s: torch.Tensor) -> torch.Tensor:
        """w = clip(1 - (1 - rcut_smth·s)³, 0, 1): 1 inside rcut_smth, 0 at rcut and for empty slots."""
        v = 1.0 - self.rcut_smth * s
        return (1.0 - v * v * v).clamp(0.0, 1.0)

    def _type_rows(self, table: torch.Tensor, tj: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        """Type part of a pair's embedding input: [T[t_j], T[t_i]] (or T[t_j] one-sided)."""
        if self.type_one_side:
            return table.index_select(0, tj)
        return torch.cat([table.index_select(0, tj), table.index_select(0, ti)], dim=1)

    def _embed(
        self, s_norm: torch.Tensor, s_raw: torch.Tensor, tj: torch.Tensor, ti: torch.Tensor, table: torch.Tensor
    ) -> torch.Tensor:
        """G⁰ of real pairs, [P, M]."""
        if not self.stripped:
            return self.net(torch.cat([s_norm, self._type_rows(table, tj, ti)], dim=1))
        g = self.net(s_norm)
        # the type net runs once per (centre type, neighbour type) combination, not per pair
        nt1 = self.ntypes + 1
        if self.type_one_side:
            tau = self.type_net(table).index_select(0, tj)
        else:
            nei = torch.arange(nt1, device=tj.device).repeat(self.ntypes)
            cen = torch.arange(self.ntypes, device=tj.device).repeat_interleave(nt1)
            tau = self.type_net(self._type_rows(table, nei, cen)).index_select(0, ti * nt1 + tj)
        if self.smooth:
            tau = tau * self._smooth_weight(s_raw)
        return g * tau + g

    def _empty_slot(self, table: torch.Tensor) -> torch.Tensor:
        """R̃_padᵀ G^L_pad per centre type, [ntypes, 4, M]."""
        pad = padding_rows(self.davg, self.dstd)  # [nt, 4]
        centre = torch.arange(self.ntypes, device=pad.device)
        empty = torch.full_like(centre, self.ntypes)
        if self.stripped:
            g = self.net(pad[:, 0:1])
            if self.smooth:
                emb = g  # w = 0 for an empty slot
            else:
                emb = g * self.type_net(self._type_rows(table, empty, centre)) + g
        else:
            emb = self.net(torch.cat([pad[:, 0:1], self._type_rows(table, empty, centre)], dim=1))
        for layer in self.layers:
            emb = layer.empty_slot(emb)
        return pad.unsqueeze(2) * emb.unsqueeze(1)

    def _attention_masks(
        self, rows_pad: torch.Tensor, w_pad: torch.Tensor, counts: torch.Tensor, extra: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """What every attention layer shares in one layout: logit bias, smooth row weights, softmax
        gate. ``w_pad`` [n, m, 1]: the smooth weights laid out (smooth only); ``counts``: each
        atom's real neighbours; ``extra`` > 0: the last column stands for that many empty slots
        (smooth only)."""
        natoms, width = rows_pad.shape[0], rows_pad.shape[1]
        device = rows_pad.device
        dummy = torch.zeros(1, 1, 1, dtype=self.dtype, device=device)
        row_weight = dummy
        gate = dummy
        use_gate = False
        if self.smooth:
            w = w_pad
            pair_weight = w * w.transpose(1, 2)
            row_weight = torch.stack([w, w, torch.ones_like(w)], dim=2)  # scales q, k; not v
            bias = 20.0 * pair_weight - 20.0
            if extra > 0:
                last = torch.zeros(width, dtype=self.dtype, device=device)
                last[width - 1] = math.log(float(extra))
                bias = bias + last
            gate = pair_weight
            use_gate = True
        else:
            real = torch.arange(width, device=device).unsqueeze(0) < counts.unsqueeze(1)  # [n, m]
            bias = torch.zeros(natoms, 1, width, dtype=self.dtype, device=device)
            bias = bias.masked_fill(~real.unsqueeze(1), -8589934592.0)  # -2³³ on empty keys
        if self.attn_dotr:
            rhat = unit_rows(rows_pad[:, :, 1:4])
            rr = torch.bmm(rhat, rhat.transpose(1, 2))
            gate = gate * rr if use_gate else rr
            use_gate = True
        if self.attn_mask:
            off = 1.0 - torch.eye(width, dtype=self.dtype, device=device)
            gate = gate * off if use_gate else off.unsqueeze(0)
            use_gate = True
        return bias, row_weight, gate, use_gate

    def _layout(self, counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[int], List[int], int]:
        """Atoms in buckets of similar neighbour counts, each padded to its own widest atom.

        Attention costs [atoms × width²]: one layout for all atoms pads every atom to the widest
        (water, 192 atoms: 80-101 neighbours, a quarter of the work on padding); up to
        ``layout_buckets`` buckets of at least ``bucket_atoms`` atoms, sorted by count, pad each to
        its own. Returns (atoms in layout order, each atom's first row in the flat layout, bucket
        bounds in layout order, widths, extra empty slots per bucket, rows in all)."""
        natoms = counts.shape[0]
        buckets = 1 if len(self.layers) == 0 else max(1, min(self.layout_buckets, natoms // self.bucket_atoms))
        order = torch.argsort(counts, stable=True)
        sorted_counts = counts.index_select(0, order)
        bounds: List[int] = [natoms * b // buckets for b in range(buckets + 1)]
        widths: List[int] = []
        extras: List[int] = []
        starts: List[torch.Tensor] = []
        offset = 0
        for b in range(buckets):
            lo, hi = bounds[b], bounds[b + 1]
            widest = max(int(sorted_counts[hi - 1]), 1) if hi > lo else 1
            extra = self.nnei - widest if self.smooth and self.nnei > widest and len(self.layers) > 0 else 0
            width = widest + 1 if extra > 0 else widest  # one more column stands for the slots not laid out
            starts.append(offset + torch.arange(hi - lo, device=counts.device) * width)
            offset += (hi - lo) * width
            widths.append(width)
            extras.append(extra)
        first_row = torch.empty_like(order).index_copy_(0, order, torch.cat(starts))
        return order, first_row, bounds, widths, extras, offset

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        center: torch.Tensor,
        neighbor: torch.Tensor,
        shift: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        natoms = coord.shape[0]
        atype = self._extended_types(atype)
        real_atom = atype < self.ntypes
        ti_atom = torch.where(real_atom, atype, torch.zeros_like(atype))
        table = self.type_embedding().to(self.dtype)
        keep, rows = self._pairs(coord, atype, center, neighbor, shift)
        center = center.index_select(0, keep)
        ti = atype.index_select(0, center)
        tj = atype.index_select(0, neighbor.index_select(0, keep))
        normed = (rows - self.davg.index_select(0, ti)) / self.dstd.index_select(0, ti)
        emb = self._embed(normed[:, 0:1], rows[:, 0:1], tj, ti, table)
        slot, counts = neighbor_slots(center, natoms)
        order, first_row, bounds, widths, extras, total = self._layout(counts)
        flat = first_row.index_select(0, center) + slot  # each pair's row in the flat layout
        rows_flat = scatter_rows(normed, flat, total)
        g_flat = scatter_rows(emb, flat, total)
        # smooth weights laid out likewise; without smooth, an unused stand-in of the same shape
        w_flat = scatter_rows(self._smooth_weight(rows[:, 0:1]), flat, total) if self.smooth else rows_flat[:, 0:1]
        sorted_counts = counts.index_select(0, order)
        parts: List[torch.Tensor] = []
        row = 0
        for b in range(len(widths)):
            n, width = bounds[b + 1] - bounds[b], widths[b]
            rows_pad = rows_flat[row : row + n * width].view(n, width, 4)
            g = g_flat[row : row + n * width].view(n, width, self.dim_emb)
            if len(self.layers) > 0:
                w_pad = w_flat[row : row + n * width].view(n, width, 1)
                bias, row_weight, gate, use_gate = self._attention_masks(
                    rows_pad, w_pad, sorted_counts[bounds[b] : bounds[b + 1]], extras[b])
                for layer in self.layers:
                    g = layer(g, bias, row_weight, gate, self.smooth, use_gate)
            parts.append(torch.bmm(rows_pad.transpose(1, 2), g))  # [n, 4, M]
            row += n * width
        rank = torch.empty_like(order).index_copy_(0, order, torch.arange(natoms, device=order.device))
        env = torch.cat(parts, dim=0).index_select(0, rank)
        empty = (self.nnei - counts).to(self.dtype).view(-1, 1, 1)
        env = env + empty * self._empty_slot(table).index_select(0, ti_atom)
        env = env * (real_atom.to(self.dtype) / self.nnei).view(-1, 1, 1)
        descriptor = torch.bmm(env.transpose(1, 2), env[:, :, : self.axis_neuron]).reshape(natoms, -1)
        return {
            "descriptor": descriptor,
            "rot_mat": env[:, 1:4, :].transpose(1, 2),
            "type_embedding": table.index_select(0, atype),
        }


def arguments(ctx: SchemaContext, v2: bool = False) -> list[Argument]:
    args = [
        Argument("sel", [int, list, str], optional=True, default="auto", doc="total slots (a list is summed), or 'auto'/'auto:f'"),
        Argument("rcut", float, optional=True, default=6.0, doc="cut-off radius (Å)"),
        Argument("rcut_smth", float, optional=True, default=0.5, doc="where the smooth switch starts (Å)"),
        Argument("neuron", list, optional=True, default=[10, 20, 40], doc="embedding net widths"),
        Argument("axis_neuron", int, optional=True, default=4, alias=["n_axis_neuron"], doc="columns of G kept for the axis"),
        Argument("activation_function", str, optional=True, default="tanh"),
        Argument("resnet_dt", bool, optional=True, default=False, doc="trainable timestep on residual connections"),
        Argument("type_one_side", bool, optional=True, default=False, doc="embedding input without the centre's type"),
        Argument("precision", str, optional=True, default="default"),
        Argument("trainable", bool, optional=True, default=True),
        Argument("seed", [int, None], optional=True, default=None),
        Argument("exclude_types", list, optional=True, default=[], doc="type pairs that do not interact"),
        Argument("attn", int, optional=True, default=128, doc="width of queries, keys and values"),
        Argument("attn_layer", int, optional=True, default=2, doc="number of attention layers"),
        Argument("attn_dotr", bool, optional=True, default=True, doc="gate attention weights with r̂_j·r̂_k"),
        Argument("attn_mask", bool, optional=True, default=False, doc="zero the attention of a neighbour on itself"),
    ]
    if not v2:
        args += [
            Argument("stripped_type_embedding", bool, optional=True, default=False,
                     doc="embed distance and type pair with separate nets (G = g ⊙ τ + g)"),
            Argument("smooth_type_embdding", bool, optional=True, default=False,
                     doc="switch-weighted attention and type embedding: smooth at rcut (key spelled as in DeePMD-kit)"),
        ]
    args.append(Argument("set_davg_zero", bool, optional=True, default=not v2))
    return args


def arguments_v2(ctx: SchemaContext) -> list[Argument]:
    return arguments(ctx, v2=True)


def total_sel(sel: Union[int, list, str]) -> int:
    if isinstance(sel, str):
        raise MtcoreError(f"model/descriptor/sel is '{sel}': it is resolved from the training data before the model is built")
    return int(sel) if isinstance(sel, int) else sum(int(s) for s in sel)


def update_sel(params: dict, stat: NeighborStat) -> dict:
    out = dict(params)
    out["sel"] = resolve_sel(params["sel"], params["rcut"], stat, stat.ntypes, True, "model/descriptor")
    return out


def build(params: dict, ctx: DescriptorContext) -> DescrptSeAtten:
    if not ctx.type_map:
        raise MtcoreError("model/type_map: is not set or empty; se_atten needs it")
    kwargs = {k: v for k, v in params.items() if k != "type"}
    if params["type"] == "se_atten_v2":
        kwargs.update(stripped_type_embedding=True, smooth_type_embdding=True)
    kwargs["sel"] = total_sel(params["sel"])
    if not kwargs.get("set_davg_zero", True) and not (
        kwargs.get("stripped_type_embedding") and kwargs.get("smooth_type_embdding")
    ):
        warnings.warn(
            "model/descriptor: set_davg_zero false without stripped and smooth type embedding makes the energy "
            "discontinuous at rcut (as in DeePMD-kit)",
            stacklevel=2,
        )
    type_embedding = ctx.type_embedding if ctx.type_embedding is not None else AUTO_TYPE_EMBEDDING
    return DescrptSeAtten(ntypes=ctx.ntypes, type_embedding=type_embedding, **kwargs)


@hookimpl
def mtcore_descriptors() -> list[DescriptorRegistration]:
    return [
        DescriptorRegistration(name="se_atten", arguments=arguments, build=build, update_sel=update_sel, doc=DOC),
        DescriptorRegistration(name="se_atten_v2", arguments=arguments_v2, build=build, update_sel=update_sel, doc=DOC_V2),
    ]
