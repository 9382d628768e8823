"""dipole: per-atom dipole vectors that rotate with the structure.

For an atom i of a selected type, with the net output f_i ∈ R^M (M = the descriptor's
``get_dim_rot()``) and the descriptor's rotation matrix Q_i ∈ R^{M×3}:

    μ_i = f_iᵀ Q_i ∈ R^3,     μ_{i,α} = Σ_m f_{i,m} Q_{i,mα};     μ_i = 0 for other types
    global dipole = Σ_i μ_i

f_i is rotation invariant and Q_i rotates as a set of vectors (Q_i R for coordinates r ↦ r R),
so μ_i does too. No output bias or statistics (as DeePMD-kit v2). Keys as v2's ``dipole`` plus
``layer_name`` (which v2 rejected for tensor heads) and ``trainable``, both from the shared
:class:`~mtcore.model.fitting_net.TypeFittingNet`.
"""

from __future__ import annotations

from typing import Dict

import torch
from dargs import Argument

from mtcore.hookspecs import FittingContext, FittingRegistration, SchemaContext, hookimpl
from mtcore.model.fitting import OutputDef, TestQuantity
from mtcore_builtins.fittings.tensor_common import TensorFitting, check_rot_mat, common_arguments

#: the plugin API this module was written for (mtcore.hookspecs: versions)
MTCORE_PLUGIN_API = 2

DOC = "Atomic dipoles f·Q (net output contracted with the descriptor's rotation matrix), summed to the frame dipole."

#: The loss a dipole head gets when the input has none: v2 has no usable default (its loss
#: asserts on missing prefs; spec D6), mtcore weights both labels equally.
DEFAULT_LOSS = {"type": "tensor", "pref": 1.0, "pref_atomic": 1.0}


class DipoleFitting(TensorFitting):
    def __init__(self, ntypes: int, dim_descrpt: int, dim_rot: int, dim_type_embedding: int, head: str, layers, **kwargs):
        super().__init__(ntypes, dim_descrpt, dim_type_embedding, dim_rot, head, layers, **kwargs)
        self.dim_rot = dim_rot

    def output_def(self) -> OutputDef:
        return OutputDef("dipole", 3, "dipole", "atomic_dipole", sel_types=tuple(self.sel_types))

    def test_quantities(self) -> list[TestQuantity]:
        xyz = ("x", "y", "z")
        return [
            TestQuantity("Dipole", "dipole", per_atom=True, detail="", columns=xyz),
            TestQuantity("Atomic dipole", "atomic_dipole", atomic=True, detail="atomic", columns=xyz),
        ]

    def forward(self, descriptor: Dict[str, torch.Tensor], atype: torch.Tensor) -> torch.Tensor:
        f = self._fit(descriptor, atype)  # [n, M]
        rot = self._rot_mat(descriptor)  # [n, M, 3]
        return torch.bmm(f.unsqueeze(1), rot).squeeze(1).to(torch.float64)


def arguments(ctx: SchemaContext) -> list[Argument]:
    return common_arguments("dipole_type")


def build(params: dict, ctx: FittingContext) -> DipoleFitting:
    dim_rot = check_rot_mat(ctx, "dipole")
    kwargs = {k: v for k, v in params.items() if k != "type"}
    return DipoleFitting(
        ntypes=ctx.ntypes,
        dim_descrpt=ctx.descriptor.get_dim_out(),
        dim_rot=dim_rot,
        dim_type_embedding=ctx.descriptor.get_dim_type_embedding(),
        head=ctx.head,
        layers=ctx.layers,
        **kwargs,
    )


@hookimpl
def mtcore_fittings() -> list[FittingRegistration]:
    return [
        FittingRegistration(
            name="dipole", arguments=arguments, build=build, default_loss=dict(DEFAULT_LOSS), doc=DOC
        )
    ]
