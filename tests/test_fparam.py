"""Frame and atomic parameters (numb_fparam / numb_aparam of the ener fitting): read from
fparam.npy / aparam.npy, normalised by the training data's statistics, fed to the fitting net,
carried through freezing, the Python API and ``mtcore test``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import ENER, WATER, small_input, water_frame
from mtcore.cli import app
from mtcore.errors import MtcoreError
from mtcore.infer import load as load_frozen
from test_training import lcurve_rows, make_trainer

NATOMS = 192


def system_with_parameters(workdir: Path, source: str, nframes: int, seed: int, aparam: bool = False) -> Path:
    """A water system whose energy label carries a frame parameter T: E' = E + 0.05·N·T (what a
    finite-temperature label would do); with ``aparam`` also one random value per atom."""
    src, target = WATER / source, Path(workdir) / f"{source}_fparam"
    (target / "set.000").mkdir(parents=True)
    for name in ("type.raw", "type_map.raw"):
        shutil.copy(src / name, target / name)
    rng = np.random.default_rng(seed)
    for key in ("coord", "box", "force"):
        np.save(target / "set.000" / f"{key}.npy", np.load(src / "set.000" / f"{key}.npy")[:nframes])
    temperature = rng.uniform(0.5, 1.5, size=(nframes, 1))
    energy = np.load(src / "set.000" / "energy.npy")[:nframes].reshape(-1, 1) + 0.05 * NATOMS * temperature
    np.save(target / "set.000" / "energy.npy", energy.reshape(-1))
    np.save(target / "set.000" / "fparam.npy", temperature)
    if aparam:
        np.save(target / "set.000" / "aparam.npy", rng.normal(size=(nframes, NATOMS * 2)))
    return target


def parameter_input(tmp_path: Path, numb_steps: int = 20, aparam: bool = False) -> dict:
    train = system_with_parameters(tmp_path, "data_0", 20, 1, aparam)
    valid = system_with_parameters(tmp_path, "data_3", 6, 2, aparam)
    fitting = dict(ENER, numb_fparam=1, numb_aparam=2 if aparam else 0)
    doc = small_input(tmp_path, fitting=fitting, numb_steps=numb_steps, train_systems=[str(train)],
                      valid_systems=[str(valid)], disp_freq=numb_steps, save_freq=numb_steps)
    doc["learning_rate"] = {"start_lr": 5e-3, "stop_lr": 1e-3, "decay_steps": 10}
    doc["loss"].update(start_pref_e=1.0, start_pref_f=1.0)  # the parameter acts through the energy
    return doc


def test_statistics_normalise_the_parameters(tmp_path):
    trainer = make_trainer(tmp_path, parameter_input(tmp_path, aparam=True))
    fitting = trainer.model.heads["default"]
    temperature = np.load(tmp_path / "data_0_fparam" / "set.000" / "fparam.npy")
    frames = trainer.heads["default"].train.systems[0].labels["fparam"]
    assert np.allclose(np.sort(frames.reshape(-1)), np.sort(temperature.reshape(-1)))
    # the statistics are the mean and 1/std of the given frames' parameters
    samples = [b.stat_sample() for b in trainer.heads["default"].train.stat_batches(3, np.random.default_rng(0))]
    fitting.compute_output_stats(samples)
    fp = np.concatenate([s.labels["fparam"].numpy().reshape(-1, 1) for s in samples])
    ap = np.concatenate([s.labels["aparam"].numpy().reshape(-1, 2) for s in samples])
    np.testing.assert_allclose(fitting.fparam_avg.numpy(), fp.mean(0), rtol=1e-12)
    np.testing.assert_allclose(fitting.fparam_inv_std.numpy(), 1.0 / fp.std(0), rtol=1e-12)
    np.testing.assert_allclose(fitting.aparam_avg.numpy(), ap.mean(0), rtol=1e-12)
    np.testing.assert_allclose(fitting.aparam_inv_std.numpy(), 1.0 / ap.std(0), rtol=1e-12)
    # a (nearly) constant parameter is only shifted, not scaled up (DeePMD-kit's std < 1e-2 rule)
    for s in samples:
        s.labels["fparam"] = torch.full_like(s.labels["fparam"], 0.7)
    fitting.compute_output_stats(samples)
    assert float(fitting.fparam_avg[0]) == pytest.approx(0.7) and float(fitting.fparam_inv_std[0]) == 1.0


def test_energy_depends_on_the_parameters_and_forces_stay_gradients(tmp_path):
    trainer = make_trainer(tmp_path, parameter_input(tmp_path, aparam=True))
    model = trainer.model
    coord, atype, box = water_frame(0)
    coord = coord[None].clone().requires_grad_(False)
    from mtcore.model.frozen import batch_neighbor_list

    center, neighbor, image = batch_neighbor_list(coord, atype[None], box[None], model.rcut, model.ntypes)
    aparam = torch.tensor(np.random.default_rng(0).normal(size=(1, NATOMS, 2)))

    def energy(c, fparam, ap=aparam):
        out = model("default", c, atype[None], box[None], center, neighbor, image, want_force=True,
                    fparam=torch.tensor([[fparam]]), aparam=ap)
        return out

    low, high = energy(coord, 0.6), energy(coord, 1.4)
    assert abs(float(low["energy"].detach()) - float(high["energy"].detach())) > 1e-6
    other = energy(coord, 0.6, aparam + 1.0)
    assert abs(float(other["energy"].detach()) - float(low["energy"].detach())) > 1e-6
    # forces: minus the finite-difference gradient at fixed parameters
    h = 1e-5
    for atom, axis in ((0, 0), (7, 2)):
        plus, minus = coord.clone(), coord.clone()
        plus[0, atom, axis] += h
        minus[0, atom, axis] -= h
        fd = -(float(energy(plus, 0.6)["energy"].detach()) - float(energy(minus, 0.6)["energy"].detach())) / (2 * h)
        assert float(low["force"][0, atom, axis]) == pytest.approx(fd, abs=1e-6)
    with pytest.raises(RuntimeError, match="fparam"):
        model("default", coord, atype[None], box[None], center, neighbor, image)


def test_training_learns_the_parameter_and_frozen_model_matches(tmp_path):
    doc = parameter_input(tmp_path, numb_steps=40)
    trainer = make_trainer(tmp_path, doc)
    trainer.run()
    rows = lcurve_rows(tmp_path / "lcurve.out")
    assert rows[-1][3] < 0.5 * rows[0][3], rows  # rmse_e_val falls
    runner = CliRunner()
    frozen = tmp_path / "model.pth"
    result = runner.invoke(app, ["freeze", "-c", str(tmp_path / "model.ckpt-40.pt"), "-o", str(frozen)])
    assert result.exit_code == 0, result.output
    pot = load_frozen(frozen)
    assert pot.numb_fparam == 1 and pot.numb_aparam == 0
    valid = tmp_path / "data_3_fparam"
    coord = np.load(valid / "set.000" / "coord.npy")[:2].astype(np.float64)
    box = np.load(valid / "set.000" / "box.npy")[:2].astype(np.float64)
    fparam = np.load(valid / "set.000" / "fparam.npy")[:2]
    atype = np.loadtxt(valid / "type.raw", dtype=np.int64)
    out = pot.evaluate(coord, box, atype, fparam=fparam)
    for f in range(2):
        ref = trainer.model("default", *[torch.tensor(coord[f : f + 1]).reshape(1, -1, 3), torch.tensor(atype)[None],
                                         torch.tensor(box[f : f + 1]).reshape(1, 3, 3)],
                            *_neighbors(trainer.model, coord[f], atype, box[f]), fparam=torch.tensor(fparam[f : f + 1]))
        assert float(out["energy"][f]) == pytest.approx(float(ref["energy"].detach()), abs=1e-10)
    # the same parameter for every frame may be given once
    once = pot.evaluate(coord, box, atype, fparam=fparam[0])
    assert float(once["energy"][0]) == pytest.approx(float(out["energy"][0]), abs=1e-12)
    with pytest.raises(MtcoreError, match="needs fparam"):
        pot.evaluate(coord, box, atype)
    # mtcore test reads fparam.npy and reports the same energy error as the prediction above
    result = runner.invoke(app, ["test", "-m", str(frozen), "-s", str(valid), "-n", "2", "--json"])
    assert result.exit_code == 0, result.output
    energy_label = np.load(valid / "set.000" / "energy.npy")[:2]
    expected = np.sqrt(np.mean((out["energy"] - energy_label) ** 2))
    assert json.loads(result.stdout)["combined"]["Energy"]["rmse"] == pytest.approx(expected, rel=1e-9)


def _neighbors(model, coord, atype, box):
    from mtcore.model.frozen import batch_neighbor_list

    return batch_neighbor_list(torch.tensor(coord).reshape(1, -1, 3), torch.tensor(atype)[None],
                               torch.tensor(box).reshape(1, 3, 3), model.rcut, model.ntypes)


def test_missing_parameter_file_is_one_line_naming_it(tmp_path):
    doc = parameter_input(tmp_path)
    (tmp_path / "data_0_fparam" / "set.000" / "fparam.npy").unlink()
    with pytest.raises(MtcoreError, match=r"data_0_fparam/set.000/fparam.npy: not found"):
        make_trainer(tmp_path, doc)
