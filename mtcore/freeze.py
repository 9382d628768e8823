"""``mtcore freeze``: checkpoints → TorchScript files that plain torch can load.

Multi-task: one file per head by default (``<stem>_<head><suffix>``), each exactly what a
single-task model with that head would freeze to; ``head`` picks one; ``united`` writes every head
into one file (the head is chosen at evaluation; also usable as an ``--init-model`` source).

``best`` (:func:`freeze_best`): each head from its own best-model file (``model.best.<head>.pt``,
written by training when that head's validation metric improved), named like the per-head files.
A united file holds ONE descriptor, so ``--united`` with ``--best`` is refused unless every head's
best model is from the same step (then they are one and the same model).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

import mtcore
from mtcore.config import config_from_document, single_task_document
from mtcore.errors import MtcoreError
from mtcore.model.build import build_model
from mtcore.model.fitting import reduction_of
from mtcore.model.frozen import FrozenModel, UnitedModel
from mtcore.model.model import MultiHeadModel
from mtcore.plugins import Registry, get_registry

METADATA_FILE = "mtcore.json"


def _save_script(module: torch.nn.Module, path: Path, metadata: str) -> None:
    with warnings.catch_warnings():
        # torch >= 2.10 marks TorchScript deprecated; it is still the one format that carries the
        # autograd force computation and loads in plain torch (and C++/LAMMPS) without Python.
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
        _write_script(scripted, path, metadata)


def _write_script(scripted, path: Path, metadata: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.jit.save(scripted, tmp, _extra_files={METADATA_FILE: metadata})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_frozen(path: Path, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """A TorchScript file and its ``mtcore.json`` metadata ({} when it has none). Whatever torch
    raises for a file that is not TorchScript is passed on: each caller decides what that means
    (a checkpoint to try instead, or its own one-line error)."""
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated; see _save_script
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    return module, json.loads(extra[METADATA_FILE] or "{}")


def frozen_execution(device: str = "cpu"):
    """The context a frozen file is called in: on the CPU without TorchScript's optimising
    executor. There its first calls take seconds (profiling, then a differentiable graph per
    shape) and later calls take 1.05-1.4x as long as the plain scripted code with autograd
    (benchmarks/bench_executor.py, docs/performance.md); elsewhere it is left on (unmeasured).
    The setting is per thread and restored on exit."""
    return torch.jit.optimized_execution(torch.device(device).type != "cpu")


def head_metadata(model: MultiHeadModel, document: dict, head: str, multi_task: bool,
                  provenance: Optional[dict] = None) -> dict:
    fitting = model.heads[head]
    odef = fitting.output_def()
    meta = {
        "format": "mtcore-frozen",
        "mtcore_version": mtcore.__version__,
        "kind": "single",
        "head": head,
        "type_map": model.type_map,
        "rcut": model.rcut,
        "fitting_type": (document["model"]["fitting_net_dict"][head] if multi_task else document["model"]["fitting_net"]).get("type", "ener"),
        "output": {"name": odef.name, "global_key": odef.global_key, "atomic_key": odef.atomic_key,
                   "conservative": odef.conservative, "size": odef.size,
                   "sel_types": list(odef.sel_types) if odef.sel_types is not None else None,
                   "reduction": reduction_of(odef)},
        "test_quantities": [q.__dict__ for q in fitting.test_quantities()],
        "label_requirements": [dict(r.__dict__, sel_types=list(r.sel_types) if r.sel_types is not None else None)
                               for r in fitting.stat_requirements()],
        "inputs": [{"key": r.key, "ndof": r.ndof, "atomic": r.atomic} for r in fitting.input_requirements()],
        "descriptor": document["model"]["descriptor"],
        "config": single_task_document(document, head) if multi_task else document,
    }
    if provenance is not None:
        meta["provenance"] = provenance
    return meta


def frozen_provenance(state: dict, document: dict, registry: Optional[Registry] = None) -> dict:
    """What a frozen file records: the packages that provide its components now (their code is
    what gets scripted), plus the data loaders its checkpoint was trained with."""
    from mtcore.provenance import record

    loaders = [c for c in (state.get("provenance") or {}).get("components") or [] if c.get("kind") == "data_loader"]
    return record(document, registry or get_registry(), loaders=loaders)


def model_from_checkpoint(state: dict, registry: Optional[Registry] = None) -> tuple[MultiHeadModel, dict, bool]:
    registry = registry or get_registry()
    for key, value in state["model"].items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            # a frozen model must never answer NaN for every input
            raise MtcoreError(f"{state.get('path', 'checkpoint')}: parameter '{key}' is not finite (NaN or inf); not frozen")
    config = config_from_document(state["config"], registry)
    model = build_model(config, registry)
    model.load_state_dict(state["model"])
    model.eval()
    return model, state["config"], config.multi_task


def freeze(state: dict, output: Optional[Path], head: Optional[str] = None, united: bool = False,
           extra: Optional[dict] = None) -> list[Path]:
    """Write the frozen file(s); returns their paths. ``extra``: more metadata for per-head files."""
    model, document, multi = model_from_checkpoint(state)
    extra = extra or {}
    default = Path("frozen_model.pth")
    if not multi:
        if head is not None and head != "all":
            raise MtcoreError("--head: this checkpoint is single-task (one head); drop --head")
        if united:
            raise MtcoreError("--united: this checkpoint is single-task; a plain freeze already holds its only head")
        path = Path(output or default)
        meta = dict(head_metadata(model, document, "default", False, frozen_provenance(state, document)), **extra)
        _save_script(FrozenModel(model.descriptor, model.heads["default"], model.type_map, "default", json.dumps(meta)), path, json.dumps(meta))
        return [path]
    if united:
        if head not in (None, "all"):
            raise MtcoreError("--united writes every head; drop --head")
        path = Path(output or default)
        meta = {
            "format": "mtcore-frozen", "mtcore_version": mtcore.__version__, "kind": "united",
            "heads": {h: head_metadata(model, document, h, True, frozen_provenance(state, single_task_document(document, h)))
                      for h in model.heads},
            "type_map": model.type_map, "rcut": model.rcut, "config": document,
            "provenance": frozen_provenance(state, document),
            "state_dict_keys": list(model.state_dict().keys()),
        }
        text = json.dumps(meta)
        _save_script(UnitedModel(model.descriptor, dict(model.heads.items()), model.type_map, text), path, text)
        return [path]
    heads = list(model.heads) if head in (None, "all") else [head]
    for h in heads:
        if h not in model.heads:
            raise MtcoreError(f"--head {h}: not a head of this model; heads: {', '.join(model.heads)}")
    base = Path(output or default)
    written = []
    for h in heads:
        path = base if (head not in (None, "all") and output is not None) else base.with_name(f"{base.stem}_{h}{base.suffix}")
        meta = json.dumps(dict(head_metadata(model, document, h, True, frozen_provenance(state, single_task_document(document, h))), **extra))
        _save_script(FrozenModel(model.descriptor, model.heads[h], model.type_map, h, meta), path, meta)
        written.append(path)
    return written


def best_files(state: dict, head: Optional[str] = None) -> tuple[dict[str, dict], list[str]]:
    """The best-model states to freeze for ``state`` (a run's checkpoint, or a best file itself):
    head → checksum-verified state of its best file; and the trained heads that have none
    (no validation data). Errors name the file and what is wrong with it."""
    from mtcore.train.checkpoint import best_file_name, read_checkpoint_file

    where = state.get("path", "checkpoint")
    own = state.get("best_of")
    if own is not None:  # -c model.best.<head>.pt: that head, from that file
        if head not in (None, "all", own.get("head")):
            raise MtcoreError(f"--head {head}: {where} is the best model of head '{own.get('head')}'")
        return {own["head"]: state}, []
    record = state.get("best")
    if not record or not record.get("heads"):
        raise MtcoreError(
            f"{where}: no best model is recorded (no head has validation data, or the run predates best "
            "tracking); freeze without --best"
        )
    heads = record["heads"]
    config = config_from_document(state["config"], get_registry())
    without = [h for h in config.trained_heads() if h not in heads]
    if head not in (None, "all"):
        if head not in config.heads:
            raise MtcoreError(f"--head {head}: not a head of this model; heads: {', '.join(config.heads)}")
        if head not in heads:
            raise MtcoreError(f"--head {head}: this head has no validation data in its run, so it has no best model")
        wanted, without = [head], []
    else:
        wanted = list(heads)
    folder = Path(where).parent
    prefix = Path(config.training.get("save_ckpt", "model.ckpt")).name
    found = {}
    for h in wanted:
        path = folder / best_file_name(prefix, h)
        if not path.exists():
            raise MtcoreError(f"{path}: best model of head '{h}' not found (it is written at the head's first validation)")
        best_state = read_checkpoint_file(path)
        mark = best_state.get("best_of") or {}
        if mark.get("head") != h or mark.get("run_id") != record.get("run_id"):
            raise MtcoreError(f"{path}: not the best model of head '{h}' written by the run of {where}")
        found[h] = best_state
    return found, without


def freeze_best(state: dict, output: Optional[Path], head: Optional[str] = None,
                united: bool = False) -> list[tuple[Path, dict]]:
    """Freeze each head from its own best-model file; returns (path, that head's best_of)."""
    found, without = best_files(state, head)
    if united:
        steps = {h: s["best_of"]["step"] for h, s in found.items()}
        if len(set(steps.values())) > 1:
            shown = ", ".join(f"{h} {step}" for h, step in steps.items())
            raise MtcoreError(
                f"--united --best: the heads' best models are from different steps ({shown}); a united file holds one "
                "descriptor, so freeze each head from its own best model (drop --united)"
            )
        first = next(iter(found.values()))
        return [(path, first["best_of"]) for path in freeze(first, output, head, united=True)]
    for h in without:
        warnings.warn(f"head '{h}' has no validation data, so no best model; not frozen (freeze without --best for it)")
    multi = bool(state.get("multi_task"))
    base = Path(output or "frozen_model.pth")
    written = []
    for h, best_state in found.items():
        if not multi:
            path = base
        elif head not in (None, "all") and output is not None:
            path = base
        else:
            path = base.with_name(f"{base.stem}_{h}{base.suffix}")
        mark = dict(best_state["best_of"], file=Path(best_state["path"]).name)
        freeze(best_state, path, h if multi else None, extra={"best": mark})
        written.append((path, mark))
    return written
