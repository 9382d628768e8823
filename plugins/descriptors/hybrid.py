"""hybrid: several descriptors side by side (DeePMD-kit hybrid).

    D_i = [D_i^(0), D_i^(1), …]                 (concatenated along the feature axis)
    Q_i = [Q_i^(a), Q_i^(b), …] ∈ R^{(Σ M)×3}   over the members a, b, … that have a rotation matrix

Each member is computed exactly as if it were alone: its own rcut, sel, pair selection and
davg/dstd (its statistics come from the same pooled frames). The model's rcut is the largest
member rcut; the core's neighbour list covers it and each member applies its own. Members are
built through the core (``DescriptorContext.build_descriptor``) and validated through the
descriptor variant the schema hands out, so this module never imports another descriptor.

Choices beyond DeePMD-kit v2 (which gives hybrid no rotation matrix): the members' rotation
matrices are concatenated along M so that dipole/polar heads work with a hybrid containing
se_e2_a; a member's type embedding (the first member that has one) is passed on to the heads.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from dargs import Argument
from torch import nn

from mtcore.errors import MtcoreError
from mtcore.hookspecs import DescriptorContext, DescriptorRegistration, NeighborStat, SchemaContext, hookimpl
from mtcore.model.descriptor import Descriptor, StatSample
from mtcore.plugins import get_registry

#: the plugin API this module was written for (mtcore.hookspecs: versions)
MTCORE_PLUGIN_API = 2

DOC = "Concatenation of several descriptors, each with its own cut-off, sel and statistics."
NAME = "hybrid"


class DescrptHybrid(Descriptor):
    def __init__(self, members: List[Descriptor]):
        super().__init__()
        if len(members) == 0:
            raise MtcoreError("model/descriptor[hybrid]/list: needs at least one descriptor")
        ntypes = {m.get_ntypes() for m in members}
        if len(ntypes) != 1:
            raise MtcoreError(f"model/descriptor[hybrid]/list: members disagree on the number of types ({sorted(ntypes)})")
        self.members = nn.ModuleList(members)
        self.ntypes = members[0].get_ntypes()
        self.rcut = max(float(m.get_rcut()) for m in members)
        self.dim_out = sum(int(m.get_dim_out()) for m in members)
        self.dim_rot = sum(int(m.get_dim_rot()) for m in members)
        self.dim_type_embedding = next((int(m.get_dim_type_embedding()) for m in members if m.get_dim_type_embedding()), 0)

    def get_rcut(self) -> float:
        return self.rcut

    def get_ntypes(self) -> int:
        return self.ntypes

    def get_dim_out(self) -> int:
        return self.dim_out

    def get_dim_rot(self) -> int:
        return self.dim_rot

    def get_dim_type_embedding(self) -> int:
        return self.dim_type_embedding

    @torch.jit.unused
    def compute_input_stats(self, samples: List[StatSample]) -> None:
        for member in self.members:
            member.compute_input_stats(samples)

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        center: torch.Tensor,
        neighbor: torch.Tensor,
        shift: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        descriptors: List[torch.Tensor] = []
        rot_mats: List[torch.Tensor] = []
        type_embeddings: List[torch.Tensor] = []
        for member in self.members:
            out = member(coord, atype, center, neighbor, shift)
            descriptors.append(out["descriptor"])
            if "rot_mat" in out:
                rot_mats.append(out["rot_mat"])
            if "type_embedding" in out:
                type_embeddings.append(out["type_embedding"])
        # members may differ in precision; the widest one carries the concatenation
        dtype = descriptors[0].dtype
        for d in descriptors:
            dtype = torch.promote_types(dtype, d.dtype)
        result: Dict[str, torch.Tensor] = {"descriptor": torch.cat([d.to(dtype) for d in descriptors], dim=1)}
        if len(rot_mats) > 0:
            result["rot_mat"] = torch.cat([m.to(dtype) for m in rot_mats], dim=1)
        if len(type_embeddings) > 0:
            result["type_embedding"] = type_embeddings[0]
        return result


def arguments(ctx: SchemaContext) -> list[Argument]:
    member = Argument(
        "list", list, [], [ctx.descriptor_variant([NAME])], repeat=True,
        doc="the member descriptors (any registered type except hybrid), each with its own keys",
    )
    return [member]


def _member_params(params: dict) -> list[dict]:
    members = params.get("list") or []
    if len(members) == 0:
        raise MtcoreError("model/descriptor[hybrid]/list: needs at least one descriptor")
    registry = get_registry()
    for k, member in enumerate(members):
        kind = member.get("type")
        if kind is None:
            raise MtcoreError(f"model/descriptor[hybrid]/list[{k}]: 'type' is missing")
        if registry.canonical("descriptor", kind) == NAME:
            raise MtcoreError(f"model/descriptor[hybrid]/list[{k}]: a hybrid cannot contain another hybrid")
    return members


def update_sel(params: dict, stat: NeighborStat) -> dict:
    """Each member resolves its own sel with its own rcut (its registration's update_sel)."""
    registry = get_registry()
    members = []
    for member in _member_params(params):
        registration = registry.get("descriptor", member["type"])
        members.append(registration.update_sel(member, stat) if registration.update_sel is not None else dict(member))
    out = dict(params)
    out["list"] = members
    return out


def build(params: dict, ctx: DescriptorContext) -> DescrptHybrid:
    return DescrptHybrid([ctx.build_descriptor(member) for member in _member_params(params)])


@hookimpl
def mtcore_descriptors() -> list[DescriptorRegistration]:
    return [DescriptorRegistration(name=NAME, arguments=arguments, build=build, update_sel=update_sel, doc=DOC)]
