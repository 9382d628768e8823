"""The deepmd/npy loader and data sets: batch sizes, probabilities, type maps, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import WATER
from mtcore.data.dataset import DataSet, resolve_batch_sizes, system_probabilities
from mtcore.data.loading import expand_systems, load_system
from mtcore.data.neighbors import NeighborCache
from mtcore.data.requirements import DataRequirement
from mtcore.errors import MtcoreError
from mtcore.plugins import get_registry

ENERGY = [DataRequirement("energy", 1), DataRequirement("force", 3, atomic=True), DataRequirement("virial", 9)]


def _load(path, type_map=("O", "H"), reqs=ENERGY):
    return load_system(Path(path), list(type_map), list(reqs), "set", get_registry())


def test_water_system_loads_every_set_and_only_existing_labels():
    system = _load(WATER / "data_1")
    assert system.nframes == 160 and system.natoms == 192 and system.set_sizes == [80, 80]
    assert system.coords.shape == (160, 192, 3) and system.boxes.shape == (160, 3, 3)
    assert system.labels["force"].shape == (160, 192, 3) and system.labels["energy"].shape == (160, 1)
    assert "virial" not in system.labels  # missing label → find = 0, not zeros
    raw = np.load(WATER / "data_1" / "set.001" / "coord.npy")
    assert np.allclose(system.coords[80:].reshape(80, -1), raw)


def test_type_map_is_applied_by_element_name(tmp_path):
    copy = tmp_path / "sys"
    shutil.copytree(WATER / "data_0", copy)
    swapped = _load(copy, type_map=("H", "O"))
    original = _load(copy)
    assert np.array_equal(swapped.atypes[0], 1 - original.atypes[0])
    with pytest.raises(MtcoreError, match=r"type_map.raw: element 'O' is not in the model's type_map"):
        _load(copy, type_map=("C", "H"))


def test_errors_name_the_file(tmp_path):
    copy = tmp_path / "sys"
    shutil.copytree(WATER / "data_0", copy)
    (copy / "type.raw").write_text("0 1 1\n")
    with pytest.raises(MtcoreError, match=r"coord.npy: has 576 values per frame but type.raw lists 3 atoms"):
        _load(copy)
    with pytest.raises(MtcoreError, match=r"missing: not found"):
        expand_systems([str(tmp_path / "missing")], get_registry(), "training/training_data")
    shutil.rmtree(copy / "set.000")
    (copy / "type.raw").write_text(" ".join(["0"] * 64 + ["1"] * 128))
    with pytest.raises(MtcoreError, match=r"no set\.\* folder"):
        _load(copy)


def test_a_folder_string_finds_every_system_below():
    found = expand_systems(str(WATER), get_registry(), "t")
    assert [p.name for p in found] == ["data_0", "data_1", "data_2", "data_3"]


def test_batch_size_rules():
    systems = [_load(WATER / "data_0")]
    assert resolve_batch_sizes("auto", systems, "t") == [1]
    assert resolve_batch_sizes("auto:400", systems, "t") == [3]
    assert resolve_batch_sizes(4, systems, "t") == [4]
    with pytest.raises(MtcoreError, match="batch_size"):
        resolve_batch_sizes("mixed:4", systems, "t")


def test_system_probabilities():
    nb = [10, 30, 60]
    assert np.allclose(system_probabilities(nb, "prob_uniform", None, "t"), [1 / 3] * 3)
    assert np.allclose(system_probabilities(nb, "prob_sys_size", None, "t"), [0.1, 0.3, 0.6])
    assert np.allclose(system_probabilities(nb, "prob_sys_size;0:1:0.5;1:3:0.5", None, "t"), [0.5, 0.5 * 30 / 90, 0.5 * 60 / 90])
    assert np.allclose(system_probabilities(nb, "x", [0.5, -1, -1], "t"), [0.5, 0.5 * 30 / 90, 0.5 * 60 / 90])
    with pytest.raises(MtcoreError, match="auto_prob"):
        system_probabilities(nb, "prob_weird", None, "t")


def test_sampling_is_reproducible_and_resumable():
    systems = [_load(WATER / "data_0"), _load(WATER / "data_2")]
    cache = NeighborCache(6.0)

    def run(n, rng, ds):
        return [(b.system, float(b.coord[0, 0, 0])) for b in (ds.sample(rng) for _ in range(n))]

    ds = DataSet(systems, 2, "prob_sys_size", None, cache, "t")
    rng = np.random.default_rng(5)
    first = run(30, rng, ds)
    state, rng_state = ds.state_dict(), rng.bit_generator.state
    rest = run(30, rng, ds)
    again = DataSet(systems, 2, "prob_sys_size", None, cache, "t")
    again.load_state_dict(state)
    rng2 = np.random.default_rng(0)
    rng2.bit_generator.state = rng_state
    assert run(30, rng2, again) == rest
    assert first != rest
    batch = ds.sample(rng)
    assert batch.coord.shape == (2, 192, 3) and batch.center.max() >= 192  # frames flattened with offsets
