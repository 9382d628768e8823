"""The plugin kernel: discovery through entry points, the registry, conflicts and failures."""

from __future__ import annotations

import importlib.metadata as metadata
import types

import pluggy
import pytest
from dargs import Argument

from mtcore import hookspecs, plugins
from mtcore.errors import PluginError
from mtcore.hookspecs import DescriptorRegistration, hookimpl
from mtcore.plugins import PluginSource, Registered, Registry, get_registry
from mtcore.schema import check, input_argument


def test_builtins_come_through_the_entry_point_group():
    registry = get_registry()
    for kind, name in [("descriptor", "se_e2_a"), ("fitting_net", "ener"), ("loss", "ener"), ("data_loader", "deepmd/npy")]:
        entry = next(e for e in registry.entries(kind) if e.name == name)
        assert entry.source.distribution == "mtcore"
        assert entry.source.entry_point  # registered under an entry-point name, not imported by the core
    assert registry.canonical("descriptor", "se_a") == "se_e2_a"


def _toy_registration(name: str, aliases=()):
    return DescriptorRegistration(
        name=name,
        aliases=tuple(aliases),
        arguments=lambda ctx: [Argument("width", int, optional=True, default=3)],
        build=lambda params, ctx: None,
    )


def test_same_name_from_two_distributions_is_an_error_naming_both():
    a = Registered("descriptor", _toy_registration("toy"), PluginSource("pkg-alpha", "1.0", "toy"))
    b = Registered("descriptor", _toy_registration("other", aliases=["toy"]), PluginSource("pkg-beta", "2.0", "other"))
    registry = Registry([a, b])  # building works: only using the ambiguous name fails
    assert registry.get("descriptor", "other") is b.registration
    with pytest.raises(PluginError) as info:
        registry.get("descriptor", "toy")
    assert "pkg-alpha" in str(info.value) and "pkg-beta" in str(info.value) and "'toy'" in str(info.value)


def test_a_plugin_that_fails_to_import_warns_and_the_rest_load(monkeypatch):
    broken = metadata.EntryPoint(name="broken", value="mtcore_no_such_module_xyz", group="mtcore")
    real = plugins._entry_points()
    monkeypatch.setattr(plugins, "_entry_points", lambda: real + [broken])
    with pytest.warns(UserWarning, match="broken"):
        pm = plugins.make_plugin_manager()
    registry = Registry.from_plugin_manager(pm)
    assert "se_e2_a" in registry.names("descriptor")


def test_a_third_party_plugin_gets_schema_validation_and_defaults():
    module = types.ModuleType("toy_plugin")

    @hookimpl
    def mtcore_descriptors():
        return [_toy_registration("toy_descriptor")]

    module.mtcore_descriptors = mtcore_descriptors
    pm = plugins.make_plugin_manager()
    pm.register(module, name="toy")
    registry = Registry.from_plugin_manager(pm)
    doc = {
        "model": {"type_map": ["O"], "descriptor": {"type": "toy_descriptor"}, "fitting_net": {}},
        "training": {"training_data": {"systems": ["x"]}, "numb_steps": 1},
    }
    normalized = check(input_argument(registry), doc)
    assert normalized["model"]["descriptor"]["width"] == 3
    doc["model"]["descriptor"]["widht"] = 4
    with pytest.raises(Exception, match="Did you mean: width"):
        check(input_argument(registry), doc)


def test_hookspecs_module_is_the_contract():
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    assert {"mtcore_descriptors", "mtcore_fittings", "mtcore_losses", "mtcore_data_loaders"} <= {
        name for name in dir(pm.hook) if name.startswith("mtcore_")
    }
    for name in ("mtcore_descriptors", "mtcore_fittings", "mtcore_losses", "mtcore_data_loaders"):
        assert getattr(hookspecs, name).__doc__


def test_trace_hooks_names_each_hook_call_and_what_it_registered(monkeypatch, capsys):
    monkeypatch.setenv("MTCORE_TRACE_HOOKS", "1")
    Registry.from_plugin_manager(plugins.make_plugin_manager())
    lines = capsys.readouterr().err.splitlines()
    assert any("mtcore_descriptors()" in line and "'se_e2_a'" in line and line.endswith("-> se_e2_a") for line in lines), lines
    assert any("mtcore_data_loaders()" in line and "deepmd/npy" in line for line in lines), lines
    monkeypatch.delenv("MTCORE_TRACE_HOOKS")
    Registry.from_plugin_manager(plugins.make_plugin_manager())
    assert "mtcore hook" not in capsys.readouterr().err
