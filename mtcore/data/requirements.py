"""What a head needs from its data: one :class:`DataRequirement` per label file.

Requirements are per head (a loss and its fitting net declare them), never global: two heads may
read the same label file differently (e.g. two dipole heads with different ``sel_type``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DataRequirement:
    """One label a head reads.

    key: the label name, also the file stem (``energy`` → ``energy.npy``).
    ndof: values per frame (``atomic=False``) or per atom (``atomic=True``).
    must: a system without the file is an error (otherwise the label counts as missing: the key
        is absent from the batch's ``labels`` and ``find``, so read it as ``find.get(key, 0.0)``,
        and the loss term that uses it drops out for that system).
    default: declared for DeePMD-kit parity (its ``add_data_requirement`` default); the core does
        not fill missing labels with it: a loss that wants a default applies it where
        ``find.get(key, 0.0) == 0``.
    sel_types: for atomic labels that DeePMD-kit v2 stores for selected atom types only
        (``atomic_dipole.npy``): those types. The loader accepts both layouts, rows for
        ``sel_types`` atoms only or rows for every atom, and returns one row per atom with
        zeros on unselected atoms.
    """

    key: str
    ndof: int
    atomic: bool = False
    must: bool = False
    default: float = 0.0
    sel_types: Optional[tuple[int, ...]] = None


def merge_requirements(requirements: list[DataRequirement]) -> list[DataRequirement]:
    """Drop duplicates within one head; conflicting declarations of a key are a bug."""
    merged: dict[str, DataRequirement] = {}
    for req in requirements:
        old = merged.get(req.key)
        if old is None:
            merged[req.key] = req
        elif old != req:
            if (old.ndof, old.atomic, old.sel_types) != (req.ndof, req.atomic, req.sel_types):
                raise ValueError(f"label '{req.key}' required with different layouts: {old} vs {req}")
            merged[req.key] = DataRequirement(req.key, req.ndof, req.atomic, old.must or req.must, req.default, req.sel_types)
    return list(merged.values())
