"""The whole plugin contract of mtcore.

A plugin is a module (or object) with functions marked ``@hookimpl`` and is found through the
``mtcore`` entry-point group: in the plugin's ``pyproject.toml``::

    [project.entry-points.mtcore]
    my_descriptor = "my_package.my_descriptor"

mtcore's own descriptors, fitting nets, losses and the ``deepmd/npy`` loader register through this
very group, so everything they can do a third-party plugin can do too.

Each hook returns a list of *registrations*. A registration carries the component's name, its
aliases, its dargs argument schema (the core assembles the input schema from all of them, so a
plugin's keys get validation, defaults, aliases and "did you mean" suggestions for free) and its
builder. The objects the builders return follow the base classes named below:

* descriptors: :class:`mtcore.model.descriptor.Descriptor`
* fitting nets: :class:`mtcore.model.fitting.Fitting`
* losses: :class:`mtcore.model.loss.Loss`
* data loaders return :class:`mtcore.data.system.SystemData`

Modules built by plugins must be TorchScript-scriptable: ``mtcore freeze`` scripts the model so
that plain ``torch`` can load it without mtcore installed.

What the core checks (one line naming the plugin's distribution and entry point, never a
traceback):

* every hook returns a *list* (or tuple) of registrations of its own class. A bare registration
  is accepted with a warning (the intent is unambiguous); ``None``, another type, or an item of
  the wrong class skips that item or hook with a warning, so one broken plugin never stops the
  others or unrelated commands. A hook that raises is skipped the same way.
* a registration has a non-empty string ``name``, ``aliases`` as a list/tuple of strings (a bare
  string is refused: it would be read letter by letter) and callables where callables are due.
* builders return instances of the base classes above (``torch.nn.Module`` subclasses);
  anything else is an error naming the input section, the component and its distribution.
* a name (or alias) registered by two distributions is *ambiguous*: commands that do not use
  it are unaffected, and using it is an error listing both distributions.

Checkpoints and frozen files record which distribution (and version) provided each component
used (see :mod:`mtcore.provenance`), so a missing plugin is named when they are loaded.

Versions: an entry-point module states the plugin API it was written for with a module-level
``MTCORE_PLUGIN_API = 2``. A module without it is a v1 plugin and keeps working (v2 only added
fields whose defaults are v1's behaviour); a module asking for a newer API than this mtcore's
:data:`PLUGIN_API_VERSION` is skipped with one warning saying to upgrade mtcore.

* v1: the four hooks, registrations and contexts above.
* v2: ``OutputDef.reduction`` ("sum" | "mean" | "none": extensive, intensive and per-atom-only
  heads) and the public per-type fitting MLP :class:`mtcore.model.fitting_net.TypeFittingNet`,
  whose ``layer_name`` sharing means the same tensors whichever package wrote the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import pluggy

if TYPE_CHECKING:  # pragma: no cover - imported for annotations only
    from dargs import Argument, Variant

    from mtcore.data.requirements import DataRequirement
    from mtcore.data.system import SystemData
    from mtcore.model.descriptor import Descriptor
    from mtcore.model.fitting import Fitting
    from mtcore.model.loss import Loss
    from mtcore.model.shared_layers import SharedLayerManager

PLUGIN_API_VERSION = 2
PROJECT_NAME = "mtcore"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --------------------------------------------------------------------------------------------
# Contexts: what the core hands to argument functions and builders
# --------------------------------------------------------------------------------------------


@dataclass
class SchemaContext:
    """Given to ``arguments`` functions while the core assembles the input schema.

    ``descriptor_variant(exclude)`` returns the dargs ``Variant`` over every registered
    descriptor except those named in ``exclude``; a composite descriptor (``hybrid``) uses it to
    validate its members without knowing them.
    """

    descriptor_variant: Callable[[Sequence[str]], "Variant"]


@dataclass
class NeighborStat:
    """Neighbour statistics over the training systems of all heads, pooled.

    ``max_count(rcut, mixed)`` returns the largest number of neighbours within ``rcut`` per
    neighbour type (a list of ``ntypes`` ints), or as one total when ``mixed`` is true.
    ``min_distance`` is the shortest interatomic distance seen.
    """

    max_count: Callable[[float, bool], list]
    min_distance: Callable[[], float]
    ntypes: int = 0


@dataclass
class DescriptorContext:
    """Given to a descriptor builder."""

    type_map: list[str]
    #: Builds another registered descriptor from its (normalised) parameters; for composites.
    build_descriptor: Callable[[dict], "Descriptor"]
    #: The normalised ``model/type_embedding`` section, or None when the input has none.
    type_embedding: Optional[dict] = None

    @property
    def ntypes(self) -> int:
        return len(self.type_map)


@dataclass
class FittingContext:
    """Given to a fitting-net builder: one call per head."""

    head: str
    type_map: list[str]
    descriptor: "Descriptor"
    #: Creates or looks up the layers named by ``layer_name``; see
    #: :class:`mtcore.model.shared_layers.SharedLayerManager`.
    layers: "SharedLayerManager"

    @property
    def ntypes(self) -> int:
        return len(self.type_map)


@dataclass
class LossContext:
    """Given to a loss builder: one call per head."""

    head: str
    fitting: "Fitting"
    start_lr: float


# --------------------------------------------------------------------------------------------
# Registrations: what the hooks return
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DescriptorRegistration:
    """A descriptor type, selected by ``model/descriptor/type``.

    ``arguments(ctx)`` returns the dargs arguments of the descriptor's section (without
    ``type``). ``build(params, ctx)`` receives the normalised section and returns a
    :class:`~mtcore.model.descriptor.Descriptor`. ``update_sel(params, stat)`` resolves
    ``sel: "auto"`` (and warns about a too small explicit ``sel``) from the pooled neighbour
    statistics before the model is built; ``None`` means the descriptor has no ``sel``.
    """

    name: str
    arguments: Callable[[SchemaContext], "list[Argument]"]
    build: Callable[[dict, DescriptorContext], "Descriptor"]
    aliases: tuple[str, ...] = ()
    doc: str = ""
    update_sel: Optional[Callable[[dict, NeighborStat], dict]] = None


@dataclass(frozen=True)
class FittingRegistration:
    """A fitting-net type (one head), selected by ``type`` in ``fitting_net``.

    ``default_loss`` is the loss section a head of this type gets when the input has none.
    """

    name: str
    arguments: Callable[[SchemaContext], "list[Argument]"]
    build: Callable[[dict, FittingContext], "Fitting"]
    default_loss: dict = field(default_factory=lambda: {"type": "ener"})
    aliases: tuple[str, ...] = ()
    doc: str = ""


@dataclass(frozen=True)
class LossRegistration:
    """A loss type, selected by ``type`` in ``loss`` / ``loss_dict`` entries."""

    name: str
    arguments: Callable[[SchemaContext], "list[Argument]"]
    build: Callable[[dict, LossContext], "Loss"]
    aliases: tuple[str, ...] = ()
    doc: str = ""


@dataclass(frozen=True)
class DataLoaderRegistration:
    """A data format on disk.

    ``detect(path)`` answers whether ``path`` is a system of this format (the core asks every
    loader, and two claiming one path is an error naming both; it also uses ``detect`` to find
    systems below a folder given as ``systems``). A system
    may be a folder (deepmd/npy) or a single file (one ``.npz``/``.h5``/extended-XYZ file per
    system): ``path`` is a file as well as a folder, both when named in ``systems`` or ``mtcore
    test -s/-f`` and for every file met while searching a folder (files inside a folder that is
    itself a system are not offered). So ``detect`` is called often and must return ``False``
    quickly, without reading the file and without raising, for any path it does not own (check
    the suffix or ``is_file()``/``is_dir()`` first; an ``OSError`` it raises skips that file
    with a warning during a search and is one error line for a path the user named).
    ``load(path, type_map, requirements, set_prefix)`` reads the system: every label named by a
    requirement if the file exists, an error naming the file if a required one is missing.
    Loaders only ever read.
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, "Optional[list[str]]", "list[DataRequirement]", str], "SystemData"]
    aliases: tuple[str, ...] = ()
    doc: str = ""


# --------------------------------------------------------------------------------------------
# Hook specifications
# --------------------------------------------------------------------------------------------


@hookspec
def mtcore_descriptors() -> "list[DescriptorRegistration]":
    """Return the descriptors this plugin provides.

    Called once when the registry is built. Return a list, even of one. A name (or alias)
    that another distribution also registers is ambiguous: an error listing both, raised only
    where an input, a checkpoint or a command uses that name.
    """


@hookspec
def mtcore_fittings() -> "list[FittingRegistration]":
    """Return the fitting-net types (heads) this plugin provides."""


@hookspec
def mtcore_losses() -> "list[LossRegistration]":
    """Return the loss types this plugin provides."""


@hookspec
def mtcore_data_loaders() -> "list[DataLoaderRegistration]":
    """Return the data formats this plugin can read."""


_CALLABLES = {
    "DescriptorRegistration": ("arguments", "build"),
    "FittingRegistration": ("arguments", "build"),
    "LossRegistration": ("arguments", "build"),
    "DataLoaderRegistration": ("detect", "load"),
}


def registration_problem(value: Any) -> Optional[str]:
    """What is wrong with a registration's fields, in words; None when it is usable.

    Checked when the registry is built, so a plugin mistake is named at once instead of
    surfacing as a traceback when the component is first used."""
    name = getattr(value, "name", None)
    if not isinstance(name, str) or not name.strip():
        return f"its name must be a non-empty string, got {name!r}"
    aliases = getattr(value, "aliases", ())
    if isinstance(aliases, str) or not isinstance(aliases, (list, tuple)):
        return f"'{name}': aliases must be a list or tuple of strings, got {aliases!r}"
    bad = [a for a in aliases if not isinstance(a, str) or not a.strip()]
    if bad:
        return f"'{name}': aliases must be non-empty strings, got {bad[0]!r}"
    for field_name in _CALLABLES.get(type(value).__name__, ()):
        if not callable(getattr(value, field_name, None)):
            return f"'{name}': {field_name} must be callable, got {getattr(value, field_name, None)!r}"
    update = getattr(value, "update_sel", None)
    if update is not None and not callable(update):
        return f"'{name}': update_sel must be callable or None, got {update!r}"
    return None


def describe(value: Any) -> str:
    """A short name for a registration's kind, used in messages and ``list-plugins``."""
    return {
        DescriptorRegistration: "descriptor",
        FittingRegistration: "fitting_net",
        LossRegistration: "loss",
        DataLoaderRegistration: "data_loader",
    }[type(value)]
