"""A DeePMD-kit v2 multi-task input in DeePMD-kit 3's multi-task layout, for side-by-side timing only.

DeePMD-kit 3 does not read v2's ``fitting_net_dict`` / ``loss_dict`` / ``data_dict`` input
(mtcore does), so bench.py gives it this translation of the same model, losses and data:

- ``model.shared_dict`` holds the type map and the one descriptor; each head of
  ``model.model_dict`` names them and keeps its own fitting net. v2's ``layer_name`` (sharing single
  fitting layers between heads) has no v3 counterpart and is dropped: it changes which parameters
  are tied, not the work of a step, so the timing compares like with like.
- ``training.fitting_weight`` becomes ``training.model_prob`` (both are normalised draw weights).
- Atomic tensor labels (``atomic_dipole.npy`` / ``atomic_polarizability.npy``) are stored by v2 for
  the ``sel_type`` atoms only; v3 wants a row for every atom. Systems holding them are copied with
  those labels widened (zeros for atoms outside ``sel_type``, which their loss does not count), into
  a folder of the benchmark's own; the user's data are only read.

Not a converter for users: it handles what the shipped multi-task examples use and no more.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np

ATOMIC_TENSOR_WIDTH = {"atomic_dipole.npy": 3, "atomic_polarizability.npy": 9}


def v3_multi_task(doc: dict, data_root: Path) -> dict:
    """The v3 multi-task document of the v2 multi-task ``doc`` (absolute data paths); systems whose
    atomic tensor labels need widening are copied under ``data_root``."""
    doc = copy.deepcopy(doc)
    model = doc["model"]
    heads = model.pop("fitting_net_dict")
    model_dict = {}
    for head, fitting in heads.items():
        fitting = {k: v for k, v in fitting.items() if k != "layer_name" and not k.startswith("_")}
        model_dict[head] = {"type_map": "type_map_all", "descriptor": "shared_descriptor", "fitting_net": fitting}
    doc["model"] = {"shared_dict": {"type_map_all": model["type_map"], "shared_descriptor": model["descriptor"]},
                    "model_dict": model_dict}
    training = doc["training"]
    weights = training.pop("fitting_weight", None) or {head: 1.0 for head in heads}
    training["model_prob"] = {head: float(weights[head]) for head in heads}
    for head, entry in training["data_dict"].items():
        sel_type = heads[head].get("sel_type")
        for key in ("training_data", "validation_data"):
            section = entry.get(key)
            if isinstance(section, dict) and sel_type is not None:
                systems = section["systems"]
                systems = [systems] if isinstance(systems, str) else systems
                section["systems"] = [str(widened_system(Path(s), sel_type, data_root / head / key / str(i)))
                                      for i, s in enumerate(systems)]
    return doc


def widened_system(system: Path, sel_type, target: Path) -> Path:
    """``system`` itself when it has no sel_type-only atomic labels; else a copy at ``target``
    whose atomic tensor labels have a row for every atom."""
    sel = [sel_type] if isinstance(sel_type, int) else list(sel_type)
    atype = np.loadtxt(system / "type.raw", dtype=int, ndmin=1)
    selected = np.isin(atype, sel)
    labelled = [f for f in sorted(system.glob("set.*/*.npy")) if f.name in ATOMIC_TENSOR_WIDTH]
    narrow = [f for f in labelled if np.load(f, mmap_mode="r").shape[1] == selected.sum() * ATOMIC_TENSOR_WIDTH[f.name]]
    if not narrow:
        return system
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(system, target)
    for f in narrow:
        width = ATOMIC_TENSOR_WIDTH[f.name]
        labels = np.load(f).reshape(-1, int(selected.sum()), width)
        full = np.zeros((labels.shape[0], atype.size, width), dtype=labels.dtype)
        full[:, selected] = labels
        np.save(target / f.relative_to(system), full.reshape(labels.shape[0], -1))
    return target
