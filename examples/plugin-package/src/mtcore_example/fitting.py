"""gap: an intensive per-frame scalar (a band-gap-like property) as the MEAN of atomic outputs.

An extensive quantity (an energy) is the sum of atomic contributions and grows with the system;
an intensive one (a band gap, a density, an energy per atom) does not. This head declares
``OutputDef(..., reduction="mean")``: the core predicts, trains and tests the frame value

    gap = (1/N) Σ_i g_i,        g_i = net_{t_i}(D_i) + b

so one model serves frames of any size. The nets are mtcore's public per-type fitting MLP
(:class:`mtcore.model.fitting_net.TypeFittingNet`), so ``layer_name`` shares layers with the
built-in heads of the same run (equal names, equal widths: the very same tensors). With a
descriptor that embeds types (se_atten) one net serves every type (``mixed_types``).

b starts at the mean gap label of this head's training frames (``compute_output_stats``): the
same for every type, since an intensive quantity has no per-element share. It is a buffer that
``mtcore change-bias`` reaches through :meth:`output_bias`.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from dargs import Argument

from mtcore.data.requirements import DataRequirement
from mtcore.hookspecs import FittingContext, FittingRegistration, SchemaContext, hookimpl
from mtcore.model.fitting import Fitting, OutputDef, TestQuantity
from mtcore.model.fitting_net import TypeFittingNet

#: The plugin API this module was written for (see docs/plugins.md, "Publishing").
MTCORE_PLUGIN_API = 2

NAME = "gap"
LABEL = "gap"            # the label key: gap.npy in deepmd/npy, the 'gap' array in an .npz
ATOMIC_KEY = "atom_gap"  # the per-atom prediction (no label needed)
DOC = "Intensive per-frame scalar (e.g. a band gap): the mean of atomic outputs, one net per type."


class GapFitting(Fitting):
    def __init__(self, head: str, layers, ntypes: int, dim_descrpt: int, dim_type_embedding: int, **net_args):
        super().__init__()
        self.ntypes = int(ntypes)
        self.dim_type_embedding = int(dim_type_embedding)
        self.net = TypeFittingNet(
            head=head, layers=layers, ntypes=ntypes, n_in=dim_descrpt + dim_type_embedding, n_out=1,
            mixed_types=dim_type_embedding > 0, **net_args,
        )
        self.dtype = self.net.dtype
        self.register_buffer("bias_atom_gap", torch.zeros(ntypes, 1, dtype=torch.float64))

    def output_def(self) -> OutputDef:
        return OutputDef(NAME, 1, LABEL, ATOMIC_KEY, reduction="mean")

    def stat_requirements(self) -> list[DataRequirement]:
        return [DataRequirement(LABEL, 1)]

    def test_quantities(self) -> list[TestQuantity]:
        return [TestQuantity("Gap", LABEL, detail="gap", columns=("gap",))]

    def output_bias(self) -> Optional[torch.Tensor]:
        return self.bias_atom_gap

    @torch.jit.unused
    def compute_output_stats(self, samples: list) -> None:
        values = [s.labels[LABEL].reshape(-1).to(torch.float64) for s in samples if s.find.get(LABEL, 0.0) > 0.5]
        if values:
            self.bias_atom_gap.fill_(float(torch.cat(values).mean()))

    def forward(self, descriptor: Dict[str, torch.Tensor], atype: torch.Tensor) -> torch.Tensor:
        x = descriptor["descriptor"]
        if self.dim_type_embedding > 0:
            x = torch.cat([x, descriptor["type_embedding"]], dim=1)
        out = self.net(x.to(self.dtype), atype).to(torch.float64)  # zero rows for virtual atoms (type -1)
        real = (atype >= 0).to(torch.float64).unsqueeze(1)
        return out + self.bias_atom_gap.index_select(0, atype.clamp_min(0)) * real


def arguments(ctx: SchemaContext) -> list[Argument]:
    # neuron, activation_function, precision, resnet_dt, trainable, seed, layer_name: the same
    # keys, defaults and checks as every head built on TypeFittingNet
    return TypeFittingNet.arguments(neuron_default=[32, 32, 32])


def build(params: dict, ctx: FittingContext) -> GapFitting:
    kwargs = {k: v for k, v in params.items() if k != "type"}
    return GapFitting(
        head=ctx.head,
        layers=ctx.layers,
        ntypes=ctx.ntypes,
        dim_descrpt=ctx.descriptor.get_dim_out(),
        dim_type_embedding=ctx.descriptor.get_dim_type_embedding(),
        **kwargs,
    )


REGISTRATION = FittingRegistration(name=NAME, arguments=arguments, build=build, default_loss={"type": "gap"}, doc=DOC)


@hookimpl
def mtcore_fittings() -> list[FittingRegistration]:
    return [REGISTRATION]
