"""From a batch of frames to pair vectors, and from atomic outputs to frame quantities
(summed, or averaged for an intensive output; see :func:`reduce_atomic`).

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


def reduce_atomic(atomic: torch.Tensor, atype: torch.Tensor, reduction: str, sel_types: List[int]) -> torch.Tensor:
    """The frame quantity [B, k] of atomic outputs [B, N, k] by the head's declared reduction.

    ``sum``: Σ_i over all atoms (outputs vanish outside ``sel_types`` anyway). ``mean``: the sum
    over the atoms whose type is in ``sel_types`` (every real atom, type >= 0, when empty) divided by their number,
    so an intensive quantity does not grow with the frame; a frame without such atoms gives 0.
    The loop runs over the selected types, never over atoms. TorchScript-scriptable: the frozen
    models call it too, so training and inference reduce alike.
    """
    if reduction != "mean":
        return atomic.sum(1)
    if len(sel_types) == 0:
        keep = atype >= 0  # virtual atoms (type -1, padding of mixed-type data) are not atoms of the frame
    else:
        keep = torch.zeros(atype.shape, dtype=torch.bool, device=atype.device)
        for t in sel_types:
            keep = keep | (atype == t)
    weight = keep.to(atomic.dtype)
    count = torch.clamp(weight.sum(1, keepdim=True), min=1.0)
    return (atomic * weight.unsqueeze(-1)).sum(1) / count


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
    reduction: str = "sum",
    atype: Optional[torch.Tensor] = None,
    sel_types: Optional[List[int]] = None,
) -> Dict[str, torch.Tensor]:
    """Frame quantities of the atomic output by ``reduction`` (see :func:`reduce_atomic`; ``none``:
    the atomic output only) and, for energies (always summed), forces and virials by autograd.
    ``atype`` [B, N] is needed for ``mean``."""
    atomic = atomic.to(leaf.dtype).reshape(nframes, natoms, -1)
    out: Dict[str, torch.Tensor] = {atomic_key: atomic}
    if reduction == "none":
        return out
    sel: List[int] = sel_types if sel_types is not None else []
    if atype is None:
        if reduction == "mean" and len(sel) > 0:
            raise RuntimeError("finish_outputs: reduction 'mean' over sel_types needs the atom types")
        types = torch.zeros(nframes, natoms, dtype=torch.long, device=atomic.device)
    else:
        types = atype.reshape(nframes, natoms)
    total = reduce_atomic(atomic, types, reduction, sel)
    out[global_key] = total
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
