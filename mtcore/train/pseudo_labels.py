"""Pseudo-labels: an old head whose training data is gone replays frames labelled by itself.

Extending a trained model moves the shared descriptor, and an old head that is not trained while
that happens forgets. When its own data is no longer at hand, the frames a user chooses (often the
new head's configurations) are labelled with that head's predictions from the ``--init-model``
weights, before any step, and the head trains on them beside the new heads (distillation). The
labels are the teacher's energy, forces, virial (periodic frames) or tensor outputs: whatever of
the head's label keys the model predicts. Input keys (``fparam``, ``aparam``) stay from the files.

A restart must relabel with the same teacher, not with the weights trained since, so the teacher's
weights (descriptor and that head) travel in the checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from mtcore.data.dataset import Batch, DataSet
from mtcore.data.requirements import DataRequirement
from mtcore.errors import MtcoreError

#: label keys that are inputs of the model, never predictions
INPUT_KEYS = ("fparam", "aparam")

#: frames evaluated at once while labelling
CHUNK_FRAMES = 8


def loading_requirements(requirements: list[DataRequirement]) -> list[DataRequirement]:
    """What to read from a pseudo-labelled system's files: inputs as declared, labels optional
    (they are replaced, so their files may be gone)."""
    return [r if r.key in INPUT_KEYS else replace(r, must=False) for r in requirements]


def teacher_state(model_state: dict, head: str) -> dict:
    """The weights that label ``head``'s frames: the descriptor and that head (CPU copies)."""
    return {
        k: v.detach().to("cpu").clone()
        for k, v in model_state.items()
        if k.startswith("descriptor.") or k.startswith(f"heads.{head}.")
    }


def label_frames(
    predict: Callable[[Batch], dict], dataset: DataSet, requirements: list[DataRequirement], where: str
) -> list[str]:
    """Replace the labels of every frame of ``dataset`` by ``predict``'s outputs. Returns the
    label keys written. One inference pass over the frames, in chunks."""
    wanted = [r for r in requirements if r.key not in INPUT_KEYS]
    written: set[str] = set()
    for index, system in enumerate(dataset.systems):
        nframes, natoms = system.nframes, system.natoms
        arrays: dict[str, np.ndarray] = {}
        for start in range(0, nframes, CHUNK_FRAMES):
            frames = np.arange(start, min(start + CHUNK_FRAMES, nframes))
            pred = predict(dataset.batch(index, frames))
            for req in wanted:
                if req.key not in pred:
                    continue
                value = pred[req.key].detach().to("cpu").double().numpy()
                shape = (len(frames), natoms, req.ndof) if req.atomic else (len(frames), req.ndof)
                if value.size != int(np.prod(shape)):
                    raise MtcoreError(
                        f"{where}/pseudo_labels: the model predicts '{req.key}' with {value.size // len(frames)} values "
                        f"per frame, the label needs {int(np.prod(shape[1:]))}"
                    )
                if not np.isfinite(value).all():
                    raise MtcoreError(
                        f"{where}/pseudo_labels: the --init-model predicts non-finite '{req.key}' on {system.path} "
                        f"(frames {frames[0]}..{frames[-1]}); these frames cannot be labelled"
                    )
                out = arrays.setdefault(req.key, np.empty((nframes,) + shape[1:], dtype=np.float64))
                out[frames] = value.reshape(shape)
        if not arrays:
            keys = ", ".join(r.key for r in wanted) or "none"
            raise MtcoreError(f"{where}/pseudo_labels: the model predicts none of the head's labels ({keys})")
        labels = dict(system.labels)
        labels.update(arrays)
        system.labels = labels
        written.update(arrays)
    return sorted(written)
