"""The loss interface: what the core expects from a loss plugin."""

from __future__ import annotations

from typing import Dict

import torch

from mtcore.data.requirements import DataRequirement


class Loss:
    """One head's training loss and the metrics shown in ``lcurve.out``.

    ``__call__(pred, label, find, atype, lr_ratio, metrics)`` returns ``(loss, values)``: the
    scalar to minimise and, when ``metrics`` is true, ``{name: float}`` for
    :meth:`metric_names` (NaN for a metric whose label the batch lacks). ``find[key]`` is 1.0 when
    the batch's system has label ``key``; ``atype`` is [B, N] (N = atoms per frame);
    ``lr_ratio`` is lr(t)/start_lr for prefactor schedules.
    """

    def requirements(self) -> list[DataRequirement]:
        raise NotImplementedError

    def needs_force(self) -> bool:
        return False

    def needs_virial(self) -> bool:
        return False

    def metric_names(self) -> list[str]:
        raise NotImplementedError

    def metric_weight(self, atype: torch.Tensor, pred: Dict[str, torch.Tensor]) -> float:
        """Weight of a batch when averaging metrics over several batches (atoms, as DeePMD-kit)."""
        return float(atype.shape[1])

    def __call__(
        self,
        pred: Dict[str, torch.Tensor],
        label: Dict[str, torch.Tensor],
        find: Dict[str, float],
        atype: torch.Tensor,
        lr_ratio: float,
        metrics: bool = False,
    ) -> tuple[torch.Tensor, Dict[str, float]]:
        raise NotImplementedError
