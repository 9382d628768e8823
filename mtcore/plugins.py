"""Plugin manager and registry.

Plugins are found through the ``mtcore`` entry-point group (the built-ins too). The registry is
built once from the hooks' answers and read by the schema assembler, the model builder, the data
layer and ``mtcore list-plugins``.

Plugin mistakes never end in a traceback and never stop unrelated commands: hook answers are
checked when the registry is built (a bare registration is accepted with a warning; anything
else malformed is skipped with one warning line naming the distribution and entry point), and
a name (or alias) that two distributions register stays listed but is refused, naming both,
only where something selects it (the schema for that ``type``, building, loading data).

Environment switches, for tests and plugin authors:

* ``MTCORE_PLUGINS=a,b``: load only the entry points with these names.
* ``MTCORE_TRACE_HOOKS=1``: print (on stderr) every hook implementation called, with its package,
  entry point and the names it registered.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys
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
    """Where a registration came from: distribution name and version, entry-point name, and the
    plugin API version the module declares (``MTCORE_PLUGIN_API``; 1 when it declares none)."""

    distribution: str
    version: str
    entry_point: str
    api: int = 1


def declared_api(module: Any) -> tuple[Optional[int], str]:
    """The plugin API version an entry-point module was written for, and why it is refused ('' if
    usable). A module without ``MTCORE_PLUGIN_API`` is a v1 plugin: v2 only added optional
    fields with v1 defaults (``OutputDef.reduction`` = "sum"), so v1 plugins keep working."""
    value = getattr(module, "MTCORE_PLUGIN_API", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None, f"MTCORE_PLUGIN_API must be a positive integer, got {value!r}"
    if value > hookspecs.PLUGIN_API_VERSION:
        from mtcore import __version__

        return value, (f"it was written for mtcore plugin API v{value}, but mtcore {__version__} provides "
                       f"v{hookspecs.PLUGIN_API_VERSION}; upgrade mtcore")
    return value, ""


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
        api, refused = declared_api(module)
        if refused:
            warnings.warn(
                f"mtcore plugin '{ep.name}' ({ep.value}, from {dist.name if dist else '?'}) is skipped: {refused}",
                stacklevel=2,
            )
            continue
        source = PluginSource(dist.name if dist else "unknown", dist.version if dist else "?", ep.name, int(api or 1))
        pm.register(module, name=f"{source.distribution}:{ep.name}")
        _SOURCES[id(module)] = source
    return pm


_SOURCES: dict[int, PluginSource] = {}


def _source_of(pm: pluggy.PluginManager, plugin: Any) -> PluginSource:
    if id(plugin) in _SOURCES:
        return _SOURCES[id(plugin)]
    name = pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
    return PluginSource(name, "?", name)


def _label(source: PluginSource) -> str:
    return f"package '{source.distribution}' (entry point '{source.entry_point}')"


def _hook_registrations(kind: str, result: Any, source: PluginSource, problems: list[str]) -> list[Any]:
    """The usable registrations of one hook answer; each problem becomes one warning line.

    A bare registration is accepted (with a warning): what the author meant is unambiguous.
    None, a non-list, items of the wrong class and malformed registrations are skipped, so one
    broken plugin never stops the others or commands that do not need it."""
    hook, cls = _HOOK_OF_KIND[kind], _CLASS_OF_KIND[kind]
    where = f"mtcore plugin {_label(source)}: {hook}()"

    def problem(text: str) -> None:
        problems.append(f"{where} {text}")
        warnings.warn(f"{where} {text}", stacklevel=4)

    if isinstance(result, cls):
        warnings.warn(f"{where} returned a bare {cls.__name__}; accepted, but return a list of them", stacklevel=4)
        result = [result]
    if not isinstance(result, (list, tuple)):
        problem(f"returned {type(result).__name__}; expected a list of {cls.__name__} (nothing registered from it)")
        return []
    usable = []
    for item in result:
        if not isinstance(item, cls):
            problem(f"returned a {type(item).__name__} in its list; expected {cls.__name__} (skipped)")
            continue
        bad = hookspecs.registration_problem(item)
        if bad is not None:
            problem(f"registration skipped: {bad}")
            continue
        usable.append(item)
    return usable


@dataclass(frozen=True)
class _Choice:
    """One selectable ``type`` value of a kind, as the schema sees it (``.name``/``.registration``
    like :class:`Registered`): the name (or first unambiguous alias) of one registration, or an
    ambiguous label whose use is refused with the clash message."""

    name: str
    registration: Any


@dataclass(frozen=True)
class _SchemaView:
    name: str
    arguments: Any
    aliases: tuple[str, ...] = ()
    doc: str = ""


class Registry:
    """Everything the registered plugins provide, by kind and name (aliases resolved).

    A label (name or alias) registered by two entries is *ambiguous*: listed, but resolving it
    raises a :class:`PluginError` naming both distributions; every other label works."""

    def __init__(self, entries: Iterable[Registered], problems: Iterable[str] = ()):
        self._entries: dict[str, list[Registered]] = {kind: [] for kind in KINDS}
        self._owners: dict[str, dict[str, list[Registered]]] = {kind: {} for kind in KINDS}
        self.problems: list[str] = list(problems)
        for entry in entries:
            self._entries[entry.kind].append(entry)
            for label in dict.fromkeys((entry.name, *entry.aliases)):
                self._owners[entry.kind].setdefault(label, []).append(entry)

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> "Registry":
        entries: list[Registered] = []
        problems: list[str] = []
        for kind in KINDS:
            hook = getattr(pm.hook, _HOOK_OF_KIND[kind])
            for impl in hook.get_hookimpls():
                source = _source_of(pm, impl.plugin)
                try:
                    result = impl.function()
                except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the others
                    text = (str(exc).strip().splitlines() or [""])[0]
                    message = f"mtcore plugin {_label(source)}: {_HOOK_OF_KIND[kind]}() failed and is skipped: {type(exc).__name__}: {text}"
                    problems.append(message)
                    warnings.warn(message, stacklevel=2)
                    continue
                accepted = _hook_registrations(kind, result, source, problems)
                if os.environ.get("MTCORE_TRACE_HOOKS"):
                    # each implementation is called here, one by one (so a broken one cannot stop
                    # the rest), not through pm.hook, so pluggy's own tracing never sees the call
                    names = ", ".join(r.name for r in accepted) or "nothing"
                    print(f"mtcore hook {_HOOK_OF_KIND[kind]}() of {_label(source)} -> {names}", file=sys.stderr)
                for registration in accepted:
                    entries.append(Registered(kind, registration, source))
        return cls(entries, problems)

    # -- ambiguity ---------------------------------------------------------------------------
    def clashes(self, kind: str) -> dict[str, list[Registered]]:
        """Ambiguous labels of ``kind`` → the entries that register them."""
        return {label: owners for label, owners in self._owners[kind].items() if len(owners) > 1}

    def clash_note(self, entry: Registered) -> str:
        """'' or a short note for ``list-plugins``: which of its labels other packages also register."""
        notes = []
        for label in dict.fromkeys((entry.name, *entry.aliases)):
            others = [o.source.distribution for o in self._owners[entry.kind].get(label, []) if o is not entry]
            if others:
                notes.append(f"'{label}' also in {', '.join(others)}")
        return "ambiguous: " + "; ".join(notes) if notes else ""

    def clash_message(self, kind: str, label: str) -> str:
        owners = self._owners[kind][label]
        listed = " and ".join(f"{_label(o.source)} {o.source.version}" for o in owners)
        return (f"{kind} '{label}' is registered by more than one package: {listed}; "
                f"uninstall one of them (or select entry points with MTCORE_PLUGINS)")

    def _tag(self, entry: Registered) -> Optional[str]:
        """The label that selects ``entry``: its name, or its first unambiguous alias."""
        for label in (entry.name, *entry.aliases):
            if len(self._owners[entry.kind][label]) == 1:
                return label
        return None

    # -- lookup ------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return [tag for tag in (self._tag(e) for e in self._entries[kind]) if tag is not None]

    def entries(self, kind: Optional[str] = None) -> list[Registered]:
        """Every registration (ambiguous ones included), for listing."""
        kinds = [kind] if kind else list(KINDS)
        return [entry for k in kinds for entry in self._entries[k]]

    def choices(self, kind: str) -> list[_Choice]:
        """What the schema offers for ``type``: one choice per selectable entry (aliases that are
        ambiguous dropped), plus one per ambiguous label that accepts the keys of every owner and
        refuses its use with the clash message. So an ambiguous name never breaks the schema of
        an input that does not use it."""
        from dargs import Argument

        out: list[_Choice] = []
        for entry in self._entries[kind]:
            tag = self._tag(entry)
            if tag is None:
                continue
            reg = entry.registration
            aliases = tuple(a for a in (entry.name, *entry.aliases) if a != tag and len(self._owners[kind][a]) == 1)
            out.append(_Choice(tag, _SchemaView(tag, reg.arguments, aliases, getattr(reg, "doc", ""))))
        for label, owners in self.clashes(kind).items():
            message = self.clash_message(kind, label)

            def refuse(_value: Any, message: str = message) -> bool:
                raise PluginError(message)

            def arguments(ctx: Any, owners: list[Registered] = owners, refuse: Any = refuse) -> list:
                merged: dict[str, Any] = {}
                for owner in owners:
                    for argument in owner.registration.arguments(ctx) if hasattr(owner.registration, "arguments") else []:
                        merged.setdefault(argument.name, argument)
                sentinel = Argument("mtcore_ambiguous_type", [type(None)], optional=True, default=None, extra_check=refuse)
                return [*merged.values(), sentinel]

            out.append(_Choice(label, _SchemaView(label, arguments, (), f"ambiguous: {message}")))
        return out

    def lookup(self, kind: str, name: str) -> Optional[Registered]:
        """The entry ``name`` selects, None when nothing registers it; ambiguous → PluginError."""
        owners = self._owners[kind].get(name)
        if not owners:
            return None
        if len(owners) > 1:
            raise PluginError(self.clash_message(kind, name))
        return owners[0]

    def entry(self, kind: str, name: str) -> Registered:
        """Like :meth:`lookup`, but an unknown name is an error listing what is registered."""
        found = self.lookup(kind, name)
        if found is None:
            known = ", ".join(sorted(self.names(kind))) or "none"
            skipped = f" ({len(self.problems)} plugin hook(s) were skipped; see the warnings)" if self.problems else ""
            raise PluginError(f"unknown {kind} type '{name}'; registered: {known}{skipped}")
        return found

    def canonical(self, kind: str, name: str) -> str:
        """The label that selects what ``name`` selects (its name unless that is ambiguous)."""
        tag = self._tag(self.entry(kind, name))
        assert tag is not None  # the entry is selectable through ``name``
        return tag

    def get(self, kind: str, name: str) -> Any:
        """The registration of ``name`` (or an alias) of ``kind``."""
        return self.entry(kind, name).registration

    def source(self, kind: str, name: str) -> PluginSource:
        return self.entry(kind, name).source

    def loader_entry_for(self, path: Any) -> Optional[Registered]:
        """The data loader that recognises ``path`` (None if none). Every loader is asked: when
        two claim the same path (two packages reading ``.npz``), which one reads it would depend
        on the order packages happen to be found, so that is an error naming both, as is a
        loader whose name another package registers too."""
        claims = [entry for entry in self._entries["data_loader"] if entry.registration.detect(path)]
        for entry in claims:
            if self._tag(entry) != entry.name:
                raise PluginError(f"{path}: {self.clash_message('data_loader', entry.name)}")
        if len(claims) > 1:
            listed = " and ".join(f"'{e.name}' from {_label(e.source)}" for e in claims)
            raise PluginError(f"{path}: more than one data loader reads it: {listed}; uninstall one of them "
                              f"(or select entry points with MTCORE_PLUGINS)")
        return claims[0] if claims else None

    def loader_for(self, path: Any) -> Optional[Any]:
        """The registration of :meth:`loader_entry_for`."""
        entry = self.loader_entry_for(path)
        return None if entry is None else entry.registration


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry of installed plugins (built on first use)."""
    return Registry.from_plugin_manager(make_plugin_manager())
