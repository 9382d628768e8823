"""Frozen models: plain torch loads them without mtcore, and they equal the in-memory model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import predict, small_input, water_frame, write_input
from mtcore import infer
from mtcore.config import load_config
from mtcore.freeze import freeze
from mtcore.train.checkpoint import load_checkpoint
from mtcore.train.trainer import Trainer
from test_training import QUIET


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    Trainer(load_config(write_input(workdir, small_input(workdir, numb_steps=6))), workdir, QUIET).run()
    state = load_checkpoint(workdir / "model.ckpt.pt")
    path = freeze(state, workdir / "model.pth")[0]
    return workdir, state, path


def test_frozen_equals_in_memory_model(trained):
    workdir, state, path = trained
    trainer = Trainer(None, workdir, QUIET, restart=state)
    model = trainer.model.eval()
    pot = infer.load(path)
    for frame, box_on in [(0, True), (3, True), (1, False)]:
        coord, atype, box = water_frame(frame, "data_3")
        if not box_on:
            coord, atype, box = coord[:60], atype[:60], None
        ref = predict(model, "default", coord, atype, box)
        out = pot.evaluate(coord.numpy(), None if box is None else box.numpy(), atype.numpy())
        assert np.allclose(out["energy"], ref["energy"].detach().numpy().reshape(-1), atol=1e-10, rtol=0)
        assert np.allclose(out["force"], ref["force"].detach().numpy(), atol=1e-10, rtol=0)
        assert np.allclose(out["virial"], ref["virial"].detach().numpy(), atol=1e-10, rtol=0)
        assert np.isclose(out["atom_energy"].sum(), out["energy"].sum(), atol=1e-9)


def test_several_frames_at_once_and_element_names(trained):
    _, _, path = trained
    pot = infer.load(path)
    frames = [water_frame(i, "data_3") for i in range(3)]
    coords = np.stack([f[0].numpy() for f in frames])
    boxes = np.stack([f[2].numpy().reshape(9) for f in frames])
    names = ["O" if t == 0 else "H" for t in frames[0][1].tolist()]
    together = pot.evaluate(coords, boxes, names)
    for i, (c, t, b) in enumerate(frames):
        alone = pot.evaluate(c.numpy(), b.numpy(), t.numpy())
        assert np.allclose(together["energy"][i], alone["energy"][0], atol=1e-10)
        assert np.allclose(together["force"][i], alone["force"][0], atol=1e-10)
    assert pot.type_map == ["O", "H"] and pot.rcut == 6.0


def test_plain_torch_loads_it_without_mtcore(trained):
    _, _, path = trained
    coord, atype, box = water_frame(0, "data_3")
    np.save(path.parent / "c.npy", coord.numpy())
    np.save(path.parent / "b.npy", box.numpy())
    np.save(path.parent / "t.npy", atype.numpy())
    script = f"""
import sys
for name in ("mtcore", "mtcore_builtins"):
    sys.modules[name] = None  # any import of mtcore would now fail
import numpy as np, torch
folder = {str(path.parent)!r}
extra = {{"mtcore.json": ""}}
m = torch.jit.load({str(path)!r}, _extra_files=extra)
out = m(torch.tensor(np.load(folder + "/c.npy")), torch.tensor(np.load(folder + "/t.npy")), torch.tensor(np.load(folder + "/b.npy")))
print(repr(float(out["energy"][0])), m.get_type_map(), m.get_rcut(), m.get_head(), len(extra["mtcore.json"]) > 0)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    energy = infer.load(path).evaluate(coord.numpy(), box.numpy(), atype.numpy())["energy"][0]
    printed = result.stdout.split()
    assert abs(float(printed[0]) - energy) < 1e-10
    assert "['O', 'H']" in result.stdout and "6.0" in result.stdout and "default" in result.stdout and printed[-1] == "True"


def test_single_task_freeze_rejects_head_options(trained):
    from mtcore.errors import MtcoreError

    _, state, path = trained
    with pytest.raises(MtcoreError, match="single-task"):
        freeze(state, path.parent / "x.pth", head="default")
    with pytest.raises(MtcoreError, match="single-task"):
        freeze(state, path.parent / "x.pth", united=True)


def test_show_names_a_torchscript_file_that_is_not_a_frozen_model(tmp_path):
    """A TorchScript file without mtcore's metadata is one line, not a KeyError."""
    from mtcore.errors import MtcoreError
    from mtcore.show import describe

    path = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(MtcoreError, match=r"other\.pt: a TorchScript file, but not a frozen mtcore model$"):
        describe(path)
