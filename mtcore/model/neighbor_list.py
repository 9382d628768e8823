"""Neighbour lists in plain torch (TorchScript-compatible), for frozen models and inference.

Training builds its lists once per frame with vesin (:mod:`mtcore.data.neighbors`); a frozen
model must run with nothing but torch, so it carries this builder. Both return the same layout:

    center[p], neighbor[p], image[p, 3]  with  r_ij = coord[neighbor] - coord[center] + image @ box

sorted by (center, neighbour type, distance, neighbour index). Descriptors rely on that order to
keep the nearest ``sel`` neighbours of each type without sorting again.

:func:`build_neighbor_list` uses cell lists (binning): atoms are sorted into bins at least rcut
wide (measured perpendicular to the cell faces, so triclinic cells work too) and each atom is
compared with the atoms of its own and the neighbouring bins only, so the cost grows linearly
with the atom count. :func:`build_neighbor_list_reference` is the former all-pairs builder, kept
as the reference the tests compare against.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def _face_spacing(box: torch.Tensor) -> torch.Tensor:
    """Distances between opposite faces of the cell, one per cell vector: [3]."""
    a, b, c = box[0], box[1], box[2]
    volume = torch.abs(torch.dot(a, torch.linalg.cross(b, c)))
    return torch.stack(
        [
            volume / torch.linalg.norm(torch.linalg.cross(b, c)),
            volume / torch.linalg.norm(torch.linalg.cross(c, a)),
            volume / torch.linalg.norm(torch.linalg.cross(a, b)),
        ]
    )


def _image_range(box: torch.Tensor, rcut: float) -> torch.Tensor:
    """Integer cell images (as float rows) that can hold a neighbour within rcut of the cell."""
    nmax = torch.ceil(rcut / _face_spacing(box)).to(torch.long)
    n0, n1, n2 = int(nmax[0]), int(nmax[1]), int(nmax[2])
    r0 = torch.arange(-n0, n0 + 1, dtype=box.dtype, device=box.device)
    r1 = torch.arange(-n1, n1 + 1, dtype=box.dtype, device=box.device)
    r2 = torch.arange(-n2, n2 + 1, dtype=box.dtype, device=box.device)
    grid = torch.meshgrid(r0, r1, r2, indexing="ij")
    return torch.stack([grid[0].reshape(-1), grid[1].reshape(-1), grid[2].reshape(-1)], dim=1)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_k|² for every pair, [len(a), len(b)], without a [len(a), len(b), 3] temporary."""
    d2 = (a * a).sum(1).unsqueeze(1) + (b * b).sum(1).unsqueeze(0) - 2.0 * (a @ b.t())
    return d2.clamp_min(0.0)


def _sort_pairs(
    center: torch.Tensor, neighbor: torch.Tensor, image: torch.Tensor, dist: torch.Tensor, atype: torch.Tensor, ntypes: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order pairs by (center, neighbour type, distance, neighbour index); distances come along."""
    if not torch.jit.is_scripting():
        grouped = _pair_order_in_c(center, neighbor, dist, atype)
        if grouped is not None:
            return center.index_select(0, grouped), neighbor.index_select(0, grouped), \
                image.index_select(0, grouped), dist.index_select(0, grouped)
    order = torch.argsort(neighbor, stable=True)
    order = order.index_select(0, torch.argsort(dist.index_select(0, order), stable=True))
    key = center.index_select(0, order) * ntypes + atype.index_select(0, neighbor.index_select(0, order))
    order = order.index_select(0, torch.argsort(key, stable=True))
    return center.index_select(0, order), neighbor.index_select(0, order), image.index_select(0, order), dist.index_select(0, order)


@torch.jit.unused
def _pair_order_in_c(center: torch.Tensor, neighbor: torch.Tensor, dist: torch.Tensor,
                     atype: torch.Tensor) -> Optional[torch.Tensor]:
    """Eager calls (a frozen file's twin, mtcore.eager_twin): the same order from one counting
    sort by centre and a sort of each centre's pairs in C (mtcore.data.pair_order), instead of
    three stable sorts of the whole list (2.6 of the 7 ms a 192-atom water list takes); None
    where that library is not available."""
    from mtcore.data.pair_order import KERNELS, pair_order

    if center.device.type != "cpu" or center.numel() < 2 or KERNELS.load() is None:
        return None
    types = atype.index_select(0, neighbor)
    order = pair_order(center.numpy(), neighbor.numpy(), types.numpy(), dist.detach().to(torch.float64).numpy())
    return torch.from_numpy(order)


#: frames above this many atoms keep the chunked cell lists in eager calls too: a whole frame's
#: list from vesin (with its ordering buffers, ~150 bytes a pair) would outgrow the memory a
#: chunked pass is bounded by (98,304 water atoms: ~1.3 GB)
WHOLE_FRAME_ATOMS = 20000


@torch.jit.unused
def frame_pairs_in_c(
    coord: torch.Tensor, atype: torch.Tensor, box: Optional[torch.Tensor], rcut: float
) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Eager calls (a frozen file's twin, mtcore.eager_twin): one frame's whole list from vesin,
    ordered in C (:func:`mtcore.data.neighbors.frame_neighbor_list`, the list training uses),
    in the layout of :func:`pairs_of` (image rows in the coordinates' dtype). Less than half the
    time of the torch cell lists (192 water atoms: 1.6 against 4.1 ms). None on other devices,
    for frames above WHOLE_FRAME_ATOMS, or where vesin cannot place the images (an index beyond
    int16)."""
    from mtcore.data.neighbors import frame_neighbor_list

    if coord.device.type != "cpu" or coord.shape[0] > WHOLE_FRAME_ATOMS:
        return None
    cell = None if box is None else box.detach().to(torch.float64).numpy()
    try:
        i, j, image, dist = frame_neighbor_list(coord.detach().to(torch.float64).numpy(), cell, atype.numpy(), rcut)
    except ValueError:
        return None
    return (torch.from_numpy(i).to(torch.long), torch.from_numpy(j).to(torch.long),
            torch.from_numpy(image).to(coord.dtype), torch.from_numpy(dist).to(coord.dtype))


def pairs_of_centres(
    pairs: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], centres: torch.Tensor, natoms: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of a frame's sorted list whose centre is in ``centres`` (ascending): each centre's
    pairs are one run of the list, so this is a gather of runs, in the list's order."""
    center, neighbor, image, dist = pairs
    if centres.shape[0] == natoms:
        return pairs
    counts = torch.bincount(center, minlength=natoms)
    starts = torch.cumsum(counts, 0) - counts
    mine = counts.index_select(0, centres)
    total = int(mine.sum())
    run_start = torch.cumsum(mine, 0) - mine
    rows = torch.arange(total, device=center.device) + torch.repeat_interleave(
        starts.index_select(0, centres) - run_start, mine, output_size=total)
    return center.index_select(0, rows), neighbor.index_select(0, rows), image.index_select(0, rows), dist.index_select(0, rows)


def sort_neighbor_list(
    center: torch.Tensor, neighbor: torch.Tensor, image: torch.Tensor, dist: torch.Tensor, atype: torch.Tensor, ntypes: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order pairs by (center, neighbour type, distance, neighbour index)."""
    c, n, img, _ = _sort_pairs(center, neighbor, image, dist, atype, ntypes)
    return c, n, img


def build_neighbor_list_reference(
    coord: torch.Tensor, atype: torch.Tensor, box: Optional[torch.Tensor], rcut: float, ntypes: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pairs by comparing every atom with every atom of every image: O(n²), the reference.

    Chunked over centres to bound memory; distances come from one matmul per chunk, and the pairs
    it finds near rcut are checked again with exact differences.
    """
    n = coord.shape[0]
    device = coord.device
    if box is None:
        images = torch.zeros(1, 3, dtype=coord.dtype, device=device)
        wrapped = coord
        cell_of = torch.zeros(n, 3, dtype=coord.dtype, device=device)
        shifts = images
    else:
        frac = coord @ torch.linalg.inv(box)
        cell_of = torch.floor(frac)
        wrapped = (frac - cell_of) @ box
        images = _image_range(box, rcut)
        shifts = images @ box
    nimg = images.shape[0]
    cand = (wrapped.unsqueeze(0) + shifts.unsqueeze(1)).reshape(-1, 3)
    zero_image = int(torch.nonzero(torch.all(images == 0.0, dim=1))[0, 0])
    chunk = max(1, 4_000_000 // max(1, nimg * n))
    centers: List[torch.Tensor] = []
    neighbors: List[torch.Tensor] = []
    image_rows: List[torch.Tensor] = []
    dists: List[torch.Tensor] = []
    rc2 = rcut * rcut
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rough = _squared_distances(wrapped[start:stop], cand)
        hits = torch.nonzero(rough < rc2 * (1.0 + 1e-8) + 1e-8)
        ii, kk = hits[:, 0], hits[:, 1]
        gi = ii + start
        diff = cand.index_select(0, kk) - wrapped.index_select(0, gi)
        d2 = (diff * diff).sum(1)
        img = kk // n
        jj = kk - img * n
        real = (d2 < rc2) & ~((jj == gi) & (img == zero_image))
        gi, jj, img, d2 = gi[real], jj[real], img[real], d2[real]
        centers.append(gi)
        neighbors.append(jj)
        image_rows.append(images[img] + cell_of[gi] - cell_of[jj])
        dists.append(torch.sqrt(d2))
    return sort_neighbor_list(torch.cat(centers), torch.cat(neighbors), torch.cat(image_rows), torch.cat(dists), atype, ntypes)


def _cap_bins(nbins: torch.Tensor, cap: int) -> torch.Tensor:
    """Fewer, wider bins when a sparse system would have far more bins than atoms."""
    while int(nbins[0]) * int(nbins[1]) * int(nbins[2]) > cap:
        k = int(torch.argmax(nbins))
        nbins[k] = (nbins[k] + 1) // 2
    return nbins


def _offsets(reach: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every bin offset within ``reach`` bins along each axis: [K, 3] (long)."""
    r0, r1, r2 = int(reach[0]), int(reach[1]), int(reach[2])
    grid = torch.meshgrid(
        torch.arange(-r0, r0 + 1, device=device),
        torch.arange(-r1, r1 + 1, device=device),
        torch.arange(-r2, r2 + 1, device=device),
        indexing="ij",
    )
    return torch.stack([grid[0].reshape(-1), grid[1].reshape(-1), grid[2].reshape(-1)], dim=1)


# Atoms sorted into bins, everything a pair search needs: positions wrapped into the cell, the
# cell each atom came from, its bin, bins per axis, search reach (bins), atoms in bin order,
# atoms per bin, first slot of each bin, bin strides, cell vectors, periodic or not.
CellBins = Tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool,
]


def bin_atoms(coord: torch.Tensor, box: Optional[torch.Tensor], rcut: float) -> CellBins:
    """Sort one frame's atoms into bins at least rcut wide along each face normal (O(n)).

    A neighbour within rcut is then at most ``reach`` bins away along each axis (1, or more along
    an axis where the cell is narrower than rcut, where the search wraps to further images).
    Without a box the bins cover the atoms' bounding box and nothing wraps.
    """
    n = coord.shape[0]
    device = coord.device
    dtype = coord.dtype
    cap = 8 * n + 64
    if box is not None:
        frac = coord @ torch.linalg.inv(box)
        cell_of = torch.floor(frac)
        unit = frac - cell_of  # in [0, 1]
        pos = unit @ box
        spacing = _face_spacing(box)
        nbins = _cap_bins(torch.clamp(torch.floor(spacing / rcut), min=1.0).to(torch.long), cap)
        # bins are spacing/nbins wide (≥ rcut unless the cell is narrower than rcut)
        reach = torch.ceil(rcut * nbins.to(dtype) / spacing).to(torch.long).clamp(min=1)
        cell_vectors = box
    else:
        lo = coord.min(0).values if n > 0 else torch.zeros(3, dtype=dtype, device=device)
        span = coord.max(0).values - lo if n > 0 else torch.zeros(3, dtype=dtype, device=device)
        nbins = _cap_bins(torch.clamp(torch.floor(span / rcut), min=1.0).to(torch.long), cap)
        width = torch.maximum(span / nbins.to(dtype), torch.full_like(span, rcut))
        unit = (coord - lo) / (width * nbins.to(dtype))
        pos = coord
        cell_of = torch.zeros(n, 3, dtype=dtype, device=device)
        reach = torch.ones(3, dtype=torch.long, device=device)
        cell_vectors = torch.zeros(3, 3, dtype=dtype, device=device)  # unused: no images
    bin3 = torch.minimum(torch.floor(unit * nbins.to(dtype)).to(torch.long).clamp(min=0), nbins - 1)
    strides = torch.stack([nbins[1] * nbins[2], nbins[2], torch.ones_like(nbins[0])])
    nbin_total = int(nbins[0]) * int(nbins[1]) * int(nbins[2])
    bin_of = (bin3 * strides).sum(1)
    by_bin = torch.argsort(bin_of, stable=True)
    counts = torch.bincount(bin_of, minlength=nbin_total)
    starts = torch.cumsum(counts, 0) - counts
    return pos, cell_of, bin3, nbins, reach, by_bin, counts, starts, strides, cell_vectors, box is not None


def spatial_order(bins: CellBins) -> torch.Tensor:
    """The atoms in Z-order (Morton) of their bins: consecutive runs are compact blocks of space,
    so a chunk of atoms taken from this order needs few neighbours from outside itself."""
    bin3 = bins[2]
    key = torch.zeros(bin3.shape[0], dtype=torch.long, device=bin3.device)
    for bit in range(20):
        for axis in range(3):
            key = key | (((bin3[:, axis] >> bit) & 1) << (3 * bit + (2 - axis)))
    return torch.argsort(key, stable=True)


def pairs_of(
    bins: CellBins, centres: torch.Tensor, atype: torch.Tensor, rcut: float, ntypes: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(center, neighbor, image, distance) of the pairs within rcut around ``centres`` (atom
    indices), sorted by (center, neighbour type, distance, neighbour index).

    Each centre is compared with the atoms of the bins within ``reach`` (27 bin offsets in a cell
    wider than 2·rcut): one row per (centre, offset), the candidates of a block of rows gathered
    at once, so a small frame takes a few vectorised operations instead of some per offset, and a
    large one keeps its temporaries small.
    """
    pos, cell_of, bin3, nbins, reach, by_bin, counts, starts, strides, cell_vectors, periodic = bins
    device = pos.device
    dtype = pos.dtype
    m = centres.shape[0]
    rc2 = rcut * rcut
    # positions in bin order, one contiguous column per axis: candidates are gathered per column
    px = pos[:, 0].index_select(0, by_bin)
    py = pos[:, 1].index_select(0, by_bin)
    pz = pos[:, 2].index_select(0, by_bin)
    offsets = _offsets(reach, device)
    k = offsets.shape[0]
    raw = (bin3.index_select(0, centres).unsqueeze(1) + offsets.unsqueeze(0)).reshape(-1, 3)  # [m·k, 3]
    owner = torch.arange(m, device=device).repeat_interleave(k)  # row → centre position
    mine = pos.index_select(0, centres).index_select(0, owner)
    if periodic:
        wrap = torch.div(raw, nbins, rounding_mode="floor")
        other = raw - wrap * nbins
        bin_index = (other * strides).sum(1)
        many = counts.index_select(0, bin_index)
        img = wrap.to(dtype)
        # the centre moved by minus the image shift: r_ij = pos_j - (pos_i - wrap_i @ box)
        q = mine - img @ cell_vectors
        moved = (wrap != 0).any(1)
    else:
        valid = ((raw >= 0) & (raw < nbins)).all(1)
        other = torch.minimum(raw.clamp(min=0), nbins - 1)
        bin_index = (other * strides).sum(1)
        many = torch.where(valid, counts.index_select(0, bin_index), torch.zeros_like(bin_index))
        img = torch.zeros(raw.shape[0], 3, dtype=dtype, device=device)
        q = mine
        moved = torch.zeros(raw.shape[0], dtype=torch.bool, device=device)
    first_slot = starts.index_select(0, bin_index)  # each row's bin starts here in bin order
    centers: List[torch.Tensor] = []
    neighbors: List[torch.Tensor] = []
    image_rows: List[torch.Tensor] = []
    dists: List[torch.Tensor] = []
    nrows = raw.shape[0]
    # rows in blocks: one block for a small frame (few operations), bounded temporaries (that stay
    # in cache) for a large one (a local: TorchScript reads no module globals)
    block = 4096
    for lo in range(0, nrows, block):
        hi = min(nrows, lo + block)
        block_many = many[lo:hi]
        total = int(block_many.sum())
        if total == 0:
            continue
        # candidate slots: consecutive from each row's first slot
        base = first_slot[lo:hi] - (torch.cumsum(block_many, 0) - block_many)
        slot = torch.arange(total, device=device) + torch.repeat_interleave(base, block_many, output_size=total)
        row = torch.repeat_interleave(torch.arange(lo, hi, device=device), block_many, output_size=total)
        dx = px.index_select(0, slot) - q[:, 0].index_select(0, row)
        dy = py.index_select(0, slot) - q[:, 1].index_select(0, row)
        dz = pz.index_select(0, slot) - q[:, 2].index_select(0, row)
        d2 = dx * dx + dy * dy + dz * dz
        idx = torch.nonzero(d2 < rc2).squeeze(1)
        ri = row.index_select(0, idx)
        ci = centres.index_select(0, owner.index_select(0, ri))
        cj = by_bin.index_select(0, slot.index_select(0, idx))
        d2 = d2.index_select(0, idx)
        real = torch.nonzero((cj != ci) | moved.index_select(0, ri)).squeeze(1)  # not the atom itself
        ri, ci, cj, d2 = ri.index_select(0, real), ci.index_select(0, real), cj.index_select(0, real), d2.index_select(0, real)
        centers.append(ci)
        neighbors.append(cj)
        # image in the frame of the input (unwrapped) coordinates
        image_rows.append(img.index_select(0, ri) + cell_of.index_select(0, ci) - cell_of.index_select(0, cj))
        dists.append(torch.sqrt(d2))
    if len(centers) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, torch.zeros(0, 3, dtype=dtype, device=device), torch.zeros(0, dtype=dtype, device=device)
    return _sort_pairs(torch.cat(centers), torch.cat(neighbors), torch.cat(image_rows), torch.cat(dists), atype, ntypes)


def neighbor_pairs(
    coord: torch.Tensor, atype: torch.Tensor, box: Optional[torch.Tensor], rcut: float, ntypes: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(center, neighbor, image, distance) of all pairs within rcut of one frame, sorted; cell lists.

    coord [n, 3] (need not be wrapped into the cell), box [3, 3] or None (no periodicity).
    Periodic images of every atom are included (also of the centre itself), so cells smaller than
    2·rcut work.
    """
    centres = torch.arange(coord.shape[0], device=coord.device)
    return pairs_of(bin_atoms(coord, box, rcut), centres, atype, rcut, ntypes)


def build_neighbor_list(
    coord: torch.Tensor, atype: torch.Tensor, box: Optional[torch.Tensor], rcut: float, ntypes: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pairs (i, j, image) with |r_ij| < rcut for one frame; coord [n, 3], box [3, 3] or None.

    Linear in n (cell lists, :func:`neighbor_pairs`); same pairs and order as
    :func:`build_neighbor_list_reference`.
    """
    c, nb, img, _ = neighbor_pairs(coord, atype, box, rcut, ntypes)
    return c, nb, img


def neighbor_rank(center: torch.Tensor, ntype: torch.Tensor, natoms: int, ntypes: int) -> torch.Tensor:
    """Rank of each pair within its (centre, neighbour type) group; pairs must be sorted."""
    key = center * ntypes + ntype
    counts = torch.bincount(key, minlength=natoms * ntypes)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(key.numel(), device=key.device) - starts[key]
