"""Plugin manager and registry.

Plugins are found through the ``mtcore`` entry-point group (the built-ins too). The registry is
built once from the hooks' answers and read by the schema assembler, the model builder, the data
layer and ``mtcore list-plugins``.

Environment switches, for tests and plugin authors:

* ``MTCORE_PLUGINS=a,b``: load only the entry points with these names.
* ``MTCORE_TRACE_HOOKS=1``: print every hook call with its arguments and results.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Optional

import pluggy

from mtcore import hookspecs
from mtcore.errors import PluginError
from mtcore.hookspecs import (
    DataLoaderRegistration,
    DescriptorRegistration,
    FittingRegistration,
    LossRegistration,
)

ENTRY_POINT_GROUP = "mtcore"

KINDS = ("descriptor", "fitting_net", "loss", "data_loader")
_HOOK_OF_KIND = {
    "descriptor": "mtcore_descriptors",
    "fitting_net": "mtcore_fittings",
    "loss": "mtcore_losses",
    "data_loader": "mtcore_data_loaders",
}
_CLASS_OF_KIND = {
    "descriptor": DescriptorRegistration,
    "fitting_net": FittingRegistration,
    "loss": LossRegistration,
    "data_loader": DataLoaderRegistration,
}


@dataclass(frozen=True)
class PluginSource:
    """Where a registration came from: distribution name and version, entry-point name."""

    distribution: str
    version: str
    entry_point: str


@dataclass(frozen=True)
class Registered:
    """One registration with its source."""

    kind: str
    registration: Any
    source: PluginSource

    @property
    def name(self) -> str:
        return self.registration.name

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(self.registration.aliases)


def _entry_points() -> list[metadata.EntryPoint]:
    eps = metadata.entry_points()
    group = eps.select(group=ENTRY_POINT_GROUP) if hasattr(eps, "select") else eps.get(ENTRY_POINT_GROUP, [])
    only = os.environ.get("MTCORE_PLUGINS")
    selected = list(group)
    if only:
        wanted = {name.strip() for name in only.split(",") if name.strip()}
        selected = [ep for ep in selected if ep.name in wanted]
    # Unique by (name, value): the same distribution can be visible twice on odd sys.paths.
    seen: set[tuple[str, str]] = set()
    unique = []
    for ep in selected:
        key = (ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            unique.append(ep)
    return unique


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh plugin manager with the hookspecs and, by default, every entry-point plugin.

    A plugin that fails to import gives a warning naming it; the others still load.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if os.environ.get("MTCORE_TRACE_HOOKS"):
        pm.trace.root.setwriter(print)
        pm.enable_tracing()
    if not load_entry_points:
        return pm
    for ep in _entry_points():
        try:
            module = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure must not stop the rest
            dist = ep.dist.name if getattr(ep, "dist", None) else "?"
            warnings.warn(
                f"mtcore plugin '{ep.name}' ({ep.value}, from {dist}) failed to load and is skipped: "
                f"{type(exc).__name__}: {exc}",
                stacklevel=2,
            )
            continue
        if pm.is_registered(module):
            continue
        dist = getattr(ep, "dist", None)
        source = PluginSource(dist.name if dist else "unknown", dist.version if dist else "?", ep.name)
        pm.register(module, name=f"{source.distribution}:{ep.name}")
        _SOURCES[id(module)] = source
    return pm


_SOURCES: dict[int, PluginSource] = {}


def _source_of(pm: pluggy.PluginManager, plugin: Any) -> PluginSource:
    if id(plugin) in _SOURCES:
        return _SOURCES[id(plugin)]
    name = pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
    return PluginSource(name, "?", name)


class Registry:
    """Everything the registered plugins provide, by kind and name (aliases resolved)."""

    def __init__(self, entries: Iterable[Registered]):
        self._by_kind: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        self._alias: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        for entry in entries:
            self._add(entry)

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> "Registry":
        entries: list[Registered] = []
        for kind in KINDS:
            hook = getattr(pm.hook, _HOOK_OF_KIND[kind])
            for impl in hook.get_hookimpls():
                result = impl.function()
                for registration in result or []:
                    if not isinstance(registration, _CLASS_OF_KIND[kind]):
                        raise PluginError(
                            f"plugin {_source_of(pm, impl.plugin).distribution} returned "
                            f"{type(registration).__name__} from {_HOOK_OF_KIND[kind]}; expected "
                            f"{_CLASS_OF_KIND[kind].__name__}"
                        )
                    entries.append(Registered(kind, registration, _source_of(pm, impl.plugin)))
        return cls(entries)

    def _add(self, entry: Registered) -> None:
        names = self._alias[entry.kind]
        for label in (entry.name, *entry.aliases):
            if label in names:
                other = self._by_kind[entry.kind][names[label]]
                raise PluginError(
                    f"{entry.kind} '{label}' is registered twice: by {other.source.distribution} "
                    f"({other.source.entry_point}) and by {entry.source.distribution} "
                    f"({entry.source.entry_point}); uninstall one of them"
                )
            names[label] = entry.name
        self._by_kind[entry.kind][entry.name] = entry

    def names(self, kind: str) -> list[str]:
        return list(self._by_kind[kind])

    def entries(self, kind: Optional[str] = None) -> list[Registered]:
        kinds = [kind] if kind else list(KINDS)
        return [entry for k in kinds for entry in self._by_kind[k].values()]

    def canonical(self, kind: str, name: str) -> str:
        try:
            return self._alias[kind][name]
        except KeyError:
            known = ", ".join(sorted(self._alias[kind])) or "none"
            raise PluginError(f"unknown {kind} type '{name}'; registered: {known}") from None

    def get(self, kind: str, name: str) -> Any:
        """The registration of ``name`` (or an alias) of ``kind``."""
        return self._by_kind[kind][self.canonical(kind, name)].registration


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry of installed plugins (built on first use)."""
    return Registry.from_plugin_manager(make_plugin_manager())
