"""mtcore's plugin test kit on each component of this package: one line per component.

Each check builds the component from its schema, runs it on synthetic frames and lists every
property that fails (forces = -dE/dx, invariances, smoothness at rcut, TorchScript, checkpoint
and freeze round trips, ...). Small networks keep each check to seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtcore.testing import check_descriptor, check_fitting, check_loader
from mtcore_example import descriptor, fitting, loader

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
    check_fitting(fitting.REGISTRATION, {"neuron": [8, 8], "seed": 1},
                  descriptor=(descriptor.REGISTRATION, SMALL_DESCRIPTOR))


def test_gap_head_passes_the_kit_on_a_builtin_descriptor():
    check_fitting(fitting.REGISTRATION, {"neuron": [8, 8], "seed": 1})


def test_loader_passes_the_kit(tmp_path):
    check_loader(loader.REGISTRATION, small_npz(tmp_path / "system.npz"))


def test_loader_passes_the_kit_without_a_cell(tmp_path):
    check_loader(loader.REGISTRATION, small_npz(tmp_path / "cluster.npz", periodic=False))


def test_loader_errors_are_one_line_naming_the_file(tmp_path):
    """Bad files: an MtcoreError of one line naming the file and what is wrong."""
    import pytest

    from mtcore.data.requirements import DataRequirement
    from mtcore.errors import MtcoreError

    energy = [DataRequirement("energy", 1, must=True)]
    good = small_npz(tmp_path / "good.npz")
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    cases = {
        "not_a_zip.npz": None,
        "no_coord.npz": {k: v for k, v in arrays.items() if k != "coord"},
        "no_energy.npz": {k: v for k, v in arrays.items() if k != "energy"},
        "bad_element.npz": dict(arrays, type_map=np.array(["A", "C"])),
        "objects.npz": dict(arrays, energy=np.array([None, 1, 2], dtype=object)),
        "nan.npz": dict(arrays, coord=np.where(np.arange(15).reshape(1, 5, 3) == 4, np.nan, arrays["coord"])),
        "short_force.npz": dict(arrays, energy=arrays["force"]),
    }
    expected = {
        "not_a_zip.npz": "cannot be read", "no_coord.npz": "no 'coord'", "no_energy.npz": "no 'energy' array (required)",
        "bad_element.npz": "element 'C'", "objects.npz": "cannot be read", "nan.npz": "non-finite",
        "short_force.npz": "expected 1",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is None:
            path.write_text("not an archive")
        else:
            np.savez(path, **content)
        with pytest.raises(MtcoreError) as info:
            loader.load(path, ["A", "B"], energy, "set")
        message = str(info.value)
        assert "\n" not in message and str(path) in message and expected[name] in message, (name, message)
    assert not loader.detect(tmp_path / "missing.npz") and not loader.detect(tmp_path)
