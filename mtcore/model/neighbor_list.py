"""Neighbour lists in plain torch (TorchScript-compatible), for frozen models and inference.

Training builds its lists once per frame with vesin (:mod:`mtcore.data.neighbors`); a frozen
model must run with nothing but torch, so it carries this builder. Both return the same layout:

    center[p], neighbor[p], image[p, 3]  with  r_ij = coord[neighbor] - coord[center] + image @ box

sorted by (center, neighbour type, distance, neighbour index). Descriptors rely on that order to
keep the nearest ``sel`` neighbours of each type without sorting again.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def _image_range(box: torch.Tensor, rcut: float) -> torch.Tensor:
    """Integer cell images (as float rows) that can hold a neighbour within rcut of the cell."""
    a, b, c = box[0], box[1], box[2]
    volume = torch.abs(torch.dot(a, torch.linalg.cross(b, c)))
    spacing = torch.stack(
        [
            volume / torch.linalg.norm(torch.linalg.cross(b, c)),
            volume / torch.linalg.norm(torch.linalg.cross(c, a)),
            volume / torch.linalg.norm(torch.linalg.cross(a, b)),
        ]
    )
    nmax = torch.ceil(rcut / spacing).to(torch.long)
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


def sort_neighbor_list(
    center: torch.Tensor, neighbor: torch.Tensor, image: torch.Tensor, dist: torch.Tensor, atype: torch.Tensor, ntypes: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order pairs by (center, neighbour type, distance, neighbour index)."""
    order = torch.argsort(neighbor, stable=True)
    order = order[torch.argsort(dist[order], stable=True)]
    key = center[order] * ntypes + atype[neighbor[order]]
    order = order[torch.argsort(key, stable=True)]
    return center[order], neighbor[order], image[order]


def build_neighbor_list(
    coord: torch.Tensor, atype: torch.Tensor, box: Optional[torch.Tensor], rcut: float, ntypes: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pairs (i, j, image) with |r_ij| < rcut for one frame; coord [n, 3], box [3, 3] or None.

    Periodic images of every atom are included (also of the centre itself), so cells smaller
    than 2·rcut work. Coordinates need not be wrapped into the cell. Cost is O(n²) in time and
    is chunked over centres to bound memory; distances come from one matmul per chunk, and the
    pairs it finds near rcut are checked again with exact differences.
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
    # candidate neighbours: every atom in every image, flattened as (image, atom)
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
        # candidates by the fast (matmul) distances with a margin, then the exact test on those
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
        # image in the frame of the unwrapped input coordinates
        image_rows.append(images[img] + cell_of[gi] - cell_of[jj])
        dists.append(torch.sqrt(d2))
    center = torch.cat(centers)
    neighbor = torch.cat(neighbors)
    image = torch.cat(image_rows)
    dist = torch.cat(dists)
    return sort_neighbor_list(center, neighbor, image, dist, atype, ntypes)


def neighbor_rank(center: torch.Tensor, ntype: torch.Tensor, natoms: int, ntypes: int) -> torch.Tensor:
    """Rank of each pair within its (centre, neighbour type) group; pairs must be sorted."""
    key = center * ntypes + ntype
    counts = torch.bincount(key, minlength=natoms * ntypes)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(key.numel(), device=key.device) - starts[key]
