"""The cluster data of benchmarks/scarce_head.py ``--configurations clusters`` (issue 15's
data-limited regime): whole molecules cut out of the DFT frames, and labels whose forces are
really −∇E, so the benchmark's two levels of theory are physical and its figures mean something."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from helpers import ROOT, WATER

sys.path.insert(0, str(ROOT / "benchmarks"))
water_clusters = importlib.import_module("water_clusters")


def _frame(k: int = 0):
    source = WATER / "data_0" / "set.000"
    coord = np.load(source / "coord.npy")[k].reshape(-1, 3).astype(np.float64)
    box = np.load(source / "box.npy")[k].reshape(3, 3).astype(np.float64)
    types = np.loadtxt(WATER / "data_0" / "type.raw", dtype=int)
    return coord, box, types


@pytest.mark.parametrize("molecules", [4, 8])
def test_a_cluster_is_whole_molecules_nearest_its_centre(molecules):
    coord, box, types = _frame()
    cluster = water_clusters.cut_cluster(coord, box, types, 0, molecules)
    assert cluster is not None
    xyz, t, mol = cluster
    assert len(t) == 3 * molecules and (t[:molecules] == 0).all() and (t[molecules:] == 1).all()
    for m in range(molecules):
        hydrogens = np.flatnonzero((mol == m) & (t == 1))
        assert len(hydrogens) == 2
        assert np.linalg.norm(xyz[hydrogens] - xyz[m], axis=1).max() < 1.25  # unwrapped: bonded, not an image away
    # every oxygen within the cluster's farthest oxygen distance of the centre (minimum image) is in it
    inverse = np.linalg.inv(box)
    d = coord[types == 0] - coord[0]
    d = (d @ inverse - np.round(d @ inverse)) @ box
    radius = np.linalg.norm(xyz[:molecules] - xyz[0], axis=1).max()
    assert (np.linalg.norm(d, axis=1) < radius - 1e-9).sum() <= molecules


@pytest.mark.parametrize("level", ["level_a", "level_b"])
def test_level_forces_are_minus_the_energy_gradient(level):
    coord, box, types = _frame(3)
    xyz, t, mol = water_clusters.cut_cluster(coord, box, types, 5, 4)
    label = getattr(water_clusters, level)
    _, force = label(xyz, t, mol)
    h = 1e-5
    rng = np.random.default_rng(0)
    for atom in rng.choice(len(t), 4, replace=False):
        for axis in range(3):
            plus, minus = xyz.copy(), xyz.copy()
            plus[atom, axis] += h
            minus[atom, axis] -= h
            numeric = -(label(plus, t, mol)[0] - label(minus, t, mol)[0]) / (2 * h)
            assert numeric == pytest.approx(force[atom, axis], abs=1e-6)


def test_level_b_differs_from_level_a_by_the_pair_term():
    coord, box, types = _frame(1)
    xyz, t, mol = water_clusters.cut_cluster(coord, box, types, 2, 8)
    e_a, f_a = water_clusters.level_a(xyz, t, mol)
    e_b, f_b = water_clusters.level_b(xyz, t, mol)
    # a correction of a real size: not zero, not the whole signal
    ratio = np.sqrt(np.mean((f_b - f_a) ** 2)) / np.sqrt(np.mean(f_a**2))
    assert 0.1 < ratio < 1.0
    assert e_a != e_b


def test_written_system_is_a_non_periodic_deepmd_npy_system(tmp_path):
    rng = np.random.default_rng(0)
    n = water_clusters.write_clusters(tmp_path / "sys", WATER / "data_0", np.arange(3), 2, 4, "B", rng)
    assert n == 6
    folder = tmp_path / "sys"
    assert (folder / "nopbc").exists() and not (folder / "set.000" / "box.npy").exists()
    assert np.load(folder / "set.000" / "coord.npy").shape == (6, 36)
    assert np.load(folder / "set.000" / "force.npy").shape == (6, 36)
    assert np.isfinite(np.load(folder / "set.000" / "energy.npy")).all()
    assert np.loadtxt(folder / "type.raw", dtype=int).tolist() == [0] * 4 + [1] * 8
