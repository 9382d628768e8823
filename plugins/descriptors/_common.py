"""Small checks and tables shared by the built-in descriptors (se_e2_a, se_e2_r, se_e3, se_atten).

Kept apart from the descriptor modules so that no plugin module imports another plugin module.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from mtcore.errors import MtcoreError
from mtcore.hookspecs import NeighborStat
from mtcore.model import pair_contraction, table_contraction, table_kernel, tangent_embedding
from mtcore.model.descriptor import EmbeddingInput
from mtcore.model.env import group_slices
from mtcore.model.sel import resolve_sel
from mtcore.model.tabulate import normalised_s_range


def exclusion_matrix(ntypes: int, exclude_types: list) -> torch.Tensor:
    """Symmetric [ntypes, ntypes] bool table of the type pairs that do not interact."""
    excluded = torch.zeros(ntypes, ntypes, dtype=torch.bool)
    for pair in exclude_types:
        if len(pair) != 2 or not all(0 <= int(t) < ntypes for t in pair):
            raise MtcoreError(f"model/descriptor/exclude_types: {pair} is not a pair of type indices below {ntypes}")
        a, b = int(pair[0]), int(pair[1])
        excluded[a, b] = True
        excluded[b, a] = True
    return excluded


def checked_sel(sel: Union[list, int, str], ntypes: int, name: str) -> List[int]:
    """``sel`` as one int per type; "auto" must have been resolved (update_sel) before building."""
    if isinstance(sel, str):
        raise MtcoreError(f"{name}/sel is '{sel}': it is resolved from the training data before the model is built")
    values = [int(sel)] if isinstance(sel, int) else [int(s) for s in sel]
    if len(values) != ntypes:
        raise MtcoreError(f"{name}/sel has {len(values)} entries; expected one per type in type_map ({ntypes})")
    return values


def check_rcut(rcut: float, rcut_smth: float, name: str) -> None:
    if rcut_smth > rcut:
        raise MtcoreError(f"{name}: rcut_smth ({rcut_smth}) should be no more than rcut ({rcut})")


def update_sel_per_type(params: dict, stat: NeighborStat) -> dict:
    """``sel: "auto"`` resolved per neighbour type from the pooled neighbour statistics."""
    out = dict(params)
    out["sel"] = resolve_sel(params["sel"], params["rcut"], stat, stat.ntypes, False, "model/descriptor")
    return out


def _used_blocks(nets: Sequence[torch.nn.Module], net_groups: Sequence[int],
                 offsets: Sequence[int]) -> Tuple[List[torch.nn.Module], List[Tuple[int, int]]]:
    """The nets whose type group has pairs, and each one's rows ``offsets[g]:offsets[g + 1]``."""
    used, bounds = [], []
    for net, g in zip(nets, net_groups):
        if offsets[g + 1] > offsets[g]:
            used.append(net)
            bounds.append((offsets[g], offsets[g + 1]))
    return used, bounds


def embed_type_groups(nets: Sequence[torch.nn.Module], net_groups: Sequence[int], s_sorted: torch.Tensor,
                      offsets: Sequence[int]) -> Optional[torch.Tensor]:
    """G of every pair, net k on the rows ``offsets[g_k]:offsets[g_k + 1]`` of its type group, as
    one fused Function in force training (mtcore.model.tangent_embedding.embed_groups); None where
    that path does not apply (the caller then runs the nets one by one and joins their rows)."""
    used, bounds = _used_blocks(nets, net_groups, offsets)
    return tangent_embedding.embed_groups(used, s_sorted, bounds)


def contract_taking_tangent(descriptor, rows: Optional[torch.Tensor], s: torch.Tensor, key: torch.Tensor,
                            center: torch.Tensor, natoms: int) -> Optional[torch.Tensor]:
    """In force training, Σ over each atom's pairs of rows[p]ᵀ G(s_p) (``rows`` None: unit rows,
    the plain sum of G), [natoms, K, M], with the
    descriptor's type-pair nets (``nets``, ``net_groups``, ``ngroups``) giving G and dG/ds from one
    fused Function (tangent_embedding.embed_group_parts) and the contraction taking the derivative
    in s itself (pair_contraction.contract_with_tangent): the forces and their parameter gradient
    then need no [pairs × M] product beyond dG/ds's own gradient. None where that path does not
    apply (the caller runs the general one)."""
    if not (tangent_embedding.would_fuse(s) and pair_contraction.takes_tangent(s if rows is None else rows)):
        return None
    if rows is None:
        rows = torch.ones_like(s)
    order, offsets = group_slices(key, descriptor.ngroups)
    s_sorted = s.index_select(0, order)
    used, bounds = _used_blocks(descriptor.nets, descriptor.net_groups, offsets)
    # a compressed model: tables and contraction in one C loop, no [pairs × M] tensor at all
    fused = table_contraction.contract(used, s_sorted, bounds, rows, center, order, natoms)
    if fused is not None:
        return fused
    # else the tables' G and dG/ds from their C loop, or the nets' from their fused Function
    parts = table_kernel.value_and_slope(used, s_sorted, bounds) or \
        tangent_embedding.embed_group_parts(used, s_sorted, bounds)
    if parts is None:
        return None
    return pair_contraction.contract_with_tangent(rows, parts[0], parts[1], s_sorted, center, order, natoms)


def type_group_embeddings(descriptor, min_distance: float) -> List[EmbeddingInput]:
    """What ``mtcore compress`` tabulates in se_e2_a and se_e2_r: net k embeds the normalised s(r)
    of type group k (a neighbour type with ``type_one_side``, else a (centre, neighbour) pair), over
    the range the training data's shortest distance allows for the centres that use it."""
    ntypes = descriptor.ntypes
    out: List[EmbeddingInput] = []
    for k, g in enumerate(descriptor.net_groups):
        if descriptor.type_one_side:
            centres = list(range(ntypes))  # the padding term runs it for every centre type
            what = f"normalised s(r) of neighbours of type {g}"
        else:
            centres = [g // ntypes]
            what = f"normalised s(r) of type pair ({g // ntypes}, {g % ntypes})"
        lower, upper = normalised_s_range(descriptor.davg, descriptor.dstd, centres, min_distance,
                                          descriptor.rcut_smth, descriptor.rcut)
        out.append(EmbeddingInput(f"nets.{k}", lower, upper, what))
    return out
