"""What the dipole and polar heads share: selected types, per-type MLPs, schema keys.

For an atom i of a type in ``sel_type`` the net gives f_i = F_{t_i}(x_i) ∈ R^{n_out}, with
x_i = D_i (or [D_i, T[t_i]] when the descriptor embeds types, then one net for all types);
atoms of other types get f_i = 0, so every tensor built from f_i vanishes on them. Without a
type embedding there is one MLP per *selected* type (as DeePMD-kit v2). The nets, ``layer_name``
sharing and ``trainable`` are the core's :class:`~mtcore.model.fitting_net.TypeFittingNet`, as
in the ener head.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from dargs import Argument

from mtcore.errors import MtcoreError
from mtcore.hookspecs import FittingContext
from mtcore.model.fitting import Fitting
from mtcore.model.fitting_net import TypeFittingNet
from mtcore.model.mlp import dtype_of
from mtcore.model.shared_layers import SharedLayerManager

ROT_DESCRIPTORS = "se_e2_a, se_atten, or a hybrid containing one"


def normalize_sel_type(sel_type: Union[None, int, Sequence[int]], ntypes: int, head: str) -> List[int]:
    """``sel_type`` as a sorted list of type indices (null = every type; an int = one type)."""
    if sel_type is None:
        return list(range(ntypes))
    values = [sel_type] if isinstance(sel_type, int) else list(sel_type)
    out = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < ntypes:
            raise MtcoreError(f"fitting net '{head}': sel_type entry {v!r} is not a type index in 0..{ntypes - 1}")
        out.add(int(v))
    if not out:
        raise MtcoreError(f"fitting net '{head}': sel_type is empty; give at least one type (or null for all)")
    return sorted(out)


def check_rot_mat(ctx: FittingContext, kind: str) -> int:
    """Width M of the descriptor's rotation matrix; an error naming the head when it has none."""
    dim_rot = int(ctx.descriptor.get_dim_rot())
    if dim_rot <= 0:
        raise MtcoreError(
            f"fitting net '{ctx.head}': a '{kind}' head needs a descriptor with a rotation matrix "
            f"({ROT_DESCRIPTORS}); the descriptor {type(ctx.descriptor).__name__} has none"
        )
    return dim_rot


class TensorFitting(Fitting):
    """Per-atom net outputs f_i for the selected types; subclasses turn f_i into a tensor."""

    def __init__(
        self,
        ntypes: int,
        dim_descrpt: int,
        dim_type_embedding: int,
        n_out: int,
        head: str,
        layers: SharedLayerManager,
        sel_type: Union[None, int, Sequence[int]] = None,
        neuron: Optional[List[int]] = None,
        activation_function: str = "tanh",
        precision: str = "default",
        resnet_dt: bool = True,
        seed: Optional[int] = None,
        layer_name: Optional[list] = None,
        trainable: Union[bool, List[bool]] = True,
    ):
        super().__init__()
        neuron = list(neuron or [120, 120, 120])
        self.ntypes = ntypes
        self.n_out = n_out
        self.dtype = dtype_of(precision)
        self.dim_type_embedding = dim_type_embedding
        self.sel_types: List[int] = normalize_sel_type(sel_type, ntypes, head)
        self.nets = TypeFittingNet(
            head=head, layers=layers, ntypes=ntypes, n_in=dim_descrpt + dim_type_embedding, n_out=n_out,
            neuron=neuron, activation_function=activation_function, precision=precision, resnet_dt=resnet_dt,
            layer_name=layer_name, trainable=trainable, seed=seed, mixed_types=dim_type_embedding > 0,
            sel_types=self.sel_types,
        )
        mask = torch.zeros(ntypes, dtype=torch.bool)
        mask[self.sel_types] = True
        self.register_buffer("sel_mask", mask)

    def needs_rot_mat(self) -> bool:
        return True

    def _fit(self, descriptor: Dict[str, torch.Tensor], atype: torch.Tensor) -> torch.Tensor:
        """f_i for every atom, [n, n_out] in the net's precision, zero on unselected atoms."""
        x = descriptor["descriptor"].to(self.dtype)
        if self.dim_type_embedding > 0:
            x = torch.cat([x, descriptor["type_embedding"].to(self.dtype)], dim=1)
        return self.nets(x, atype)

    def _rot_mat(self, descriptor: Dict[str, torch.Tensor]) -> torch.Tensor:
        return descriptor["rot_mat"].to(self.dtype)


def common_arguments(sel_alias: str) -> list[Argument]:
    """Keys of both tensor heads (DeePMD-kit v2 names and defaults; plus ``layer_name``)."""
    net = {a.name: a for a in TypeFittingNet.arguments()}
    net["layer_name"].doc += " (DeePMD-kit v2 allowed this for energy heads only)"
    return [
        *(net[k] for k in ("neuron", "activation_function", "resnet_dt", "precision")),
        Argument(
            "sel_type",
            [list, int, None],
            optional=True,
            default=None,
            alias=[sel_alias],
            doc="atom types that carry the tensor (null: every type)",
        ),
        *(net[k] for k in ("seed", "layer_name", "trainable")),
    ]
