"""The descriptor interface: what the core expects from a descriptor plugin's module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn


@dataclass
class StatSample:
    """One batch of statistics frames, flattened like the model's input (B frames of n atoms).

    coord: [B·n, 3] float64; atype: [B·n]; center/neighbor: [P] flat atom indices; shift: [P, 3]
    so that r_ij = coord[neighbor] - coord[center] + shift; labels: label key → tensor;
    find: label key → 1.0 if the system has it; system: the system's path.
    """

    coord: torch.Tensor
    atype: torch.Tensor
    center: torch.Tensor
    neighbor: torch.Tensor
    shift: torch.Tensor
    nframes: int
    natoms: int
    labels: dict
    find: dict
    system: str = ""


@dataclass
class EmbeddingInput:
    """An embedding net that ``mtcore compress`` may replace by a table (mtcore.model.tabulate).

    path: dotted name of the net inside the descriptor (``descriptor.get_submodule(path)``), a
    one-input net with EmbeddingNet's interface (x [n, 1] → [n, M]); lower/upper: the smallest
    and largest input it receives on frames whose atoms are at least ``min_distance`` apart
    (empty neighbour slots included); meaning: what the input is, for messages and metadata.
    """

    path: str
    lower: float
    upper: float
    meaning: str


class Descriptor(nn.Module):
    """Maps atoms and their neighbours to per-atom features.

    ``forward(coord [n,3], atype [n], center [P], neighbor [P], shift [P,3])`` returns a dict with
    ``"descriptor"`` ([n, get_dim_out()]) and optionally ``"rot_mat"`` ([n, get_dim_rot(), 3],
    needed by tensor heads) and ``"type_embedding"`` ([n, get_dim_type_embedding()], given to
    the fitting nets of descriptors that embed types). Pairs arrive sorted by (center, neighbour
    type, distance) and include every neighbour within the model's largest rcut: a descriptor
    applies its own rcut and ``sel``. Everything must be differentiable in ``coord`` and
    ``shift`` (forces and virials come from autograd) and TorchScript-scriptable.
    """

    def get_rcut(self) -> float:
        raise NotImplementedError

    def get_ntypes(self) -> int:
        raise NotImplementedError

    def get_dim_out(self) -> int:
        raise NotImplementedError

    def get_dim_rot(self) -> int:
        """Width M of the rotation matrix; 0 when the descriptor has none (no tensor heads)."""
        return 0

    def get_dim_type_embedding(self) -> int:
        return 0

    def compute_input_stats(self, samples: list[StatSample]) -> None:
        """Set normalisation statistics from training frames (all heads' frames, pooled)."""

    @torch.jit.unused
    def compressible_embeddings(self, min_distance: float) -> Optional[List[EmbeddingInput]]:
        """Optional (``mtcore compress``): the one-input embedding nets that may be tabulated,
        with the range of their inputs when no two atoms are closer than ``min_distance`` (Å;
        from the training data), or None when this descriptor cannot be compressed (default).
        Called after statistics are set; the nets are swapped for tables with the same forward."""
        return None

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        center: torch.Tensor,
        neighbor: torch.Tensor,
        shift: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        raise NotImplementedError
