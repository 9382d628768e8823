"""A gap model trains end to end through mtcore's command line on this package's own data, and
its frame value is the MEAN of the atomic outputs (intensive: a supercell predicts the same gap)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from mtcore import infer

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
MTCORE = [sys.executable, "-m", "mtcore.cli"]


def gap_input(numb_steps: int) -> dict:
    return {
        "model": {
            "type_map": ["O", "H"],
            "descriptor": {"type": "gauss_radial", "rcut": 5.0, "n_basis": 6},
            "fitting_net": {"type": "gap", "neuron": [16, 16], "seed": 1},
        },
        "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 10},
        "loss": {"type": "gap"},
        "training": {
            "training_data": {"systems": [str(DATA / "water_gap_train.npz")], "batch_size": 2},
            "validation_data": {"systems": [str(DATA / "water_gap_valid.npz")], "batch_size": 2, "numb_btch": 1},
            "numb_steps": numb_steps,
            "seed": 3,
            "disp_freq": numb_steps,
            "save_freq": numb_steps,
        },
    }


def test_gap_model_trains_and_averages(tmp_path):
    (tmp_path / "input.json").write_text(json.dumps(gap_input(numb_steps=8)))
    done = subprocess.run(MTCORE + ["train", "input.json"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = np.loadtxt(tmp_path / "lcurve.out", ndmin=2)
    assert rows.shape[0] == 2 and np.isfinite(rows[:, 1:]).all()  # steps 0 and 8: rmse_val, rmse_trn, ...

    model = infer.load(tmp_path / "model.ckpt.pt")
    with np.load(DATA / "water_gap_valid.npz") as z:
        coord, box, types = z["coord"][:1], z["box"][:1], z["types"]
    out = model.evaluate(coord, box, types)
    atomic = out["atom_gap"].reshape(1, -1)
    assert out["gap"].shape == (1, 1)
    assert np.allclose(out["gap"][0, 0], atomic.mean(), rtol=1e-10, atol=0.0)
    assert abs(atomic.sum()) > 1.5 * abs(atomic.mean())  # sum and mean differ: the check can fail

    # a 2x1x1 supercell has the very same atomic environments: the mean (gap) is unchanged while a
    # sum would double
    cell = box[0]
    big_coord = np.concatenate([coord[0], coord[0] + cell[0]])[None]
    big_box = (cell * np.array([[2.0], [1.0], [1.0]]))[None]
    big = model.evaluate(big_coord, big_box, np.concatenate([types, types]))
    assert np.allclose(big["gap"], out["gap"], rtol=1e-10, atol=0.0)
    assert np.allclose(big["atom_gap"].reshape(-1), np.tile(atomic.reshape(-1), 2), rtol=1e-9, atol=1e-12)
