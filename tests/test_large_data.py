"""Data larger than memory: frames read lazily from memory-mapped set files, NaN/inf caught when a
frame is read, statistics from a bounded sample, a neighbour-list cache that stays in its budget.
Small and fast; the memory and time figures are in benchmarks/bench_large_data.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mtcore.data import frames as frames_module
from mtcore.data import loading
from mtcore.data.frames import FrameStore
from mtcore.data.loading import load_dataset, load_system, pooled_neighbor_stat
from mtcore.data.neighbors import NeighborCache, frame_neighbor_list
from mtcore.data.requirements import DataRequirement
from mtcore.data.statsample import even_shares, neighbor_stat_frames, stat_systems
from mtcore.errors import MtcoreError
from mtcore.input_checks import check_model
from mtcore.plugins import get_registry
from helpers import WATER

REQS = [DataRequirement("energy", 1, atomic=False, must=True), DataRequirement("force", 3, atomic=True, must=True)]


def _eager(system: Path, name: str) -> np.ndarray:
    """What the loader used to do: read every set whole, as float64, concatenated."""
    return np.concatenate([np.load(d / f"{name}.npy").astype(np.float64) for d in sorted(system.glob("set.*"))])


def _load(path: Path, reqs=REQS):
    return load_system(path, ["O", "H"], reqs, "set", get_registry())


def test_lazy_frames_equal_eager_ones_whatever_the_index():
    system = WATER / "data_1"  # two sets, float32 on disk
    data = _load(system)
    assert isinstance(data.coords, FrameStore) and isinstance(data.labels["force"], FrameStore)
    assert all(isinstance(p.rows, np.memmap) and p.rows.dtype == np.float32 for p in data.coords.parts)
    coord = _eager(system, "coord").reshape(-1, 192, 3)
    force = _eager(system, "force").reshape(-1, 192, 3)
    box = _eager(system, "box").reshape(-1, 3, 3)
    energy = _eager(system, "energy").reshape(-1, 1)
    assert data.coords.shape == coord.shape and data.nframes == 160 and data.set_sizes == [80, 80]
    picks = np.array([159, 3, 80, 79, 3, 0])  # both sets, unsorted, a repeat
    for key in (picks, 5, -1, slice(70, 90), slice(None, None, 7), np.arange(160) % 3 == 0, [1, 2]):
        assert np.array_equal(data.coords[key], coord[key]), key
        assert np.array_equal(data.labels["force"][key], force[key]), key
        assert np.array_equal(data.boxes[key], box[key]), key
        assert np.array_equal(data.labels["energy"][key], energy[key]), key
    hydrogens = np.asarray(data.atypes[0]) == 1
    assert np.array_equal(data.labels["force"][:, hydrogens], force[:, hydrogens])
    assert np.array_equal(data.coords[7, 5], coord[7, 5]) and data.coords[7].dtype == np.float64
    assert np.array_equal(np.asarray(data.coords), coord)
    assert data.coords[[]].shape == (0, 192, 3) and data.coords[70:70].shape == (0, 192, 3)
    last = data.last_set()
    assert isinstance(last.coords, FrameStore) and np.array_equal(last.coords[:], coord[80:])
    with pytest.raises(IndexError):
        data.coords[160]


def test_reading_frames_touches_only_those_rows(monkeypatch):
    """A batch reads its frames' rows, never a whole set: record what the store asks the map for."""
    data = _load(WATER / "data_1")
    asked = []

    class Recorder:
        def __init__(self, rows):
            self.rows, self.shape, self.nbytes = rows, rows.shape, rows.nbytes

        def __getitem__(self, key):
            asked.append(np.array(key))
            return self.rows[key]

    for part in data.coords.parts:
        part.rows = Recorder(part.rows)
    data.coords[np.array([3, 85, 4])]
    assert sorted(int(v) for a in asked for v in np.atleast_1d(a)) == [3, 4, 5]  # frame 85 is frame 5 of set.001
    assert len(asked) == 2  # one read per set file touched, not per frame


def _copy_system(tmp_path: Path) -> Path:
    target = tmp_path / "sys"
    shutil.copytree(WATER / "data_0", target)
    return target


def test_a_nan_frame_of_large_data_fails_when_its_batch_is_drawn(tmp_path, monkeypatch):
    system = _copy_system(tmp_path)
    force = np.load(system / "set.000" / "force.npy")
    force[3, 3 * 7 + 1] = np.nan
    np.save(system / "set.000" / "force.npy", force)
    section = {"systems": [str(system)], "batch_size": 2}
    # small data: the whole file is scanned at load, as before
    with pytest.raises(MtcoreError, match=r"force.npy: non-finite value nan at frame 3, atom 7 \(1 non-finite value in the file\)"):
        load_dataset(section, ["O", "H"], REQS, NeighborCache(6.0), get_registry(), "training/training_data")
    # "large" data: loading does not read the frames; the batch holding frame 3 is refused
    monkeypatch.setattr(frames_module, "FULL_CHECK_BYTES", 0)
    data = load_dataset(section, ["O", "H"], REQS, NeighborCache(6.0), get_registry(), "training/training_data")
    batch = data.batch(0, np.array([0, 1]))
    assert np.isfinite(batch.labels["force"].numpy()).all()
    with pytest.raises(MtcoreError) as caught:
        data.batch(0, np.array([5, 3]))
    message = str(caught.value)
    assert "\n" not in message and str(system / "set.000" / "force.npy") in message
    assert "non-finite value nan at frame 3, atom 7" in message and "system frame 3" in message


def test_training_on_large_data_with_a_nan_frame_stops_before_any_update(tmp_path, monkeypatch):
    """End to end: the bad frame is met by the statistics or the first batch; nothing is saved."""
    import io

    from rich.console import Console

    from mtcore.config import load_config
    from mtcore.train.trainer import Trainer
    from helpers import small_input, write_input

    system = _copy_system(tmp_path)
    coord = np.load(system / "set.000" / "coord.npy")
    coord[41, 3 * 5] = np.inf
    np.save(system / "set.000" / "coord.npy", coord)
    monkeypatch.setattr(frames_module, "FULL_CHECK_BYTES", 0)
    doc = small_input(tmp_path, train_systems=[str(system)], numb_steps=2, valid_systems=[str(WATER / "data_3")])
    doc["training"]["training_data"]["batch_size"] = 80  # every batch holds frame 41
    doc["model"]["data_stat_nbatch"] = 1
    with pytest.raises(MtcoreError) as caught:
        Trainer(load_config(write_input(tmp_path, doc)), tmp_path, Console(file=io.StringIO())).run()
    assert "\n" not in str(caught.value)
    assert f"{system / 'set.000' / 'coord.npy'}: non-finite value inf at frame 41, atom 5" in str(caught.value)
    assert not list(tmp_path.glob("model.ckpt*"))


def test_a_flat_cell_of_large_data_is_named_when_read(tmp_path, monkeypatch):
    system = _copy_system(tmp_path)
    box = np.load(system / "set.000" / "box.npy")
    box[6] = 0.0
    np.save(system / "set.000" / "box.npy", box)
    monkeypatch.setattr(frames_module, "FULL_CHECK_BYTES", 0)
    data = _load(system)
    data.boxes[:6]
    with pytest.raises(MtcoreError, match=r"box.npy: the cell of frame 6 has zero volume"):
        data.boxes[[2, 6]]


def test_a_file_that_cannot_be_mapped_is_read_normally(tmp_path):
    system = _copy_system(tmp_path)
    coord = np.load(system / "set.000" / "coord.npy")
    np.save(system / "set.000" / "coord.npy", np.asfortranarray(coord.astype(np.float64)))
    data = _load(system)
    assert not isinstance(data.coords.parts[0].rows, np.memmap)
    assert np.array_equal(data.coords[[4, 2]], coord.astype(np.float64).reshape(-1, 192, 3)[[4, 2]])


def test_running_out_of_memory_maps_is_one_line_not_a_silent_full_read(tmp_path, monkeypatch):
    import errno

    real_load = np.load

    def no_maps(path, mmap_mode=None, **kw):
        if mmap_mode:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real_load(path, **kw)

    monkeypatch.setattr(np, "load", no_maps)
    with pytest.raises(MtcoreError, match=r"coord.npy: cannot be memory-mapped: .*vm.max_map_count"):
        _load(WATER / "data_0")


# bounded statistics -----------------------------------------------------------------------------
def test_even_shares_and_neighbour_stat_frames():
    assert list(even_shares([100, 3, 50], 30)) == [14, 3, 13]
    assert list(even_shares([5, 5], 100)) == [5, 5]
    rng = np.random.default_rng(0)
    every = neighbor_stat_frames([4, 6], 10, rng)  # at the cap: every frame, in order
    assert [list(f) for f in every] == [[0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    some = neighbor_stat_frames([400, 10, 90], 30, rng)
    assert [len(f) for f in some] == [10, 10, 10] and all(len(set(f)) == len(f) for f in some)
    few = neighbor_stat_frames([5] * 20, 4, rng)  # more systems than frames allowed: one frame of 4 systems
    assert sum(len(f) for f in few) == 4 and max(len(f) for f in few) == 1
    again = neighbor_stat_frames([400, 10, 90], 30, np.random.default_rng(0))
    first = neighbor_stat_frames([400, 10, 90], 30, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(again, first))  # seeded


def test_stat_systems_caps_batches_then_systems():
    rng = np.random.default_rng(1)
    assert stat_systems([1, 1, 2], 10, None, rng) == ([0, 1, 2], 10)
    assert stat_systems([1, 1, 2], 10, 40, rng) == ([0, 1, 2], 10)  # fits: unchanged
    assert stat_systems([1, 1, 2], 10, 9, rng) == ([0, 1, 2], 2)  # fewer batches per system
    chosen, nbatch = stat_systems([2] * 10, 10, 5, rng)
    assert nbatch == 1 and len(chosen) == 2 and chosen == sorted(chosen)


def test_statistics_read_a_bounded_sample(monkeypatch):
    registry = get_registry()
    section = {"systems": [str(WATER / f"data_{i}") for i in range(4)], "batch_size": 1}
    data = load_dataset(section, ["O", "H"], REQS, NeighborCache(6.0), registry, "t")
    drawn = []
    real_batch = data.batch
    monkeypatch.setattr(data, "batch", lambda index, frames: drawn.append((index, len(frames))) or real_batch(index, frames))
    capped = data.stat_batches(10, np.random.default_rng(3), max_frames=7)
    assert sum(b.nframes for b in capped) <= 7 and len({i for i, _ in drawn}) == 4  # one batch of each system
    drawn.clear()
    free = data.stat_batches(10, np.random.default_rng(3))
    same = data.stat_batches(10, np.random.default_rng(3), max_frames=1000)  # the default cap: today's draws
    assert len(free) == len(same) == 40
    for a, b in zip(free, same):
        assert a.system == b.system and np.abs(a.coord.numpy() - b.coord.numpy()).max() < 1e-10

    counted = []
    real_counts = loading.max_neighbor_counts
    monkeypatch.setattr(loading, "max_neighbor_counts", lambda *a, **k: counted.append(1) or real_counts(*a, **k))
    stat = pooled_neighbor_stat(data.systems, 2, max_frames=12, seed=5)
    bounded = stat.max_count(6.0, False)
    assert len(counted) == 12 and (stat.frames_read, stat.frames_total) == (12, 400)
    full = pooled_neighbor_stat(data.systems, 2).max_count(6.0, False)
    assert all(b <= f for b, f in zip(bounded, full)) and min(bounded) > 0


def test_new_stat_keys_are_checked():
    for key in ("data_stat_nframes", "neighbor_stat_nframes"):
        with pytest.raises(MtcoreError, match=rf"model/{key}: must be an integer of at least 1, got 0"):
            check_model({"type_map": ["O", "H"], key: 0})


# neighbour-list cache ---------------------------------------------------------------------------
def test_neighbor_cache_evicts_within_its_budget():
    data = _load(WATER / "data_0", [])
    one = sum(a.nbytes for a in frame_neighbor_list(data.coords[0], data.boxes[0], np.asarray(data.atypes[0]), 6.0)[:3])
    cache = NeighborCache(6.0, budget_bytes=int(3.5 * one))
    first = [a.copy() for a in cache.get("s", 0, data.coords[0], data.boxes[0], data.atypes[0])]
    for f in range(1, 12):
        cache.get("s", f, data.coords[f], data.boxes[f], data.atypes[f])
        assert cache.used <= cache.budget and len(cache) <= 4
    assert cache.evicted >= 7 and ("s", 0) not in cache._store
    again = cache.get("s", 0, data.coords[0], data.boxes[0], data.atypes[0])  # recomputed, the same
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert cache.used <= cache.budget
    tiny = NeighborCache(6.0, budget_bytes=10)  # a list larger than the budget is returned, not kept
    tiny.get("s", 0, data.coords[0], data.boxes[0], data.atypes[0])
    assert len(tiny) == 0 and tiny.used == 0
    isolated = NeighborCache(0.5, budget_bytes=2000)  # no neighbours: empty lists still count
    for f in range(12):
        isolated.get("s", f, data.coords[f], data.boxes[f], data.atypes[f])
        assert isolated.used <= isolated.budget
    assert 0 < len(isolated) < 12
