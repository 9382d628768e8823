"""Small water clusters with two analytic levels of theory: the data-limited regime of issue 15.

The periodic 192-atom DFT frames carry so many atomic environments that even 2 of them are not a
data limit at benchmark step counts (docs/multitask.md). Here each frame is a cluster of a few
whole molecules cut out of those DFT frames (real liquid geometries, no periodic box), so a
handful of frames really is a handful of environments. Clusters have no DFT labels, so both
levels are analytic and exact, with forces by autograd:

* level A, the cheap rich level: a flexible SPC/E-like water model: harmonic O-H bonds and H-O-H
  angles within a molecule, Lennard-Jones O-O and shifted-force Coulomb between molecules, every
  intermolecular term smoothly zero at 6 Å (the descriptor's cut-off);
* level B, the scarce level: level A plus ``scarce_head.pair_correction`` (the same smooth pair
  term as the periodic benchmark's level B).
"""

from __future__ import annotations

import mtcore  # noqa: F401  first: MKL's kernels are chosen when torch loads (mtcore/mkl_dispatch.py)

import shutil
from pathlib import Path

import numpy as np
import torch

from scarce_head import pair_correction

#: eV, Å, rad, e; SPC/E charges and O-O Lennard-Jones, a flexible O-H bond and H-O-H angle
BOND_K, BOND_R0 = 22.0, 0.97
ANGLE_K, ANGLE_0 = 1.6, np.deg2rad(104.5)
CHARGE = {0: -0.8476, 1: 0.4238}
LJ_EPSILON, LJ_SIGMA = 0.00674, 3.166
COULOMB_K = 14.399645
CUTOFF = 6.0
#: edge of the (non-periodic) box written for the clusters; no image is ever within CUTOFF
FAR_BOX = 100.0


def _shifted_force(v, dv, r: torch.Tensor, rc: float) -> torch.Tensor:
    """V(r) − V(rc) − (r − rc) V'(rc): energy and force both zero at rc, so no jump at the cut."""
    rc_t = torch.as_tensor(rc, dtype=r.dtype)
    return torch.where(r < rc, v(r) - v(rc_t) - (r - rc) * dv(rc_t), torch.zeros_like(r))


def level_a(coord: np.ndarray, types: np.ndarray, molecule: np.ndarray) -> tuple[float, np.ndarray]:
    """Energy and forces of level A for one cluster (``molecule[i]``: the molecule of atom i)."""
    x = torch.tensor(coord, dtype=torch.float64, requires_grad=True)
    t = torch.as_tensor(types)
    mol = torch.as_tensor(molecule)
    n = len(types)
    i, j = torch.triu_indices(n, n, 1)
    rij = x[j] - x[i]
    r = rij.norm(dim=1)
    same = mol[i] == mol[j]
    # intramolecular: the two O-H bonds and the H-O-H angle of each molecule
    oxygen = torch.nonzero(t == 0).flatten()
    energy = x.new_zeros(())
    for o in oxygen.tolist():
        h = torch.nonzero((mol == mol[o]) & (t == 1)).flatten()
        d1, d2 = x[h[0]] - x[o], x[h[1]] - x[o]
        r1, r2 = d1.norm(), d2.norm()
        angle = torch.acos(torch.clamp((d1 @ d2) / (r1 * r2), -1.0, 1.0))
        energy = energy + BOND_K * ((r1 - BOND_R0) ** 2 + (r2 - BOND_R0) ** 2) + ANGLE_K * (angle - ANGLE_0) ** 2
    # intermolecular: shifted-force Coulomb between all pairs, Lennard-Jones between oxygens
    q = torch.tensor([CHARGE[int(k)] for k in types], dtype=torch.float64)
    qq = COULOMB_K * q[i] * q[j]
    coulomb = _shifted_force(lambda s: 1.0 / s, lambda s: -1.0 / s**2, r, CUTOFF)
    lj = _shifted_force(lambda s: 4 * LJ_EPSILON * ((LJ_SIGMA / s) ** 12 - (LJ_SIGMA / s) ** 6),
                        lambda s: 4 * LJ_EPSILON * (-12 * LJ_SIGMA**12 / s**13 + 6 * LJ_SIGMA**6 / s**7), r, CUTOFF)
    oo = (t[i] == 0) & (t[j] == 0)
    inter = torch.where(same, torch.zeros_like(r), qq * coulomb + torch.where(oo, lj, torch.zeros_like(r)))
    energy = energy + inter.sum()
    (grad,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -grad.numpy()


def level_b(coord: np.ndarray, types: np.ndarray, molecule: np.ndarray) -> tuple[float, np.ndarray]:
    """Level A plus the pair correction (evaluated in a box far larger than its 4 Å cut-off)."""
    coord = np.asarray(coord, dtype=np.float64)
    energy, force = level_a(coord, types, molecule)
    e_pair, f_pair = pair_correction(coord, np.eye(3) * FAR_BOX, types)
    return energy + e_pair, force + f_pair


def cut_cluster(coord: np.ndarray, box: np.ndarray, types: np.ndarray, center: int, molecules: int):
    """The ``molecules`` whole molecules whose oxygens are nearest oxygen ``center`` (minimum
    image), unwrapped around it: coordinates (oxygens first), types, molecule of each atom; None
    when an oxygen there does not own exactly two hydrogens."""
    inverse = np.linalg.inv(box)

    def minimum_image(d: np.ndarray) -> np.ndarray:
        frac = d @ inverse
        return (frac - np.round(frac)) @ box

    oxygens, hydrogens = np.flatnonzero(types == 0), np.flatnonzero(types == 1)
    # each hydrogen belongs to its nearest oxygen
    d_ho = np.linalg.norm(minimum_image(coord[hydrogens][:, None, :] - coord[oxygens][None, :, :]), axis=2)
    owner = oxygens[np.argmin(d_ho, axis=1)]
    d_oo = np.linalg.norm(minimum_image(coord[oxygens] - coord[center]), axis=1)
    chosen = oxygens[np.argsort(d_oo)[:molecules]]
    owned = [hydrogens[owner == o] for o in chosen]
    if any(len(h) != 2 for h in owned):
        return None
    atoms = np.concatenate([chosen, np.concatenate(owned)])
    unwrapped = coord[center] + minimum_image(coord[atoms] - coord[center])
    molecule = np.concatenate([np.arange(molecules), np.repeat(np.arange(molecules), 2)])
    return unwrapped - unwrapped.mean(axis=0) + FAR_BOX / 2, types[atoms], molecule


def write_clusters(folder: Path, source: Path, frames: np.ndarray, per_frame: int, molecules: int,
                   level: str, rng: np.random.Generator, forces_too: bool = True) -> int:
    """A non-periodic deepmd/npy system of clusters cut from ``frames`` of the DFT system
    ``source``, labelled at ``level`` ('A' or 'B'); returns the number of clusters written."""
    sets = sorted(source.glob("set.*"))
    coords = np.concatenate([np.load(s / "coord.npy") for s in sets]).astype(np.float64)
    boxes = np.concatenate([np.load(s / "box.npy") for s in sets]).astype(np.float64)
    types = np.loadtxt(source / "type.raw", dtype=int).reshape(-1)
    label = level_a if level == "A" else level_b
    out_coord, out_energy, out_force, out_types = [], [], [], None
    for f in frames:
        coord, box = coords[f].reshape(-1, 3), boxes[f].reshape(3, 3)
        written = 0
        for c in rng.permutation(np.flatnonzero(types == 0)):  # until per_frame clusters are whole
            if written == per_frame:
                break
            cluster = cut_cluster(coord, box, types, int(c), molecules)
            if cluster is None:
                continue
            written += 1
            xyz, t, mol = cluster
            energy, force = label(xyz, t, mol)
            out_coord.append(xyz.reshape(-1))
            out_energy.append(energy)
            out_force.append(force.reshape(-1))
            out_types = t
    out = folder / "set.000"
    out.mkdir(parents=True)
    np.save(out / "coord.npy", np.array(out_coord))
    np.save(out / "energy.npy", np.array(out_energy))
    if forces_too:
        np.save(out / "force.npy", np.array(out_force))
    np.savetxt(folder / "type.raw", out_types, fmt="%d")
    shutil.copy(source / "type_map.raw", folder / "type_map.raw")
    (folder / "nopbc").touch()
    return len(out_energy)


def make_cluster_data(root: Path, water: Path, scarce_frames: int, seed: int, molecules: int,
                      scarce_forces: bool = True) -> dict:
    """rich: level A on 4 clusters of every frame of data_0..2; scarce: level B on one cluster of
    each of ``scarce_frames`` frames of data_0; validation: one cluster of every frame of data_3
    at level A and at level B (the same clusters)."""
    rng = np.random.default_rng(seed)
    data = {}
    for k in range(3):
        source = water / f"data_{k}"
        n = sum(len(np.load(s / "energy.npy")) for s in source.glob("set.*"))
        write_clusters(root / f"rich_{k}", source, np.arange(n), 4, molecules, "A", rng)
    data["rich"] = [str(root / f"rich_{k}") for k in range(3)]
    n0 = len(np.load(water / "data_0" / "set.000" / "energy.npy"))
    frames = np.sort(rng.choice(n0, scarce_frames, replace=False))
    write_clusters(root / "scarce", water / "data_0", frames, 1, molecules, "B", rng, forces_too=scarce_forces)
    data["scarce"] = [str(root / "scarce")]
    n3 = len(np.load(water / "data_3" / "set.000" / "energy.npy"))
    state = rng.bit_generator.state
    write_clusters(root / "valid_b", water / "data_3", np.arange(n3), 1, molecules, "B", rng)
    rng.bit_generator.state = state  # the same clusters at level A
    write_clusters(root / "valid_a", water / "data_3", np.arange(n3), 1, molecules, "A", rng)
    data["valid_b"], data["valid_a"] = [str(root / "valid_b")], [str(root / "valid_a")]
    return data
