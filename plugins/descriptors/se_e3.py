"""se_e3 (aliases se_at, se_a_3be, se_t): three-body embedding of neighbour-pair angles (DeePMD-kit se_e3).

Per atom i (type t_i), with the angular part of the normalised environment row of each of its
nearest ``sel[t]`` neighbours of type t, e_j = (R_j[1:4] - davg[t_i, 1:4]) / dstd[t_i, 1:4]
(= s(r_ij)·r̂_ij / dstd, since davg's angular columns are 0 by construction; see
:mod:`mtcore.model.env`), and for each pair of neighbour-type blocks p ≤ q:

    θ_jk = e_j · e_k                                   j in block p, k in block q
    D_i  = Σ_{p≤q} 1/(sel_p·sel_q) Σ_{j∈p} Σ_{k∈q} θ_jk · N_{p,q}(θ_jk)     ∈ R^M

with one embedding net N_{p,q} per unordered block pair, shared by all centre types. The
normaliser 1/(sel_p·sel_q) counts every slot (DeePMD-kit's code). An empty slot has e = 0
(0 - 0 over dstd), so θ = 0 and θ·N(θ) = 0 for every term it enters: empty slots contribute
nothing and are never computed. Only real neighbour pairs are: for p = q the sum is symmetric
in (j, k), so it runs over j ≤ k with weight 2 off the diagonal, which halves those blocks.
Excluded (centre, neighbour) type pairs are dropped like empty slots. No rotation matrix.

Layout: per neighbour type, e sits in a zero-padded [atoms, largest count, 3] tensor; one batched
matmul per block pair gives every θ_jk, of which only the real (j, k) pairs are gathered and fed
to the net, and the weighted terms are summed per atom with one index_add.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from dargs import Argument
from torch import nn

from mtcore.hookspecs import DescriptorContext, DescriptorRegistration, SchemaContext, hookimpl
from mtcore.model.descriptor import Descriptor, EmbeddingInput, StatSample
from mtcore.model import table_contraction
from mtcore.model.env import env_statistics, kept_rows
from mtcore.model.mlp import EmbeddingNet, dtype_of, new_generator
from mtcore.model.tabulate import angular_product_range
from mtcore_builtins.descriptors._common import check_rcut, checked_sel, exclusion_matrix, update_sel_per_type

#: the plugin API this module was written for (mtcore.hookspecs: versions)
MTCORE_PLUGIN_API = 2

DOC = "Smooth three-body embedding of the angles between pairs of neighbours."


class DescrptSeT(Descriptor):
    def __init__(
        self,
        ntypes: int,
        sel: List[int],
        rcut: float = 6.0,
        rcut_smth: float = 0.5,
        neuron: Optional[List[int]] = None,
        activation_function: str = "tanh",
        resnet_dt: bool = False,
        precision: str = "default",
        trainable: bool = True,
        seed: Optional[int] = None,
        exclude_types: Optional[list] = None,
        set_davg_zero: bool = False,
    ):
        super().__init__()
        neuron = list(neuron or [10, 20, 40])
        self.ntypes = ntypes
        self.rcut = float(rcut)
        self.rcut_smth = float(rcut_smth)
        check_rcut(self.rcut, self.rcut_smth, "model/descriptor[se_e3]")
        self.sel_list: List[int] = checked_sel(sel, ntypes, "model/descriptor[se_e3]")
        self.nnei = sum(self.sel_list)
        self.dim_emb = neuron[-1]
        self.set_davg_zero = bool(set_davg_zero)
        self.dtype = dtype_of(precision)
        self.register_buffer("sel", torch.tensor(self.sel_list, dtype=torch.long))
        self.register_buffer("excluded", exclusion_matrix(ntypes, exclude_types or []))
        self.register_buffer("davg", torch.zeros(ntypes, 4, dtype=self.dtype))
        self.register_buffer("dstd", torch.ones(ntypes, 4, dtype=self.dtype))
        gen = new_generator(seed)
        nets = []
        self.block_p: List[int] = []
        self.block_q: List[int] = []
        self.block_scale: List[float] = []
        for p in range(ntypes):
            for q in range(p, ntypes):
                nets.append(EmbeddingNet(1, neuron, activation_function, resnet_dt, self.dtype, gen))
                self.block_p.append(p)
                self.block_q.append(q)
                self.block_scale.append(1.0 / max(1, self.sel_list[p] * self.sel_list[q]))
        self.nets = nn.ModuleList(nets)
        for prm in self.parameters():
            prm.requires_grad_(bool(trainable))

    def get_rcut(self) -> float:
        return self.rcut

    def get_ntypes(self) -> int:
        return self.ntypes

    def get_dim_out(self) -> int:
        return self.dim_emb

    def get_dim_rot(self) -> int:
        return 0

    def _rows(
        self, coord: torch.Tensor, atype: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor, shift: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kept pairs and their un-normalised full rows [P, 4]."""
        return kept_rows(coord, atype, center, neighbor, shift, self.rcut, self.rcut_smth, self.sel, self.excluded,
                         self.ntypes, False, False, self.dtype)

    @torch.jit.unused
    def compute_input_stats(self, samples: List[StatSample]) -> None:
        davg, dstd = env_statistics(samples, self._rows, self.ntypes, self.nnei, self.rcut, False, self.set_davg_zero)
        self.davg.copy_(davg.to(self.dtype))
        self.dstd.copy_(dstd.to(self.dtype))

    @torch.jit.unused
    def compressible_embeddings(self, min_distance: float) -> List[EmbeddingInput]:
        """Every net takes θ = e_j·e_k of its block pair, any centre type (mtcore compress)."""
        lower, upper = angular_product_range(self.davg, self.dstd, min_distance, self.rcut_smth, self.rcut)
        return [EmbeddingInput(f"nets.{b}", lower, upper, f"angular product θ of neighbour types ({p}, {q})")
                for b, (p, q) in enumerate(zip(self.block_p, self.block_q))]

    def _block_pairs(
        self, counts: torch.Tensor, p: int, q: int, mp: int, mq: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (j in block p, k in block q) pairs of real neighbours of every atom, as flat
        indices into an [n, mp, mq] layout; for p = q only j ≤ k, with weight 2 off the diagonal.

        Returns (flat index, owner atom, weight), one entry per neighbour pair (weight: p = q only)."""
        device = counts.device
        ar_p = torch.arange(mp, device=device)
        ar_q = torch.arange(mq, device=device)
        valid_p = ar_p.unsqueeze(0) < counts[:, p : p + 1]  # [n, mp]
        valid_q = ar_q.unsqueeze(0) < counts[:, q : q + 1]  # [n, mq]
        mask = valid_p.unsqueeze(2) & valid_q.unsqueeze(1)  # [n, mp, mq]
        if p == q:
            mask = mask & (ar_p.unsqueeze(1) <= ar_q.unsqueeze(0)).unsqueeze(0)
        flat = torch.nonzero(mask.reshape(-1)).squeeze(1)
        owner = torch.div(flat, mp * mq, rounding_mode="floor")
        weight = torch.ones(0, dtype=torch.float64, device=device)  # p ≠ q: every pair counts once
        if p == q:
            rest = flat - owner * (mp * mq)
            j = torch.div(rest, mq, rounding_mode="floor")
            weight = 2.0 - (rest == j * (mq + 1)).to(torch.float64)  # k = rest - j·mq equals j
        return flat, owner, weight

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        center: torch.Tensor,
        neighbor: torch.Tensor,
        shift: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        natoms = coord.shape[0]
        keep, rows = self._rows(coord, atype, center, neighbor, shift)
        center = center.index_select(0, keep)
        ti = atype.index_select(0, center)
        tj = atype.index_select(0, neighbor.index_select(0, keep))
        ang = (rows[:, 1:] - self.davg.index_select(0, ti)[:, 1:]) / self.dstd.index_select(0, ti)[:, 1:]
        # kept pairs are sorted by (centre, neighbour type): the slot of a pair is its rank in its block
        key = center * self.ntypes + tj
        counts = torch.bincount(key, minlength=natoms * self.ntypes)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(key.shape[0], device=key.device) - starts.index_select(0, key)
        counts = counts.view(natoms, self.ntypes)
        maxc: List[int] = counts.max(0).values.tolist() if natoms > 0 else [0] * self.ntypes
        # e_j in a zero-padded [n, max count, 3] layout per neighbour type (padding: e = 0)
        blocks: List[torch.Tensor] = []
        for t in range(self.ntypes):
            width = max(1, maxc[t])
            idx = torch.nonzero(tj == t).squeeze(1)
            pos = center.index_select(0, idx) * width + slot.index_select(0, idx)
            padded = torch.zeros(natoms * width, 3, dtype=ang.dtype, device=ang.device)
            blocks.append(padded.index_put((pos,), ang.index_select(0, idx)).view(natoms, width, 3))
        out = torch.zeros(natoms, self.dim_emb, dtype=self.dtype, device=coord.device)
        for b, net in enumerate(self.nets):
            p, q = self.block_p[b], self.block_q[b]
            if maxc[p] > 0 and maxc[q] > 0:
                flat, owner, weight = self._block_pairs(counts, p, q, maxc[p], maxc[q])
                theta = torch.bmm(blocks[p], blocks[q].transpose(1, 2)).reshape(-1).index_select(0, flat).unsqueeze(1)
                if p == q:
                    factor = theta * (weight.to(self.dtype) * self.block_scale[b]).unsqueeze(1)
                else:
                    factor = theta * self.block_scale[b]
                if not torch.jit.is_scripting():
                    summed = self._tabulated_sum(net, theta, factor, owner, natoms)
                    if summed is not None:
                        out = out + summed.squeeze(1)  # [natoms, 1, M]
                        continue
                emb = net(theta)  # [L, M]
                out = out.index_add(0, owner, factor * emb)
        return {"descriptor": out}

    @torch.jit.unused
    def _tabulated_sum(self, net: nn.Module, theta: torch.Tensor, factor: torch.Tensor, owner: torch.Tensor,
                       natoms: int) -> Optional[torch.Tensor]:
        """A compressed net (a table) called eagerly: Σ per atom of factor·G(θ) in one C loop
        with its forces' gradient, no [triplets × M] tensor (mtcore.model.table_contraction;
        ``owner`` is ascending); None elsewhere."""
        rows = torch.arange(theta.shape[0], device=theta.device)
        return table_contraction.contract([net], theta, [(0, theta.shape[0])], factor, owner, rows, natoms)


def arguments(ctx: SchemaContext) -> list[Argument]:
    return [
        Argument("sel", [list, str], optional=True, default="auto", doc="slots per neighbour type, or 'auto'/'auto:f'"),
        Argument("rcut", float, optional=True, default=6.0, doc="cut-off radius (Å)"),
        Argument("rcut_smth", float, optional=True, default=0.5, doc="where the smooth switch starts (Å)"),
        Argument("neuron", list, optional=True, default=[10, 20, 40], doc="embedding net widths"),
        Argument("activation_function", str, optional=True, default="tanh"),
        Argument("resnet_dt", bool, optional=True, default=False, doc="trainable timestep on residual connections"),
        Argument("precision", str, optional=True, default="default"),
        Argument("trainable", bool, optional=True, default=True),
        Argument("seed", [int, None], optional=True, default=None),
        Argument(
            "exclude_types", list, optional=True, default=[],
            doc="type pairs that do not interact (an mtcore extension: DeePMD-kit v2's se_e3 has no such key)",
        ),
        Argument("set_davg_zero", bool, optional=True, default=False),
    ]


def build(params: dict, ctx: DescriptorContext) -> DescrptSeT:
    kwargs = {k: v for k, v in params.items() if k != "type"}
    return DescrptSeT(ntypes=ctx.ntypes, **kwargs)


@hookimpl
def mtcore_descriptors() -> list[DescriptorRegistration]:
    return [
        DescriptorRegistration(
            name="se_e3",
            aliases=("se_at", "se_a_3be", "se_t"),
            arguments=arguments,
            build=build,
            update_sel=update_sel_per_type,
            doc=DOC,
        )
    ]
