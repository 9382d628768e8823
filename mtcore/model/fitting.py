"""The fitting-net (head) interface: what the core expects from a fitting plugin's module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from mtcore.data.requirements import DataRequirement
from mtcore.errors import MtcoreError


@dataclass(frozen=True)
class OutputDef:
    """What a head predicts per atom, and how the core turns it into frame quantities.

    name: the quantity (``energy``, ``dipole``, ``polarizability``).
    size: values per atom (1, 3, 9).
    global_key / atomic_key: names of the frame-sum and per-atom predictions; they match the
        label file stems (``energy`` / ``atom_ener``, ``dipole`` / ``atomic_dipole``).
    conservative: the quantity is an energy: the core adds ``force`` = -dE/dr and ``virial``.
    sel_types: atom types that carry the quantity (None: all).
    reduction: how the frame quantity ``global_key`` comes from the atomic one: ``"sum"``
        (extensive: energy, dipole), ``"mean"`` (intensive: a band gap, a per-atom-normalised
        property; the mean over the atoms of ``sel_types``) or ``"none"`` (per-atom only: no
        frame quantity is predicted, trained or tested). Plugin API v2; v1 heads sum.
    """

    name: str
    size: int
    global_key: str
    atomic_key: str
    conservative: bool = False
    sel_types: Optional[tuple[int, ...]] = None
    reduction: str = "sum"


#: The reductions an output may declare (see :attr:`OutputDef.reduction`).
REDUCTIONS = ("sum", "mean", "none")


def reduction_of(odef: OutputDef) -> str:
    """The declared reduction; ``sum`` for an output object from before reductions (API v1)."""
    return str(getattr(odef, "reduction", "sum"))


def check_output_def(odef: OutputDef, where: str) -> None:
    """Refuse an output the core cannot honour, in one line starting with ``where`` (the input
    section and fitting type): an unknown reduction, or an energy that is not summed (forces are
    the gradient of the frame sum; a mean or per-atom-only energy has none)."""
    reduction = reduction_of(odef)
    if reduction not in REDUCTIONS:
        raise MtcoreError(f"{where}: output_def().reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if odef.conservative and reduction != "sum":
        raise MtcoreError(f"{where}: output_def() is conservative (forces, virials), so its reduction must be 'sum', "
                          f"not {reduction!r}")


def sel_type_list(odef: OutputDef) -> list[int]:
    """``sel_types`` as a list for TorchScript (empty: every type)."""
    return [] if odef.sel_types is None else [int(t) for t in odef.sel_types]


@dataclass(frozen=True)
class TestQuantity:
    """One row group of ``mtcore test``: prediction vs label, optionally also per atom."""

    title: str
    key: str
    per_atom: bool = False
    atomic: bool = False
    #: only for periodic systems (virials)
    periodic_only: bool = False
    #: ``mtcore test -d PREFIX`` writes ``PREFIX.<detail>.out`` (``PREFIX.out`` for ""; None: no
    #: file), columns data_<c>… then pred_<c>… for c in ``columns``; with ``per_atom`` also
    #: ``PREFIX.<detail>_peratom.out`` (DeePMD-kit's names: e, f, v)
    detail: Optional[str] = None
    columns: tuple[str, ...] = ()


class Fitting(nn.Module):
    """Maps descriptor outputs to a per-atom quantity for one head.

    ``forward(descriptor_outputs, atype)`` returns the atomic output, shape [n, size], zero on
    atoms whose type is not in ``sel_types``. TorchScript-scriptable.
    """

    def output_def(self) -> OutputDef:
        raise NotImplementedError

    def needs_rot_mat(self) -> bool:
        return False

    def stat_requirements(self) -> list[DataRequirement]:
        """Labels :meth:`compute_output_stats` reads (loaded for this head's data)."""
        return []

    def input_requirements(self) -> list[DataRequirement]:
        """Per-frame / per-atom inputs read from the data and passed to :meth:`forward` in the
        descriptor dict under the same key (``fparam`` [atoms, n] repeated per atom, ``aparam``
        [atoms, n]); a frozen model takes them as arguments. Only ``fparam`` and ``aparam``."""
        return []

    def compute_output_stats(self, samples: list) -> None:
        """Initialise output biases from this head's training frames (a list of StatSample)."""

    def test_quantities(self) -> list[TestQuantity]:
        return []

    def output_bias(self) -> Optional[torch.Tensor]:
        """The per-type constant this head adds to each atom's output, [ntypes, size], as a view
        of the buffer the forward pass reads (editing it in place changes the model); None when
        the head has none. ``mtcore change-bias`` shifts it to new data without knowing the
        fitting type. Optional: the default None means change-bias refuses this head."""
        return None

    @torch.jit.unused
    def trained_parameters(self):
        """The parameters this head's optimiser steps (all of its own; a Δ head may leave out its base's)."""
        return self.parameters()

    def forward(self, descriptor: Dict[str, torch.Tensor], atype: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
