"""Building blocks of smooth-edition (se_*) descriptors: switch, environment rows, statistics.

Notation: pair p = (i, j), r_ij = r_j - r_i, r = |r_ij|. With u = (r - rcut_smth)/(rcut - rcut_smth):
    sw(r) = 1 (r < rcut_smth);  u³(-6u² + 15u - 10) + 1 (rcut_smth ≤ r < rcut);  0 beyond
    s(r)  = sw(r)/r;  full row R_p = (s, s·x/r, s·y/r, s·z/r);  radial row R_p = (s)
Rows are normalised per centre type: R̃ = (R - davg[t_i]) / dstd[t_i]. Empty neighbour slots
(sel - real neighbours) hold R = 0 before normalisation, i.e. R̃ = -davg/dstd, exactly as in
DeePMD-kit; :func:`padding_rows` gives that value so descriptors can add the padded slots'
contribution analytically instead of computing on padding.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from mtcore.model.neighbor_list import neighbor_rank


def smooth_weight(r: torch.Tensor, rcut_smth: float, rcut: float) -> torch.Tensor:
    """C² switch from 1 at rcut_smth to 0 at rcut."""
    u = ((r - rcut_smth) / (rcut - rcut_smth)).clamp(0.0, 1.0)
    return u * u * u * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0


def select_pairs(
    center: torch.Tensor,
    neighbor: torch.Tensor,
    atype: torch.Tensor,
    r: torch.Tensor,
    rcut: float,
    sel: torch.Tensor,
    excluded: torch.Tensor,
    natoms: int,
    ntypes: int,
    mixed: bool,
) -> torch.Tensor:
    """Indices of the pairs a descriptor keeps: within rcut, not an excluded type pair, and among
    the nearest ``sel[t]`` neighbours of type t (``mixed``: the nearest ``sel[0]`` of any type).

    Relies on pairs sorted by (center, neighbour type, distance)."""
    tj = atype.index_select(0, neighbor)
    ti = atype.index_select(0, center)
    keep = (r < rcut) & ~excluded[ti, tj]
    idx = torch.nonzero(keep).squeeze(1)
    c, t = center.index_select(0, idx), tj.index_select(0, idx)
    if mixed:
        dist = r.index_select(0, idx)
        # nearest sel[0] regardless of type: rank by distance inside each centre
        key = c.to(dist.dtype) * (2.0 * rcut + 1.0) + dist
        order = torch.argsort(key, stable=True)
        rank_sorted = neighbor_rank(c.index_select(0, order), torch.zeros_like(order), natoms, 1)
        rank = torch.empty_like(rank_sorted).index_copy_(0, order, rank_sorted)
        return idx[rank < sel[0]]
    rank = neighbor_rank(c, t, natoms, ntypes)
    return idx[rank < sel.index_select(0, t)]


def env_rows(rij: torch.Tensor, r: torch.Tensor, rcut_smth: float, rcut: float, radial: bool) -> torch.Tensor:
    """Un-normalised environment rows [P, 4] (full) or [P, 1] (radial)."""
    s = (smooth_weight(r, rcut_smth, rcut) / r).unsqueeze(1)
    if radial:
        return s
    return torch.cat([s, s * rij / r.unsqueeze(1)], dim=1)


def kept_rows(
    coord: torch.Tensor,
    atype: torch.Tensor,
    center: torch.Tensor,
    neighbor: torch.Tensor,
    shift: torch.Tensor,
    rcut: float,
    rcut_smth: float,
    sel: torch.Tensor,
    excluded: torch.Tensor,
    ntypes: int,
    mixed: bool,
    radial: bool,
    dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pairs a descriptor keeps (:func:`select_pairs`) and their un-normalised rows in
    ``dtype``: the first step of every se_* descriptor, in training and in statistics alike."""
    rij = coord.index_select(0, neighbor) - coord.index_select(0, center) + shift
    r = torch.linalg.vector_norm(rij, dim=1)
    keep = select_pairs(center, neighbor, atype, r, rcut, sel, excluded, coord.shape[0], ntypes, mixed)
    if not torch.jit.is_scripting():
        rows = _rows_in_c(coord, shift, center, neighbor, keep, r, rcut_smth, rcut, radial, dtype)
        if rows is not None:
            return keep, rows
    rij = rij.index_select(0, keep).to(dtype)
    r = r.index_select(0, keep).to(dtype)
    return keep, env_rows(rij, r, rcut_smth, rcut, radial)


@torch.jit.unused
def _rows_in_c(coord: torch.Tensor, shift: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor,
               keep: torch.Tensor, r: torch.Tensor, rcut_smth: float, rcut: float, radial: bool,
               dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Eager calls: the kept pairs' rows from one C loop with their derivative
    (mtcore.model.env_kernel), at the distances measured above; None where that loop does not
    apply."""
    from mtcore.model import env_kernel

    return env_kernel.rows(coord, shift.index_select(0, keep), center.index_select(0, keep),
                           neighbor.index_select(0, keep), r.index_select(0, keep), rcut_smth, rcut, radial, dtype)


def padding_rows(davg: torch.Tensor, dstd: torch.Tensor) -> torch.Tensor:
    """The normalised row of an empty slot, per centre type: -davg/dstd, shape [ntypes, ncol]."""
    return -davg / dstd


def neighbor_slots(center: torch.Tensor, natoms: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each pair's slot among its centre's pairs (pairs sorted by center) and each atom's pair count."""
    counts = torch.bincount(center, minlength=natoms)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(center.numel(), device=center.device) - starts.index_select(0, center), counts


def padded_positions(center: torch.Tensor, natoms: int) -> Tuple[torch.Tensor, int]:
    """Slot of each pair in a [natoms, maxnn] layout (pairs sorted by center) and maxnn."""
    slot, counts = neighbor_slots(center, natoms)
    maxnn = int(counts.max()) if counts.numel() > 0 and center.numel() > 0 else 1
    return center * maxnn + slot, maxnn


def scatter_rows(values: torch.Tensor, positions: torch.Tensor, nrows: int) -> torch.Tensor:
    """Place per-pair rows [P, k] at ``positions`` of a zero-filled [nrows, k] tensor."""
    out = torch.zeros(nrows, values.shape[1], dtype=values.dtype, device=values.device)
    # in place on the fresh zeros (out-of-place would copy them first); index_copy_, not
    # index_put_: its backward gathers with index_select (a row copy; index_put_'s backward is
    # the element-wise aten::index, 2.5× slower on [17,000 × 100]) and the force loss's second
    # backward scatters with index_add_. Positions are distinct, so the two write the same.
    return out.index_copy_(0, positions, values)


def scatter_padded(values: torch.Tensor, positions: torch.Tensor, natoms: int, maxnn: int) -> torch.Tensor:
    """Place per-pair rows [P, k] into a zero-filled [natoms, maxnn, k] tensor."""
    return scatter_rows(values, positions, natoms * maxnn).view(natoms, maxnn, values.shape[1])


def group_slices(key: torch.Tensor, ngroups: int) -> Tuple[torch.Tensor, List[int]]:
    """A stable order that groups pairs by ``key`` and the start offset of each group."""
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=ngroups)
    ends: List[int] = torch.cumsum(counts, 0).tolist()
    return order, [0] + ends


def accumulate_env_stats(rows: torch.Tensor, center_type: torch.Tensor, ntypes: int) -> torch.Tensor:
    """Per centre type: [Σ R0, Σ R0², Σ mean(R1..3), Σ mean(R1..3²)] of the real pairs, [ntypes, 4]."""
    rows = rows.to(torch.float64)
    parts = [rows[:, 0], rows[:, 0] * rows[:, 0]]
    if rows.shape[1] > 1:
        parts += [rows[:, 1:].mean(1), (rows[:, 1:] * rows[:, 1:]).mean(1)]
    else:
        parts += [torch.zeros_like(rows[:, 0]), torch.zeros_like(rows[:, 0])]
    values = torch.stack(parts, dim=1)
    return torch.zeros(ntypes, 4, dtype=torch.float64).index_add_(0, center_type, values)


def finalize_env_stats(
    sums: torch.Tensor, slot_counts: torch.Tensor, rcut: float, radial: bool, set_davg_zero: bool, protect: float = 1e-2
) -> Tuple[torch.Tensor, torch.Tensor]:
    """davg, dstd per centre type ([ntypes, 4] or [ntypes, 1]) from accumulated sums.

    ``slot_counts[t]`` counts every slot of type-t centres, empty ones included (their rows are 0),
    as DeePMD-kit does. A type with no centres gets std = 1/rcut; small stds are floored."""
    ntypes = sums.shape[0]
    n = slot_counts.to(torch.float64)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    mean_r = sums[:, 0] / safe

    def _std(s2: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        var = (s2 / safe - (s / safe) ** 2).clamp_min(0.0)
        std = torch.sqrt(var)
        std = torch.where(std.abs() < protect, torch.full_like(std, protect), std)
        return torch.where(n > 0, std, torch.full_like(std, 1.0 / rcut))

    std_r = _std(sums[:, 1], sums[:, 0])
    if radial:
        davg = mean_r.unsqueeze(1)
        dstd = std_r.unsqueeze(1)
    else:
        std_a = _std(sums[:, 3], sums[:, 2])
        davg = torch.stack([mean_r] + [torch.zeros(ntypes, dtype=torch.float64)] * 3, dim=1)
        dstd = torch.stack([std_r, std_a, std_a, std_a], dim=1)
    if set_davg_zero:
        davg = torch.zeros_like(davg)
    return davg, dstd


def env_statistics(
    samples: list,
    rows_of: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
    ntypes: int,
    nnei: int,
    rcut: float,
    radial: bool,
    set_davg_zero: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """davg, dstd from statistics frames (``StatSample``): ``rows_of(coord, atype, center,
    neighbor, shift)`` gives a descriptor's kept pairs and rows; every centre of a real type
    (0 ≤ t < ntypes) counts ``nnei`` slots."""
    sums = torch.zeros(ntypes, 4, dtype=torch.float64)
    slots = torch.zeros(ntypes, dtype=torch.float64)
    with torch.no_grad():
        for s in samples:
            keep, rows = rows_of(s.coord, s.atype, s.center, s.neighbor, s.shift)
            sums += accumulate_env_stats(rows, s.atype[s.center[keep]], ntypes)
            real = s.atype[(s.atype >= 0) & (s.atype < ntypes)]
            slots += torch.bincount(real, minlength=ntypes).to(torch.float64) * nnei
    return finalize_env_stats(sums, slots, rcut, radial, set_davg_zero)
