"""``mtcore test``: errors of a frozen model on labelled systems (MAE and RMSE per quantity).

Which quantities are compared comes from the frozen head's metadata (its fitting net's
``test_quantities``): energy (total and per atom), force, virial for energy heads; global and
atomic tensors for tensor heads. Several systems are combined as DeePMD-kit does: MAE weighted
by the number of values, RMSE as the root of the weighted mean square.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mtcore.data.loading import expand_systems, load_system
from mtcore.data.requirements import DataRequirement
from mtcore.errors import MtcoreError
from mtcore.infer import DeepPotential
from mtcore.plugins import get_registry


@dataclass
class ErrorStat:
    """Sums that give MAE and RMSE, and combine over systems."""

    abs_sum: float = 0.0
    sq_sum: float = 0.0
    count: int = 0

    def add(self, diff: np.ndarray) -> None:
        self.abs_sum += float(np.abs(diff).sum())
        self.sq_sum += float((diff**2).sum())
        self.count += int(diff.size)

    @property
    def mae(self) -> float:
        return self.abs_sum / self.count if self.count else float("nan")

    @property
    def rmse(self) -> float:
        return float(np.sqrt(self.sq_sum / self.count)) if self.count else float("nan")


@dataclass
class TestResult:
    system: str
    nframes: int
    stats: dict[str, ErrorStat] = field(default_factory=dict)


def _requirements(meta: dict) -> list[DataRequirement]:
    reqs = {}
    output = meta["output"]
    sel = tuple(output["sel_types"]) if output.get("sel_types") is not None else None
    for q in meta.get("test_quantities", []):
        key = q["key"]
        if key == "force":
            reqs[key] = DataRequirement("force", 3, atomic=True)
        elif key == "virial":
            reqs[key] = DataRequirement("virial", 9)
        elif q.get("atomic"):
            reqs[key] = DataRequirement(key, output["size"], atomic=True, sel_types=sel)
        else:
            reqs[key] = DataRequirement(key, output["size"] if key != "energy" else 1)
    return list(reqs.values())


def _selected_count(meta: dict, atype: np.ndarray) -> np.ndarray:
    sel = meta["output"].get("sel_types")
    if sel is None:
        return np.full(atype.shape[0], atype.shape[1])
    return np.isin(atype, sel).sum(1)


def test_system(pot: DeepPotential, path: Path, numb_test: int, chunk: int = 8) -> TestResult:
    meta = pot.head_metadata
    system = load_system(path, pot.type_map, _requirements(meta), "set", get_registry())
    nframes = system.nframes if numb_test <= 0 else min(numb_test, system.nframes)
    result = TestResult(str(path), nframes)
    preds: dict[str, list] = {}
    for start in range(0, nframes, chunk):
        stop = min(nframes, start + chunk)
        box = None if system.boxes is None else system.boxes[start:stop]
        types = np.asarray(system.atypes[start])
        if np.any(np.asarray(system.atypes[start:stop]) != types):
            raise MtcoreError(f"{path}: per-frame atom types (mixed-type data) are not supported by mtcore test yet")
        out = pot.evaluate(system.coords[start:stop], box, types)
        for key, value in out.items():
            preds.setdefault(key, []).append(value)
    pred = {k: np.concatenate(v) for k, v in preds.items()}
    natoms = system.natoms
    nsel = _selected_count(meta, np.asarray(system.atypes[:nframes]))
    for q in meta.get("test_quantities", []):
        key = q["key"]
        if key not in system.labels or key not in pred:
            continue
        if q.get("periodic_only") and not system.periodic:
            continue
        label = system.labels[key][:nframes].reshape(nframes, -1)
        value = pred[key].reshape(nframes, -1)
        if value.shape != label.shape:
            raise MtcoreError(f"{path}: {key} label has {label.shape[1]} values per frame, the model predicts {value.shape[1]}")
        diff = value - label
        if q.get("atomic") and meta["output"].get("sel_types") is not None:
            # a tensor head predicts (and v2 files label) only atoms of its sel_type: compare those
            selected = np.isin(np.asarray(system.atypes[:nframes]), meta["output"]["sel_types"])
            diff = diff.reshape(nframes, natoms, -1)[selected]
        result.stats.setdefault(q["title"], ErrorStat()).add(diff)
        if q.get("per_atom"):
            norm = natoms if meta["output"]["conservative"] else nsel.reshape(-1, 1)
            result.stats.setdefault(q["title"] + "/atom", ErrorStat()).add(diff / norm)
    return result


def run_test(model: Path, systems: list[str], numb_test: int = 0, head: Optional[str] = None) -> tuple[list[TestResult], dict]:
    pot = DeepPotential(model, head=head)
    registry = get_registry()
    paths: list[Path] = []
    for s in systems:
        paths.extend(expand_systems(s, registry, "-s/--system"))
    results = [test_system(pot, p, numb_test) for p in paths]
    combined: dict[str, ErrorStat] = {}
    for r in results:
        for title, stat in r.stats.items():
            acc = combined.setdefault(title, ErrorStat())
            acc.abs_sum += stat.abs_sum
            acc.sq_sum += stat.sq_sum
            acc.count += stat.count
    return results, combined
