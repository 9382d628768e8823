"""What the dipole and polar heads share: selected types, per-type MLPs, schema keys.

For an atom i of a type in ``sel_type`` the net gives f_i = F_{t_i}(x_i) ∈ R^{n_out}, with
x_i = D_i (or [D_i, T[t_i]] when the descriptor embeds types, then one net for all types);
atoms of other types get f_i = 0, so every tensor built from f_i vanishes on them. Without a
type embedding there is one MLP per *selected* type (as DeePMD-kit v2); ``layer_name`` shares
layers per type through the core's :class:`SharedLayerManager`, exactly as the ener head does.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from dargs import Argument
from torch import nn

from mtcore.errors import MtcoreError
from mtcore.hookspecs import FittingContext
from mtcore.model.fitting import Fitting
from mtcore.model.mlp import FittingMLP, dtype_of, new_generator
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
    ):
        super().__init__()
        neuron = list(neuron or [120, 120, 120])
        self.ntypes = ntypes
        self.n_out = n_out
        self.dtype = dtype_of(precision)
        self.dim_type_embedding = dim_type_embedding
        self.sel_types: List[int] = normalize_sel_type(sel_type, ntypes, head)
        names = SharedLayerManager.check_layer_name(layer_name, neuron, head)
        gen = new_generator(seed)
        n_in = dim_descrpt + dim_type_embedding
        net_types = [-1] if dim_type_embedding else list(self.sel_types)
        nets = []
        for t in net_types:
            suffix = "" if dim_type_embedding else f"/type_{t}"

            def factory(index, width, n_layer_out, activation, suffix=suffix):
                name = names[index] if names else None
                return layers.dense(
                    head, index, name, suffix, width, n_layer_out, activation or activation_function, self.dtype, gen
                )

            nets.append(FittingMLP(n_in, neuron, n_out, resnet_dt, gen, factory))
        self.nets = nn.ModuleList(nets)
        self.net_types: List[int] = net_types
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
            out = torch.zeros(x.shape[0], self.n_out, dtype=self.dtype, device=x.device)
            idx = torch.nonzero(self.sel_mask.index_select(0, atype)).squeeze(1)
            if idx.numel() > 0:
                out = out.index_put((idx,), self.nets[0](x.index_select(0, idx)))
            return out
        out = torch.zeros(x.shape[0], self.n_out, dtype=self.dtype, device=x.device)
        for k, net in enumerate(self.nets):
            idx = torch.nonzero(atype == self.net_types[k]).squeeze(1)
            if idx.numel() > 0:
                out = out.index_put((idx,), net(x.index_select(0, idx)))
        return out

    def _rot_mat(self, descriptor: Dict[str, torch.Tensor]) -> torch.Tensor:
        return descriptor["rot_mat"].to(self.dtype)


def common_arguments(sel_alias: str) -> list[Argument]:
    """Keys of both tensor heads (DeePMD-kit v2 names and defaults; plus ``layer_name``)."""
    return [
        Argument("neuron", list, optional=True, default=[120, 120, 120], alias=["n_neuron"], doc="hidden widths"),
        Argument("activation_function", str, optional=True, default="tanh"),
        Argument("resnet_dt", bool, optional=True, default=True, doc="trainable timestep on residual layers"),
        Argument("precision", str, optional=True, default="default"),
        Argument(
            "sel_type",
            [list, int, None],
            optional=True,
            default=None,
            alias=[sel_alias],
            doc="atom types that carry the tensor (null: every type)",
        ),
        Argument("seed", [int, None], optional=True, default=None),
        Argument(
            "layer_name",
            [list, None],
            optional=True,
            default=None,
            doc="len(neuron)+1 names or nulls; equal names share one layer across heads "
            "(DeePMD-kit v2 allowed this for energy heads only)",
        ),
    ]
