"""The multi-head model: one shared descriptor, one fitting net per head.

A single-task model is this model with one head; there is no second code path.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from mtcore.model.descriptor import Descriptor
from mtcore.model.fitting import Fitting, check_output_def, reduction_of, sel_type_list
from mtcore.model.geometry import finish_outputs, prepare_geometry


def with_parameters(
    desc: Dict[str, torch.Tensor], nframes: int, natoms: int, fparam: Optional[torch.Tensor], aparam: Optional[torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """The descriptor dict plus frame parameters (repeated per atom) and atomic parameters, flat
    over the B·N atoms, for fitting nets that take them."""
    if fparam is None and aparam is None:
        return desc
    out: Dict[str, torch.Tensor] = {}
    for key, value in desc.items():
        out[key] = value
    if fparam is not None:
        f = fparam.reshape(nframes, 1, -1).to(torch.float64)  # [B, nf]
        out["fparam"] = f.expand(nframes, natoms, f.shape[2]).reshape(nframes * natoms, -1)
    if aparam is not None:
        out["aparam"] = aparam.reshape(nframes * natoms, -1).to(torch.float64)
    return out


class MultiHeadModel(nn.Module):
    """Descriptor + named heads. ``shared_layers`` owns the layers heads share by ``layer_name``."""

    def __init__(
        self,
        descriptor: Descriptor,
        heads: Dict[str, Fitting],
        type_map: list[str],
        shared_layers: Optional[nn.ModuleDict] = None,
        shared_users: Optional[dict[str, list[str]]] = None,
    ):
        super().__init__()
        for name, fitting in heads.items():
            check_output_def(fitting.output_def(), f"head '{name}' ({type(fitting).__name__})")
        self.descriptor = descriptor
        self.heads = nn.ModuleDict(heads)
        self.shared_layers = shared_layers if shared_layers is not None else nn.ModuleDict()
        self.shared_users = dict(shared_users or {})
        self.type_map = list(type_map)

    @property
    def rcut(self) -> float:
        return float(self.descriptor.get_rcut())

    @property
    def ntypes(self) -> int:
        return len(self.type_map)

    def head_names(self) -> list[str]:
        return list(self.heads.keys())

    def forward(
        self,
        head: str,
        coord: torch.Tensor,
        atype: torch.Tensor,
        box: Optional[torch.Tensor],
        center: torch.Tensor,
        neighbor: torch.Tensor,
        image: torch.Tensor,
        want_force: bool = True,
        want_virial: bool = False,
        create_graph: bool = False,
        fparam: Optional[torch.Tensor] = None,
        aparam: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Predictions of ``head`` for B frames of N atoms: coord [B,N,3], atype [B,N], box [B,3,3];
        fparam [B, nf] and aparam [B, N, na] for heads that take them. The frame quantity follows
        the head's declared reduction (absent for ``none``)."""
        fitting = self.heads[head]
        odef = fitting.output_def()
        nframes, natoms = atype.shape
        conservative = odef.conservative
        flat, shift, leaf, strain = prepare_geometry(
            coord, box, center, image, conservative and (want_force or want_virial), conservative and want_virial
        )
        atype_flat = atype.reshape(-1)
        desc = with_parameters(self.descriptor(flat, atype_flat, center, neighbor, shift), nframes, natoms, fparam, aparam)
        atomic = fitting(desc, atype_flat)
        return finish_outputs(
            atomic,
            nframes,
            natoms,
            odef.global_key,
            odef.atomic_key,
            conservative,
            leaf,
            strain,
            want_force,
            want_virial,
            create_graph,
            reduction_of(odef),
            atype,
            sel_type_list(odef),
        )
