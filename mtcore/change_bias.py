"""``mtcore change-bias``: refit a head's per-type output bias to new data (as ``dp change-bias``).

A model moved to data of another level of theory (or another reference energy) is often off by
a constant per element; retraining is not needed for that. With the head's atomic output
``y_i = net(D_i) + b[t_i]`` summed over atoms, the frame residual (label − prediction) is linear
in the per-type atom counts, so the least-squares shift Δb over the given frames is exact for a
per-type offset:

- mode ``change`` (default): ``b += argmin ||counts·Δb − (label − prediction)||`` (min-norm);
- mode ``set``: ``b = argmin ||counts·b − label||``, the bias from the labels alone, as at the
  start of training (the network's part is ignored).

Rows are frames (every set folder of every system). Only atoms of the head's ``sel_types`` count;
a ``mean`` head (intensive frame value) is fitted on the per-type fractions instead of counts. The head's bias is reached through
``Fitting.output_bias()``, so any fitting that implements it works. The input file is never
touched: the result goes to ``-o`` or to ``<stem>_bias<suffix>`` (``_bias1`` ... if taken).
Checkpoints keep their optimiser and data-sampling state (a ``--restart`` continues from the new
bias) and get a fresh checksum.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mtcore.errors import MtcoreError

MODES = ("change", "set")


def output_path(model: Path, output: Optional[Path]) -> Path:
    """``output`` when given (it must not exist), else the first free ``<stem>_bias[N]<suffix>``."""
    if output is not None:
        output = Path(output)
        if output.exists() or output.is_symlink():
            raise MtcoreError(f"-o/--output {output}: exists; change-bias writes a new file and never replaces one")
        if output.resolve() == Path(model).resolve():
            raise MtcoreError(f"-o/--output {output}: is the input model")
        return output
    model = Path(model)
    for n in range(1000):
        candidate = model.with_name(f"{model.stem}_bias{n if n else ''}{model.suffix}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise MtcoreError(f"{model}: no free name {model.stem}_bias<N>{model.suffix} beside it; give -o")


def fit_shift(counts: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Min-norm least squares: Δb [ntypes, size] with counts [nframes, ntypes] · Δb ≈ residual."""
    return np.linalg.lstsq(counts.astype(np.float64), residual.astype(np.float64), rcond=None)[0]


def frame_counts(atypes: np.ndarray, ntypes: int) -> np.ndarray:
    """Atoms of each type per frame, [nframes, ntypes] (vectorised; virtual atoms, type -1, skipped)."""
    atypes = np.asarray(atypes).reshape(atypes.shape[0], -1)
    onehot = atypes[..., None] == np.arange(ntypes)
    return onehot.sum(axis=1).astype(np.float64)


def _collect(pot, systems: list[str], set_prefix: str, key: str, size: int, ntypes: int, numb_test: int):
    """Per frame over all systems: type counts, label and prediction of ``key``."""
    from mtcore.data.loading import expand_systems, load_system
    from mtcore.data.requirements import DataRequirement
    from mtcore.evaluate import _evaluate_frames
    from mtcore.plugins import get_registry

    registry = get_registry()
    reqs = [DataRequirement(key, size)] + [
        DataRequirement(i["key"], int(i["ndof"]), atomic=bool(i["atomic"]), must=True) for i in pot.head_metadata.get("inputs", [])
    ]
    counts, labels, preds = [], [], []
    for s in systems:
        for path in expand_systems(s, registry, "-s/--system"):
            system = load_system(path, pot.type_map, reqs, set_prefix, registry)
            if key not in system.labels:
                raise MtcoreError(f"{path}: has no {key} labels ({key}.npy) to fit the bias to")
            nframes = system.nframes if numb_test <= 0 else min(numb_test, system.nframes)
            pred = _evaluate_frames(pot, system, nframes, 8)
            counts.append(frame_counts(np.asarray(system.atypes)[:nframes], ntypes))
            labels.append(system.labels[key][:nframes].reshape(nframes, size))
            preds.append(pred[key].reshape(nframes, size))
    return np.concatenate(counts), np.concatenate(labels), np.concatenate(preds)


def compute_bias(pot, bias: np.ndarray, systems: list[str], mode: str, set_prefix: str = "set", numb_test: int = 0):
    """The new bias [ntypes, size] of the loaded head ``pot`` whose current bias is ``bias``, and
    a summary: frames used, RMSE per atom of the frame quantity before and after (same frames).
    A ``mean`` head (an intensive frame value) is linear in the per-type fractions of its
    selected atoms instead of the counts."""
    output = pot.head_metadata.get("output", {})
    key, size = str(output.get("global_key", "energy")), int(output.get("size", 1))
    reduction = str(output.get("reduction") or "sum")
    if reduction not in ("sum", "mean"):
        raise MtcoreError(f"head '{pot.head}': predicts per-atom values only (reduction {reduction!r}); "
                          "change-bias fits frame labels")
    ntypes = len(pot.type_map)
    counts, label, pred = _collect(pot, systems, set_prefix, key, size, ntypes, numb_test)
    natoms = counts.sum(1, keepdims=True)
    sel = output.get("sel_types")
    if sel is not None:  # atoms outside sel_types output 0: their bias is never added
        counts[:, [t for t in range(ntypes) if t not in set(sel)]] = 0.0
    if reduction == "mean":  # the frame value is the mean over the selected atoms: fractions
        counts = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
    absent = np.flatnonzero(counts.sum(0) == 0)
    if mode == "change":
        new = bias + fit_shift(counts, label - pred)
    else:
        new = fit_shift(counts, label)
    new[absent] = bias[absent]  # a type the data lacks keeps its bias (min-norm would zero it)
    shift = new - bias
    norm = natoms if reduction == "sum" else 1.0  # an extensive quantity is compared per atom
    before = float(np.sqrt(np.mean(((pred - label) / norm) ** 2)))
    after = float(np.sqrt(np.mean(((pred + counts @ shift - label) / norm) ** 2)))
    return new, {"key": key, "per_atom": reduction == "sum", "frames": int(counts.shape[0]), "rmse_before": before, "rmse_after": after,
                 "absent_types": [pot.type_map[t] for t in absent]}


def _buffer_name(fitting, head: str) -> tuple[str, torch.Tensor]:
    """The fitting's buffer that ``output_bias()`` views, and that view."""
    bias = fitting.output_bias() if hasattr(fitting, "output_bias") else None
    if bias is None:
        raise MtcoreError(f"head '{head}': its fitting has no per-type output bias (Fitting.output_bias() is None); "
                          "change-bias applies to heads that add one, such as ener")
    for name, buffer in fitting.named_buffers():
        if buffer.data_ptr() == bias.data_ptr() and buffer.numel() == bias.numel():
            return name, bias
    raise MtcoreError(f"head '{head}': output_bias() is not a view of one of the fitting's buffers; change-bias cannot store it")


def change_bias(
    model: Path,
    systems: list[str],
    head: Optional[str] = None,
    mode: str = "change",
    output: Optional[Path] = None,
    set_prefix: str = "set",
    numb_test: int = 0,
) -> tuple[Path, dict]:
    """Write a copy of ``model`` (a checkpoint, or a frozen single-head file) with the head's bias
    refitted; returns the new file and a summary (old and new bias, RMSE before and after)."""
    from mtcore.infer import DeepPotential, _is_checkpoint

    if mode not in MODES:
        raise MtcoreError(f"--mode: must be one of {', '.join(MODES)}, got {mode!r}")
    model = Path(model)
    if not model.is_file():
        raise MtcoreError(f"{model}: model file not found")
    target = output_path(model, output)
    checkpoint = _is_checkpoint(model)
    pot = DeepPotential(model, head=head)  # a checkpoint: its in-memory head, evaluated as frozen
    if pot.united:
        raise MtcoreError(f"{model}: a united file; freeze the head on its own (mtcore freeze --head) and change that")
    if checkpoint:
        fitting = pot.module.fitting
    else:
        fitting = _rebuilt_fitting(pot)
    buffer, view = _buffer_name(fitting, pot.head)
    if checkpoint:
        old = view.detach().cpu().numpy().astype(np.float64).copy()
    else:
        stored = dict(pot.module.named_buffers())[f"fitting.{buffer}"]
        old = stored.detach().cpu().numpy().astype(np.float64).reshape(view.shape).copy()
    new, summary = compute_bias(pot, old, systems, mode, set_prefix, numb_test)
    if checkpoint:
        _write_checkpoint(model, pot.head, buffer, view, new, target)
    else:
        _write_frozen(pot, stored, new, target)
    return target, dict(summary, head=pot.head, type_map=pot.type_map, old=old, new=new)


def _write_checkpoint(path: Path, head: str, buffer: str, view: torch.Tensor, new: np.ndarray, target: Path) -> None:
    """The checkpoint with only that buffer changed (optimiser and sampling state kept, fresh checksum)."""
    from mtcore.train.checkpoint import DIGEST_KEY, atomic_torch_save, load_checkpoint, state_digest

    state = load_checkpoint(path)
    key = f"heads.{head}.{buffer}"
    if key not in state["model"]:
        raise MtcoreError(f"{path}: no parameter {key} in the checkpoint")
    stored = state["model"][key]
    updated = stored.clone()
    updated.view(view.shape).copy_(torch.as_tensor(new, dtype=stored.dtype))
    state = {k: v for k, v in state.items() if k not in ("path", DIGEST_KEY)}
    state["model"][key] = updated
    state[DIGEST_KEY] = state_digest(state)
    atomic_torch_save(state, target)


def _rebuilt_fitting(pot):
    """A frozen file's head rebuilt from its stored configuration, only to learn which buffer
    ``output_bias()`` views (the TorchScript module does not carry that Python method)."""
    from mtcore.config import config_from_document
    from mtcore.model.build import build_model
    from mtcore.plugins import get_registry

    registry = get_registry()
    net = build_model(config_from_document(pot.metadata["config"], registry), registry)
    return net.heads[pot.head] if pot.head in net.heads else next(iter(net.heads.values()))


def _write_frozen(pot, stored: torch.Tensor, new: np.ndarray, target: Path) -> None:
    import warnings

    from mtcore.freeze import _write_script

    with torch.no_grad():
        stored.copy_(torch.as_tensor(new, dtype=stored.dtype).reshape(stored.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript: see mtcore.freeze
        _write_script(pot.module, target, json.dumps(pot.metadata))
