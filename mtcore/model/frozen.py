"""Self-contained models for inference: TorchScript modules that plain ``torch`` can load.

A frozen model holds the descriptor, one head's fitting net and the plain-torch neighbour-list
builder; ``forward(coord, atype, box=None)`` takes coordinates [N,3] or [B,N,3], types [N] or
[B,N] and an optional cell ([3,3], [9], [B,3,3] or [B,9]) (and ``fparam`` [B, nf], ``aparam``
[B, N, na] for a head trained with frame/atomic parameters) and returns ``energy``, ``force``,
``virial``, ``atom_energy`` for energy heads, or the global and atomic tensors for tensor heads.
The united model holds every head and takes the head's name as an argument.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from mtcore.model.descriptor import Descriptor
from mtcore.model.fitting import Fitting
from mtcore.model.geometry import finish_outputs, prepare_geometry
from mtcore.model.model import with_parameters
from mtcore.model.neighbor_list import build_neighbor_list


def _frames(
    coord: torch.Tensor, atype: torch.Tensor, box: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    if coord.dim() == 2:
        coord = coord.unsqueeze(0)
    coord = coord.reshape(coord.shape[0], -1, 3).to(torch.float64)
    nframes = coord.shape[0]
    if atype.dim() == 1:
        atype = atype.unsqueeze(0).expand(nframes, -1)
    atype = atype.to(torch.long)
    if box is not None:
        box = box.to(torch.float64).reshape(-1, 3, 3)
        if box.shape[0] == 1 and nframes > 1:
            box = box.expand(nframes, 3, 3)
    return coord, atype, box


def batch_neighbor_list(
    coord: torch.Tensor, atype: torch.Tensor, box: Optional[torch.Tensor], rcut: float, ntypes: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbour lists of B frames, flattened over the B·N atoms (a loop over frames, not atoms)."""
    nframes, natoms = atype.shape[0], atype.shape[1]
    centers: List[torch.Tensor] = []
    neighbors: List[torch.Tensor] = []
    images: List[torch.Tensor] = []
    for b in range(nframes):
        frame_box: Optional[torch.Tensor] = None
        if box is not None:
            frame_box = box[b]
        c, n, img = build_neighbor_list(coord[b].detach(), atype[b], frame_box, rcut, ntypes)
        centers.append(c + b * natoms)
        neighbors.append(n + b * natoms)
        images.append(img)
    return torch.cat(centers), torch.cat(neighbors), torch.cat(images)


class FrozenModel(nn.Module):
    """One head, ready for ``torch.jit.script``."""

    def __init__(self, descriptor: Descriptor, fitting: Fitting, type_map: List[str], head: str, metadata: str):
        super().__init__()
        self.descriptor = descriptor
        self.fitting = fitting
        odef = fitting.output_def()
        self.type_map: List[str] = list(type_map)
        self.ntypes = len(type_map)
        self.rcut = float(descriptor.get_rcut())
        self.head = head
        self.global_key = odef.global_key
        self.atomic_key = odef.atomic_key
        self.conservative = odef.conservative
        self.metadata = metadata

    @torch.jit.export
    def get_type_map(self) -> List[str]:
        return self.type_map

    @torch.jit.export
    def get_rcut(self) -> float:
        return self.rcut

    @torch.jit.export
    def get_head(self) -> str:
        return self.head

    @torch.jit.export
    def get_metadata(self) -> str:
        return self.metadata

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        box: Optional[torch.Tensor] = None,
        do_virial: bool = True,
        fparam: Optional[torch.Tensor] = None,
        aparam: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        coord, atype, box = _frames(coord, atype, box)
        nframes, natoms = atype.shape[0], atype.shape[1]
        center, neighbor, image = batch_neighbor_list(coord, atype, box, self.rcut, self.ntypes)
        want_grad = self.conservative
        want_virial = self.conservative and do_virial
        flat, shift, leaf, strain = prepare_geometry(coord, box, center, image, want_grad, want_virial)
        atype_flat = atype.reshape(-1)
        desc = with_parameters(self.descriptor(flat, atype_flat, center, neighbor, shift), nframes, natoms, fparam, aparam)
        atomic = self.fitting(desc, atype_flat)
        out = finish_outputs(
            atomic, nframes, natoms, self.global_key, self.atomic_key, self.conservative, leaf, strain,
            want_grad, want_virial, False,
        )
        if self.conservative:
            out["atom_energy"] = out[self.atomic_key].reshape(nframes, natoms)
            out["energy"] = out["energy"].reshape(nframes)
        return {k: v.detach() for k, v in out.items()}


class UnitedModel(nn.Module):
    """Every head in one file; ``forward(coord, atype, box, head)``."""

    def __init__(self, descriptor: Descriptor, heads: Dict[str, Fitting], type_map: List[str], metadata: str):
        super().__init__()
        self.descriptor = descriptor
        self.heads = nn.ModuleDict(heads)
        self.head_names: List[str] = list(heads.keys())
        self.type_map: List[str] = list(type_map)
        self.ntypes = len(type_map)
        self.rcut = float(descriptor.get_rcut())
        self.global_keys: Dict[str, str] = {k: f.output_def().global_key for k, f in heads.items()}
        self.atomic_keys: Dict[str, str] = {k: f.output_def().atomic_key for k, f in heads.items()}
        self.conservative: Dict[str, bool] = {k: f.output_def().conservative for k, f in heads.items()}
        self.metadata = metadata

    @torch.jit.export
    def get_type_map(self) -> List[str]:
        return self.type_map

    @torch.jit.export
    def get_rcut(self) -> float:
        return self.rcut

    @torch.jit.export
    def get_heads(self) -> List[str]:
        return self.head_names

    @torch.jit.export
    def get_metadata(self) -> str:
        return self.metadata

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        box: Optional[torch.Tensor] = None,
        head: str = "",
        do_virial: bool = True,
        fparam: Optional[torch.Tensor] = None,
        aparam: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        if head not in self.head_names:
            raise RuntimeError("unknown head '" + head + "'; heads: " + ", ".join(self.head_names))
        coord, atype, box = _frames(coord, atype, box)
        nframes, natoms = atype.shape[0], atype.shape[1]
        center, neighbor, image = batch_neighbor_list(coord, atype, box, self.rcut, self.ntypes)
        conservative = self.conservative[head]
        want_virial = conservative and do_virial
        flat, shift, leaf, strain = prepare_geometry(coord, box, center, image, conservative, want_virial)
        atype_flat = atype.reshape(-1)
        desc = with_parameters(self.descriptor(flat, atype_flat, center, neighbor, shift), nframes, natoms, fparam, aparam)
        atomic = torch.zeros(0)
        for name, fitting in self.heads.items():
            if name == head:
                atomic = fitting(desc, atype_flat)
        out = finish_outputs(
            atomic, nframes, natoms, self.global_keys[head], self.atomic_keys[head], conservative, leaf, strain,
            conservative, want_virial, False,
        )
        if conservative:
            out["atom_energy"] = out[self.atomic_keys[head]].reshape(nframes, natoms)
            out["energy"] = out["energy"].reshape(nframes)
        return {k: v.detach() for k, v in out.items()}
