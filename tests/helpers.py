"""Helpers for tests: build small models, evaluate them on raw coordinates, small inputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mtcore.config import normalize
from mtcore.data.loading import load_dataset
from mtcore.data.neighbors import NeighborCache
from mtcore.model.build import build_model
from mtcore.model.frozen import batch_neighbor_list
from mtcore.plugins import get_registry

ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT / "examples" / "water" / "data"

SE_E2_A = {"type": "se_e2_a", "sel": [46, 92], "rcut": 6.0, "rcut_smth": 0.5, "neuron": [8, 16, 32],
           "axis_neuron": 4, "seed": 1, "precision": "float64"}
ENER = {"type": "ener", "neuron": [32, 32, 32], "seed": 2, "precision": "float64"}


def small_input(
    workdir: Path,
    descriptor: Optional[dict] = None,
    fitting: Optional[dict] = None,
    numb_steps: int = 20,
    train_systems: Optional[list] = None,
    valid_systems: Optional[list] = None,
    **training,
) -> dict:
    """A single-task water input with absolute data paths."""
    doc = {
        "model": {
            "type_map": ["O", "H"],
            "descriptor": copy.deepcopy(descriptor or SE_E2_A),
            "fitting_net": copy.deepcopy(fitting or ENER),
        },
        "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 10},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
        "training": {
            "training_data": {"systems": train_systems or [str(WATER / "data_0")], "batch_size": 1},
            "validation_data": {"systems": valid_systems or [str(WATER / "data_3")], "batch_size": 1, "numb_btch": 2},
            "numb_steps": numb_steps,
            "seed": 7,
            "disp_freq": 10,
            "save_freq": 10,
        },
    }
    doc["training"].update(training)
    return doc


def write_input(workdir: Path, doc: dict, name: str = "input.json") -> Path:
    path = Path(workdir) / name
    path.write_text(json.dumps(doc, indent=1))
    return path


def model_with_stats(doc: dict, nbatch: int = 2):
    """Build the model of a (single- or multi-task) input and set its statistics from its data."""
    registry = get_registry()
    config = normalize(doc, Path("/"), registry)
    model = build_model(config, registry)
    cache = NeighborCache(model.rcut)
    rng = np.random.default_rng(0)
    samples = []
    for name, head in config.heads.items():
        if head.training_data is None:
            continue
        ds = load_dataset(head.training_data, config.type_map, model.heads[name].stat_requirements(), cache, registry, "t")
        head_samples = [b.stat_sample() for b in ds.stat_batches(nbatch, rng)]
        model.heads[name].compute_output_stats(head_samples)
        samples += head_samples
    model.descriptor.compute_input_stats(samples)
    return model, config


def water_frame(index: int = 0, system: str = "data_0"):
    coord = np.load(WATER / system / "set.000" / "coord.npy")[index].reshape(-1, 3).astype(np.float64)
    box = np.load(WATER / system / "set.000" / "box.npy")[index].reshape(3, 3).astype(np.float64)
    atype = np.loadtxt(WATER / system / "type.raw", dtype=np.int64)
    return torch.tensor(coord), torch.tensor(atype), torch.tensor(box)


def predict(model, head: str, coord, atype, box, want_virial: bool = True, create_graph: bool = False) -> dict:
    """Evaluate ``model`` (MultiHeadModel) on one or more frames, building neighbour lists in torch."""
    coord = coord.reshape(-1, atype.shape[-1], 3).to(torch.float64)
    nframes = coord.shape[0]
    atype = atype.reshape(-1, atype.shape[-1]).expand(nframes, -1)
    box = None if box is None else box.reshape(-1, 3, 3).expand(nframes, 3, 3)
    center, neighbor, image = batch_neighbor_list(coord, atype, box, model.rcut, model.ntypes)
    conservative = model.heads[head].output_def().conservative
    return model(head, coord, atype, box, center, neighbor, image, want_force=conservative,
                 want_virial=want_virial and conservative, create_graph=create_graph)


def random_rotation(seed: int = 0) -> torch.Tensor:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return torch.tensor(q)


def transformed_system(workdir: Path, source: str = "data_1", scale: float = 1.05, shift_per_atom: float = -0.3) -> Path:
    """A copy of a water system as a stand-in for a second level of theory:
    E' = scale·E + shift·N, F' = scale·F (consistent: F' = -dE'/dr)."""
    import shutil

    target = Path(workdir) / f"{source}_transformed"
    if target.exists():
        return target
    shutil.copytree(WATER / source, target)
    natoms = len((target / "type.raw").read_text().split())
    for set_dir in sorted(target.glob("set.*")):
        energy = np.load(set_dir / "energy.npy").astype(np.float64)
        np.save(set_dir / "energy.npy", scale * energy + shift_per_atom * natoms)
        np.save(set_dir / "force.npy", scale * np.load(set_dir / "force.npy").astype(np.float64))
    return target


def multi_task_input(
    workdir: Path,
    numb_steps: int = 20,
    weights: Optional[dict] = None,
    layer_name: Optional[list] = None,
    descriptor: Optional[dict] = None,
    **training,
) -> dict:
    """Two energy heads: 'ccsd' on water data_0, 'wb97m' on transformed data_1, layers shared."""
    names = layer_name if layer_name is not None else ["l0", None, "l2", None]
    second = transformed_system(workdir)
    doc = {
        "model": {
            "type_map": ["O", "H"],
            "descriptor": copy.deepcopy(descriptor or SE_E2_A),
            "fitting_net_dict": {
                "ccsd": dict(ENER, seed=11, layer_name=names),
                "wb97m": dict(ENER, seed=12, layer_name=names),
            },
        },
        "learning_rate": {"type": "exp", "start_lr": 5e-3, "stop_lr": 1e-3, "decay_steps": 10},
        "loss_dict": {
            "ccsd": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
            "wb97m": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
        },
        "training": {
            "data_dict": {
                "ccsd": {
                    "training_data": {"systems": [str(WATER / "data_0")], "batch_size": 1},
                    "validation_data": {"systems": [str(WATER / "data_3")], "batch_size": 1, "numb_btch": 2},
                },
                "wb97m": {
                    "training_data": {"systems": [str(second)], "batch_size": 1},
                    "validation_data": {"systems": [str(second)], "batch_size": 1, "numb_btch": 2},
                },
            },
            "numb_steps": numb_steps,
            "seed": 9,
            "disp_freq": 10,
            "save_freq": 10,
        },
    }
    if weights is not None:
        doc["training"]["fitting_weight"] = weights
    doc["training"].update(training)
    return doc


def two_head_input(numb_steps: int, descriptor: dict) -> dict:
    """An energy head 'water' on water data_0 and a dipole head 'dipole' on the water_tensor
    example, one descriptor."""
    tensor = ROOT / "examples" / "water_tensor"
    dipole = [str(tensor / "dipole" / "training_data" / n) for n in ("atomic_system", "global_system")]
    return {
        "model": {
            "type_map": ["O", "H"],
            "descriptor": copy.deepcopy(descriptor),
            "fitting_net_dict": {
                "water": {"type": "ener", "neuron": [16, 16], "seed": 1, "precision": "float64"},
                "dipole": {"type": "dipole", "sel_type": [0], "neuron": [16, 16], "seed": 3, "precision": "float64"},
            },
        },
        "learning_rate": {"type": "exp", "start_lr": 5e-3, "stop_lr": 1e-3, "decay_steps": 10},
        "loss_dict": {
            "water": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
            "dipole": {"type": "tensor", "pref": 1.0, "pref_atomic": 1.0},
        },
        "training": {
            "data_dict": {
                "water": {"training_data": {"systems": [str(WATER / "data_0")], "batch_size": 1}},
                "dipole": {"training_data": {"systems": dipole, "batch_size": 1}},
            },
            "numb_steps": numb_steps, "seed": 1, "disp_freq": numb_steps, "save_freq": numb_steps,
        },
    }


def assert_nested_close(a, b, rel: float = 1e-10, abs_: float = 1e-12, where: str = "") -> None:
    """Equal structure, floats equal within a stated tolerance.

    Two code paths (a scripted and an eager module, or threaded reductions in another order) do
    not promise the same last bit, so results are never compared with ``==``.
    """
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_nested_close(a[key], b[key], rel, abs_, f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for k, (x, y) in enumerate(zip(a, b)):
            assert_nested_close(x, y, rel, abs_, f"{where}[{k}]")
    elif isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            assert a is b, f"{where}: {a!r} vs {b!r}"
        else:
            assert abs(a - b) <= max(abs_, rel * max(abs(a), abs(b))), f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def fake_distribution(root: Path, dist: str, version: str, source: str, entry_point: str = "main") -> str:
    """Write an installed-looking distribution ``dist`` ``version`` into ``root`` whose ``mtcore``
    entry point loads a module with ``source``; returns the module name (unique per call).

    Put ``root`` on sys.path (the ``installed_plugins`` fixture) or PYTHONPATH (a subprocess):
    names, versions and entry points are then what a user's installed packages would give."""
    import textwrap
    import uuid

    module = f"mtcore_fake_{uuid.uuid4().hex[:10]}"
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[mtcore]\n{entry_point} = {module}\n")
    return module
