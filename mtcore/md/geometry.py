"""Cells and periodicity as MD engines hand them over, turned into what a model evaluates."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mtcore.errors import MtcoreError


def cell_for(cell: np.ndarray, pbc: Sequence[bool], where: str = "atoms") -> Optional[np.ndarray]:
    """The box to hand to the model: None when no direction is periodic, the 3×3 cell when all
    are. Mixed periodicity (a slab, a wire) would need images along some directions only, which
    the model's neighbour list does not do, so it is refused rather than silently made 3-D."""
    flags = np.asarray(pbc, dtype=bool).reshape(3)
    if not flags.any():
        return None
    if not flags.all():
        raise MtcoreError(
            f"{where}: pbc={flags.tolist()} mixes periodic and open directions; mtcore models take fully periodic "
            "or fully open systems (for a slab, add vacuum and make it periodic)"
        )
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if abs(np.linalg.det(cell)) < 1e-12:
        raise MtcoreError(f"{where}: periodic but the cell has zero volume; set a cell or make it open")
    return cell


def wrap_positions(positions: np.ndarray, cell: Optional[np.ndarray]) -> np.ndarray:
    """Atoms folded into the cell. Energy, forces and virial are unchanged by lattice
    translations; folding keeps atoms an MD step carried out of the cell inside the image range
    the neighbour search assumes."""
    if cell is None:
        return positions
    frac = np.linalg.solve(cell.T, positions.T).T
    return (frac - np.floor(frac)) @ cell


def lammps_cell(boxlo: Sequence[float], boxhi: Sequence[float], xy: float, yz: float, xz: float) -> np.ndarray:
    """LAMMPS's (possibly triclinic) box as cell rows: a = (lx, 0, 0), b = (xy, ly, 0),
    c = (xz, yz, lz)."""
    lx, ly, lz = (float(boxhi[i]) - float(boxlo[i]) for i in range(3))
    return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]], dtype=np.float64)


def virial_to_stress(virial: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """ASE's stress (Voigt xx, yy, zz, yz, xz, xy) from the model's virial W = −∂E/∂ε:
    σ = (1/V) ∂E/∂ε = −W/V, symmetrised."""
    w = np.asarray(virial, dtype=np.float64).reshape(3, 3)
    sigma = -0.5 * (w + w.T) / abs(np.linalg.det(cell))
    return sigma[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]


def virial_to_lammps(virial: np.ndarray) -> list[float]:
    """The model's virial W = Σ r⊗F (DeePMD-kit's sign, which is also LAMMPS's) in LAMMPS's
    order xx, yy, zz, xy, xz, yz, symmetrised."""
    w = np.asarray(virial, dtype=np.float64).reshape(3, 3)
    w = 0.5 * (w + w.T)
    return [w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]]
