"""ener loss: energy, force, virial (and atomic energy, weighted force) with DeePMD-kit v2 prefactors.

With p(t) = limit + (start - limit)·lr(t)/start_lr and N atoms per frame:

    L = p_e·mean(ΔE²)/N + p_f·mean(ΔF²) + p_v·mean(ΔΞ²)/N + p_ae·mean(ΔE_i²) + p_pf·mean(q·ΔF²)

A term is active when its start or limit prefactor is non-zero, and drops out for a batch whose
system lacks the label. Reported: rmse = √L, rmse_e = √mean(ΔE²)/N, rmse_f = √mean(ΔF²),
rmse_v = √mean(ΔΞ²)/N, rmse_ae, rmse_pf.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from dargs import Argument

from mtcore.data.requirements import DataRequirement
from mtcore.errors import MtcoreError
from mtcore.hookspecs import LossContext, LossRegistration, SchemaContext, hookimpl
from mtcore.model.loss import Loss

#: the plugin API this module was written for (mtcore.hookspecs: versions)
MTCORE_PLUGIN_API = 2

DOC = "Energy/force/virial loss with prefactors that move from start to limit as the learning rate decays."
TERMS = ("e", "f", "v", "ae", "pf")


class EnerLoss(Loss):
    def __init__(self, params: dict, head: str):
        self.start = {t: float(params[f"start_pref_{t}"]) for t in TERMS}
        self.limit = {t: float(params[f"limit_pref_{t}"]) for t in TERMS}
        self.active = {t: self.start[t] != 0.0 or self.limit[t] != 0.0 for t in TERMS}
        self.relative_f: Optional[float] = params.get("relative_f")
        if params.get("enable_atom_ener_coeff"):
            raise MtcoreError(f"loss of head '{head}': enable_atom_ener_coeff is not supported yet")
        if params.get("start_pref_gf", 0.0) or params.get("limit_pref_gf", 0.0):
            raise MtcoreError(f"loss of head '{head}': the generalised-force term (pref_gf) is not supported yet")
        if not any(self.active.values()):
            raise MtcoreError(f"loss of head '{head}': every prefactor is zero; nothing to train")

    def requirements(self) -> list[DataRequirement]:
        reqs = []
        if self.active["e"]:
            reqs.append(DataRequirement("energy", 1))
        if self.active["f"] or self.active["pf"]:
            reqs.append(DataRequirement("force", 3, atomic=True))
        if self.active["v"]:
            reqs.append(DataRequirement("virial", 9))
        if self.active["ae"]:
            reqs.append(DataRequirement("atom_ener", 1, atomic=True))
        if self.active["pf"]:
            reqs.append(DataRequirement("atom_pref", 1, atomic=True, default=1.0))
        return reqs

    def needs_force(self) -> bool:
        return self.active["f"] or self.active["pf"]

    def needs_virial(self) -> bool:
        return self.active["v"]

    def metric_names(self) -> list[str]:
        return ["rmse"] + [f"rmse_{t}" for t in TERMS if self.active[t]]

    def __call__(
        self,
        pred: Dict[str, torch.Tensor],
        label: Dict[str, torch.Tensor],
        find: Dict[str, float],
        atype: torch.Tensor,
        lr_ratio: float,
        metrics: bool = False,
    ) -> tuple[torch.Tensor, Dict[str, float]]:
        natoms = atype.shape[1]
        # lr/start_lr lies in [0, 1] for a decaying schedule; clamping keeps every prefactor between
        # its limit and start value whatever schedule a caller passes (never negative)
        lr_ratio = min(max(float(lr_ratio), 0.0), 1.0)
        pref = {t: self.limit[t] + (self.start[t] - self.limit[t]) * lr_ratio for t in TERMS}
        loss = pred["energy"].new_zeros(())
        l2: Dict[str, Optional[torch.Tensor]] = {}
        if self.active["e"]:
            l2["e"] = torch.mean((pred["energy"] - label["energy"]) ** 2) if find.get("energy", 0.0) else None
            if l2["e"] is not None:
                loss = loss + pref["e"] / natoms * l2["e"]
        if self.active["f"] or self.active["pf"]:
            have_f = find.get("force", 0.0) > 0
            diff = (label["force"] - pred["force"]) if have_f else None
            if self.active["f"]:
                if diff is not None and self.relative_f is not None:
                    scale = torch.linalg.vector_norm(label["force"], dim=-1, keepdim=True) + self.relative_f
                    l2["f"] = torch.mean((diff / scale) ** 2)
                else:
                    l2["f"] = torch.mean(diff**2) if diff is not None else None
                if l2["f"] is not None:
                    loss = loss + pref["f"] * l2["f"]
            if self.active["pf"]:
                if diff is not None and find.get("atom_pref", 0.0):
                    l2["pf"] = torch.mean(label["atom_pref"] * diff**2)
                    loss = loss + pref["pf"] * l2["pf"]
                else:
                    l2["pf"] = None
        if self.active["v"]:
            l2["v"] = torch.mean((pred["virial"] - label["virial"]) ** 2) if find.get("virial", 0.0) else None
            if l2["v"] is not None:
                loss = loss + pref["v"] / natoms * l2["v"]
        if self.active["ae"]:
            have = find.get("atom_ener", 0.0) > 0
            l2["ae"] = torch.mean((pred["atom_ener"] - label["atom_ener"]) ** 2) if have else None
            if l2["ae"] is not None:
                loss = loss + pref["ae"] * l2["ae"]
        if not metrics:
            return loss, {}
        values = {"rmse": math.sqrt(max(float(loss.detach()), 0.0))}
        for t in TERMS:
            if not self.active[t]:
                continue
            value = l2.get(t)
            if value is None:
                values[f"rmse_{t}"] = math.nan
            else:
                rmse = math.sqrt(float(value.detach()))
                values[f"rmse_{t}"] = rmse / natoms if t in ("e", "v") else rmse
        return loss, values


def arguments(ctx: SchemaContext) -> list[Argument]:
    args = []
    defaults = {"e": (0.02, 1.0), "f": (1000, 1.0), "v": (0.0, 0.0), "ae": (0.0, 0.0), "pf": (0.0, 0.0)}
    for t, (start, limit) in defaults.items():
        args.append(Argument(f"start_pref_{t}", [float, int], optional=True, default=start))
        args.append(Argument(f"limit_pref_{t}", [float, int], optional=True, default=limit))
    args += [
        Argument("relative_f", [float, None], optional=True, default=None, doc="relative force error shift ν"),
        Argument("enable_atom_ener_coeff", bool, optional=True, default=False, doc="not supported yet"),
        Argument("start_pref_gf", float, optional=True, default=0.0, doc="not supported yet"),
        Argument("limit_pref_gf", float, optional=True, default=0.0, doc="not supported yet"),
        Argument("numb_generalized_coord", int, optional=True, default=0),
    ]
    return args


def build(params: dict, ctx: LossContext) -> EnerLoss:
    if not ctx.fitting.output_def().conservative:
        raise MtcoreError(
            f"loss of head '{ctx.head}': type 'ener' needs an energy fitting net, not '{ctx.fitting.output_def().name}'"
        )
    return EnerLoss(params, ctx.head)


@hookimpl
def mtcore_losses() -> list[LossRegistration]:
    return [LossRegistration(name="ener", arguments=arguments, build=build, doc=DOC)]
