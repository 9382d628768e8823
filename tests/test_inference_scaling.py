"""Inference that scales: cell-list neighbours, chunked evaluation, the external-neighbour entry
point and the checks on what users pass in (frozen module and ``infer.evaluate``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import ENER, SE_E2_A, model_with_stats, small_input, water_frame
from mtcore import infer
from mtcore.data.neighbors import frame_neighbor_list
from mtcore.errors import MtcoreError
from mtcore.freeze import METADATA_FILE
from mtcore.model.frozen import FrozenModel
from mtcore.model.neighbor_list import build_neighbor_list, build_neighbor_list_reference

TOL = 1e-10


def _pairs(center, neighbor, image):
    return sorted(zip(np.asarray(center).tolist(), np.asarray(neighbor).tolist(),
                      map(tuple, np.asarray(image).astype(int).tolist())))


def _random_frame(rng, kind: str):
    n = int(rng.integers(2, 70))
    atype = torch.tensor(rng.integers(0, 2, n))
    rcut = float(rng.uniform(2.0, 6.5))
    if kind == "orthogonal":
        box = np.diag(rng.uniform(6.0, 16.0, 3))
    elif kind == "triclinic":
        box = np.diag(rng.uniform(5.0, 14.0, 3)) + np.triu(rng.uniform(-4.0, 4.0, (3, 3)), 1)
    elif kind == "small_cell":  # narrower than 2·rcut, some axes narrower than rcut: many images
        box = np.diag(rng.uniform(1.5, 5.0, 3)) + np.triu(rng.uniform(-1.0, 1.0, (3, 3)), 1)
        n = min(n, 12)
        atype = atype[:n]
        rcut = float(rng.uniform(5.0, 6.5))
    else:
        box = np.diag(rng.uniform(4.0, 15.0, 3))
    frac = rng.uniform(-1.5, 2.5, (n, 3))  # unwrapped: atoms up to two cells outside
    coord = torch.tensor(frac @ box)
    return coord, atype, (None if kind == "open" else torch.tensor(box)), rcut


@pytest.mark.parametrize("kind", ["orthogonal", "triclinic", "small_cell", "open"])
def test_cell_lists_equal_vesin_and_the_all_pairs_builder(kind):
    rng = np.random.default_rng({"orthogonal": 1, "triclinic": 2, "small_cell": 3, "open": 4}[kind])
    for _ in range(5):
        coord, atype, box, rcut = _random_frame(rng, kind)
        c, n, img = build_neighbor_list(coord, atype, box, rcut, 2)
        rc, rn, rimg = build_neighbor_list_reference(coord, atype, box, rcut, 2)
        vc, vn, vimg, _ = frame_neighbor_list(coord.numpy(), None if box is None else box.numpy(), atype.numpy(), rcut)
        assert _pairs(c, n, img) == _pairs(rc, rn, rimg) == _pairs(vc, vn, vimg)
        # the same order: (center, neighbour type, distance); equal keys only where distances tie
        rij = coord[n] - coord[c] + (img @ box if box is not None else 0.0)
        d = rij.norm(dim=1)
        key = c * 2 + atype[n]
        assert torch.all(key[1:] >= key[:-1])
        same = key[1:] == key[:-1]
        assert torch.all(d[1:][same] >= d[:-1][same] - 1e-12)
        assert torch.equal(c, rc) and torch.equal(atype[n], atype[rn])
        assert torch.allclose(d, (coord[rn] - coord[rc] + (rimg @ box if box is not None else 0.0)).norm(dim=1), atol=1e-12)
        if kind == "small_cell":
            assert bool(((c == n) & (img.abs().sum(1) > 0)).any())  # an atom sees its own images


def test_cell_lists_on_a_replicated_water_box_keep_the_order():
    coord, atype, box = water_frame(0)
    shifts = torch.tensor([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], dtype=torch.float64) @ box
    big = (coord.unsqueeze(0) + shifts.unsqueeze(1)).reshape(-1, 3)
    types, cell = atype.repeat(8), box * 2
    got = build_neighbor_list(big, types, cell, 6.0, 2)
    ref = build_neighbor_list_reference(big, types, cell, 6.0, 2)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def water_model(tmp_path_factory):
    """A small se_e2_a water model with statistics (no training: weights do not matter here)."""
    workdir = tmp_path_factory.mktemp("scaling")
    return model_with_stats(small_input(workdir, descriptor=SE_E2_A, fitting=ENER))[0]


@pytest.fixture(scope="module")
def frozen(water_model, tmp_path_factory):
    """The model scripted and saved as ``mtcore freeze`` would."""
    workdir = tmp_path_factory.mktemp("frozen")
    model = water_model
    meta = {"format": "mtcore-frozen", "kind": "single", "head": "default", "type_map": ["O", "H"], "rcut": 6.0,
            "output": {"conservative": True}, "inputs": [], "test_quantities": []}
    module = torch.jit.script(FrozenModel(model.descriptor, model.heads["default"], ["O", "H"], "default", json.dumps(meta)))
    path = workdir / "model.pth"
    torch.jit.save(module, str(path), _extra_files={METADATA_FILE: json.dumps(meta)})
    return module, path


def _replicated(n: int):
    coord, atype, box = water_frame(0)
    cells = [[i, j, k] for i in range(n) for j in range(n) for k in range(n)]
    shifts = torch.tensor(cells, dtype=torch.float64) @ box
    return (coord.unsqueeze(0) + shifts.unsqueeze(1)).reshape(-1, 3), atype.repeat(len(cells)), box * n


def test_chunked_evaluation_equals_one_pass(frozen):
    module, _ = frozen
    coord, atype, box = _replicated(2)
    coord = coord + torch.tensor(np.random.default_rng(5).normal(0, 0.05, coord.shape))
    default = module.chunk_atoms
    module.set_chunk_atoms(100_000)
    whole = module(coord, atype, box)
    module.set_chunk_atoms(150)  # 11 spatial chunks, each with ghosts from the others
    chunked = module(coord, atype, box)
    module.set_chunk_atoms(default)
    for key in ("energy", "force", "virial", "atom_energy"):
        assert torch.allclose(whole[key], chunked[key], atol=TOL, rtol=0), key
    # and the replica of a frame has 8 times its energy and the same forces
    small = module(*water_frame(0))
    assert abs(float(whole["energy"][0]) - 8 * float(small["energy"][0])) > 0  # perturbed: not identical
    c, t, b = water_frame(0)
    exact = module(_replicated(2)[0], t.repeat(8), b * 2)
    assert abs(float(exact["energy"][0]) - 8 * float(small["energy"][0])) < 1e-9
    assert torch.allclose(exact["force"][0, :192], small["force"][0], atol=TOL)


def test_forces_also_under_no_grad(frozen):
    module, _ = frozen
    coord, atype, box = water_frame(1)
    ref = module(coord, atype, box)
    with torch.no_grad():
        out = module(coord, atype, box)
        assert not torch.is_grad_enabled()
    assert float(ref["force"].abs().max()) > 0
    assert torch.allclose(out["force"], ref["force"], atol=TOL, rtol=0)
    assert torch.allclose(out["virial"], ref["virial"], atol=TOL, rtol=0)


def test_several_small_frames_share_a_pass_and_equal_one_by_one(frozen):
    module, _ = frozen
    frames = [water_frame(i) for i in range(3)]
    coords = torch.stack([f[0] for f in frames])
    boxes = torch.stack([f[2] for f in frames])
    default = module.chunk_atoms
    module.set_chunk_atoms(400)  # two frames per pass, then one
    together = module(coords, frames[0][1], boxes)
    module.set_chunk_atoms(default)
    for i, (c, t, b) in enumerate(frames):
        alone = module(c, t, b)
        for key in ("energy", "force", "virial", "atom_energy"):
            assert torch.allclose(together[key][i], alone[key][0], atol=TOL, rtol=0), key


def _extended_system(coord, atype, box, rcut):
    """Local atoms plus every periodic image within rcut of them, pairs by brute force."""
    n = coord.shape[0]
    span = (-2, -1, 0, 1, 2)  # the data is not wrapped into the cell: reach two cells out
    cells = [[i, j, k] for i in span for j in span for k in span]
    cells.remove([0, 0, 0])
    shifts = torch.tensor(cells, dtype=torch.float64) @ box
    images = (coord.unsqueeze(0) + shifts.unsqueeze(1)).reshape(-1, 3)
    image_owner = torch.arange(n).repeat(len(cells))
    near = torch.cdist(images, coord).min(1).values < rcut + 0.5
    ext = torch.cat([coord, images[near]])
    mapping = torch.cat([torch.arange(n), image_owner[near]])
    d = torch.cdist(coord, ext)
    ii, jj = torch.nonzero((d < rcut + 1.0) & (d > 0), as_tuple=True)  # with a skin, as engines keep
    return ext, atype[mapping], mapping, torch.stack([ii, jj], 1)


def test_external_neighbour_list_equals_forward(frozen):
    module, _ = frozen
    rng = np.random.default_rng(7)
    for frame in (0, 2):
        coord, atype, box = water_frame(frame)
        ref = module(coord, atype, box)
        ext, ext_type, mapping, pairs = _extended_system(coord, atype, box, 6.0)
        shuffled = pairs[torch.tensor(rng.permutation(pairs.shape[0]))]  # any order
        out = module.forward_extended(ext, ext_type, coord.shape[0], mapping, pairs=shuffled)
        for key in ("energy", "force", "virial", "atom_energy"):
            assert torch.allclose(out[key], ref[key], atol=TOL, rtol=0), key
        assert out["extended_force"].shape == (1, ext.shape[0], 3)
        # the per-atom form ([nloc, nnei], -1 padded), chunked over local atoms
        nloc = coord.shape[0]
        counts = torch.bincount(pairs[:, 0], minlength=nloc)
        table = torch.full((nloc, int(counts.max()) + 3), -1, dtype=torch.long)
        slot = torch.arange(pairs.shape[0]) - (torch.cumsum(counts, 0) - counts)[pairs[:, 0]]
        table[pairs[:, 0], slot] = pairs[:, 1]
        default = module.chunk_atoms
        module.set_chunk_atoms(50)
        out = module.forward_extended(ext, ext_type, nloc, mapping, nlist=table)
        module.set_chunk_atoms(default)
        for key in ("energy", "force", "virial", "atom_energy"):
            assert torch.allclose(out[key], ref[key], atol=TOL, rtol=0), key


def _message(call) -> str:
    with pytest.raises(Exception) as info:
        call()
    return str(info.value).strip().splitlines()[-1]


def test_the_module_refuses_bad_input_with_one_readable_line(frozen):
    module, _ = frozen
    coord, atype, box = water_frame(0)
    bad = coord.clone()
    bad[5, 1] = float("nan")
    assert "coord: frame 0, atom 5 holds a non-finite value (nan)" in _message(lambda: module(bad, atype, box))
    assert "box: frame 0 holds a non-finite value (inf)" in _message(lambda: module(coord, atype, box * float("inf")))
    same = coord.clone()
    same[17] = same[3] + 1e-9
    assert "atoms 3 and 17 of frame 0" in _message(lambda: module(same, atype, box)) and "coincident" in _message(
        lambda: module(same, atype, box))
    assert "integer type indices" in _message(lambda: module(coord, atype.to(torch.float64), box))
    assert "integer type indices" in _message(lambda: module(coord, atype.to(torch.bool), box))
    wrong = atype.clone()
    wrong[9] = 2
    assert "type index 2 (position 9) is outside 0..1" in _message(lambda: module(coord, wrong, box))


def test_evaluate_refuses_bad_input_with_mtcore_errors(frozen):
    _, path = frozen
    pot = infer.load(path)
    coord, atype, box = (x.numpy() for x in water_frame(0))
    bad = coord.copy()
    bad[7, 0] = np.inf
    with pytest.raises(MtcoreError, match=r"coords: frame 0, atom 7 .*inf"):
        pot.evaluate(bad, box, atype)
    with pytest.raises(MtcoreError, match=r"box: frame 0 .*nan"):
        pot.evaluate(coord, box * np.nan, atype)
    same = coord.copy()
    same[40] = same[2]
    with pytest.raises(MtcoreError, match=r"atoms 2 and 40 of frame 0 .*coincident"):
        pot.evaluate(same, box, atype)
    with pytest.raises(MtcoreError, match="atypes: .*integer"):
        pot.evaluate(coord, box, atype.astype(float) + 0.4)
    with pytest.raises(MtcoreError, match="atypes: .*integer"):
        pot.evaluate(coord, box, atype.astype(bool))
    with pytest.raises(MtcoreError, match=r"atypes: type indices must lie in 0..1"):
        pot.evaluate(coord, box, atype + 1)


def test_evaluate_takes_a_list_of_frames_of_different_sizes(frozen):
    _, path = frozen
    pot = infer.load(path)
    frames = [water_frame(0), water_frame(1), _replicated(2), water_frame(2)]
    coords = [f[0].numpy() for f in frames]
    coords[1] = coords[1][:60]  # a cluster without a box
    atypes = [f[1].numpy() for f in frames]
    atypes[1] = atypes[1][:60]
    boxes = [frames[0][2].numpy(), None, frames[2][2].numpy(), frames[3][2].numpy()]
    results = pot.evaluate(coords, boxes, atypes)
    assert isinstance(results, list) and len(results) == 4
    for c, b, t, got in zip(coords, boxes, atypes, results):
        alone = pot.evaluate(c, b, t)
        assert got["force"].shape == (1, len(t), 3)
        for key in ("energy", "force", "atom_energy"):
            assert np.allclose(got[key], alone[key], atol=TOL, rtol=0), key
    bad = [c.copy() for c in coords]
    bad[2][100, 2] = np.nan
    with pytest.raises(MtcoreError, match=r"coords: frame 2, atom 100"):
        pot.evaluate(bad, boxes, atypes)


def test_united_model_takes_external_neighbours_per_head(frozen, water_model):
    from mtcore.model.frozen import UnitedModel

    module, _ = frozen
    fitting = water_model.heads["default"]  # the same weights as two heads
    united = torch.jit.script(UnitedModel(water_model.descriptor, {"a": fitting, "b": fitting}, ["O", "H"], "{}"))
    coord, atype, box = water_frame(3)
    ref = module(coord, atype, box)
    ext, ext_type, mapping, pairs = _extended_system(coord, atype, box, 6.0)
    out = united.forward_extended(ext, ext_type, coord.shape[0], mapping, pairs=pairs, head="b")
    for key in ("energy", "force", "virial", "atom_energy"):
        assert torch.allclose(out[key], ref[key], atol=TOL, rtol=0), key
    assert "unknown head 'c'" in _message(lambda: united.forward_extended(ext, ext_type, 192, mapping, pairs=pairs, head="c"))


def test_evaluate_runs_the_plain_scripted_code_on_the_cpu_with_the_same_numbers(frozen, monkeypatch):
    """On the CPU ``evaluate`` turns TorchScript's optimising executor off for its call (seconds
    saved on the first calls, 5-40 % on later ones: benchmarks/bench_executor.py); what it
    computes must not change, and the caller's own setting must come back afterwards. (Here the
    scripted module itself runs, as where no eager twin is made: tests/test_eager_twin.py.)"""
    _, path = frozen
    monkeypatch.setenv("MTCORE_INFER_SCRIPTED", "1")
    pot = infer.load(path)
    monkeypatch.delenv("MTCORE_INFER_SCRIPTED")
    seen = []
    module = pot.module
    assert pot.runner is module

    def spy(*args):
        seen.append(torch._C._get_graph_executor_optimize())
        return module(*args)

    pot.runner = spy
    coord, atype, box = water_frame(1)
    coord = coord.numpy() + np.random.default_rng(3).normal(0, 0.05, coord.shape)
    plain = pot.evaluate(coord, box.numpy(), atype.numpy())
    assert seen == [False] and torch._C._get_graph_executor_optimize() is True
    optimised = infer.load(path).module
    with torch.jit.optimized_execution(True):
        for _ in range(3):  # the profiling executor's first calls record, later ones run its graph
            reference = optimised(torch.as_tensor(coord), atype, box, True, None, None)
    for key in ("energy", "force", "virial", "atom_energy"):
        assert np.allclose(plain[key], reference[key].numpy(), atol=TOL, rtol=0), key
