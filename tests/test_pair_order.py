"""mtcore/data/pair_order.py: the C per-centre sort gives numpy.lexsort's order exactly, ties
included, and the training data's neighbour lists are unchanged by it."""

from __future__ import annotations

import numpy as np
import pytest
import vesin

from helpers import WATER
from mtcore.data import pair_order as module
from mtcore.data.neighbors import frame_neighbor_list

pytestmark = pytest.mark.skipif(module.KERNELS.load() is None, reason=f"pair order kernel {module.KERNELS.status}")


def lexsorted(i, j, t, d):
    return np.lexsort((j, d, t, i))


def pairs(coord, box, rcut):
    i, j, _, d = vesin.NeighborList(cutoff=rcut, full_list=True).compute(coord, box, True, "ijSd")
    return i, j, d


def test_water_frame_matches_lexsort():
    coord = np.load(WATER / "data_0" / "set.000" / "coord.npy")[0].reshape(-1, 3).astype(np.float64)
    box = np.load(WATER / "data_0" / "set.000" / "box.npy")[0].reshape(3, 3).astype(np.float64)
    atype = np.loadtxt(WATER / "data_0" / "type.raw", dtype=np.int64)
    i, j, d = pairs(coord, box, 6.0)
    assert not np.all(i[1:] >= i[:-1])  # vesin does not group by centre here: the counting sort must
    assert np.array_equal(module.pair_order(i, j, atype[j], d), lexsorted(i, j, atype[j], d))


def test_ties_and_repeated_images_keep_lexsorts_order():
    """A simple cubic lattice in a box smaller than twice the cut-off: many neighbours at exactly
    the same distance, and the same neighbour through several images (equal j, equal d)."""
    grid = np.stack(np.meshgrid(*[np.arange(3.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    box = np.eye(3) * 3.0
    i, j, d = pairs(grid, box, 2.5)
    atype = np.arange(len(grid)) % 2
    t = atype[j]
    order = module.pair_order(i, j, t, d)
    assert len(np.unique(d)) < 10 and len(set(zip(i.tolist(), j.tolist()))) < len(i)  # the ties are there
    assert np.array_equal(order, lexsorted(i, j, t, d))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffled_lists_of_every_size_match_lexsort(seed):
    """Centres in any order, runs longer than the insertion-sort block (16) and odd lengths,
    float32 distances with repeats."""
    rng = np.random.default_rng(seed)
    P = 5000
    i = rng.integers(0, 37, P).astype(np.uint64)
    j = rng.integers(0, 50, P).astype(np.uint64)
    t = rng.integers(0, 3, P)
    d = rng.choice(np.linspace(0.5, 6.0, 40), P).astype(np.float32)
    assert np.array_equal(module.pair_order(i, j, t, d), lexsorted(i, j, t, d))


@pytest.mark.parametrize("seed", [0, 1])
def test_ordered_pairs_keep_filter_and_order_in_one_pass(seed):
    """mtcore.data.pair_order.ordered_pairs: the pairs closer than the cut-off (not those at it,
    beyond it or NaN), in lexsort's order with ties, their shifts along: as mask + lexsort + gathers."""
    rng = np.random.default_rng(seed)
    P, natoms = 6000, 41
    i = rng.integers(0, natoms, P).astype(np.uint64)
    j = rng.integers(0, natoms, P).astype(np.uint64)
    shifts = rng.integers(-3, 4, (P, 3)).astype(np.int32)
    d = rng.choice(np.linspace(0.5, 6.5, 45), P)
    d[::97] = np.nan
    d[::89] = 6.0  # exactly at the cut-off: out
    types = rng.integers(0, 3, natoms)
    got = module.ordered_pairs(i, j, shifts, d, types, 6.0)
    keep = d < 6.0
    order = lexsorted(i[keep], j[keep], types[j[keep]], d[keep])
    want = (i[keep][order], j[keep][order], shifts[keep][order], d[keep][order])
    assert got is not None and len(got[0]) == keep.sum() < P
    for a, b in zip(got, want):
        assert np.array_equal(a, b.astype(a.dtype))


def test_frame_lists_are_the_same_with_the_plain_sort(monkeypatch):
    coord = np.load(WATER / "data_1" / "set.000" / "coord.npy")[3].reshape(-1, 3)
    box = np.load(WATER / "data_1" / "set.000" / "box.npy")[3].reshape(3, 3)
    atype = np.loadtxt(WATER / "data_1" / "type.raw", dtype=np.int64)
    fast = frame_neighbor_list(coord, box, atype, 6.0)
    monkeypatch.setattr(module.KERNELS, "library", None)
    plain = frame_neighbor_list(coord, box, atype, 6.0)
    for a, b in zip(fast[:3], plain[:3]):  # centre, neighbour, image: integers
        assert np.array_equal(a, b)
    assert np.allclose(fast[3], plain[3], rtol=1e-15, atol=0.0)  # distances, in the same order


def test_frozen_models_list_is_the_same_eager_and_scripted():
    """mtcore.model.neighbor_list sorts in C when called eagerly (a frozen file's eager twin) and
    with three stable torch sorts when scripted: the same pairs in the same order, ties included
    (a lattice in a box smaller than twice the cut-off: equal distances, repeated images)."""
    import torch

    from mtcore.model import neighbor_list

    scripted = torch.jit.script(neighbor_list.neighbor_pairs)
    grid = torch.stack(torch.meshgrid(*[torch.arange(3.0, dtype=torch.float64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    water = torch.from_numpy(np.load(WATER / "data_0" / "set.000" / "coord.npy")[0].reshape(-1, 3).astype(np.float64))
    water_box = torch.from_numpy(np.load(WATER / "data_0" / "set.000" / "box.npy")[0].reshape(3, 3).astype(np.float64))
    water_types = torch.from_numpy(np.loadtxt(WATER / "data_0" / "type.raw", dtype=np.int64))
    for coord, atype, box, rcut in [(grid, torch.arange(27) % 2, torch.eye(3, dtype=torch.float64) * 3.0, 2.5),
                                    (water, water_types, water_box, 6.0), (water[:50], water_types[:50], None, 6.0)]:
        calls = []
        original = neighbor_list._pair_order_in_c

        def counted(*args):
            calls.append(1)
            return original(*args)

        neighbor_list._pair_order_in_c = counted
        try:
            eager = neighbor_list.neighbor_pairs(coord, atype, box, rcut, 2)
        finally:
            neighbor_list._pair_order_in_c = original
        plain = scripted(coord, atype, box, rcut, 2)
        assert calls == [1]
        for a, b in zip(eager, plain):
            assert torch.equal(a, b)


def _images_by_pair(pairs):
    """The image rows sorted within each (centre, neighbour) run."""
    center, neighbor, image = (t.numpy() for t in pairs[:3])
    order = np.lexsort((image[:, 2], image[:, 1], image[:, 0], neighbor, center))
    return __import__("torch").from_numpy(image[order])


@pytest.mark.parametrize("chunk", [None, "half", "scattered"])
def test_eager_frame_list_selects_the_cell_lists_pairs(chunk):
    """A frozen file's eager twin takes each frame's list from vesin (neighbor_list.frame_pairs_in_c,
    the training data's list) and a chunk's centres from it (pairs_of_centres): the same pairs,
    images and order as the torch cell lists give those centres, for unwrapped coordinates (atoms
    moved by whole cell vectors), an open cluster and a box narrower than twice the cut-off."""
    import torch

    from mtcore.model.neighbor_list import bin_atoms, frame_pairs_in_c, pairs_of, pairs_of_centres

    water = torch.from_numpy(np.load(WATER / "data_0" / "set.000" / "coord.npy")[0].reshape(-1, 3).astype(np.float64))
    box = torch.from_numpy(np.load(WATER / "data_0" / "set.000" / "box.npy")[0].reshape(3, 3).astype(np.float64))
    types = torch.from_numpy(np.loadtxt(WATER / "data_0" / "type.raw", dtype=np.int64))
    moved = water + torch.randint(-2, 3, (water.shape[0], 3), generator=torch.Generator().manual_seed(3)).double() @ box
    small = 0.45 * box  # 5.6 Å cell, cut-off 6 Å: neighbours among several images
    for coord, cell, rcut in [(moved, box, 6.0), (water[:80], None, 6.0), (water[:40] * 0.45, small, 6.0)]:
        n = coord.shape[0]
        atype = types[:n]
        centres = {None: torch.arange(n), "half": torch.arange(n // 2, n),
                   "scattered": torch.arange(0, n, 3)}[chunk]
        listed = frame_pairs_in_c(coord, atype, cell, rcut)
        assert listed is not None
        mine = pairs_of_centres(listed, centres, n)
        theirs = pairs_of(bin_atoms(coord, cell, rcut), centres, atype, rcut, 2)
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
        assert torch.allclose(mine[3], theirs[3], rtol=0, atol=1e-12)
        # images of one atom at one distance (a small cell) are an exact tie, in either order
        assert torch.equal(_images_by_pair(mine), _images_by_pair(theirs))
        if cell is None or cell is box:  # no ties: the same order
            assert torch.equal(mine[2], theirs[2])
