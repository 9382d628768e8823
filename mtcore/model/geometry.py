"""From a batch of frames to pair vectors, and from atomic outputs to frame quantities.

These are the only places where forces and virials are made: a descriptor just has to be a
differentiable function of the coordinates and of the periodic shifts. The virial comes from a
homogeneous strain ε applied to coordinates and cell alike (Ξ = -(∂E/∂ε)ᵀ at ε = 0), which equals
DeePMD-kit's -Σ_ij r_ij ⊗ ∂E/∂r_ij for any descriptor.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch


def prepare_geometry(
    coord: torch.Tensor,
    box: Optional[torch.Tensor],
    center: torch.Tensor,
    image: torch.Tensor,
    want_grad: bool,
    want_virial: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """coord [B, N, 3], box [B, 3, 3] or None, image [P, 3] (cell units).

    Returns (flat coordinates [B·N, 3], shifts [P, 3], the coordinate leaf, the strain leaf
    [B, 3, 3]); the leaves are what forces and virials are taken against.
    """
    nframes, natoms = coord.shape[0], coord.shape[1]
    leaf = coord.detach().requires_grad_(want_grad)
    strain = torch.zeros(nframes, 3, 3, dtype=coord.dtype, device=coord.device)
    strain.requires_grad_(want_virial)
    deform = strain + torch.eye(3, dtype=coord.dtype, device=coord.device)
    if want_virial:
        flat = torch.bmm(leaf, deform).reshape(nframes * natoms, 3)
    else:
        flat = leaf.reshape(nframes * natoms, 3)
    if box is None:
        shift = torch.zeros(image.shape[0], 3, dtype=coord.dtype, device=coord.device)
    else:
        cell = torch.bmm(box, deform) if want_virial else box
        frame = torch.div(center, natoms, rounding_mode="floor")
        if nframes == 1:
            shift = image.to(coord.dtype) @ cell[0]
        else:
            shift = torch.bmm(image.to(coord.dtype).unsqueeze(1), cell.index_select(0, frame)).squeeze(1)
    return flat, shift, leaf, strain


def finish_outputs(
    atomic: torch.Tensor,
    nframes: int,
    natoms: int,
    global_key: str,
    atomic_key: str,
    conservative: bool,
    leaf: torch.Tensor,
    strain: torch.Tensor,
    want_force: bool,
    want_virial: bool,
    create_graph: bool,
) -> Dict[str, torch.Tensor]:
    """Frame sums of the atomic output and, for energies, forces and virials by autograd."""
    atomic = atomic.to(leaf.dtype).reshape(nframes, natoms, -1)
    total = atomic.sum(1)
    out: Dict[str, torch.Tensor] = {global_key: total, atomic_key: atomic}
    if conservative and (want_force or want_virial):
        inputs: List[torch.Tensor] = [leaf]
        if want_virial:
            inputs.append(strain)
        grads = torch.autograd.grad([total.sum()], inputs, create_graph=create_graph, allow_unused=True)
        g_coord = grads[0]
        if g_coord is None:
            g_coord = torch.zeros_like(leaf)
        out["force"] = -g_coord
        if want_virial:
            g_strain = grads[1]
            if g_strain is None:
                g_strain = torch.zeros_like(strain)
            out["virial"] = -g_strain.transpose(1, 2).reshape(nframes, 9)
    return out
