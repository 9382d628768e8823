"""The Python inference API: ``mtcore.infer.load(path).evaluate(coords, box, atypes)``.

Frozen files are TorchScript; this wrapper reads their metadata, maps element names to type
indices and returns numpy arrays. A united file needs ``head=``. A training checkpoint is taken
too (a multi-task one with ``head=``), evaluated exactly as its frozen head would be.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from mtcore.errors import MtcoreError
from mtcore.freeze import METADATA_FILE


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


class DeepPotential:
    """A frozen model (one head, or a united model with ``head`` chosen)."""

    def __init__(self, path: Union[str, Path], head: Optional[str] = None, device: str = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise MtcoreError(f"{path}: model file not found")
        extra = {METADATA_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript: see mtcore.freeze
                self.module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
            self.metadata = json.loads(extra[METADATA_FILE] or "{}")
        except Exception as exc:  # noqa: BLE001
            if not _is_checkpoint(path):
                raise MtcoreError(f"{path}: neither a frozen mtcore model nor a checkpoint ({type(exc).__name__})") from None
            self.module, self.metadata = _from_checkpoint(path, head, device)
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
        values = list(np.asarray(atypes).reshape(-1)) if not isinstance(atypes, torch.Tensor) else atypes.tolist()
        if values and isinstance(values[0], str):
            try:
                values = [self.type_map.index(v) for v in values]
            except ValueError as exc:
                raise MtcoreError(f"atypes: {exc}; the model's type_map is {self.type_map}") from None
        array = np.asarray(values, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() >= len(self.type_map)):
            raise MtcoreError(f"atypes: type indices must lie in 0..{len(self.type_map) - 1} ({self.type_map})")
        return torch.as_tensor(array).reshape(np.shape(atypes) if not isinstance(atypes, list) else (-1,))

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
            array = np.broadcast_to(array.reshape(1, per_frame), (nframes, per_frame))
        elif array.size != nframes * per_frame:
            raise MtcoreError(f"{name}: has {array.size} values; expected {per_frame} per frame for {nframes} frame(s)")
        shape = (nframes, size) if name == "fparam" else (nframes, natoms, size)
        return torch.as_tensor(np.ascontiguousarray(array).reshape(shape))

    def evaluate(self, coords, box, atypes, virial: bool = True, fparam=None, aparam=None) -> dict[str, np.ndarray]:
        """coords [N,3] / [B,N,3] / [B,3N] (Å); box None, [3,3], [9], [B,9] or [B,3,3]; atypes [N]
        (type indices or element names); fparam / aparam for a model trained with them. Returns
        numpy arrays with a leading frame axis."""
        coord = torch.as_tensor(np.asarray(coords, dtype=np.float64))
        types = self._types(atypes)
        natoms = types.shape[-1]
        coord = coord.reshape(-1, natoms, 3)
        nframes = coord.shape[0]
        cell = None if box is None else torch.as_tensor(np.asarray(box, dtype=np.float64)).reshape(-1, 3, 3)
        fp = self._parameters("fparam", fparam, self.numb_fparam, nframes, natoms)
        ap = self._parameters("aparam", aparam, self.numb_aparam, nframes, natoms)
        if self.united:
            out = self.module(coord, types, cell, self.head, virial, fp, ap)
        else:
            out = self.module(coord, types, cell, virial, fp, ap)
        return {k: v.cpu().numpy() for k, v in out.items()}


def load(path: Union[str, Path], head: Optional[str] = None, device: str = "cpu") -> DeepPotential:
    return DeepPotential(path, head=head, device=device)
