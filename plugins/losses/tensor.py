"""tensor loss: atomic and global labels of a dipole/polar head, DeePMD-kit v2 normalisation.

A batch holds B frames of N atoms; n_s = selected atoms per frame (types in the head's
sel_type; every atom when sel_type is null); k = 3 (dipole) or 9 (polarizability); T_i the
predicted atomic tensor, T = Σ_i T_i the global one, * marks labels:

    L_lc = mean over the B·n_s·k selected components of (T_i − T_i*)²     (atomic label)
    L_gl = mean over the B·k components of (T − T*)²                      (global label)
    L    = pref_atomic · L_lc + pref · L_gl / n_s

A term is active when its pref is > 0 and drops out for a batch whose system lacks the label, so
a system with only global (or only atomic) labels trains only that term. The prefs are constant
(no lr schedule). Reported: rmse = √L, rmse_lc = √L_lc, rmse_gl = √L_gl / n_s (NaN without the
label); batches are averaged with weight n_s.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from dargs import Argument

from mtcore.data.requirements import DataRequirement
from mtcore.errors import MtcoreError
from mtcore.hookspecs import LossContext, LossRegistration, SchemaContext, hookimpl
from mtcore.model.fitting import reduction_of
from mtcore.model.loss import Loss

#: the plugin API this module was written for (mtcore.hookspecs: versions)
MTCORE_PLUGIN_API = 2

DOC = "Atomic and global tensor labels (dipole, polarizability) with DeePMD-kit v2's weights pref_atomic and pref."


class TensorLoss(Loss):
    def __init__(
        self,
        pref: float,
        pref_atomic: float,
        global_key: str,
        atomic_key: str,
        size: int,
        sel_types: Optional[tuple[int, ...]],
    ):
        self.pref = float(pref)
        self.pref_atomic = float(pref_atomic)
        self.global_key = global_key
        self.atomic_key = atomic_key
        self.size = int(size)
        self.sel_types = None if sel_types is None else tuple(int(t) for t in sel_types)

    def requirements(self) -> list[DataRequirement]:
        reqs = []
        if self.pref > 0:
            reqs.append(DataRequirement(self.global_key, self.size))
        if self.pref_atomic > 0:
            reqs.append(DataRequirement(self.atomic_key, self.size, atomic=True, sel_types=self.sel_types))
        return reqs

    def metric_names(self) -> list[str]:
        names = ["rmse"]
        if self.pref_atomic > 0:
            names.append("rmse_lc")
        if self.pref > 0:
            names.append("rmse_gl")
        return names

    def selected(self, atype: torch.Tensor) -> torch.Tensor:
        """[B, N] bool: atoms whose type carries the tensor."""
        if self.sel_types is None:
            return atype >= 0
        sel = torch.tensor(self.sel_types, dtype=atype.dtype, device=atype.device)
        return (atype.unsqueeze(-1) == sel).any(-1)

    def selected_per_frame(self, atype: torch.Tensor) -> float:
        """n_s: selected atoms per frame (the batch mean, for per-frame types)."""
        return float(self.selected(atype).sum()) / max(int(atype.shape[0]), 1)

    def metric_weight(self, atype: torch.Tensor, pred: Dict[str, torch.Tensor]) -> float:
        return self.selected_per_frame(atype)

    def __call__(
        self,
        pred: Dict[str, torch.Tensor],
        label: Dict[str, torch.Tensor],
        find: Dict[str, float],
        atype: torch.Tensor,
        lr_ratio: float,
        metrics: bool = False,
    ) -> tuple[torch.Tensor, Dict[str, float]]:
        nframes = atype.shape[0]
        mask = self.selected(atype)
        n_sel_total = int(mask.sum())
        n_s = n_sel_total / max(nframes, 1)
        loss = pred[self.atomic_key].new_zeros(())  # the frame key is absent for a per-atom-only head
        local: Optional[torch.Tensor] = None
        glob: Optional[torch.Tensor] = None
        if self.pref_atomic > 0 and find.get(self.atomic_key, 0.0) > 0 and n_sel_total > 0:
            diff = pred[self.atomic_key].reshape(nframes, -1, self.size) - label[self.atomic_key].reshape(
                nframes, -1, self.size
            ).to(pred[self.atomic_key].dtype)
            local = (diff[mask] ** 2).sum() / (n_sel_total * self.size)
            loss = loss + self.pref_atomic * local
        if self.pref > 0 and find.get(self.global_key, 0.0) > 0 and n_sel_total > 0:
            diff = pred[self.global_key].reshape(nframes, self.size) - label[self.global_key].reshape(
                nframes, self.size
            ).to(pred[self.global_key].dtype)
            glob = torch.mean(diff**2)
            loss = loss + self.pref * glob / n_s
        if not metrics:
            return loss, {}
        values = {"rmse": math.sqrt(float(loss.detach()))}
        if self.pref_atomic > 0:
            values["rmse_lc"] = math.nan if local is None else math.sqrt(float(local.detach()))
        if self.pref > 0:
            values["rmse_gl"] = math.nan if glob is None else math.sqrt(float(glob.detach())) / n_s
        return loss, values


def arguments(ctx: SchemaContext) -> list[Argument]:
    return [
        Argument("pref", [float, int], optional=False, doc="weight of the global label (dipole.npy, polarizability.npy)"),
        Argument(
            "pref_atomic",
            [float, int],
            optional=False,
            doc="weight of the atomic label (atomic_dipole.npy, atomic_polarizability.npy)",
        ),
    ]


def build(params: dict, ctx: LossContext) -> TensorLoss:
    odef = ctx.fitting.output_def()
    where = f"loss of head '{ctx.head}'"
    if odef.conservative:
        raise MtcoreError(f"{where}: type 'tensor' needs a tensor fitting net (dipole, polar), not '{odef.name}'")
    pref, pref_atomic = float(params["pref"]), float(params["pref_atomic"])
    if pref < 0 or pref_atomic < 0:
        raise MtcoreError(f"{where}: pref and pref_atomic must be >= 0 (got {pref}, {pref_atomic})")
    if pref == 0 and pref_atomic == 0:
        raise MtcoreError(f"{where}: pref and pref_atomic are both 0; nothing to train")
    if pref > 0 and reduction_of(odef) == "none":
        raise MtcoreError(f"{where}: the head predicts per-atom values only (reduction 'none'), so it has no "
                          f"frame value to fit: set pref to 0 and train it with pref_atomic")
    return TensorLoss(pref, pref_atomic, odef.global_key, odef.atomic_key, odef.size, odef.sel_types)


@hookimpl
def mtcore_losses() -> list[LossRegistration]:
    return [LossRegistration(name="tensor", arguments=arguments, build=build, doc=DOC)]
