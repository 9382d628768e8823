"""Building the multi-head model and the heads' losses from a normalised configuration."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from mtcore.config import RunConfig
from mtcore.data.requirements import DataRequirement, merge_requirements
from mtcore.errors import MtcoreError
from mtcore.hookspecs import DescriptorContext, FittingContext, LossContext, NeighborStat
from mtcore.model.delta import base_of, check_delta_heads, plugin_params, wrap_delta_heads
from mtcore.model.descriptor import Descriptor
from mtcore.model.fitting import Fitting, check_output_def
from mtcore.model.loss import Loss
from mtcore.model.model import MultiHeadModel
from mtcore.model.precision import apply_compute_precision, override_precision, policy_of
from mtcore.model.shared_layers import SharedLayerManager
from mtcore.plugins import Registry, get_registry


def build_descriptor(
    params: dict, type_map: list[str], registry: Registry, type_embedding: Optional[dict] = None
) -> Descriptor:
    entry = registry.entry("descriptor", params["type"])
    ctx = DescriptorContext(
        type_map=type_map,
        build_descriptor=lambda p: build_descriptor(p, type_map, registry, type_embedding),
        type_embedding=type_embedding,
    )
    return checked_build(entry, entry.registration.build(params, ctx), Descriptor)


def checked_build(entry: Any, built: Any, expected: type) -> Any:
    """``built`` if it is what the contract promises (an instance of ``expected``);
    otherwise one line naming the component, its distribution and what was expected, instead of
    an AttributeError deep inside training or freezing."""
    if isinstance(built, expected):
        return built
    source = entry.source
    got = "None" if built is None else f"a {type(built).__module__}.{type(built).__qualname__}"
    raise MtcoreError(
        f"{entry.kind} '{entry.name}' from package '{source.distribution}' {source.version} (entry point "
        f"'{source.entry_point}'): its build() returned {got}; expected an instance of "
        f"{expected.__module__}.{expected.__qualname__}{' (a torch.nn.Module)' if issubclass(expected, torch.nn.Module) else ''}"
    )


def update_sel(config: RunConfig, stat: NeighborStat, registry: Optional[Registry] = None) -> None:
    """Resolve ``sel: "auto"`` in place from pooled neighbour statistics (warns if too small)."""
    registry = registry or get_registry()
    params = config.model["descriptor"]
    registration = registry.get("descriptor", params["type"])
    if registration.update_sel is not None:
        config.model["descriptor"] = registration.update_sel(params, stat)


@contextmanager
def _settings_errors(where: str, kind: str) -> Iterator[None]:
    """A plugin that fails on settings the schema let through (a negative width, say) gives one
    line naming the input section instead of a traceback from inside torch."""
    try:
        yield
    except MtcoreError as exc:
        text = str(exc)
        if text.startswith(("model/", "shared layer", "fitting net", "loss")):
            raise
        raise MtcoreError(f"{where}: {text}") from None
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MtcoreError(f"{where}: cannot build a '{kind}' from these settings: {detail}") from None


def build_model(config: RunConfig, registry: Optional[Registry] = None) -> MultiHeadModel:
    registry = registry or get_registry()
    type_map = config.type_map
    if not type_map:
        raise MtcoreError("model/type_map: needed to build the model")
    # training/mixed_precision: every component in output_prec, its networks in compute_prec
    policy = policy_of(config.training)
    params = override_precision(config.model["descriptor"], policy)
    with _settings_errors("model/descriptor", params.get("type", "")):
        descriptor = build_descriptor(params, type_map, registry, override_precision(config.model.get("type_embedding"), policy))
    if not descriptor.get_rcut() > 0:
        raise MtcoreError(f"model/descriptor/rcut: must be positive, got {descriptor.get_rcut()}")
    manager = SharedLayerManager()
    fittings = {name: override_precision(head.fitting, policy) for name, head in config.heads.items()}
    section = "model/fitting_net_dict" if config.multi_task else "model/fitting_net"
    if config.multi_task:
        check_delta_heads(fittings, section)
    elif any(base_of(f) and not f.get("base_fitting_net") for f in fittings.values()):
        raise MtcoreError("model/fitting_net/base_head: a Δ head adds to another head; give both in model/fitting_net_dict")

    def build_head(name: str, params: dict, where: str, layers: SharedLayerManager) -> Fitting:
        entry = registry.entry("fitting_net", params.get("type", "ener"))
        registration = entry.registration
        with _settings_errors(where, registration.name):
            fitting = registration.build(plugin_params(params), FittingContext(name, type_map, descriptor, layers))
        fitting = checked_build(entry, fitting, Fitting)
        check_output_def(fitting.output_def(), f"{where} (type '{registration.name}')")
        if fitting.needs_rot_mat() and descriptor.get_dim_rot() == 0:
            raise MtcoreError(
                f"{where}: a '{registration.name}' head needs a descriptor with a rotation matrix "
                f"(se_e2_a, se_atten, or a hybrid containing one); '{config.model['descriptor']['type']}' has none"
            )
        return fitting

    heads = {}
    for name, head in config.heads.items():
        where = f"model/fitting_net_dict/{name}" if config.multi_task else "model/fitting_net"
        heads[name] = build_head(name, fittings[name], where, manager)
    manager.check_usage(heads)
    heads = wrap_delta_heads(
        heads, fittings, section,
        lambda base, params: build_head(base, params, f"{section}/base_fitting_net", SharedLayerManager()),
    )
    model = MultiHeadModel(descriptor, heads, type_map, manager.module_dict(), manager.users)
    apply_compute_precision(model, policy)
    return model


def build_losses(config: RunConfig, model: MultiHeadModel, registry: Optional[Registry] = None) -> dict[str, Loss]:
    registry = registry or get_registry()
    losses = {}
    for name, head in config.heads.items():
        entry = registry.entry("loss", head.loss.get("type", "ener"))
        ctx = LossContext(name, model.heads[name], float(head.learning_rate["start_lr"]))
        losses[name] = checked_build(entry, entry.registration.build(head.loss, ctx), Loss)
    return losses


def head_requirements(model: MultiHeadModel, loss: Loss, head: str) -> list[DataRequirement]:
    """What this head's data must provide: its loss's labels plus its fitting's statistics labels."""
    fitting = model.heads[head]
    return merge_requirements(
        list(loss.requirements()) + list(fitting.stat_requirements()) + list(fitting.input_requirements())
    )
