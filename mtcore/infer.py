"""The Python inference API: ``mtcore.infer.load(path).evaluate(coords, box, atypes)``.

Frozen files are TorchScript; this wrapper reads their metadata, maps element names to type
indices and returns numpy arrays. A united file needs ``head=``. A training checkpoint is taken
too (a multi-task one with ``head=``), evaluated exactly as its frozen head would be.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from mtcore.eager_twin import eager_twin, first_derivatives
from mtcore.errors import MtcoreError
from mtcore.freeze import frozen_execution, load_frozen
from mtcore.runtime import tune_allocator


def _is_checkpoint(path: Path) -> bool:
    """A torch pickle (zip with data.pkl) rather than a TorchScript archive."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist()) and not any(
                name.endswith("/constants.pkl") for name in archive.namelist()
            )
    except (OSError, zipfile.BadZipFile):
        return False


def _from_checkpoint(path: Path, head: Optional[str], device: str):
    """Evaluate a training checkpoint directly (one head, un-scripted), as ``dp test`` takes a
    checkpoint: the same module and metadata freezing that head would write."""
    from mtcore.freeze import head_metadata, model_from_checkpoint
    from mtcore.model.frozen import FrozenModel
    from mtcore.train.checkpoint import load_checkpoint

    model, document, multi = model_from_checkpoint(load_checkpoint(path))
    heads = list(model.heads)
    if multi and head is None:
        raise MtcoreError(f"{path}: a multi-task checkpoint; choose a head with --head (one of {', '.join(heads)})")
    if head is not None and head not in heads:
        raise MtcoreError(f"{path}: no head '{head}'; heads: {', '.join(heads)}")
    name = head or heads[0]
    meta = head_metadata(model, document, name, multi)
    module = FrozenModel(model.descriptor, model.heads[name], model.type_map, name, json.dumps(meta)).to(device)
    return module, meta


def _is_frame_list(atypes) -> bool:
    """A list of per-frame type arrays (frames of different sizes), not one frame's types."""
    return isinstance(atypes, (list, tuple)) and len(atypes) > 0 and np.ndim(atypes[0]) == 1


def _finite(name: str, values: np.ndarray, per_atom: Optional[bool] = None) -> np.ndarray:
    """Refuse NaN/inf by name: an atom with a NaN coordinate would silently drop out of the
    neighbour list and leave a finite, wrong energy."""
    bad = ~np.isfinite(values)
    if bad.any():
        where = np.argwhere(bad)[0]
        value = values[tuple(where)]
        if per_atom is None:
            raise MtcoreError(f"{name}: holds a non-finite value ({value})")
        place = f"frame {where[0]}, atom {where[1]}" if per_atom else f"frame {where[0]}"
        raise MtcoreError(f"{name}: {place} holds a non-finite value ({value})")
    return values


_INPUT_ERRORS = ("coord:", "box:", "atype:", "fparam", "aparam", "this model needs", "unknown head")


def _module_message(exc: Exception) -> Optional[str]:
    """The one line a frozen module raised about its input, without TorchScript's traceback
    around it; None for anything else (a genuine failure keeps its traceback)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    for prefix in ("builtins.RuntimeError: ", "RuntimeError: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
    return last if last.startswith(_INPUT_ERRORS) else None


def _renumber_frames(message: str, members: list[int]) -> str:
    """Frame numbers inside a batched call → the caller's frame numbers."""
    import re

    return re.sub(r"frame (\d+)", lambda m: f"frame {members[int(m.group(1))]}" if int(m.group(1)) < len(members) else m.group(0), message)


#: calls with fewer atoms (all frames together) run the scripted module even where an eager twin
#: exists: below this the twin's Python overhead (about 1 ms a call) outweighs its kernels
#: (se_e2_a water without a cell, one thread, ms per call scripted / twin in two runs: 3 atoms
#: 2.2-2.5 / 3.0-3.8, 48 atoms 4.4-4.9 / 5.2-6.9, 96 atoms 9.4-11.2 / 9.1-12.1, 192 atoms
#: 22-29 / 19-23; benchmarks/bench_compress.py --small)
EAGER_MIN_ATOMS = 96


class DeepPotential:
    """A frozen model (one head, or a united model with ``head`` chosen). ``module`` is what the
    file holds; ``runner`` what evaluates calls of at least ``EAGER_MIN_ATOMS`` atoms: on the CPU
    the file's model run eagerly on mtcore's C kernels (``eager`` True; mtcore.eager_twin), else
    ``module`` itself."""

    def __init__(self, path: Union[str, Path], head: Optional[str] = None, device: str = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise MtcoreError(f"{path}: model file not found")
        tune_allocator()  # as the CLI does: reuse freed tensor memory instead of page-faulting fresh pages each call
        try:
            self.module, self.metadata = load_frozen(path, device)
        except Exception as exc:  # noqa: BLE001
            if not _is_checkpoint(path):
                raise MtcoreError(f"{path}: neither a frozen mtcore model nor a checkpoint ({type(exc).__name__})") from None
            self.module, self.metadata = _from_checkpoint(path, head, device)
            self.runner, self.eager = self.module, True
        else:
            # the file's model, run eagerly on mtcore's C kernels (mtcore.eager_twin); ``module``
            # stays the scripted module the file holds (change_bias rewrites its buffers)
            twin = eager_twin(self.module, self.metadata, path, device)
            self.runner, self.eager = (self.module, False) if twin is None else (twin, True)
        self.united = self.metadata.get("kind") == "united"
        if self.united:
            heads = list(self.metadata["heads"])
            if head is None:
                raise MtcoreError(f"{path}: a united model; choose a head with head= (one of {', '.join(heads)})")
            if head not in heads:
                raise MtcoreError(f"{path}: no head '{head}'; heads: {', '.join(heads)}")
            self.head_metadata = self.metadata["heads"][head]
        else:
            if head is not None and head != self.metadata.get("head"):
                raise MtcoreError(f"{path}: holds head '{self.metadata.get('head')}', not '{head}'")
            self.head_metadata = self.metadata
        self.head = head or self.metadata.get("head")
        self.device = device

    @property
    def type_map(self) -> list[str]:
        return list(self.metadata["type_map"])

    @property
    def rcut(self) -> float:
        return float(self.metadata["rcut"])

    def _types(self, atypes: Sequence) -> torch.Tensor:
        if isinstance(atypes, torch.Tensor):
            atypes = atypes.detach().cpu().numpy()
        array = np.asarray(atypes)
        if array.dtype.kind in "UO" and array.size:  # element names
            names = array.reshape(-1).tolist()
            unknown = sorted({str(v) for v in names if v not in self.type_map})
            if unknown:
                raise MtcoreError(f"atypes: {', '.join(unknown)} not in the model's type_map {self.type_map}")
            array = np.asarray([self.type_map.index(v) for v in names], dtype=np.int64).reshape(array.shape)
        elif array.size and array.dtype.kind not in "iu":
            raise MtcoreError(f"atypes: must be integer type indices or element names, got {array.dtype} values")
        array = array.astype(np.int64)
        if array.size and (array.min() < 0 or array.max() >= len(self.type_map)):
            raise MtcoreError(f"atypes: type indices must lie in 0..{len(self.type_map) - 1} ({self.type_map})")
        return torch.as_tensor(array)

    @property
    def output(self) -> dict:
        """The head's output: name, keys, size, sel_types and reduction (``sum`` for files
        frozen before reductions)."""
        return dict(self.head_metadata.get("output", {}), reduction=self.reduction)

    @property
    def reduction(self) -> str:
        """How the frame quantity comes from the atomic one: ``sum``, ``mean`` or ``none`` (no
        frame quantity in :meth:`evaluate`'s result)."""
        return str(self.head_metadata.get("output", {}).get("reduction") or "sum")

    @property
    def numb_fparam(self) -> int:
        return sum(int(i["ndof"]) for i in self.head_metadata.get("inputs", []) if i["key"] == "fparam")

    @property
    def numb_aparam(self) -> int:
        return sum(int(i["ndof"]) for i in self.head_metadata.get("inputs", []) if i["key"] == "aparam")

    def _parameters(self, name: str, values, size: int, nframes: int, natoms: int) -> Optional[torch.Tensor]:
        """fparam [nf] or [B, nf]; aparam [N, na] or [B, N, na] (flat forms accepted), broadcast
        over frames when given once."""
        if size == 0:
            if values is not None:
                raise MtcoreError(f"{name}: this model takes no {name}")
            return None
        if values is None:
            raise MtcoreError(f"{name}: this model needs {name} ({size} per {'frame' if name == 'fparam' else 'atom'})")
        array = np.asarray(values, dtype=np.float64)
        per_frame = size if name == "fparam" else natoms * size
        if array.size == per_frame:
            array = np.repeat(array.reshape(1, per_frame), nframes, axis=0)  # a writable copy per frame
        elif array.size != nframes * per_frame:
            raise MtcoreError(f"{name}: has {array.size} values; expected {per_frame} per frame for {nframes} frame(s)")
        if not np.isfinite(array).all():
            raise MtcoreError(f"{name}: holds NaN or inf")
        shape = (nframes, size) if name == "fparam" else (nframes, natoms, size)
        return torch.as_tensor(np.ascontiguousarray(array).reshape(shape))

    def evaluate(self, coords, box, atypes, virial: bool = True, fparam=None, aparam=None):
        """coords [N,3] / [B,N,3] / [B,3N] (Å); box None, [3,3], [9], [B,9] or [B,3,3]; atypes [N]
        or [B,N] (type indices or element names); fparam / aparam for a model trained with them.
        Returns numpy arrays with a leading frame axis: the atomic output and, unless the head's
        reduction is ``none``, the frame quantity (a sum, or a mean for an intensive head).

        Frames of different sizes: pass lists (``coords``, ``atypes``, ``box`` with one entry per
        frame, ``None`` for a frame without a cell; ``fparam``/``aparam`` lists too) and get a list
        with one result per frame, each as ``evaluate`` of that frame alone would return it.
        """
        if _is_frame_list(atypes):
            return self._evaluate_list(coords, box, atypes, virial, fparam, aparam)
        types = self._types(atypes)
        natoms = types.shape[-1]
        coord = np.asarray(coords, dtype=np.float64)
        if natoms == 0 or coord.size % (3 * natoms):
            raise MtcoreError(f"coords: {coord.size} values do not make frames of {natoms} atoms x 3")
        coord = coord.reshape(-1, natoms, 3)
        _finite("coords", coord, per_atom=True)
        nframes = coord.shape[0]
        cell = None
        if box is not None:
            cell = np.asarray(box, dtype=np.float64)
            if cell.size not in (9, 9 * nframes):
                raise MtcoreError(f"box: {cell.size} values; expected 9 per frame for {nframes} frame(s)")
            cell = _finite("box", cell.reshape(-1, 9), per_atom=False)
            cell = torch.as_tensor(cell).reshape(-1, 3, 3)
        fp = self._parameters("fparam", fparam, self.numb_fparam, nframes, natoms)
        ap = self._parameters("aparam", aparam, self.numb_aparam, nframes, natoms)
        try:
            runner = self.runner if nframes * natoms >= EAGER_MIN_ATOMS else self.module
            eager = not isinstance(runner, torch.jit.ScriptModule)
            with frozen_execution(self.device), (first_derivatives() if eager else contextlib.nullcontext()):
                if self.united:
                    out = runner(torch.as_tensor(coord), types, cell, self.head, virial, fp, ap)
                else:
                    out = runner(torch.as_tensor(coord), types, cell, virial, fp, ap)
        except (torch.jit.Error, RuntimeError) as exc:
            message = _module_message(exc)
            if message is None:
                raise
            raise MtcoreError(message) from None
        return {k: v.cpu().numpy() for k, v in out.items()}

    def _evaluate_list(self, coords, box, atypes, virial, fparam, aparam) -> list:
        """Frames of different sizes, gathered by atom count (and cell or not) into batched calls."""
        nframes = len(atypes)
        for name, values in (("coords", coords), ("box", box), ("fparam", fparam), ("aparam", aparam)):
            if values is not None and (not hasattr(values, "__len__") or len(values) != nframes):
                raise MtcoreError(f"{name}: with a list of atypes, give {nframes} entries (one per frame)")
        groups: dict[tuple, list[int]] = {}
        for f in range(nframes):
            natoms = int(np.size(atypes[f]))
            has_box = box is not None and box[f] is not None
            groups.setdefault((natoms, has_box), []).append(f)
        results: list = [None] * nframes
        for (natoms, has_box), members in groups.items():
            def stack(values):
                if values is None:
                    return None
                return np.stack([np.asarray(values[f], dtype=np.float64).reshape(-1) for f in members])

            for f in members:
                if np.size(coords[f]) != 3 * natoms:
                    raise MtcoreError(f"coords: frame {f} has {np.size(coords[f])} values for {natoms} atoms")
                if not np.isfinite(np.asarray(coords[f], dtype=np.float64)).all():
                    atom = int(np.argwhere(~np.isfinite(np.asarray(coords[f], dtype=np.float64).reshape(natoms, 3)))[0, 0])
                    raise MtcoreError(f"coords: frame {f}, atom {atom} holds a non-finite value")
            coord = np.stack([np.asarray(coords[f], dtype=np.float64).reshape(natoms, 3) for f in members])
            types = np.stack([np.asarray(atypes[f]).reshape(-1) for f in members])
            try:
                out = self.evaluate(coord, stack(box) if has_box else None, types, virial, stack(fparam), stack(aparam))
            except MtcoreError as exc:
                raise MtcoreError(_renumber_frames(str(exc), members)) from None
            for k, f in enumerate(members):
                results[f] = {key: value[k : k + 1] for key, value in out.items()}
        return results

def load(path: Union[str, Path], head: Optional[str] = None, device: str = "cpu") -> DeepPotential:
    return DeepPotential(path, head=head, device=device)
