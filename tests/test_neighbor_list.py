"""vesin (training) and the plain-torch builder (frozen models) give the same sorted pair list."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import water_frame
from mtcore.data.neighbors import frame_neighbor_list
from mtcore.model.neighbor_list import build_neighbor_list


def _pairs(center, neighbor, image):
    return sorted(zip(np.asarray(center).tolist(), np.asarray(neighbor).tolist(), map(tuple, np.asarray(image).astype(int).tolist())))


def _both(coord, atype, box, rcut):
    c1, n1, i1, _ = frame_neighbor_list(coord.numpy(), None if box is None else box.numpy(), atype.numpy(), rcut)
    c2, n2, i2 = build_neighbor_list(coord, atype, box, rcut, 2)
    return (c1, n1, i1), (c2.numpy(), n2.numpy(), i2.numpy())


@pytest.mark.parametrize("case", ["water", "unwrapped", "small_cell", "open_cluster"])
def test_vesin_and_torch_builders_agree(case):
    coord, atype, box = water_frame(0)
    rcut = 6.0
    if case == "unwrapped":
        coord = coord + box[0] * 3 - box[1] * 2  # far outside the cell
    if case == "small_cell":
        coord, atype = coord[:6] * 0.3, atype[:6]
        box = torch.eye(3, dtype=torch.float64) * 4.0  # cell smaller than 2·rcut: several images of one atom
        rcut = 5.0
    if case == "open_cluster":
        coord, atype, box = coord[:40], atype[:40], None
    (c1, n1, i1), (c2, n2, i2) = _both(coord, atype, box, rcut)
    assert len(c1) > 0
    assert _pairs(c1, n1, i1) == _pairs(c2, n2, i2)
    # both sorted by (center, neighbour type, distance)
    for c, n, img in ((c1, n1, i1), (c2, n2, i2)):
        img_t = torch.as_tensor(np.asarray(img), dtype=torch.float64)
        rij = coord[torch.as_tensor(np.asarray(n), dtype=torch.long)] - coord[torch.as_tensor(np.asarray(c), dtype=torch.long)]
        if box is not None:
            rij = rij + img_t @ box
        d = rij.norm(dim=1).numpy()
        assert np.all(d < rcut) and np.all(d > 0)
        key = np.asarray(c) * 2 + atype.numpy()[np.asarray(n)]
        assert np.all(np.diff(key) >= 0)
        same = np.diff(key) == 0
        assert np.all(np.diff(d)[same] >= -1e-12)


@pytest.mark.parametrize("case", ["water", "unwrapped", "small_cell", "open_cluster"])
def test_cell_lists_equal_the_all_pairs_reference(case):
    """The linear-time builder frozen models carry gives the former all-pairs builder's pairs."""
    from mtcore.model.neighbor_list import build_neighbor_list_reference

    coord, atype, box = water_frame(1)
    rcut = 6.0
    if case == "unwrapped":
        coord = coord - box[2] * 4 + box[0] * 0.5
    if case == "small_cell":
        coord, atype = coord[:9] * 0.25, atype[:9]
        box = torch.tensor([[3.5, 0.0, 0.0], [1.2, 3.2, 0.0], [-0.7, 0.9, 2.9]], dtype=torch.float64)  # triclinic
        rcut = 5.5
    if case == "open_cluster":
        coord, atype, box = coord[:70], atype[:70], None
    got = build_neighbor_list(coord, atype, box, rcut, 2)
    ref = build_neighbor_list_reference(coord, atype, box, rcut, 2)
    assert len(ref[0]) > 0
    assert _pairs(*got) == _pairs(*ref)
    assert torch.equal(got[0], ref[0]) and torch.equal(atype[got[1]], atype[ref[1]])  # same (centre, type) layout
