"""``mtcore compress``: a frozen model whose embedding nets are tables (DeePMD-kit's ``dp compress``).

The frozen file's recorded input (``config`` in its metadata) rebuilds the eager model, the
file's weights are loaded into it (key for key, strictly), and every embedding net the
descriptor lists in ``compressible_embeddings(min_distance)`` is replaced by a
:class:`mtcore.model.tabulate.TabulatedEmbedding` on its input range. That range comes from the
training data: the shortest interatomic distance in the training systems the file records (or
those of ``-t input.json``), as DeePMD-kit's ``min_nbor_dist``. The result is scripted and
written exactly as ``mtcore freeze`` writes (same writer), with ``compressed`` in its metadata;
it loads with plain ``torch.jit.load`` like any frozen file.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

import mtcore
from mtcore.config import config_from_document, load_config
from mtcore.errors import MtcoreError
from mtcore.freeze import _save_script, load_frozen
from mtcore.model.build import build_model
from mtcore.model.frozen import FrozenModel, UnitedModel
from mtcore.model.mlp import EmbeddingNet
from mtcore.model.model import MultiHeadModel
from mtcore.model.tabulate import TabulatedEmbedding
from mtcore.plugins import Registry, get_registry


def read_frozen(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    """The scripted module and its metadata; one line when it is not a frozen mtcore file."""
    path = Path(path)
    if not path.is_file():
        raise MtcoreError(f"-i {path}: frozen model file not found")
    try:
        module, meta = load_frozen(path)
    except Exception as exc:  # noqa: BLE001
        raise MtcoreError(f"-i {path}: not a frozen mtcore model ({type(exc).__name__}); compress a file written by mtcore freeze") from None
    if meta.get("format") != "mtcore-frozen" or "config" not in meta:
        raise MtcoreError(f"-i {path}: not a frozen mtcore model (no mtcore metadata); compress a file written by mtcore freeze")
    if meta.get("compressed"):
        raise MtcoreError(f"-i {path}: is already compressed; compress the uncompressed frozen file instead")
    return module, meta


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load(module: torch.nn.Module, state: dict, what: str, path: Path) -> None:
    # a scripted module's state dict also holds the buffers eager modules keep out of theirs
    transient = {name for name, _ in module.named_buffers()} - set(module.state_dict())
    state = {k: v for k, v in state.items() if k not in transient}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = " ".join(first[1:2]) or first[0]
        raise MtcoreError(f"-i {path}: the {what} weights do not fit the model its recorded input builds ({detail})") from None


def rebuild(module: torch.jit.ScriptModule, meta: dict, path: Path, registry: Registry,
            before_load: Optional[Callable[[MultiHeadModel], None]] = None) -> MultiHeadModel:
    """The eager model of a frozen file: built from its recorded input, its weights loaded
    (``before_load`` changes the built model first, e.g. puts a compressed file's tables in)."""
    config = config_from_document(meta["config"], registry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the build's warnings were shown when it was trained
        model = build_model(config, registry)
    if before_load is not None:
        before_load(model)
    state = module.state_dict()
    _load(model.descriptor, _part(state, "descriptor."), "descriptor", path)
    if meta.get("kind") == "united":
        for head in model.heads:
            _load(model.heads[head], _part(state, f"heads.{head}."), f"head '{head}'", path)
    else:
        head = meta.get("head", "default")
        if head not in model.heads:
            head = next(iter(model.heads))
        _load(model.heads[head], _part(state, "fitting."), "fitting", path)
    return model.eval()


def training_systems(document: dict) -> tuple[list, list]:
    """Training systems of every head of a normalised input (single- or multi-task)."""
    training = document.get("training") or {}
    sections = [training.get("training_data")]
    sections += [(d or {}).get("training_data") for d in (training.get("data_dict") or {}).values()]
    systems: list = []
    for section in sections:
        if section and section.get("systems"):
            value = section["systems"]
            systems += [value] if isinstance(value, str) else list(value)
    return systems, [s.get("set_prefix", "set") for s in sections if s]


def min_neighbor_distance(document: dict, type_map: list, rcut: float, registry: Registry, source: str) -> tuple[float, list]:
    """Shortest interatomic distance (within rcut) over the training systems of ``document``."""
    from mtcore.data.loading import expand_systems, load_system, pooled_neighbor_stat

    names, prefixes = training_systems(document)
    if not names:
        raise MtcoreError(f"{source}: names no training systems; give the training data with -t input.json")
    prefix = prefixes[0] if prefixes else "set"
    try:
        paths = expand_systems(names, registry, "training_data")
        systems = [load_system(Path(p), type_map, [], prefix, registry) for p in paths]
    except MtcoreError as exc:
        raise MtcoreError(f"{source}: its training data cannot be read ({exc}); give the training data with -t input.json") from None
    stat = pooled_neighbor_stat(systems, len(type_map))
    stat.max_count(rcut, False)  # computes the distances within rcut
    return float(stat.min_distance()), [str(p) for p in paths]


def put_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    """Put ``module`` at ``path`` (``nets.0``, ``layers.1.net``) under ``root``, in place."""
    parent_name, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, torch.nn.ModuleList):
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)


def compress_descriptor(descriptor: torch.nn.Module, min_distance: float, step: float, extrapolate: float,
                        check_frequency: int, name: str) -> list[dict]:
    """Swap the descriptor's compressible embedding nets for tables, in place; returns what was done."""
    inputs = descriptor.compressible_embeddings(min_distance) if hasattr(descriptor, "compressible_embeddings") else None
    if not inputs:
        raise MtcoreError(f"model/descriptor: '{name}' cannot be compressed (it lists no compressible embedding nets); "
                          "compress supports se_e2_a, se_e2_r, se_e3 and se_atten with stripped type embedding")
    done = []
    for item in inputs:
        net = descriptor.get_submodule(item.path)
        if not isinstance(net, EmbeddingNet):
            raise MtcoreError(f"model/descriptor: '{item.path}' is a {type(net).__name__}, not an embedding net; cannot tabulate it")
        table = TabulatedEmbedding.from_net(net, item.lower, item.upper, step, extrapolate, check_frequency)
        put_submodule(descriptor, item.path, table)
        start, lower, upper, end = table.table_range()
        done.append({"path": item.path, "meaning": item.meaning, "lower": lower, "upper": upper,
                     "table_start": start, "table_end": end, "intervals": int(table.coef.shape[0])})
    return done


def compress(input_path: Path, output_path: Path, step: float = 0.01, extrapolate: float = 5.0,
             training_script: Optional[Path] = None, check_frequency: int = -1,
             registry: Optional[Registry] = None) -> dict:
    """Write the compressed model; returns its ``compressed`` metadata entry."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not (step > 0 and math.isfinite(step)):
        raise MtcoreError(f"--step: must be a positive number, got {step}")
    if not (extrapolate >= 1 and math.isfinite(extrapolate)):
        raise MtcoreError(f"--extrapolate: must be at least 1, got {extrapolate}")
    if output_path.exists() and input_path.exists() and os.path.samefile(input_path, output_path):
        raise MtcoreError(f"-o {output_path}: is the input file; write the compressed model to another file")
    registry = registry or get_registry()
    module, meta = read_frozen(input_path)
    model = rebuild(module, meta, input_path, registry)
    if training_script is not None:
        document, source = load_config(Path(training_script), registry).document, f"-t {training_script}"
    else:
        document, source = meta["config"], f"-i {input_path} (its recorded input)"
    min_distance, systems = min_neighbor_distance(document, model.type_map, model.rcut, registry, source)
    name = str(meta["config"]["model"]["descriptor"].get("type", "?"))
    tables = compress_descriptor(model.descriptor, min_distance, step, extrapolate, check_frequency, name)
    info = {"step": step, "extrapolate": extrapolate, "check_frequency": check_frequency,
            "min_distance": min_distance, "data": systems, "tables": tables, "source": str(input_path),
            "mtcore_version": mtcore.__version__}
    new_meta = copy.deepcopy(meta)
    new_meta["compressed"] = info
    if meta.get("kind") == "united":
        for head_meta in new_meta.get("heads", {}).values():
            head_meta["compressed"] = info
        text = json.dumps(new_meta)
        _save_script(UnitedModel(model.descriptor, dict(model.heads.items()), model.type_map, text), output_path, text)
    else:
        head = meta.get("head", "default")
        text = json.dumps(new_meta)
        fitting = model.heads[head] if head in model.heads else next(iter(model.heads.values()))
        _save_script(FrozenModel(model.descriptor, fitting, model.type_map, head, text), output_path, text)
    return info
