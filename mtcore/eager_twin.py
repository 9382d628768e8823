"""A frozen file run as the eager model it records, so CPU inference takes mtcore's C kernels.

Why: a frozen file must load in plain ``torch.jit.load``, so its scripted code cannot call the
C loops training uses (the nets' fused forward with dE/ds, the contraction over real pairs,
tables evaluated in C); it runs the plain padded path instead. The file records its input and
holds its weights, which rebuild the eager model exactly (``mtcore compress`` does the same), and
that model, called inside :func:`first_derivatives`, runs those kernels: on a 192-atom water
frame se_e2_a takes about 0.6 of the scripted call's time, a compressed file about 0.4
(benchmarks/bench_compress.py, docs/performance.md "Compressed inference").

:mod:`mtcore.infer` uses the twin on the CPU. The scripted module is kept where the twin cannot
be made (a plugin not installed, an older file, weights that do not fit), on other devices, and
with ``MTCORE_INFER_SCRIPTED=1``; and where the twin does not give the scripted module's numbers on
a small probe frame at load (:func:`agrees`: a file frozen by an mtcore whose code has changed).
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch


def wanted(device: str) -> bool:
    """Whether to try the twin: on the CPU, unless MTCORE_INFER_SCRIPTED=1 asks for TorchScript."""
    return torch.device(device).type == "cpu" and os.environ.get("MTCORE_INFER_SCRIPTED", "") in ("", "0")


def _scripted_part(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """Submodule ``a.b.0.c`` of a scripted module (whose ModuleLists take attribute names)."""
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _tables(module: torch.jit.ScriptModule, meta: dict, descriptor: torch.nn.Module) -> None:
    """Put the compressed file's tables where its descriptor had nets, with the table settings
    the file holds (the coefficients come with the state dict)."""
    from mtcore.compress import put_submodule
    from mtcore.model.tabulate import TabulatedEmbedding

    for entry in meta["compressed"]["tables"]:
        scripted = _scripted_part(module, "descriptor." + entry["path"])
        table = TabulatedEmbedding(scripted.coef.detach().clone(), float(scripted.lower), float(scripted.upper),
                                   float(scripted.step), int(scripted.n_coarse), int(scripted.check_frequency))
        put_submodule(descriptor, entry["path"], table)


def eager_twin(module: torch.jit.ScriptModule, meta: dict, path: Path, device: str) -> Optional[torch.nn.Module]:
    """The eager FrozenModel / UnitedModel with the file's weights, or None where it cannot be
    built exactly (the caller keeps the scripted module)."""
    if meta.get("format") != "mtcore-frozen" or "config" not in meta or not wanted(device):
        return None
    try:
        from mtcore.compress import rebuild
        from mtcore.model.frozen import FrozenModel, UnitedModel
        from mtcore.plugins import get_registry

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = rebuild(module, meta, path, get_registry(), before_load=_with_tables(module, meta))
        text = json.dumps(meta)
        if meta.get("kind") == "united":
            twin = UnitedModel(model.descriptor, dict(model.heads.items()), model.type_map, text)
        else:
            head = meta.get("head", "default")
            fitting = model.heads[head] if head in model.heads else next(iter(model.heads.values()))
            twin = FrozenModel(model.descriptor, fitting, model.type_map, head, text)
        twin.chunk_atoms = int(getattr(module, "chunk_atoms", twin.chunk_atoms))
        twin = twin.to(device).eval()
        return twin if agrees(module, twin, meta) else None
    except Exception:  # noqa: BLE001  any failure: the scripted module stays, which is always right
        return None


def _probe(meta: dict, head_meta: dict) -> tuple:
    """A small open cluster every descriptor sees neighbours in (12 atoms, 1.4 Å apart, types in
    turn), with frame/atomic parameters of ones where the head takes them."""
    natoms = 12
    generator = torch.Generator().manual_seed(20261203)
    grid = torch.stack(torch.meshgrid(*[torch.arange(3.0, dtype=torch.float64)] * 2, torch.arange(2.0, dtype=torch.float64),
                                      indexing="ij"), -1).reshape(-1, 3)[:natoms]
    coord = (grid * 1.4 + 0.1 * torch.rand(natoms, 3, generator=generator, dtype=torch.float64)).unsqueeze(0)
    atype = (torch.arange(natoms) % len(meta["type_map"])).unsqueeze(0)
    sizes = {"fparam": 0, "aparam": 0}
    for item in head_meta.get("inputs", []):
        if item["key"] in sizes:
            sizes[item["key"]] += int(item["ndof"])
    fparam = torch.ones(1, sizes["fparam"], dtype=torch.float64) if sizes["fparam"] else None
    aparam = torch.ones(1, natoms, sizes["aparam"], dtype=torch.float64) if sizes["aparam"] else None
    return coord, atype, fparam, aparam


def agrees(module: torch.jit.ScriptModule, twin: torch.nn.Module, meta: dict, rel: float = 1e-5) -> bool:
    """Whether the twin gives the scripted module's numbers on a small probe frame (every output,
    every head, to ``rel`` of its scale: float32 models differ by ~1e-7, a model the recorded
    input does not rebuild faithfully, e.g. one frozen by another mtcore version whose code has
    changed since, by far more). Costs a few ms at load."""
    from mtcore.freeze import frozen_execution

    united = meta.get("kind") == "united"
    heads = list(meta.get("heads", {})) if united else [meta.get("head", "default")]
    for head in heads:
        coord, atype, fparam, aparam = _probe(meta, meta["heads"][head] if united else meta)
        with frozen_execution("cpu"):
            if united:
                reference = module(coord, atype, None, head, True, fparam, aparam)
                with first_derivatives():
                    result = twin(coord, atype, None, head, True, fparam, aparam)
            else:
                reference = module(coord, atype, None, True, fparam, aparam)
                with first_derivatives():
                    result = twin(coord, atype, None, True, fparam, aparam)
        if sorted(reference) != sorted(result):
            return False
        for key, value in reference.items():
            scale = max(1.0, float(value.abs().max())) if value.numel() else 1.0
            if value.shape != result[key].shape or not bool(((value - result[key]).abs() <= rel * scale).all()):
                return False
    return True


def _with_tables(module: torch.jit.ScriptModule, meta: dict):
    """For rebuild: a compressed file's model needs its tables in place before the weights load."""
    if not meta.get("compressed"):
        return None
    return lambda model: _tables(module, meta, model.descriptor)


@contextmanager
def first_derivatives() -> Iterator[None]:
    """The twin's calls: forces and virials need first derivatives in the coordinates only, the
    case the fused C paths are built for (the same switch the trainer's step uses)."""
    from mtcore.model import tangent_embedding

    with tangent_embedding.force_training():
        yield
