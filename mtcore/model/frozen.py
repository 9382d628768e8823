"""Self-contained models for inference: TorchScript modules that plain ``torch`` can load.

A frozen model holds the descriptor, one head's fitting net and the plain-torch neighbour-list
builder; ``forward(coord, atype, box=None)`` takes coordinates [N,3] or [B,N,3], types [N] or
[B,N] and an optional cell ([3,3], [9], [B,3,3] or [B,9]) (and ``fparam`` [B, nf], ``aparam``
[B, N, na] for a head trained with frame/atomic parameters) and returns ``energy``, ``force``,
``virial``, ``atom_energy`` for energy heads, or the global and atomic tensors for tensor heads.
The global output follows the head's declared reduction (``OutputDef.reduction``): the sum of
the atomic outputs, their mean over the atoms of ``sel_types``, or none (atomic output only).
The united model holds every head and takes the head's name as an argument.

Scaling: neighbours come from cell lists (linear in atoms), and a frame is evaluated in chunks
of at most ``chunk_atoms`` centre atoms (spatially compact blocks, plus the neighbours they need
from outside as "ghosts"): the energy is a sum of atomic energies, so each chunk's energy is
differentiated on its own and forces and virials are accumulated (a mean is taken only after
all chunks, over the whole frame). Memory is bounded by the chunk,
not the frame. Small frames of one call are gathered into one chunk instead.

``forward_extended`` takes a neighbour list from outside, as MD engines hold it: extended
coordinates (local atoms first, then ghosts), types, the ghost → local ``mapping`` and pairs
([P, 2] local centre, extended neighbour) or a per-atom list ([nloc, nnei], -1 padded), full
(both directions). Inputs are checked and refused with a one-line RuntimeError.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from mtcore.model.descriptor import Descriptor
from mtcore.model.fitting import Fitting, reduction_of, sel_type_list
from mtcore.model.geometry import reduce_atomic
from mtcore.model.neighbor_list import (
    CellBins, _sort_pairs, bin_atoms, build_neighbor_list, frame_pairs_in_c, pairs_of, pairs_of_centres, spatial_order,
)

MIN_DISTANCE = 1e-6  # Å: closer atoms are an input error (the environment is singular); see _check_distances


def _check_types(atype: torch.Tensor, ntypes: int, name: str) -> None:
    if atype.is_floating_point() or atype.is_complex() or atype.dtype == torch.bool:
        message = name + ": atom types must be integer type indices, got " + str(atype.dtype)
        raise RuntimeError(message)
    flat = atype.reshape(-1)
    bad = torch.nonzero((flat < 0) | (flat >= ntypes)).squeeze(1)
    if bad.numel() > 0:
        k = int(bad[0])
        message = name + ": type index " + str(int(flat[k])) + " (position " + str(k) + ") is outside 0.." + str(ntypes - 1)
        raise RuntimeError(message)


def _check_finite(value: torch.Tensor, name: str, labels: List[str]) -> None:
    """NaN/inf refused, naming where: an atom with a NaN coordinate would otherwise drop out of
    the neighbour list and leave a finite, wrong energy."""
    bad = ~torch.isfinite(value)
    if bool(bad.any()):
        where: List[int] = torch.nonzero(bad)[0].tolist()
        place: List[str] = []
        for k in range(len(labels)):
            place.append(labels[k] + " " + str(where[k]))
        message = name + ": " + ", ".join(place) + " holds a non-finite value (" + str(float(value[bad][0])) + ")"
        raise RuntimeError(message)


def _frames(
    coord: torch.Tensor, atype: torch.Tensor, box: Optional[torch.Tensor], ntypes: int
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Shapes normalised to [B, N, 3], [B, N], [B, 3, 3] (float64), and every input checked."""
    _check_types(atype, ntypes, "atype")
    if atype.dim() == 0 or atype.dim() > 2:
        raise RuntimeError("atype: expected [N] or [B, N] type indices, got " + str(atype.dim()) + " dimensions")
    natoms = atype.shape[-1]
    if natoms == 0:
        raise RuntimeError("atype: no atoms")
    if coord.numel() % (3 * natoms) != 0:
        raise RuntimeError("coord: " + str(coord.numel()) + " values do not make frames of " + str(natoms) + " atoms x 3")
    coord = coord.reshape(-1, natoms, 3).to(torch.float64)
    _check_finite(coord, "coord", ["frame", "atom"])
    nframes = coord.shape[0]
    if atype.dim() == 1:
        atype = atype.unsqueeze(0).expand(nframes, -1)
    elif atype.shape[0] != nframes:
        raise RuntimeError("atype: types for " + str(atype.shape[0]) + " frames, coordinates for " + str(nframes))
    atype = atype.to(torch.long)
    if box is not None:
        if box.numel() % 9 != 0:
            raise RuntimeError("box: expected 9 values per frame, got " + str(box.numel()))
        box = box.to(torch.float64).reshape(-1, 3, 3)
        if box.shape[0] == 1 and nframes > 1:
            box = box.expand(nframes, 3, 3)
        if box.shape[0] != nframes:
            raise RuntimeError("box: cells for " + str(box.shape[0]) + " frames, coordinates for " + str(nframes))
        _check_finite(box, "box", ["frame"])
        volume = torch.abs(torch.linalg.det(box))
        if bool((volume < 1e-6).any()):
            frame = int(torch.nonzero(volume < 1e-6)[0, 0])
            raise RuntimeError("box: the cell of frame " + str(frame) + " has no volume (" + str(float(volume[frame])) + " Å³)")
    return coord, atype, box


def _check_distances(dist: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor, where: str) -> None:
    """Coincident atoms make the environment singular (NaN): refuse them by name."""
    if dist.numel() > 0:
        k = int(torch.argmin(dist))
        if float(dist[k]) < 1e-6:  # MIN_DISTANCE (TorchScript takes no module globals)
            message = ("coord: atoms " + str(int(center[k])) + " and " + str(int(neighbor[k])) + where + " are "
                       + str(float(dist[k])) + " Å apart (coincident atoms)")
            raise RuntimeError(message)


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


def _with_ghosts(
    loc: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor, atype: torch.Tensor, total: int, ntypes: int
) -> Tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk as its own small system, the neighbours it needs from outside (ghosts) included
    without making them atoms of the descriptor.

    The descriptor sees the chunk's atoms ``loc`` (ascending) and at most one extra atom per
    type; a pair whose neighbour is a ghost g points at a "proxy" atom k of g's type and its
    shift carries the rest, x_g - x_k (so r_ij = x_k - x_i + shift = x_g - x_i; forces reach g
    through the shift). Descriptors see neighbours only through r_ij and their type, so this is
    the same environment, while per-atom memory stays that of the chunk, not of its ghost shell.

    Returns (atoms: chunk, extras, ghosts as indices of the frame set, number of descriptor atoms,
    centre, neighbour (descriptor atom), source (the real neighbour, an index into atoms)).
    """
    nloc = loc.shape[0]
    device = loc.device
    lookup = torch.full((total,), -1, dtype=torch.long, device=device)
    lookup[loc] = torch.arange(nloc, device=device)
    seen = torch.zeros(total, dtype=torch.bool, device=device)
    seen[neighbor] = True
    seen[loc] = False
    ghosts = torch.nonzero(seen).squeeze(1)
    local_types = atype.index_select(0, loc)
    ghost_types = atype.index_select(0, ghosts)
    proxy = torch.zeros(ntypes, dtype=torch.long, device=device)
    extras: List[torch.Tensor] = []
    for t in range(ntypes):
        mine = torch.nonzero(local_types == t)
        if mine.shape[0] > 0:
            proxy[t] = mine[0, 0]
        else:
            theirs = torch.nonzero(ghost_types == t)
            if theirs.shape[0] > 0:  # no atom of this type in the chunk: one ghost becomes a real atom
                proxy[t] = nloc + len(extras)
                extras.append(ghosts[theirs[0, 0]].reshape(1))
    ndesc = nloc + len(extras)
    ghost_slot = torch.full((total,), -1, dtype=torch.long, device=device)
    ghost_slot[ghosts] = torch.arange(ndesc, ndesc + ghosts.shape[0], device=device)
    near = lookup.index_select(0, neighbor)
    inside = near >= 0
    stand_in = torch.where(inside, near, proxy.index_select(0, atype.index_select(0, neighbor)))
    source = torch.where(inside, near, ghost_slot.index_select(0, neighbor))
    extras.insert(0, loc)
    extras.append(ghosts)
    return torch.cat(extras), ndesc, lookup.index_select(0, center), stand_in, source


class _Evaluator(nn.Module):
    """What the single-head and the united model share: checks, neighbour lists, chunked passes."""

    def __init__(self, descriptor: Descriptor, type_map: List[str], metadata: str):
        super().__init__()
        self.descriptor = descriptor
        self.type_map: List[str] = list(type_map)
        self.ntypes = len(type_map)
        self.rcut = float(descriptor.get_rcut())
        self.metadata = metadata
        # centre atoms per pass: about 1 MB each for se_e2_a water in float64 (pairs, embedding
        # activations and their gradients), so a pass stays near 1 GB whatever the frame size;
        # passes of 512-2048 atoms run at the same speed per atom
        self.chunk_atoms: int = 1024

    def _atomic(self, desc: Dict[str, torch.Tensor], atype: torch.Tensor, head: str) -> torch.Tensor:
        raise RuntimeError("not implemented")

    @torch.jit.export
    def get_type_map(self) -> List[str]:
        return self.type_map

    @torch.jit.export
    def get_rcut(self) -> float:
        return self.rcut

    @torch.jit.export
    def get_metadata(self) -> str:
        return self.metadata

    @torch.jit.export
    def set_chunk_atoms(self, atoms: int) -> None:
        """Centre atoms evaluated per pass: fewer bound memory tighter, more amortise overhead."""
        self.chunk_atoms = max(1, atoms)

    def _pass(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        frame: torch.Tensor,
        nloc: int,
        ndesc: int,
        center: torch.Tensor,
        neighbor: torch.Tensor,
        source: torch.Tensor,
        image: Optional[torch.Tensor],
        box: Optional[torch.Tensor],
        nframes: int,
        head: str,
        conservative: bool,
        want_virial: bool,
        fparam: Optional[torch.Tensor],
        aparam: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chunk: atoms ``coord`` [M, 3]; the first ``nloc`` are centres, the first ``ndesc``
        the descriptor's atoms, the rest ghosts reached through ``source`` (see :func:`_with_ghosts`);
        pairs sorted by centre. Returns (atomic outputs of the centres, -dE/dx of all M atoms,
        virial [B, 9])."""
        grad_mode = torch.is_grad_enabled()
        if conservative:
            torch.set_grad_enabled(True)  # forces are gradients, also when called under torch.no_grad()
        leaf = coord.detach().requires_grad_(conservative)
        strain = torch.zeros(nframes, 3, 3, dtype=coord.dtype, device=coord.device)
        strain.requires_grad_(want_virial)
        deform = strain + torch.eye(3, dtype=coord.dtype, device=coord.device)
        if want_virial:
            if nframes == 1:
                x = leaf @ deform[0]
            else:
                x = torch.bmm(leaf.unsqueeze(1), deform.index_select(0, frame)).squeeze(1)
        else:
            x = leaf
        if image is None or box is None:
            shift = torch.zeros(center.shape[0], 3, dtype=coord.dtype, device=coord.device)
        else:
            cell = torch.bmm(box, deform) if want_virial else box
            if nframes == 1:
                shift = image.to(coord.dtype) @ cell[0]
            else:
                pair_frame = frame.index_select(0, center)
                shift = torch.bmm(image.to(coord.dtype).unsqueeze(1), cell.index_select(0, pair_frame)).squeeze(1)
        if ndesc < coord.shape[0]:  # ghosts: the pair's shift carries x_ghost - x_proxy
            shift = shift + (x.index_select(0, source) - x.index_select(0, neighbor))
        desc = self.descriptor(x[:ndesc], atype[:ndesc], center, neighbor, shift)
        local: Dict[str, torch.Tensor] = {}
        for key, value in desc.items():
            local[key] = value[:nloc]  # descriptor outputs are per atom; the centres come first
        if fparam is not None:
            local["fparam"] = fparam.reshape(nframes, -1).to(torch.float64).index_select(0, frame[:nloc])
        if aparam is not None:
            local["aparam"] = aparam.to(torch.float64)
        atomic = self._atomic(local, atype[:nloc], head).to(coord.dtype)
        atomic = atomic.reshape(nloc, -1)
        force = torch.zeros_like(coord)
        virial = torch.zeros(nframes, 9, dtype=coord.dtype, device=coord.device)
        if conservative and atomic.requires_grad:
            inputs: List[torch.Tensor] = [leaf]
            if want_virial:
                inputs.append(strain)
            grads = torch.autograd.grad([atomic.sum()], inputs, allow_unused=True)
            g_coord = grads[0]
            if g_coord is not None:
                force = -g_coord
            if want_virial:
                g_strain = grads[1]
                if g_strain is not None:
                    virial = -g_strain.transpose(1, 2).reshape(nframes, 9)
        torch.set_grad_enabled(grad_mode)
        return atomic.detach(), force.detach(), virial.detach()

    def _lists_in_c(
        self, coord: torch.Tensor, atype: torch.Tensor, box: Optional[torch.Tensor]
    ) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every frame's pairs from vesin when called eagerly on the CPU (the file's eager twin,
        mtcore.eager_twin: half the time of the cell lists), else none: the scripted module,
        which plain torch loads, keeps its torch cell lists."""
        listed: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if not torch.jit.is_scripting():
            for b in range(atype.shape[0]):
                found = frame_pairs_in_c(coord[b], atype[b], None if box is None else box[b], self.rcut)
                if found is None:
                    return []
                listed.append(found)
        return listed

    def _evaluate(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        box: Optional[torch.Tensor],
        head: str,
        conservative: bool,
        do_virial: bool,
        fparam: Optional[torch.Tensor],
        aparam: Optional[torch.Tensor],
        global_key: str,
        atomic_key: str,
        reduction: str,
        sel_types: List[int],
    ) -> Dict[str, torch.Tensor]:
        coord, atype, box = _frames(coord, atype, box, self.ntypes)
        nframes, natoms = atype.shape[0], atype.shape[1]
        total = nframes * natoms
        want_virial = conservative and do_virial
        device = coord.device
        flat = coord.reshape(total, 3)
        flat_type = atype.reshape(total)
        frame_of = torch.div(torch.arange(total, device=device), natoms, rounding_mode="floor")
        flat_aparam: Optional[torch.Tensor] = None
        if aparam is not None:
            flat_aparam = aparam.reshape(total, -1)
        force = torch.zeros(total, 3, dtype=coord.dtype, device=device)
        virial = torch.zeros(nframes, 9, dtype=coord.dtype, device=device)
        atomic_parts: List[torch.Tensor] = []
        loc_parts: List[torch.Tensor] = []
        # chunks: spatial blocks of a large frame; several small frames share one
        pending: List[Tuple[int, torch.Tensor]] = []
        pending_atoms = 0
        bins_of: List[CellBins] = []
        listed = self._lists_in_c(coord, atype, box)  # eager calls: each frame's list from vesin, or none
        for b in range(nframes):
            frame_box: Optional[torch.Tensor] = None
            if box is not None:
                frame_box = box[b]
            if len(listed) == 0 or natoms > self.chunk_atoms:  # bins: the pairs, or the chunks' spatial order
                bins_of.append(bin_atoms(coord[b], frame_box, self.rcut))
            pieces: List[torch.Tensor] = []
            if natoms <= self.chunk_atoms:
                pieces.append(torch.arange(natoms, device=device))
            else:
                order = spatial_order(bins_of[b])
                for start in range(0, natoms, self.chunk_atoms):
                    pieces.append(torch.sort(order[start : start + self.chunk_atoms]).values)
            for piece in pieces:
                if len(pending) > 0 and pending_atoms + piece.shape[0] > self.chunk_atoms:
                    self._chunk(pending, bins_of, listed, flat, flat_type, frame_of, natoms, box, nframes, head,
                                conservative, want_virial, fparam, flat_aparam, atomic_parts, loc_parts, force, virial)
                    pending = []
                    pending_atoms = 0
                pending.append((b, piece))
                pending_atoms += piece.shape[0]
        self._chunk(pending, bins_of, listed, flat, flat_type, frame_of, natoms, box, nframes, head, conservative,
                    want_virial, fparam, flat_aparam, atomic_parts, loc_parts, force, virial)
        atomic_all = torch.cat(atomic_parts)
        atomic_all = torch.zeros(total, atomic_all.shape[1], dtype=atomic_all.dtype, device=device).index_copy(
            0, torch.cat(loc_parts), atomic_all
        )
        atomic3 = atomic_all.reshape(nframes, natoms, -1)
        out: Dict[str, torch.Tensor] = {atomic_key: atomic3}
        if reduction != "none":
            out[global_key] = reduce_atomic(atomic3, atype, reduction, sel_types)
        if conservative:
            out["force"] = force.reshape(nframes, natoms, 3)
            if want_virial:
                out["virial"] = virial
            out["atom_energy"] = atomic3.reshape(nframes, natoms)
            out["energy"] = out["energy"].reshape(nframes)
        return out

    def _chunk(
        self,
        pending: List[Tuple[int, torch.Tensor]],
        bins_of: List[CellBins],
        listed: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
        flat: torch.Tensor,
        flat_type: torch.Tensor,
        frame_of: torch.Tensor,
        natoms: int,
        box: Optional[torch.Tensor],
        nframes: int,
        head: str,
        conservative: bool,
        want_virial: bool,
        fparam: Optional[torch.Tensor],
        aparam: Optional[torch.Tensor],
        atomic_parts: List[torch.Tensor],
        loc_parts: List[torch.Tensor],
        force: torch.Tensor,
        virial: torch.Tensor,
    ) -> None:
        """Pairs of the chunk's centres (from the frames' ``listed`` pairs where there are, else
        from the cell lists ``bins_of``), the chunk as a system with ghosts, one pass; the results
        are added to the accumulators (lists appended, force and virial in place)."""
        locs: List[torch.Tensor] = []
        centers: List[torch.Tensor] = []
        neighbors: List[torch.Tensor] = []
        images: List[torch.Tensor] = []
        for item in pending:
            b, piece = item
            frame_types = flat_type[b * natoms : (b + 1) * natoms]
            if len(listed) > 0:
                c, nb, img, dist = pairs_of_centres(listed[b], piece, natoms)
            else:
                c, nb, img, dist = pairs_of(bins_of[b], piece, frame_types, self.rcut, self.ntypes)
            _check_distances(dist, c, nb, " of frame " + str(b))
            locs.append(piece + b * natoms)
            centers.append(c + b * natoms)
            neighbors.append(nb + b * natoms)
            images.append(img)
        loc = torch.cat(locs)
        ext, ndesc, center, neighbor, source = _with_ghosts(loc, torch.cat(centers), torch.cat(neighbors), flat_type,
                                                            flat.shape[0], self.ntypes)
        chunk_aparam: Optional[torch.Tensor] = None
        if aparam is not None:
            chunk_aparam = aparam.index_select(0, loc)
        atomic, f_ext, vir = self._pass(
            flat.index_select(0, ext), flat_type.index_select(0, ext), frame_of.index_select(0, ext), loc.shape[0], ndesc,
            center, neighbor, source, torch.cat(images), box, nframes, head, conservative, want_virial, fparam, chunk_aparam,
        )
        atomic_parts.append(atomic)
        loc_parts.append(loc)
        force.index_add_(0, ext, f_ext)
        virial.add_(vir)

    def _extended(
        self,
        extended_coord: torch.Tensor,
        extended_atype: torch.Tensor,
        nloc: int,
        mapping: torch.Tensor,
        pairs: Optional[torch.Tensor],
        nlist: Optional[torch.Tensor],
        head: str,
        conservative: bool,
        do_virial: bool,
        fparam: Optional[torch.Tensor],
        aparam: Optional[torch.Tensor],
        global_key: str,
        atomic_key: str,
        reduction: str,
        sel_types: List[int],
    ) -> Dict[str, torch.Tensor]:
        """One frame from an external neighbour list (see the module docstring)."""
        _check_types(extended_atype, self.ntypes, "extended_atype")
        atype = extended_atype.reshape(-1).to(torch.long)
        nall = atype.shape[0]
        if extended_coord.numel() != 3 * nall:
            raise RuntimeError("extended_coord: expected " + str(nall) + " atoms x 3 values, got " + str(extended_coord.numel()))
        coord = extended_coord.reshape(nall, 3).to(torch.float64)
        _check_finite(coord, "extended_coord", ["atom"])
        device = coord.device
        if nloc < 1 or nloc > nall:
            raise RuntimeError("nloc: " + str(nloc) + " local atoms among " + str(nall) + " extended atoms")
        mapping = mapping.reshape(-1)
        if mapping.is_floating_point() or mapping.dtype == torch.bool or mapping.shape[0] != nall:
            raise RuntimeError("mapping: expected " + str(nall) + " integer local indices (one per extended atom)")
        mapping = mapping.to(torch.long)
        if bool(((mapping < 0) | (mapping >= nloc)).any()):
            raise RuntimeError("mapping: local indices must lie in 0.." + str(nloc - 1))
        if pairs is not None:
            if pairs.is_floating_point() or pairs.dim() != 2 or pairs.shape[1] != 2:
                raise RuntimeError("pairs: expected integer [P, 2] (local centre, extended neighbour)")
            center = pairs[:, 0].to(torch.long)
            neighbor = pairs[:, 1].to(torch.long)
        elif nlist is not None:
            if nlist.is_floating_point() or nlist.dim() != 2 or nlist.shape[0] != nloc:
                raise RuntimeError("nlist: expected integer [nloc, nnei] extended indices, -1 for empty slots")
            table = nlist.to(torch.long)
            filled = table >= 0
            center = torch.arange(nloc, device=device).unsqueeze(1).expand(nloc, table.shape[1])[filled]
            neighbor = table[filled]
        else:
            raise RuntimeError("forward_extended: give the neighbours as pairs or as nlist")
        if center.numel() > 0:
            if int(center.min()) < 0 or int(center.max()) >= nloc:
                raise RuntimeError("pairs: centres must be local atoms 0.." + str(nloc - 1))
            if int(neighbor.min()) < 0 or int(neighbor.max()) >= nall:
                raise RuntimeError("pairs: neighbours must be extended atoms 0.." + str(nall - 1))
        keep = torch.nonzero(neighbor != center).squeeze(1)
        center, neighbor = center.index_select(0, keep), neighbor.index_select(0, keep)
        rij = coord.index_select(0, neighbor) - coord.index_select(0, center)
        dist = torch.linalg.vector_norm(rij, dim=1)
        keep = torch.nonzero(dist < self.rcut).squeeze(1)  # engines add a skin; the model does not
        center, neighbor, dist = center.index_select(0, keep), neighbor.index_select(0, keep), dist.index_select(0, keep)
        _check_distances(dist, center, neighbor, " (extended indices)")
        zero = torch.zeros(center.shape[0], 3, dtype=coord.dtype, device=device)
        center, neighbor, zero, dist = _sort_pairs(center, neighbor, zero, dist, atype, self.ntypes)
        want_virial = conservative and do_virial
        frame = torch.zeros(nall, dtype=torch.long, device=device)
        force = torch.zeros(nall, 3, dtype=coord.dtype, device=device)
        virial = torch.zeros(1, 9, dtype=coord.dtype, device=device)
        counts = torch.bincount(center, minlength=nloc)
        ends = torch.cumsum(counts, 0)
        parts: List[torch.Tensor] = []
        for lo in range(0, nloc, self.chunk_atoms):
            hi = min(nloc, lo + self.chunk_atoms)
            first = 0 if lo == 0 else int(ends[lo - 1])
            last = int(ends[hi - 1])
            loc = torch.arange(lo, hi, device=device)
            ext, ndesc, c, nb, src = _with_ghosts(loc, center[first:last], neighbor[first:last], atype, nall, self.ntypes)
            chunk_aparam: Optional[torch.Tensor] = None
            if aparam is not None:
                chunk_aparam = aparam.reshape(nloc, -1)[lo:hi]
            atomic, f_ext, vir = self._pass(
                coord.index_select(0, ext), atype.index_select(0, ext), frame.index_select(0, ext), hi - lo, ndesc, c, nb,
                src, None, None, 1, head, conservative, want_virial, fparam, chunk_aparam,
            )
            parts.append(atomic)
            force.index_add_(0, ext, f_ext)
            virial = virial + vir
        atomic = torch.cat(parts).unsqueeze(0)
        out: Dict[str, torch.Tensor] = {atomic_key: atomic}
        if reduction != "none":
            out[global_key] = reduce_atomic(atomic, atype[:nloc].unsqueeze(0), reduction, sel_types)
        if conservative:
            out["extended_force"] = force.unsqueeze(0)
            out["force"] = torch.zeros(nloc, 3, dtype=coord.dtype, device=device).index_add(0, mapping, force).unsqueeze(0)
            if want_virial:
                out["virial"] = virial
            out["atom_energy"] = atomic.reshape(1, nloc)
            out["energy"] = out["energy"].reshape(1)
        return out


class FrozenModel(_Evaluator):
    """One head, ready for ``torch.jit.script``."""

    def __init__(self, descriptor: Descriptor, fitting: Fitting, type_map: List[str], head: str, metadata: str):
        super().__init__(descriptor, type_map, metadata)
        self.fitting = fitting
        odef = fitting.output_def()
        self.head = head
        self.global_key = odef.global_key
        self.atomic_key = odef.atomic_key
        self.conservative = odef.conservative
        self.reduction = reduction_of(odef)
        # every type for "all": the same mean, and never an empty list (TorchScript cannot type one)
        self.sel_types = sel_type_list(odef) or list(range(len(type_map)))

    def _atomic(self, desc: Dict[str, torch.Tensor], atype: torch.Tensor, head: str) -> torch.Tensor:
        return self.fitting(desc, atype)

    @torch.jit.export
    def get_head(self) -> str:
        return self.head

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        box: Optional[torch.Tensor] = None,
        do_virial: bool = True,
        fparam: Optional[torch.Tensor] = None,
        aparam: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        return self._evaluate(coord, atype, box, self.head, self.conservative, do_virial, fparam, aparam,
                              self.global_key, self.atomic_key, self.reduction, self.sel_types)

    @torch.jit.export
    def forward_extended(
        self,
        extended_coord: torch.Tensor,
        extended_atype: torch.Tensor,
        nloc: int,
        mapping: torch.Tensor,
        pairs: Optional[torch.Tensor] = None,
        nlist: Optional[torch.Tensor] = None,
        do_virial: bool = True,
        fparam: Optional[torch.Tensor] = None,
        aparam: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """One frame with the neighbours an MD engine already has; ``force`` is folded onto the
        local atoms through ``mapping``, ``extended_force`` is per extended atom."""
        return self._extended(extended_coord, extended_atype, nloc, mapping, pairs, nlist, self.head, self.conservative,
                              do_virial, fparam, aparam, self.global_key, self.atomic_key, self.reduction, self.sel_types)


class UnitedModel(_Evaluator):
    """Every head in one file; ``forward(coord, atype, box, head)``."""

    def __init__(self, descriptor: Descriptor, heads: Dict[str, Fitting], type_map: List[str], metadata: str):
        super().__init__(descriptor, type_map, metadata)
        self.heads = nn.ModuleDict(heads)
        self.head_names: List[str] = list(heads.keys())
        self.global_keys: Dict[str, str] = {k: f.output_def().global_key for k, f in heads.items()}
        self.atomic_keys: Dict[str, str] = {k: f.output_def().atomic_key for k, f in heads.items()}
        self.conservative: Dict[str, bool] = {k: f.output_def().conservative for k, f in heads.items()}
        self.reductions: Dict[str, str] = {k: reduction_of(f.output_def()) for k, f in heads.items()}
        self.head_sel_types = {k: sel_type_list(f.output_def()) or list(range(len(type_map))) for k, f in heads.items()}

    def _atomic(self, desc: Dict[str, torch.Tensor], atype: torch.Tensor, head: str) -> torch.Tensor:
        atomic = torch.zeros(0)
        for name, fitting in self.heads.items():
            if name == head:
                atomic = fitting(desc, atype)
        return atomic

    def _check_head(self, head: str) -> None:
        if head not in self.head_names:
            raise RuntimeError("unknown head '" + head + "'; heads: " + ", ".join(self.head_names))

    @torch.jit.export
    def get_heads(self) -> List[str]:
        return self.head_names

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
        self._check_head(head)
        return self._evaluate(coord, atype, box, head, self.conservative[head], do_virial, fparam, aparam,
                              self.global_keys[head], self.atomic_keys[head], self.reductions[head], self.head_sel_types[head])

    @torch.jit.export
    def forward_extended(
        self,
        extended_coord: torch.Tensor,
        extended_atype: torch.Tensor,
        nloc: int,
        mapping: torch.Tensor,
        pairs: Optional[torch.Tensor] = None,
        nlist: Optional[torch.Tensor] = None,
        head: str = "",
        do_virial: bool = True,
        fparam: Optional[torch.Tensor] = None,
        aparam: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        self._check_head(head)
        return self._extended(extended_coord, extended_atype, nloc, mapping, pairs, nlist, head, self.conservative[head],
                              do_virial, fparam, aparam, self.global_keys[head], self.atomic_keys[head],
                              self.reductions[head], self.head_sel_types[head])
