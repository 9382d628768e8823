"""``training/mixed_precision``: wide master weights, narrow matrix products.

DeePMD-kit v2's key ``{"output_prec": ..., "compute_prec": ...}``. The policy has two halves:

* every component is built in ``output_prec`` (its ``precision`` key is overridden), so trainable
  weights, optimiser moments, the environment matrix, statistics, the energy sum over atoms,
  forces and virials (autograd) and the loss keep the model's width: the reductions that
  decide accuracy stay wide;
* each embedding and fitting network casts its input to ``compute_prec`` once, runs every layer
  (products, activations, residual sums) in ``compute_prec`` and casts its output back to
  ``output_prec`` (DeePMD-kit v2 casts at the same places); a lone :class:`mtcore.model.mlp.Dense`
  (attention projections) casts around its own product and activation.

The policy lives in the normalised input, so checkpoints, ``--restart`` and every tool that
rebuilds a model from a document (freeze, compress, show, change-bias) apply it again; the
layers' compute dtype is a TorchScript attribute, so frozen files carry it.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from mtcore.errors import MtcoreError
from mtcore.model.mlp import PRECISIONS, Dense, EmbeddingNet, FittingMLP

KEY = "training/mixed_precision"
OUTPUT_PRECS = ("float64", "float32")
COMPUTE_PRECS = ("float32", "float16", "bfloat16")
_BITS = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 16, "default": 64}


@dataclass(frozen=True)
class MixedPrecision:
    output_prec: str
    compute_prec: str

    @property
    def output_dtype(self) -> torch.dtype:
        return PRECISIONS[self.output_prec]

    @property
    def compute_dtype(self) -> torch.dtype:
        return PRECISIONS[self.compute_prec]


def policy_of(training: Optional[dict]) -> Optional[MixedPrecision]:
    """The checked policy of a normalised ``training`` section (None when the key is absent).

    One-line errors name the key: an unknown width, or a compute width wider than the output
    (nothing would be gained, and the wide result would be rounded on the way out)."""
    section = (training or {}).get("mixed_precision")
    if section is None:
        return None
    output = section.get("output_prec", "float32")
    compute = section.get("compute_prec")
    if output not in OUTPUT_PRECS:
        raise MtcoreError(f"{KEY}/output_prec: '{output}' is not one of {', '.join(OUTPUT_PRECS)}")
    if compute in _BITS and compute != "default" and _BITS[compute] > _BITS[output]:
        raise MtcoreError(
            f"{KEY}/compute_prec: '{compute}' is wider than output_prec '{output}'; compute_prec must be "
            f"one of {', '.join(c for c in COMPUTE_PRECS if _BITS[c] <= _BITS[output])}"
        )
    if compute not in COMPUTE_PRECS:
        raise MtcoreError(f"{KEY}/compute_prec: '{compute}' is not one of {', '.join(COMPUTE_PRECS)}")
    return MixedPrecision(output, compute)


def _precision_keys(value: Any, path: str) -> list[tuple[str, str]]:
    """(path, value) of every ``precision`` key in a component's settings (hybrid members,
    Δ heads' base nets included)."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}/{key}"
            if key == "precision" and isinstance(item, str):
                found.append((where, item))
            else:
                found.extend(_precision_keys(item, where))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_precision_keys(item, f"{path}/{index}"))
    return found


def warn_disagreeing(model_section: dict, policy: MixedPrecision) -> None:
    """One warning line listing components whose explicit ``precision`` the policy overrides.

    ``default`` is not listed: it is what a user gets without choosing, and the policy replaces it."""
    disagree = [
        (where, value)
        for where, value in _precision_keys(model_section, "model")
        if value != "default" and value != policy.output_prec
    ]
    if disagree:
        listed = ", ".join(f"{where}={value}" for where, value in disagree)
        warnings.warn(
            f"{KEY}: output_prec {policy.output_prec} overrides the components' precision ({listed})",
            stacklevel=3,
        )


def override_precision(params: Any, policy: Optional[MixedPrecision]) -> Any:
    """A copy of a component's settings with every ``precision`` set to the policy's output_prec."""
    if policy is None or params is None:
        return params
    out = copy.deepcopy(params)
    stack = [out]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "precision" and isinstance(value, str):
                    item[key] = policy.output_prec
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return out


def apply_compute_precision(model: nn.Module, policy: Optional[MixedPrecision]) -> int:
    """Set every Dense layer of ``model`` to compute in the policy's compute_prec; returns how
    many layers compute narrower than their weights (0 without a policy)."""
    if policy is None:
        return 0
    narrowed = 0
    for module in model.modules():
        if isinstance(module, Dense):
            module.compute_dtype = policy.compute_dtype
            module.mixed = policy.compute_dtype != module.weight.dtype
            narrowed += int(module.mixed)
        elif isinstance(module, (EmbeddingNet, FittingMLP)):
            # a whole network computes narrow between one cast in and one cast out
            module.compute_dtype = policy.compute_dtype
            module.mixed = policy.compute_dtype != module.wide_dtype
    return narrowed
