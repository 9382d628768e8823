"""mtcore's plugin test kit on each component of this package: one line per component.

Each check builds the component from its schema, runs it on synthetic frames and lists every
property that fails (forces = -dE/dx, invariances, smoothness at rcut, TorchScript, checkpoint
and freeze round trips, ...). Small networks keep each check to seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtcore.testing import check_descriptor, check_fitting, check_loader
from mtcore_example import descriptor, loader

SMALL_DESCRIPTOR = {"rcut": 4.0, "rcut_smth": 1.0, "n_basis": 5}


def small_npz(path: Path, nframes: int = 3, natoms: int = 5, periodic: bool = True) -> Path:
    """A small system of this package's format, with energy and force labels."""
    rng = np.random.default_rng(0)
    arrays = {
        "coord": rng.uniform(0.0, 6.0, (nframes, natoms, 3)),
        "types": np.array([0, 1, 1, 0, 1][:natoms]),
        "type_map": np.array(["A", "B"]),
        "energy": rng.normal(size=nframes),
        "force": rng.normal(size=(nframes, natoms, 3)),
    }
    if periodic:
        arrays["box"] = np.tile(np.diag([6.0, 6.5, 7.0]), (nframes, 1, 1))
    np.savez_compressed(path, **arrays)
    return path


def test_descriptor_passes_the_kit():
    check_descriptor(descriptor.REGISTRATION, SMALL_DESCRIPTOR)


def test_gap_head_passes_the_kit():
    from mtcore_example import fitting

    check_fitting(fitting.REGISTRATION, {"neuron": [8, 8], "seed": 1},
                  descriptor=(descriptor.REGISTRATION, SMALL_DESCRIPTOR))


def test_gap_head_passes_the_kit_on_a_builtin_descriptor():
    from mtcore_example import fitting

    check_fitting(fitting.REGISTRATION, {"neuron": [8, 8], "seed": 1})


def test_loader_passes_the_kit(tmp_path):
    check_loader(loader.REGISTRATION, small_npz(tmp_path / "system.npz"))


def test_loader_passes_the_kit_without_a_cell(tmp_path):
    check_loader(loader.REGISTRATION, small_npz(tmp_path / "cluster.npz", periodic=False))
