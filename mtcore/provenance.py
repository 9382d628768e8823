"""Provenance: which distribution (and version) provided each component a model was made of.

Checkpoints (``state["provenance"]``) and frozen files (their metadata) record, for every
descriptor, fitting net, loss and data loader used, the package that registered it. Loading a
checkpoint whose plugin is missing then names the package to install instead of failing in the
schema with "unknown type"; an installed version older than the recorded one, or a name now
provided by another package, gives a warning. Files from before provenance load as they are.

The record is plain JSON-able data, so it also travels in frozen files' metadata::

    {"plugin_api_version": 1,
     "components": [{"kind": "descriptor", "name": "se_e2_a",
                     "distribution": "mtcore", "version": "0.1.0", "entry_point": "se_e2_a"}, ...]}
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

from mtcore.errors import PluginError
from mtcore.hookspecs import PLUGIN_API_VERSION
from mtcore.plugins import Registered, Registry

MODEL_KINDS = ("descriptor", "fitting_net", "loss")
_WORDS = {"descriptor": "descriptor", "fitting_net": "fitting net", "loss": "loss", "data_loader": "data loader"}


def _descriptor_types(params: Any) -> list[str]:
    """The descriptor ``type`` of a section and of every nested member (``hybrid``'s list)."""
    found: list[str] = []
    if isinstance(params, dict):
        if isinstance(params.get("type"), str):
            found.append(params["type"])
        for value in params.values():
            if isinstance(value, (dict, list)):
                found += _descriptor_types(value)
    elif isinstance(params, list):
        for value in params:
            found += _descriptor_types(value)
    return found


def used_components(document: dict) -> list[tuple[str, str]]:
    """(kind, name) of every descriptor, fitting net and loss a normalised document selects."""
    model = document.get("model", {})
    used = [("descriptor", name) for name in _descriptor_types(model.get("descriptor"))]
    fittings = model.get("fitting_net_dict") or {"default": model.get("fitting_net") or {}}
    used += [("fitting_net", (f or {}).get("type", "ener")) for f in fittings.values()]
    if document.get("loss_dict"):
        used += [("loss", (document["loss_dict"].get(h) or {}).get("type", "ener")) for h in fittings]
    else:
        used.append(("loss", (document.get("loss") or {}).get("type", "ener")))
    return list(dict.fromkeys(used))


def _component(entry: Registered, name: str) -> dict:
    return {"kind": entry.kind, "name": name, "distribution": entry.source.distribution,
            "version": entry.source.version, "entry_point": entry.source.entry_point}


def record(document: dict, registry: Registry, data_paths: Iterable[Any] = (), loaders: Iterable[dict] = ()) -> dict:
    """The provenance of a model trained from ``document`` with ``registry``.

    ``data_paths`` are the systems read (their loaders are recorded); ``loaders`` are data-loader
    components recorded earlier (a frozen file keeps the ones its checkpoint used). A name that
    the registry does not know (a nested dict that only looks like a descriptor) is left out."""
    components: list[dict] = []
    for kind, name in used_components(document):
        try:
            entry = registry.lookup(kind, name)
        except PluginError:
            entry = None
        if entry is not None:
            components.append(_component(entry, name))
    seen: set[str] = set()
    for path in data_paths:
        entry = registry.loader_entry_for(Path(path))
        if entry is not None and entry.name not in seen:
            seen.add(entry.name)
            components.append(_component(entry, entry.name))
    for loader in loaders:
        if loader.get("kind") == "data_loader" and loader.get("name") not in seen:
            seen.add(loader.get("name"))
            components.append(dict(loader))
    return {"plugin_api_version": PLUGIN_API_VERSION, "components": components}


def of_trainer(trainer: Any) -> dict:
    """A trainer's provenance, computed once (its configuration and data do not change)."""
    cached = getattr(trainer, "_mtcore_provenance", None)
    if cached is None:
        paths = [system.path for head in trainer.trained for data in (trainer.heads[head].train, trainer.heads[head].valid)
                 if data is not None for system in data.systems]
        cached = record(trainer.config.document, trainer.registry, paths)
        trainer._mtcore_provenance = cached
    return cached


def _normal(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _installed(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def _older(installed: str, recorded: str) -> bool:
    """True when ``installed`` is a lower version than ``recorded``; False when either is unreadable."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(installed) < Version(recorded)
    except (InvalidVersion, TypeError):
        return False


def check(provenance: Optional[dict], registry: Registry, where: str, kinds: Iterable[str] = MODEL_KINDS,
          missing_is_error: bool = True) -> None:
    """Refuse (or, ``missing_is_error=False``, warn about) recorded components of ``kinds`` that no
    installed plugin provides, naming the package and version to install; warn when the provider
    is older than recorded or another package. ``None`` (a file from before provenance) passes."""
    if not isinstance(provenance, dict):
        return
    kinds = tuple(kinds)
    for item in provenance.get("components") or []:
        if not isinstance(item, dict) or item.get("kind") not in kinds:
            continue
        kind, name = item["kind"], str(item.get("name"))
        dist, version = str(item.get("distribution", "?")), str(item.get("version", "?"))
        word = _WORDS.get(kind, kind)
        entry = registry.lookup(kind, name)  # an ambiguous name raises, listing both packages
        if entry is None:
            installed = _installed(dist)
            state = "not installed" if installed is None else f"{dist} {installed} is installed but provides no {word} '{name}'"
            at_least = f" >= {version}" if version not in ("", "?") else ""
            message = f"{where}: needs {word} '{name}' from package '{dist}'{at_least} ({state})"
            if missing_is_error:
                raise PluginError(message)
            warnings.warn(message, stacklevel=2)
        elif _normal(entry.source.distribution) != _normal(dist):
            warnings.warn(f"{where}: {word} '{name}' came from package '{dist}' {version} when saved; now "
                          f"'{entry.source.distribution}' {entry.source.version} provides it", stacklevel=2)
        elif _older(entry.source.version, version):
            warnings.warn(f"{where}: {word} '{name}' was saved with '{dist}' {version}; the installed "
                          f"{entry.source.version} is older, so results may differ", stacklevel=2)


def lines(provenance: Optional[dict]) -> list[str]:
    """Human-readable lines for ``mtcore show`` (empty for files from before provenance)."""
    if not isinstance(provenance, dict):
        return []
    return [f"{_WORDS.get(c.get('kind'), c.get('kind'))} '{c.get('name')}': {c.get('distribution')} {c.get('version')}"
            for c in provenance.get("components") or [] if isinstance(c, dict)]
