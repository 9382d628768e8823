"""``mtcore test``: errors of a frozen model on labelled systems (MAE and RMSE per quantity).

Which quantities are compared comes from the frozen head's metadata (its fitting net's
``test_quantities``): energy (total and per atom), force, virial for energy heads; global and
atomic tensors for tensor heads; frame properties for property heads. The head's declared
reduction is honoured: an intensive (``mean``) quantity gets no "/atom" row or ``_peratom`` file
(it is per atom already), a ``none`` head is compared on its atomic output only. Several systems are combined as DeePMD-kit does: MAE weighted
by the number of values, RMSE as the root of the weighted mean square.

With a detail prefix, label and prediction are written side by side as DeePMD-kit's ``dp test
-d`` does (``PREFIX.e.out``, ``.e_peratom.out``, ``.f.out``, ``.v.out``, ``.v_peratom.out``;
``PREFIX.out`` for a tensor's global label, ``PREFIX.atomic.out`` for its atomic label), one
``# system: columns`` header per system. File names and columns come from the fitting's
``TestQuantity`` entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mtcore.data.loading import expand_systems, load_system
from mtcore.data.requirements import DataRequirement
from mtcore.errors import MtcoreError
from mtcore.infer import DeepPotential, _renumber_frames
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


def _reduction(meta: dict) -> str:
    """The head's declared reduction (``sum`` for files frozen before reductions)."""
    return str(meta["output"].get("reduction") or "sum")


def _requirements(meta: dict) -> list[DataRequirement]:
    reqs = {}
    output = meta["output"]
    sel = tuple(output["sel_types"]) if output.get("sel_types") is not None else None
    for q in meta.get("test_quantities", []):
        key = q["key"]
        if key == output.get("global_key") and _reduction(meta) == "none":
            continue  # a per-atom-only head predicts no frame quantity: nothing to compare
        if key == "force":
            reqs[key] = DataRequirement("force", 3, atomic=True)
        elif key == "virial":
            reqs[key] = DataRequirement("virial", 9)
        elif q.get("atomic"):
            reqs[key] = DataRequirement(key, output["size"], atomic=True, sel_types=sel)
        else:
            reqs[key] = DataRequirement(key, output["size"] if key != "energy" else 1)
    for item in meta.get("inputs", []):  # fparam / aparam: model inputs read from the data
        reqs[item["key"]] = DataRequirement(item["key"], int(item["ndof"]), atomic=bool(item["atomic"]), must=True)
    return list(reqs.values())


def _selected_count(meta: dict, atype: np.ndarray) -> np.ndarray:
    sel = meta["output"].get("sel_types")
    if sel is None:
        return np.full(atype.shape[0], atype.shape[1])
    return np.isin(atype, sel).sum(1)


class DetailWriter:
    """Appends label/prediction columns per quantity; each file is started afresh by this run."""

    def __init__(self, prefix: Path):
        self.prefix = Path(prefix)
        self.started: set[Path] = set()

    def path(self, detail: str, per_atom: bool) -> Path:
        suffix = (detail + ("_peratom" if per_atom else "")) if detail else ("peratom" if per_atom else "")
        return self.prefix.with_name(self.prefix.name + (f".{suffix}" if suffix else "") + ".out")

    def write(self, system: str, detail: str, columns: list, label: np.ndarray, pred: np.ndarray, per_atom: bool) -> None:
        path = self.path(detail, per_atom)
        names = list(columns) if columns else [str(i) for i in range(label.shape[1])]
        header = f"{system}: " + " ".join([f"data_{c}" for c in names] + [f"pred_{c}" for c in names])
        mode = "ab" if path in self.started else "wb"
        self.started.add(path)
        try:
            with open(path, mode) as handle:
                np.savetxt(handle, np.concatenate([label, pred], axis=1), header=header)
        except OSError as exc:
            raise MtcoreError(f"-d/--detail-file: cannot write {path}: {exc.strerror}") from None


def _evaluate_frames(pot: DeepPotential, system, nframes: int, chunk: int) -> dict[str, np.ndarray]:
    """Predictions for the first ``nframes`` frames, ``chunk`` at a time (types per frame, so
    mixed-type data batches too; the model bounds its memory by evaluating large frames in atom
    chunks itself)."""
    preds: dict[str, list] = {}
    atypes = np.asarray(system.atypes)
    for start in range(0, nframes, chunk):
        stop = min(nframes, start + chunk)
        box = None if system.boxes is None else system.boxes[start:stop]
        params = {k: system.labels[k][start:stop] for k in ("fparam", "aparam") if k in system.labels}
        try:
            out = pot.evaluate(system.coords[start:stop], box, atypes[start:stop], **params)
        except MtcoreError as exc:
            raise MtcoreError(f"{system.path}: {_renumber_frames(str(exc), list(range(start, stop)))}") from None
        for key, value in out.items():
            preds.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in preds.items()}


def test_system(
    pot: DeepPotential,
    path: Path,
    numb_test: int,
    chunk: int = 8,
    details: Optional[DetailWriter] = None,
    all_sets: bool = False,
    set_prefix: str = "set",
) -> TestResult:
    """Errors on one system: its last set folder, as ``dp test`` does (every set with ``all_sets``),
    the first ``numb_test`` frames of it (all for 0)."""
    meta = pot.head_metadata
    system = load_system(path, pot.type_map, _requirements(meta), set_prefix, get_registry())
    if not all_sets:
        system = system.last_set()
    nframes = system.nframes if numb_test <= 0 else min(numb_test, system.nframes)
    result = TestResult(str(path), nframes)
    pred = _evaluate_frames(pot, system, nframes, chunk)
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
        if q.get("atomic"):
            label = label.reshape(nframes * natoms, -1)
            value = value.reshape(nframes * natoms, -1)
            if meta["output"].get("sel_types") is not None:
                # a tensor head predicts (and v2 files label) only atoms of its sel_type: compare those
                selected = np.isin(np.asarray(system.atypes[:nframes]), meta["output"]["sel_types"]).reshape(-1)
                label, value = label[selected], value[selected]
        diff = value - label
        result.stats.setdefault(q["title"], ErrorStat()).add(diff)
        detail = q.get("detail")
        if details is not None and detail is not None:
            details.write(str(path), detail, q.get("columns", []), label, value, per_atom=False)
        if q.get("per_atom") and not (key == meta["output"].get("global_key") and _reduction(meta) == "mean"):
            # an intensive (mean) quantity is already per atom: dividing it again means nothing
            norm = natoms if meta["output"]["conservative"] else nsel.reshape(-1, 1)
            result.stats.setdefault(q["title"] + "/atom", ErrorStat()).add(diff / norm)
            if details is not None and detail is not None:
                details.write(str(path), detail, q.get("columns", []), label / norm, value / norm, per_atom=True)
    return result


def run_test(
    model: Path,
    systems: list[str],
    numb_test: int = 0,
    head: Optional[str] = None,
    detail_file: Optional[Path] = None,
    all_sets: bool = False,
    set_prefix: str = "set",
) -> tuple[list[TestResult], dict]:
    pot = DeepPotential(model, head=head)
    registry = get_registry()
    paths: list[Path] = []
    for s in systems:
        paths.extend(expand_systems(s, registry, "-s/--system"))
    details = DetailWriter(detail_file) if detail_file is not None else None
    results = [test_system(pot, p, numb_test, details=details, all_sets=all_sets, set_prefix=set_prefix) for p in paths]
    combined: dict[str, ErrorStat] = {}
    for r in results:
        for title, stat in r.stats.items():
            acc = combined.setdefault(title, ErrorStat())
            acc.abs_sum += stat.abs_sum
            acc.sq_sum += stat.sq_sum
            acc.count += stat.count
    return results, combined
