"""se_e2_r (alias se_r): two-body embedding of the radial environment only (DeePMD-kit se_e2_r).

Per atom i (type t_i), with the normalised radial value R̃_j = (s(r_ij) - davg[t_i]) / dstd[t_i]
of each of its nearest ``sel[t]`` neighbours of type t (see :mod:`mtcore.model.env`) and the
embedding G_j = N_{t_i,t_j}(R̃_j) ∈ R^M (N_{t_j} with ``type_one_side``):

    D_i = (1/5) · (1/N_c) Σ_slots G_j ∈ R^M

N_c = Σ sel counts every slot; an empty slot holds R̃ = -davg/dstd and contributes the constant
G(-davg/dstd), which is added in closed form so the nets only run on real neighbours. The 1/5 is
DeePMD-kit's code (its documentation omits it). An excluded (centre, neighbour) type pair
contributes nothing, neither its real neighbours nor its empty slots. There is no rotation matrix.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from dargs import Argument
from torch import nn

from mtcore.hookspecs import DescriptorContext, DescriptorRegistration, SchemaContext, hookimpl
from mtcore.model.descriptor import Descriptor, EmbeddingInput, StatSample
from mtcore.model.env import env_statistics, group_slices, kept_rows, padding_rows
from mtcore.model.mlp import EmbeddingNet, dtype_of, new_generator
from mtcore_builtins.descriptors._common import (check_rcut, checked_sel, contract_taking_tangent, embed_type_groups,
                                                 exclusion_matrix, type_group_embeddings, update_sel_per_type)

#: the plugin API this module was written for (mtcore.hookspecs: versions)
MTCORE_PLUGIN_API = 2

DOC = "Smooth two-body embedding of the radial environment (distances only)."
#: DeePMD-kit's se_e2_r rescales its output by this constant (in the code, not in the docs).
RESCALE = 0.2


class DescrptSeR(Descriptor):
    def __init__(
        self,
        ntypes: int,
        sel: List[int],
        rcut: float = 6.0,
        rcut_smth: float = 0.5,
        neuron: Optional[List[int]] = None,
        activation_function: str = "tanh",
        resnet_dt: bool = False,
        type_one_side: bool = False,
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
        check_rcut(self.rcut, self.rcut_smth, "model/descriptor[se_e2_r]")
        self.sel_list: List[int] = checked_sel(sel, ntypes, "model/descriptor[se_e2_r]")
        self.nnei = sum(self.sel_list)
        self.scale = RESCALE / max(1, self.nnei)  # an attribute: TorchScript cannot read module globals
        self.dim_emb = neuron[-1]
        self.type_one_side = bool(type_one_side)
        self.set_davg_zero = bool(set_davg_zero)
        self.dtype = dtype_of(precision)
        self.register_buffer("sel", torch.tensor(self.sel_list, dtype=torch.long))
        self.register_buffer("excluded", exclusion_matrix(ntypes, exclude_types or []))
        self.register_buffer("davg", torch.zeros(ntypes, 1, dtype=self.dtype))
        self.register_buffer("dstd", torch.ones(ntypes, 1, dtype=self.dtype))
        gen = new_generator(seed)
        nets = []
        groups: List[int] = []
        for group in range(ntypes if self.type_one_side else ntypes * ntypes):
            if not self.type_one_side and bool(self.excluded[group // ntypes, group % ntypes]):
                continue  # an excluded (centre, neighbour) pair has no net and contributes nothing
            nets.append(EmbeddingNet(1, neuron, activation_function, resnet_dt, self.dtype, gen))
            groups.append(group)
        self.nets = nn.ModuleList(nets)
        self.net_groups: List[int] = groups
        self.ngroups = ntypes if self.type_one_side else ntypes * ntypes
        for p in self.parameters():
            p.requires_grad_(bool(trainable))

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
        """Kept pairs and their un-normalised radial rows [P, 1]."""
        return kept_rows(coord, atype, center, neighbor, shift, self.rcut, self.rcut_smth, self.sel, self.excluded,
                         self.ntypes, False, True, self.dtype)

    @torch.jit.unused
    def compute_input_stats(self, samples: List[StatSample]) -> None:
        davg, dstd = env_statistics(samples, self._rows, self.ntypes, self.nnei, self.rcut, True, self.set_davg_zero)
        self.davg.copy_(davg.to(self.dtype))
        self.dstd.copy_(dstd.to(self.dtype))

    @torch.jit.unused
    def compressible_embeddings(self, min_distance: float) -> List[EmbeddingInput]:
        """Every net takes normalised s(r) of its (centre, neighbour) type group (mtcore compress)."""
        return type_group_embeddings(self, min_distance)

    def _real_sum(self, s: torch.Tensor, key: torch.Tensor, center: torch.Tensor, natoms: int) -> torch.Tensor:
        """Σ over each atom's real neighbours of G_j: [n, M]; the nets run group by group."""
        if not torch.jit.is_scripting():
            fused = self._sum_taking_tangent(s, key, center, natoms)
            if fused is not None:
                return fused
        order, offsets = group_slices(key, self.ngroups)
        s_sorted = s.index_select(0, order)
        c_sorted = center.index_select(0, order)
        out = torch.zeros(natoms, self.dim_emb, dtype=s.dtype, device=s.device)
        if not torch.jit.is_scripting():
            together = self._embed_together(s_sorted, offsets)
            if together is not None:
                return out.index_add(0, c_sorted, together)
        for k, net in enumerate(self.nets):
            g = self.net_groups[k]
            lo, hi = offsets[g], offsets[g + 1]
            if hi > lo:
                out = out.index_add(0, c_sorted[lo:hi], net(s_sorted[lo:hi]))
        return out

    @torch.jit.unused
    def _sum_taking_tangent(self, s: torch.Tensor, key: torch.Tensor, center: torch.Tensor,
                            natoms: int) -> Optional[torch.Tensor]:
        """In force training, the sum as se_e2_a's contraction with unit rows
        (_common.contract_taking_tangent): dE/ds comes as one dot product per pair, not from a
        gather of dE/dG to [pairs × M] and its row-dot with dG/ds. None where that path does not
        apply."""
        total = contract_taking_tangent(self, None, s, key, center, natoms)
        return None if total is None else total[:, 0]

    @torch.jit.unused
    def _embed_together(self, s_sorted: torch.Tensor, offsets: List[int]) -> Optional[torch.Tensor]:
        """In force training, all nets in one fused Function writing one G (tangent_embedding)."""
        return embed_type_groups(self.nets, self.net_groups, s_sorted, offsets)

    def _padding_term(self, atype: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Σ over each atom's empty slots of G(-davg/dstd): [n, M]."""
        pad = padding_rows(self.davg, self.dstd)  # [nt, 1]
        table = torch.zeros(self.ntypes, self.ntypes, self.dim_emb, dtype=self.dtype, device=pad.device)
        for k, net in enumerate(self.nets):
            g = self.net_groups[k]
            if self.type_one_side:
                value = net(pad) * (~self.excluded[:, g]).to(self.dtype).unsqueeze(1)  # [nt(ti), M]
                table = table.index_put(
                    (torch.arange(self.ntypes, device=pad.device), torch.full((self.ntypes,), g, device=pad.device)), value
                )
            else:
                ti, tj = g // self.ntypes, g % self.ntypes
                value = net(pad[ti : ti + 1])  # [1, M]
                table = table.index_put((torch.tensor([ti], device=pad.device), torch.tensor([tj], device=pad.device)), value)
        empty = (self.sel.unsqueeze(0) - counts).to(self.dtype)  # [n, nt]
        return torch.bmm(empty.unsqueeze(1), table.index_select(0, atype)).squeeze(1)

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
        normed = (rows - self.davg.index_select(0, ti)) / self.dstd.index_select(0, ti)
        key = tj if self.type_one_side else ti * self.ntypes + tj
        total = self._real_sum(normed, key, center, natoms)
        counts = torch.bincount(center * self.ntypes + tj, minlength=natoms * self.ntypes).view(natoms, self.ntypes)
        total = total + self._padding_term(atype, counts)
        return {"descriptor": total * self.scale}


def arguments(ctx: SchemaContext) -> list[Argument]:
    return [
        Argument("sel", [list, str], optional=True, default="auto", doc="slots per neighbour type, or 'auto'/'auto:f'"),
        Argument("rcut", float, optional=True, default=6.0, doc="cut-off radius (Å)"),
        Argument("rcut_smth", float, optional=True, default=0.5, doc="where the smooth switch starts (Å)"),
        Argument("neuron", list, optional=True, default=[10, 20, 40], doc="embedding net widths"),
        Argument("activation_function", str, optional=True, default="tanh"),
        Argument("resnet_dt", bool, optional=True, default=False, doc="trainable timestep on residual connections"),
        Argument("type_one_side", bool, optional=True, default=False, doc="one net per neighbour type only"),
        Argument("precision", str, optional=True, default="default"),
        Argument("trainable", bool, optional=True, default=True),
        Argument("seed", [int, None], optional=True, default=None),
        Argument("exclude_types", list, optional=True, default=[], doc="type pairs that do not interact"),
        Argument("set_davg_zero", bool, optional=True, default=False),
    ]


def build(params: dict, ctx: DescriptorContext) -> DescrptSeR:
    kwargs = {k: v for k, v in params.items() if k != "type"}
    return DescrptSeR(ntypes=ctx.ntypes, **kwargs)


@hookimpl
def mtcore_descriptors() -> list[DescriptorRegistration]:
    return [
        DescriptorRegistration(
            name="se_e2_r", aliases=("se_r",), arguments=arguments, build=build, update_sel=update_sel_per_type, doc=DOC
        )
    ]
