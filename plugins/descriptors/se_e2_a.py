"""se_e2_a (alias se_a): two-body embedding of the full environment matrix (DeePMD-kit DeepPot-SE).

Per atom i, with normalised rows R̃_j (see :mod:`mtcore.model.env`) of its nearest ``sel[t]``
neighbours of each type t and embedding G_j = N_{t_i,t_j}(R̃_j0) ∈ R^M:

    A_i = (1/N_c) Σ_slots R̃_jᵀ G_j ∈ R^{4×M},   D_i = A_iᵀ A_i[:, :axis_neuron],   Q_i = A_i[1:4]ᵀ

N_c = Σ sel counts every slot; the empty slots' constant rows are added in closed form, so the
nets only ever run on real neighbours (no work on padding). The sum over neighbours runs as C
loops over the real pairs (mtcore.model.pair_contraction) in eager mode, and as one batched
matrix product over a [atoms × max neighbours] layout in a frozen (TorchScript) model.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from dargs import Argument
from torch import nn

from mtcore.errors import MtcoreError
from mtcore.hookspecs import DescriptorContext, DescriptorRegistration, SchemaContext, hookimpl
from mtcore.model.descriptor import Descriptor, EmbeddingInput, StatSample
from mtcore.model.env import env_statistics, group_slices, kept_rows, padded_positions, padding_rows, scatter_padded
from mtcore.model import pair_contraction, row_blocks
from mtcore.model.mlp import EmbeddingNet, dtype_of, new_generator
from mtcore_builtins.descriptors._common import (check_rcut, contract_taking_tangent, embed_type_groups, exclusion_matrix,
                                                 type_group_embeddings, update_sel_per_type)

#: the plugin API this module was written for (mtcore.hookspecs: versions)
MTCORE_PLUGIN_API = 2

DOC = "Smooth two-body embedding of the full (radial and angular) environment matrix."


class DescrptSeA(Descriptor):
    def __init__(
        self,
        ntypes: int,
        sel: List[int],
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
        set_davg_zero: bool = False,
    ):
        super().__init__()
        neuron = list(neuron or [10, 20, 40])
        self.ntypes = ntypes
        self.rcut = float(rcut)
        self.rcut_smth = float(rcut_smth)
        self.sel_list: List[int] = [int(s) for s in sel]
        self.nnei = sum(self.sel_list)
        self.axis_neuron = int(axis_neuron)
        self.dim_emb = neuron[-1]
        if self.dim_emb > 0 and not 0 < self.axis_neuron <= self.dim_emb:
            raise MtcoreError(f"model/descriptor/axis_neuron: {axis_neuron} must be between 1 and the last neuron ({self.dim_emb})")
        check_rcut(rcut, rcut_smth, "model/descriptor")
        self.type_one_side = bool(type_one_side)
        self.set_davg_zero = bool(set_davg_zero)
        self.dtype = dtype_of(precision)
        self.register_buffer("sel", torch.tensor(self.sel_list, dtype=torch.long))
        self.register_buffer("excluded", exclusion_matrix(ntypes, exclude_types or []))
        self.register_buffer("davg", torch.zeros(ntypes, 4, dtype=self.dtype))
        self.register_buffer("dstd", torch.ones(ntypes, 4, dtype=self.dtype))
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
        return self.dim_emb * self.axis_neuron

    def get_dim_rot(self) -> int:
        return self.dim_emb

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
        """Every net takes normalised s(r) of its (centre, neighbour) type group (mtcore compress)."""
        return type_group_embeddings(self, min_distance)

    def _embed(self, s: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding of every pair, grouped by net; returns (G in group order, that order)."""
        order, offsets = group_slices(key, self.ngroups)
        s_sorted = s.index_select(0, order)
        if not torch.jit.is_scripting():
            together = self._embed_together(s_sorted, offsets)
            if together is not None:
                return together, order
        parts: List[torch.Tensor] = []
        for k, net in enumerate(self.nets):
            g = self.net_groups[k]
            lo, hi = offsets[g], offsets[g + 1]
            if hi > lo:
                parts.append(net(s_sorted[lo:hi]))
        if len(parts) == 0:
            return torch.zeros(0, self.dim_emb, dtype=s.dtype, device=s.device), order
        if not torch.jit.is_scripting():
            return self._join(parts), order
        return torch.cat(parts, dim=0), order

    @torch.jit.unused
    def _embed_together(self, s_sorted: torch.Tensor, offsets: List[int]) -> Optional[torch.Tensor]:
        """In force training, all nets in one fused Function writing one G (tangent_embedding)."""
        return embed_type_groups(self.nets, self.net_groups, s_sorted, offsets)

    @torch.jit.unused
    def _join(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """torch.cat, with a derivative of its derivative that is one pass (mtcore.model.row_blocks)."""
        return row_blocks.join_rows(parts)

    def _contract(
        self, rows: torch.Tensor, emb: torch.Tensor, center: torch.Tensor, order: torch.Tensor, natoms: int
    ) -> torch.Tensor:
        """Σ over each atom's real pairs of R̃ᵀG, [n, 4, M]: C loops over the pairs in eager
        mode (mtcore.model.pair_contraction), one batched product over a padded layout when scripted."""
        if not torch.jit.is_scripting():
            fused = self._contract_pairs(rows, emb, center, order, natoms)
            if fused is not None:
                return fused
        positions, maxnn = padded_positions(center, natoms)
        rows_pad = scatter_padded(rows, positions, natoms, maxnn)
        emb_pad = scatter_padded(emb, positions.index_select(0, order), natoms, maxnn)
        return torch.bmm(rows_pad.transpose(1, 2), emb_pad)

    @torch.jit.unused
    def _contract_pairs(
        self, rows: torch.Tensor, emb: torch.Tensor, center: torch.Tensor, order: torch.Tensor, natoms: int
    ) -> Optional[torch.Tensor]:
        return pair_contraction.contract(rows, emb, center, order, natoms)

    @torch.jit.unused
    def _embed_and_contract(
        self, normed: torch.Tensor, key: torch.Tensor, center: torch.Tensor, natoms: int
    ) -> Optional[torch.Tensor]:
        """In force training, the nets and the contraction as one path that takes the nets'
        derivative in s inside the contraction (_common.contract_taking_tangent); None elsewhere."""
        return contract_taking_tangent(self, normed, normed[:, 0:1], key, center, natoms)

    def _padding_term(self, atype: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Σ over empty slots of R̃_padᵀ G(R̃_pad), per atom: [n, 4, M]."""
        pad = padding_rows(self.davg, self.dstd)  # [nt, 4]
        table = torch.zeros(self.ntypes, self.ntypes, 4, self.dim_emb, dtype=self.dtype, device=pad.device)
        for k, net in enumerate(self.nets):
            g = self.net_groups[k]
            if self.type_one_side:
                tj = g
                emb = net(pad[:, 0:1])  # [nt(ti), M]
                value = pad.unsqueeze(2) * emb.unsqueeze(1)  # [nt, 4, M]
                allowed = (~self.excluded[:, tj]).to(self.dtype).view(-1, 1, 1)
                table = table.index_put(
                    (torch.arange(self.ntypes, device=pad.device), torch.full((self.ntypes,), tj, device=pad.device)),
                    value * allowed,
                )
            else:
                ti, tj = g // self.ntypes, g % self.ntypes
                emb = net(pad[ti : ti + 1, 0:1])  # [1, M]
                value = pad[ti].unsqueeze(1) * emb  # [4, M]
                table = table.index_put(
                    (torch.tensor([ti], device=pad.device), torch.tensor([tj], device=pad.device)), value.unsqueeze(0)
                )
        empty = (self.sel.unsqueeze(0) - counts).to(self.dtype)  # [n, nt]
        return torch.einsum("nt,ntcm->ncm", empty, table.index_select(0, atype))

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
        fused: Optional[torch.Tensor] = None
        if not torch.jit.is_scripting():
            fused = self._embed_and_contract(normed, key, center, natoms)
        if fused is None:
            emb, order = self._embed(normed[:, 0:1], key)
            env = self._contract(normed, emb, center, order, natoms)  # [n, 4, M]
        else:
            env = fused
        counts = torch.bincount(center * self.ntypes + tj, minlength=natoms * self.ntypes).view(natoms, self.ntypes)
        env = (env + self._padding_term(atype, counts)) / self.nnei
        descriptor = torch.bmm(env.transpose(1, 2), env[:, :, : self.axis_neuron]).reshape(natoms, -1)
        return {"descriptor": descriptor, "rot_mat": env[:, 1:4, :].transpose(1, 2)}


def arguments(ctx: SchemaContext) -> list[Argument]:
    return [
        Argument("sel", [list, str], optional=True, default="auto", doc="slots per neighbour type, or 'auto'/'auto:f'"),
        Argument("rcut", float, optional=True, default=6.0, doc="cut-off radius (Å)"),
        Argument("rcut_smth", float, optional=True, default=0.5, doc="where the smooth switch starts (Å)"),
        Argument("neuron", list, optional=True, default=[10, 20, 40], doc="embedding net widths"),
        Argument("axis_neuron", int, optional=True, default=4, alias=["n_axis_neuron"], doc="columns of G kept for the axis"),
        Argument("activation_function", str, optional=True, default="tanh"),
        Argument("resnet_dt", bool, optional=True, default=False, doc="trainable timestep on residual connections"),
        Argument("type_one_side", bool, optional=True, default=False, doc="one net per neighbour type only"),
        Argument("precision", str, optional=True, default="default"),
        Argument("trainable", bool, optional=True, default=True),
        Argument("seed", [int, None], optional=True, default=None),
        Argument("exclude_types", list, optional=True, default=[], doc="type pairs that do not interact"),
        Argument("set_davg_zero", bool, optional=True, default=False),
    ]


def build(params: dict, ctx: DescriptorContext) -> DescrptSeA:
    kwargs = {k: v for k, v in params.items() if k != "type"}
    return DescrptSeA(ntypes=ctx.ntypes, **kwargs)


@hookimpl
def mtcore_descriptors() -> list[DescriptorRegistration]:
    return [
        DescriptorRegistration(
            name="se_e2_a", aliases=("se_a",), arguments=arguments, build=build, update_sel=update_sel_per_type, doc=DOC
        )
    ]
