"""property loss: the frame values of a property head.

A batch holds B frames of N atoms; P the predicted frame value ([B, task_dim], a sum or a mean as
the head declares), P* the label (``<property_name>.npy``); n = N for an extensive property and 1
for an intensive one, so frames of different sizes weigh alike (as DeePMD-kit's energy loss does):

    mse:         L = pref · mean over the B·task_dim values of ((P − P*)/n)²
    mae:         L = pref · mean |P − P*| / n
    smooth_mae:  L = pref · mean of the Huber function of (P − P*)/n with threshold beta

The term drops out for a batch whose system lacks the label. Reported: ``rmse`` = √L for mse (L
otherwise), ``rmse_<name>`` and ``mae_<name>`` of the frame values P − P* themselves, the numbers
``mtcore test`` prints in its row for the property (NaN without the label); batches are averaged
with weight B.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from dargs import Argument

from mtcore.data.requirements import DataRequirement
from mtcore.errors import MtcoreError
from mtcore.hookspecs import LossContext, LossRegistration, SchemaContext, hookimpl
from mtcore.model.fitting import reduction_of
from mtcore.model.loss import Loss

#: the plugin API this module was written for (mtcore.hookspecs: versions)
MTCORE_PLUGIN_API = 2

DOC = "Frame values of a property head (mse, mae or smooth_mae), extensive ones per atom."

LOSS_FUNCTIONS = ("mse", "mae", "smooth_mae")


class PropertyLoss(Loss):
    def __init__(self, key: str, size: int, intensive: bool, pref: float, loss_func: str, beta: float):
        self.key = key
        self.size = int(size)
        self.intensive = bool(intensive)
        self.pref = float(pref)
        self.loss_func = loss_func
        self.beta = float(beta)

    def requirements(self) -> list[DataRequirement]:
        return [DataRequirement(self.key, self.size)]

    def metric_names(self) -> list[str]:
        return ["rmse", f"rmse_{self.key}", f"mae_{self.key}"]

    def metric_weight(self, atype: torch.Tensor, pred: Dict[str, torch.Tensor]) -> float:
        return float(atype.shape[0])  # frame values: every frame counts once

    def __call__(
        self,
        pred: Dict[str, torch.Tensor],
        label: Dict[str, torch.Tensor],
        find: Dict[str, float],
        atype: torch.Tensor,
        lr_ratio: float,
        metrics: bool = False,
    ) -> tuple[torch.Tensor, Dict[str, float]]:
        nframes, natoms = int(atype.shape[0]), int(atype.shape[1])
        value = pred[self.key].reshape(nframes, self.size)
        loss = value.new_zeros(())
        diff = None
        if find.get(self.key, 0.0) > 0:
            diff = value - label[self.key].reshape(nframes, self.size).to(value.dtype)
            scaled = diff if self.intensive else diff / natoms
            if self.loss_func == "mse":
                term = torch.mean(scaled**2)
            elif self.loss_func == "mae":
                term = torch.mean(torch.abs(scaled))
            else:
                term = torch.nn.functional.smooth_l1_loss(scaled, torch.zeros_like(scaled), beta=self.beta)
            loss = loss + self.pref * term
        if not metrics:
            return loss, {}
        total = float(loss.detach())
        values = {"rmse": math.sqrt(total) if self.loss_func == "mse" else total}
        if diff is None:
            values[f"rmse_{self.key}"] = values[f"mae_{self.key}"] = math.nan
        else:
            d = diff.detach()
            values[f"rmse_{self.key}"] = math.sqrt(float(torch.mean(d**2)))
            values[f"mae_{self.key}"] = float(torch.mean(torch.abs(d)))
        return loss, values


def arguments(ctx: SchemaContext) -> list[Argument]:
    return [
        Argument("loss_func", str, optional=True, default="mse", doc="mse, mae or smooth_mae (Huber, threshold beta)"),
        Argument("pref", [float, int], optional=True, default=1.0, doc="weight of the property term"),
        Argument("beta", [float, int], optional=True, default=1.0, doc="smooth_mae: where the loss turns linear"),
    ]


def build(params: dict, ctx: LossContext) -> PropertyLoss:
    odef = ctx.fitting.output_def()
    where = f"loss of head '{ctx.head}'"
    reduction = reduction_of(odef)
    if odef.conservative or reduction == "none":
        raise MtcoreError(f"{where}: type 'property' needs a head with a per-frame value that is not an energy "
                          f"(a 'property' fitting net), not '{odef.name}'")
    loss_func = str(params.get("loss_func", "mse"))
    if loss_func not in LOSS_FUNCTIONS:
        raise MtcoreError(f"{where}: loss_func '{loss_func}' is not one of {', '.join(LOSS_FUNCTIONS)}")
    pref, beta = float(params.get("pref", 1.0)), float(params.get("beta", 1.0))
    if not pref > 0:
        raise MtcoreError(f"{where}: pref must be > 0 (got {pref})")
    if not beta > 0:
        raise MtcoreError(f"{where}: beta must be > 0 (got {beta})")
    return PropertyLoss(odef.global_key, odef.size, reduction == "mean", pref, loss_func, beta)


@hookimpl
def mtcore_losses() -> list[LossRegistration]:
    return [LossRegistration(name="property", arguments=arguments, build=build, doc=DOC)]
