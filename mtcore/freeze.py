"""``mtcore freeze``: checkpoints → TorchScript files that plain torch can load.

Multi-task: one file per head by default (``<stem>_<head><suffix>``), each exactly what a
single-task model with that head would freeze to; ``head`` picks one; ``united`` writes every head
into one file (the head is chosen at evaluation; also usable as an ``--init-model`` source).
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


def freeze(state: dict, output: Optional[Path], head: Optional[str] = None, united: bool = False) -> list[Path]:
    """Write the frozen file(s); returns their paths."""
    model, document, multi = model_from_checkpoint(state)
    default = Path("frozen_model.pth")
    if not multi:
        if head is not None and head != "all":
            raise MtcoreError("--head: this checkpoint is single-task (one head); drop --head")
        if united:
            raise MtcoreError("--united: this checkpoint is single-task; a plain freeze already holds its only head")
        path = Path(output or default)
        meta = head_metadata(model, document, "default", False, frozen_provenance(state, document))
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
        meta = json.dumps(head_metadata(model, document, h, True, frozen_provenance(state, single_task_document(document, h))))
        _save_script(FrozenModel(model.descriptor, model.heads[h], model.type_map, h, meta), path, meta)
        written.append(path)
    return written
