"""gap loss: squared (or absolute) error of a head's frame quantity, per frame.

For a batch of B frames with predicted frame values y_b (the core has already reduced the atomic
outputs as the head declares: the mean for the ``gap`` head) and labels y*_b:

    mse:  L = pref · (1/B) Σ_b (y_b − y*_b)²        mae:  L = pref · (1/B) Σ_b |y_b − y*_b|

A batch whose system lacks the label contributes 0 (the metrics say NaN). Metrics: ``rmse`` and
``mae`` of the frame value; batches are averaged with weight B (frames, not atoms: the quantity
is per frame). The loss reads the key and width from the head's ``output_def()``, so it fits any
head with a frame quantity; a head with ``reduction: "none"`` has none and is refused.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from dargs import Argument

from mtcore.data.requirements import DataRequirement
from mtcore.errors import MtcoreError
from mtcore.hookspecs import LossContext, LossRegistration, SchemaContext, hookimpl
from mtcore.model.loss import Loss

#: The plugin API this module was written for (see docs/plugins.md, "Publishing").
MTCORE_PLUGIN_API = 2

NAME = "gap"
DOC = "Squared or absolute error of a head's frame value (e.g. the gap head's mean), per frame."
LOSS_FUNCS = ("mse", "mae")


class FrameValueLoss(Loss):
    def __init__(self, key: str, size: int, pref: float, loss_func: str):
        self.key = key
        self.size = int(size)
        self.pref = float(pref)
        self.loss_func = loss_func

    def requirements(self) -> list[DataRequirement]:
        return [DataRequirement(self.key, self.size)]

    def metric_names(self) -> list[str]:
        return ["rmse", "mae"]

    def metric_weight(self, atype: torch.Tensor, pred: Dict[str, torch.Tensor]) -> float:
        return float(atype.shape[0])

    def __call__(self, pred, label, find, atype, lr_ratio, metrics=False):
        predicted = pred[self.key].reshape(atype.shape[0], self.size)
        if find.get(self.key, 0.0) < 0.5:
            loss = predicted.sum() * 0.0  # keeps the graph; this batch has nothing to learn from
            return loss, ({"rmse": math.nan, "mae": math.nan} if metrics else {})
        diff = predicted - label[self.key].reshape(atype.shape[0], self.size).to(predicted.dtype)
        per_frame = diff.abs() if self.loss_func == "mae" else diff * diff
        loss = self.pref * per_frame.mean()
        if not metrics:
            return loss, {}
        detached = diff.detach()
        return loss, {"rmse": math.sqrt(float((detached * detached).mean())), "mae": float(detached.abs().mean())}


def arguments(ctx: SchemaContext) -> list[Argument]:
    return [
        Argument("pref", [float, int], optional=True, default=1.0, doc="weight of the frame-value error"),
        Argument("loss_func", str, optional=True, default="mse", doc="mse (squared error) or mae (absolute error)"),
    ]


def build(params: dict, ctx: LossContext) -> FrameValueLoss:
    where = f"loss of head '{ctx.head}'"
    if params["loss_func"] not in LOSS_FUNCS:
        raise MtcoreError(f"{where}: loss_func must be one of {', '.join(LOSS_FUNCS)}, got {params['loss_func']!r}")
    if params["pref"] < 0:
        raise MtcoreError(f"{where}: pref must be non-negative, got {params['pref']}")
    odef = ctx.fitting.output_def()
    if getattr(odef, "reduction", "sum") == "none":
        raise MtcoreError(f"{where}: the '{odef.name}' output has no frame value (reduction 'none'); use a per-atom loss")
    return FrameValueLoss(odef.global_key, odef.size, params["pref"], params["loss_func"])


REGISTRATION = LossRegistration(name=NAME, arguments=arguments, build=build, doc=DOC)


@hookimpl
def mtcore_losses() -> list[LossRegistration]:
    return [REGISTRATION]
