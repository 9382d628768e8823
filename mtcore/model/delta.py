"""Δ-learning heads: a head whose atomic output is another head's atomic output plus its own net.

A scarce, expensive level of theory (CCSD(T), a hybrid functional) is most often a cheap, rich
level plus a small, smooth correction. A Δ head (``fitting_net_dict/<head>/base_head: "<rich
head>"``) predicts

    out_i = base(D_i) + correction(D_i)

with ``base`` the very module of the named head (the same tensors, not a copy), so the scarce
head's few frames train mainly the correction instead of a whole potential. Forces and virials
follow by autograd through both nets as for any energy head. The scarce loss also trains the
base net unless ``base_trainable: false`` (then only the correction and the descriptor).

The module holds its base, so a frozen Δ head (``mtcore freeze --head <Δ head>``) is
self-contained; its single-task input records the base's settings under ``base_fitting_net``
so that tools rebuilding the model from a frozen file's input (compress, change-bias) can.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterator, Optional

import torch
from torch import nn

from mtcore.data.requirements import merge_requirements
from mtcore.errors import MtcoreError
from mtcore.model.fitting import Fitting, OutputDef, TestQuantity, reduction_of

#: keys of a head's fitting section that the core reads (never passed to the fitting plugin)
DELTA_KEYS = ("base_head", "base_trainable", "base_fitting_net")


def plugin_params(fitting: dict) -> dict:
    """The fitting section without the Δ keys (what the fitting plugin's build receives)."""
    return {k: v for k, v in fitting.items() if k not in DELTA_KEYS}


def base_of(fitting: dict) -> Optional[str]:
    return fitting.get("base_head") or None


def check_delta_heads(fittings: Dict[str, dict], where: str) -> None:
    """Refuse, in one line, a base head that is unknown, the head itself, or a Δ head itself
    (chains and cycles: one correction on one base is what the statistics and docs promise)."""
    for name, fitting in fittings.items():
        base = base_of(fitting)
        if base is None:
            continue
        key = f"{where}/{name}/base_head"
        if base == name:
            raise MtcoreError(f"{key}: a head cannot be its own base")
        if base not in fittings:
            if fitting.get("base_fitting_net"):
                continue  # a frozen Δ head's single-task input: the base is built from base_fitting_net
            raise MtcoreError(f"{key}: '{base}' is not a head; heads: {', '.join(fittings)}")
        if base_of(fittings[base]) is not None:
            raise MtcoreError(
                f"{key}: '{base}' is itself a Δ head (base_head '{base_of(fittings[base])}'); chains of Δ heads are not "
                f"supported: give '{name}' the base '{base_of(fittings[base])}' directly"
            )


def same_output(base: OutputDef, mine: OutputDef) -> bool:
    return (base.name, base.size, base.conservative, reduction_of(base), base.sel_types) == (
        mine.name, mine.size, mine.conservative, reduction_of(mine), mine.sel_types
    )


class DeltaFitting(Fitting):
    """base head's atomic output + a correction net of the same output kind."""

    def __init__(self, base: Fitting, correction: Fitting, base_name: str, base_trainable: bool = True):
        super().__init__()
        self.base = base
        self.correction = correction
        self.base_name = base_name
        self.base_trainable = bool(base_trainable)

    def output_def(self) -> OutputDef:
        return self.correction.output_def()

    def needs_rot_mat(self) -> bool:
        return self.base.needs_rot_mat() or self.correction.needs_rot_mat()

    def stat_requirements(self) -> list:
        return merge_requirements(list(self.correction.stat_requirements()))

    def input_requirements(self) -> list:
        return merge_requirements(list(self.base.input_requirements()) + list(self.correction.input_requirements()))

    def test_quantities(self) -> list[TestQuantity]:
        return self.correction.test_quantities()

    @torch.jit.unused
    def output_bias(self) -> Optional[torch.Tensor]:
        """The correction's bias: shifting it shifts the Δ head alone, never its base head."""
        return self.correction.output_bias()

    @torch.jit.unused
    def trained_parameters(self) -> Iterator[nn.Parameter]:
        """What this head's optimiser steps: the correction, and the base unless base_trainable is off."""
        if self.base_trainable:
            return self.parameters()
        return self.correction.parameters()

    @torch.jit.unused
    def compute_output_stats(self, samples: list) -> None:
        """The correction's bias from the residual of this head's labels against the base head's
        per-type bias (call after the base's own statistics): at the start the Δ head predicts its
        data's mean as a plain head would, and the correction starts near zero."""
        odef = self.output_def()
        bias = self.base.output_bias()
        if bias is None:
            self.correction.compute_output_stats(samples)
            return
        bias = bias.detach().to(torch.float64).cpu()
        reduction = reduction_of(odef)
        residual = []
        for s in samples:
            labels = dict(s.labels)
            per_atom = bias.index_select(0, s.atype.to(torch.long).clamp(min=0)).reshape(s.nframes, s.natoms, -1)
            per_atom = per_atom * (s.atype.reshape(s.nframes, s.natoms, 1) >= 0)
            if odef.global_key in labels and reduction != "none":
                frame = per_atom.sum(1) if reduction == "sum" else per_atom.mean(1)
                value = labels[odef.global_key]
                labels[odef.global_key] = value - frame.reshape(value.shape).to(value.dtype)
            if odef.atomic_key in labels:
                value = labels[odef.atomic_key]
                labels[odef.atomic_key] = value - per_atom.reshape(value.shape).to(value.dtype)
            clone = copy.copy(s)
            clone.labels = labels
            residual.append(clone)
        self.correction.compute_output_stats(residual)

    def forward(self, descriptor: Dict[str, torch.Tensor], atype: torch.Tensor) -> torch.Tensor:
        return self.base(descriptor, atype) + self.correction(descriptor, atype)


def wrap_delta_heads(heads: Dict[str, Fitting], fittings: Dict[str, dict], where: str,
                     build_private_base) -> Dict[str, Fitting]:
    """Replace each Δ head's built net by a DeltaFitting over its base head's module.
    ``build_private_base(name, params)`` builds a base that is not a head of this model (a frozen
    Δ head's single-task input)."""
    out = dict(heads)
    for name, fitting in fittings.items():
        base_name = base_of(fitting)
        if base_name is None:
            continue
        if base_name in heads:
            base = heads[base_name]
        else:
            base = build_private_base(base_name, fitting["base_fitting_net"])
        mine, theirs = heads[name].output_def(), base.output_def()
        if not same_output(theirs, mine):
            raise MtcoreError(
                f"{where}/{name}/base_head: '{base_name}' predicts {theirs.name} (size {theirs.size}), this head "
                f"{mine.name} (size {mine.size}); a Δ head adds its correction to a base of the same output kind"
            )
        out[name] = DeltaFitting(base, heads[name], base_name, bool(fitting.get("base_trainable", True)))
    return out
