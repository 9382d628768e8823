"""The plugin contract seen from outside: plugins come as real (fake) distributions found through
importlib.metadata (a ``*.dist-info`` folder with ``entry_points.txt`` on sys.path / PYTHONPATH),
so names, versions and entry points are what a user's installed packages would give.

Checked: hook answers and builder results (one line naming the distribution, never a
traceback), a name registered by two distributions (refused only where used), and provenance
(recorded in checkpoints and frozen files, a missing plugin named on load)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import SE_E2_A, WATER, fake_distribution, small_input, write_input
from mtcore import provenance
from mtcore.config import normalize
from mtcore.data.loading import load_system
from mtcore.errors import MtcoreError, PluginError
from mtcore.hookspecs import DescriptorRegistration
from mtcore.model.build import build_losses, build_model
from mtcore.plugins import PluginSource, Registered, Registry, get_registry
from mtcore.train.checkpoint import DIGEST_KEY, load_checkpoint, state_digest

MTCORE = [sys.executable, "-m", "mtcore.cli"]

# A descriptor package that re-registers the built-in se_e2_a under its own name: a real,
# scriptable descriptor that only this distribution provides.
TOY_DESCRIPTOR = """
import dataclasses
from mtcore.hookspecs import hookimpl
from mtcore_builtins.descriptors import se_e2_a as _base

@hookimpl
def mtcore_descriptors():
    return [dataclasses.replace(r, name="toy_se_a", aliases=()) for r in _base.mtcore_descriptors()]
"""


def cli(args, cwd, pythonpath=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="250")
    env.pop("MTCORE_PLUGINS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(pythonpath) if pythonpath else "", env.get("PYTHONPATH", "")] if p)
    return subprocess.run(MTCORE + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _error_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert lines and lines[-1].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


# -- hook answers -----------------------------------------------------------------------------
SLOPPY = """
import dataclasses
from mtcore.hookspecs import LossRegistration, hookimpl
from mtcore_builtins.descriptors import se_e2_a as _base
from mtcore_builtins.losses import ener as _ener

@hookimpl
def mtcore_descriptors():          # a bare registration, not a list
    return dataclasses.replace(_base.mtcore_descriptors()[0], name="bare_se_a", aliases=())

@hookimpl
def mtcore_fittings():             # forgot the return
    pass

@hookimpl
def mtcore_losses():               # one good item, one of the wrong class
    return [dataclasses.replace(_ener.mtcore_losses()[0], name="kept_loss", aliases=()), "ener2"]

@hookimpl
def mtcore_data_loaders():
    raise RuntimeError("cannot find my C extension")
"""

TYPO = """
from mtcore.hookspecs import DescriptorRegistration, hookimpl

@hookimpl
def mtcore_descriptors():
    return [DescriptorRegistration(name="typo", aliases="ty", arguments=lambda ctx: [], build=lambda p, c: None)]
"""


def test_hook_answers_are_checked_one_line_naming_the_distribution(tmp_path, installed_plugins):
    fake_distribution(tmp_path, "pkg-sloppy", "0.3", SLOPPY, entry_point="sloppy")
    fake_distribution(tmp_path, "pkg-typo", "1.0", TYPO, entry_point="typo")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = installed_plugins(tmp_path)
    messages = [str(w.message) for w in caught]
    for message in messages:
        assert "\n" not in message
    mine = [m for m in messages if "pkg-sloppy" in m]
    assert any("entry point 'sloppy'" in m and "bare DescriptorRegistration; accepted" in m for m in mine), messages
    assert any("mtcore_fittings() returned NoneType; expected a list of FittingRegistration" in m for m in mine), messages
    assert any("mtcore_losses() returned a str in its list; expected LossRegistration" in m for m in mine), messages
    assert any("mtcore_data_loaders() failed and is skipped: RuntimeError: cannot find my C extension" in m for m in mine), messages
    assert any("pkg-typo" in m and "aliases must be a list or tuple of strings" in m for m in messages), messages
    # the usable parts are registered, the broken ones are not, the built-ins are untouched
    assert registry.source("descriptor", "bare_se_a").distribution == "pkg-sloppy"
    assert registry.source("loss", "kept_loss").version == "0.3"
    assert "typo" not in registry.names("descriptor") and "se_e2_a" in registry.names("descriptor")
    loaders = registry.names("data_loader")  # other installed packages' loaders may be listed too
    assert "deepmd/npy" in loaders and all(registry.source("data_loader", n).distribution != "pkg-sloppy" for n in loaders)
    with pytest.raises(PluginError, match=r"unknown descriptor type 'typo'; registered: .*plugin hook\(s\) were skipped"):
        registry.get("descriptor", "typo")


BAD_BUILDERS = """
import torch
from mtcore.hookspecs import DescriptorRegistration, FittingRegistration, LossRegistration, hookimpl

@hookimpl
def mtcore_descriptors():
    return [DescriptorRegistration(name="none_desc", arguments=lambda ctx: [], build=lambda p, c: None)]

@hookimpl
def mtcore_fittings():
    return [FittingRegistration(name="linear_fit", arguments=lambda ctx: [], build=lambda p, c: torch.nn.Linear(2, 1))]

@hookimpl
def mtcore_losses():
    return [LossRegistration(name="dict_loss", arguments=lambda ctx: [], build=lambda p, c: {"e": 1.0})]
"""


def test_builders_returning_the_wrong_kind_are_named(tmp_path, installed_plugins):
    fake_distribution(tmp_path, "pkg-badbuild", "1.2", BAD_BUILDERS, entry_point="bad")
    registry = installed_plugins(tmp_path)
    cases = [
        (small_input(tmp_path, descriptor={"type": "none_desc"}), build_model,
         r"^model/descriptor: descriptor 'none_desc' from package 'pkg-badbuild' 1.2 \(entry point 'bad'\): its build\(\) "
         r"returned None; expected an instance of mtcore.model.descriptor.Descriptor \(a torch.nn.Module\)$"),
        (small_input(tmp_path, fitting={"type": "linear_fit"}), build_model,
         r"^fitting_net 'linear_fit' from package 'pkg-badbuild' 1.2 \(entry point 'bad'\): its build\(\) returned a "
         r"torch.nn.modules.linear.Linear; expected an instance of mtcore.model.fitting.Fitting \(a torch.nn.Module\)$"),
    ]
    for doc, action, pattern in cases:
        config = normalize(doc, tmp_path, registry)
        with pytest.raises(MtcoreError, match=pattern):
            action(config, registry)
    doc = small_input(tmp_path)
    doc["loss"] = {"type": "dict_loss"}
    config = normalize(doc, tmp_path, registry)
    model = build_model(config, registry)
    with pytest.raises(MtcoreError, match=r"^loss 'dict_loss' from package 'pkg-badbuild' 1.2 .*returned a builtins.dict; "
                                          r"expected an instance of mtcore.model.loss.Loss$"):
        build_losses(config, model, registry)


# -- one name, two distributions --------------------------------------------------------------
TWIN_LOADER = """
from pathlib import Path
from mtcore.hookspecs import DataLoaderRegistration, hookimpl

@hookimpl
def mtcore_data_loaders():
    return [DataLoaderRegistration(name="twin", detect=lambda p: (Path(p) / "twin.marker").is_file(),
                                   load=lambda *a: None)]
"""


def _clashing(root: Path) -> None:
    for dist in ("pkg-alpha", "pkg-beta"):
        fake_distribution(root, dist, "1.0", TOY_DESCRIPTOR, entry_point="toy")
        fake_distribution(root, dist.replace("pkg", "loader"), "2.0", TWIN_LOADER, entry_point="twin")


def test_a_name_two_distributions_register_is_refused_only_where_used(tmp_path, installed_plugins):
    _clashing(tmp_path / "site")
    registry = installed_plugins(tmp_path / "site")
    # inputs that do not use the name: schema, hybrid members, building, data loading all work
    config = normalize(small_input(tmp_path), tmp_path, registry)
    assert config.model["descriptor"]["type"] == "se_e2_a"
    hybrid = normalize(small_input(tmp_path, descriptor={"type": "hybrid", "list": [copy.deepcopy(SE_E2_A)]}), tmp_path, registry)
    assert hybrid.model["descriptor"]["list"][0]["type"] == "se_e2_a"
    assert load_system(WATER / "data_0", ["O", "H"], [], "set", registry).nframes > 0
    # using it: one line listing both distributions
    with pytest.raises(MtcoreError) as info:
        normalize(small_input(tmp_path, descriptor=dict(SE_E2_A, type="toy_se_a")), tmp_path, registry)
    text = str(info.value)
    assert "\n" not in text and "descriptor 'toy_se_a' is registered by more than one package" in text
    assert "package 'pkg-alpha'" in text and "package 'pkg-beta'" in text
    with pytest.raises(MtcoreError, match=r"^model/descriptor: descriptor 'toy_se_a' is registered by more than one package: .*pkg-alpha"):
        build_model(config.__class__(config.multi_task, dict(config.document, model=dict(
            config.model, descriptor=dict(config.model["descriptor"], type="toy_se_a"))), config.heads), registry)
    twin = tmp_path / "twin_system"
    twin.mkdir()
    (twin / "twin.marker").write_text("")
    with pytest.raises(MtcoreError, match=r"twin_system: data_loader 'twin' is registered by more than one package: .*loader-alpha.*loader-beta"):
        load_system(twin, ["O", "H"], [], "set", registry)
    notes = [registry.clash_note(e) for e in registry.entries("descriptor") if e.name == "toy_se_a"]
    assert len(notes) == 2 and any("also in pkg-beta" in n for n in notes) and any("also in pkg-alpha" in n for n in notes)
    assert registry.clash_note(next(e for e in registry.entries("descriptor") if e.name == "se_e2_a")) == ""


def test_cli_with_an_ambiguous_name_lists_both_and_refuses_only_its_use(tmp_path):
    site = tmp_path / "site"
    _clashing(site)
    listed = cli(["list-plugins"], tmp_path, site)
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if "toy_se_a" in line]
    assert len(rows) == 2 and all("(!)" in row for row in rows), listed.stdout
    assert any("pkg-alpha" in row for row in rows) and any("pkg-beta" in row for row in rows)
    assert "se_e2_a " in listed.stdout and "(!)" not in next(l for l in listed.stdout.splitlines() if "se_e2_a " in l)
    assert cli(["--help"], tmp_path, site).returncode == 0
    write_input(tmp_path, small_input(tmp_path, descriptor=dict(SE_E2_A, type="toy_se_a")))
    line = _error_line(cli(["train", "input.json"], tmp_path, site))
    assert "toy_se_a" in line and "pkg-alpha" in line and "pkg-beta" in line


# -- provenance -------------------------------------------------------------------------------
def _registry(*entries: tuple[str, str, str, str]) -> Registry:
    return Registry([
        Registered(kind, DescriptorRegistration(name=name, arguments=lambda ctx: [], build=lambda p, c: None),
                   PluginSource(dist, version, name))
        for kind, name, dist, version in entries
    ])


def _record(*components: tuple[str, str, str, str]) -> dict:
    return {"plugin_api_version": 1, "components": [
        {"kind": k, "name": n, "distribution": d, "version": v, "entry_point": n} for k, n, d, v in components]}


def test_provenance_check_names_missing_older_and_different_providers():
    registry = _registry(("descriptor", "toy", "pkg-toy", "1.0"), ("descriptor", "moved", "pkg-new", "5.0"))
    provenance.check(None, registry, "old.pt")  # files from before provenance pass
    provenance.check(_record(("descriptor", "toy", "pkg-toy", "1.0")), registry, "same.pt")
    provenance.check(_record(("descriptor", "toy", "pkg_Toy", "0.9")), registry, "newer.pt")  # names compare normalised
    with pytest.raises(PluginError, match=r"^a.pt: needs descriptor 'gone' from package 'pkg-gone-xyz' >= 3.1 \(not installed\)$"):
        provenance.check(_record(("descriptor", "gone", "pkg-gone-xyz", "3.1")), registry, "a.pt")
    with pytest.raises(PluginError, match=r"needs fitting net 'gone' from package 'pluggy' >= 99 \(pluggy \S+ is installed but provides no fitting net 'gone'\)"):
        provenance.check(_record(("fitting_net", "gone", "pluggy", "99")), registry, "b.pt")
    with pytest.warns(UserWarning, match=r"c.pt: descriptor 'toy' was saved with 'pkg-toy' 1.10; the installed 1.0 is older"):
        provenance.check(_record(("descriptor", "toy", "pkg-toy", "1.10")), registry, "c.pt")
    with pytest.warns(UserWarning, match=r"came from package 'pkg-old' 1.0 when saved; now 'pkg-new' 5.0 provides it"):
        provenance.check(_record(("descriptor", "moved", "pkg-old", "1.0")), registry, "d.pt")
    loader = _record(("data_loader", "h5", "pkg-h5-xyz", "2"))
    provenance.check(loader, registry, "e.pt")  # data loaders are not checked unless asked
    with pytest.warns(UserWarning, match=r"needs data loader 'h5' from package 'pkg-h5-xyz' >= 2 \(not installed\)"):
        provenance.check(loader, registry, "e.pt", ("data_loader",), missing_is_error=False)


def test_checkpoints_and_frozen_files_record_and_check_provenance(tmp_path, installed_plugins):
    from mtcore.freeze import freeze
    from mtcore.train.trainer import Trainer
    from test_training import QUIET

    site_new, site_old = tmp_path / "site-new", tmp_path / "site-old"
    fake_distribution(site_new, "pkg-toy", "2.0", TOY_DESCRIPTOR, entry_point="toy")
    fake_distribution(site_old, "pkg-toy", "1.5", TOY_DESCRIPTOR, entry_point="toy")
    registry = installed_plugins(site_new)
    case = tmp_path / "case"
    case.mkdir()
    doc = small_input(case, descriptor=dict(SE_E2_A, type="toy_se_a"), numb_steps=2, disp_freq=1, save_freq=2)
    Trainer(normalize(doc, case, registry), case, QUIET, registry=registry).run()
    state = load_checkpoint(case / "model.ckpt.pt")
    components = {(c["kind"], c["name"]): (c["distribution"], c["version"]) for c in state["provenance"]["components"]}
    import mtcore

    assert components == {
        ("descriptor", "toy_se_a"): ("pkg-toy", "2.0"),
        ("fitting_net", "ener"): ("mtcore", mtcore.__version__),
        ("loss", "ener"): ("mtcore", mtcore.__version__),
        ("data_loader", "deepmd/npy"): ("mtcore", mtcore.__version__),
    }
    frozen = freeze(state, case / "frozen.pth")[0]
    extra = {"mtcore.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch marks TorchScript deprecated
        torch.jit.load(str(frozen), _extra_files=extra)
    meta = json.loads(extra["mtcore.json"])
    assert meta["provenance"]["components"][0] == {"kind": "descriptor", "name": "toy_se_a", "distribution": "pkg-toy",
                                                   "version": "2.0", "entry_point": "toy"}
    assert ("data_loader", "deepmd/npy") in {(c["kind"], c["name"]) for c in meta["provenance"]["components"]}

    # without the plugin: every command that rebuilds the model names the package to install
    needs = "needs descriptor 'toy_se_a' from package 'pkg-toy' >= 2.0 (not installed)"
    assert needs in _error_line(cli(["freeze", "-c", "model.ckpt.pt", "-o", "again.pth"], case))
    assert not (case / "again.pth").exists()
    assert needs in _error_line(cli(["train", "--restart", "model.ckpt.pt"], case))
    write_input(case, small_input(case, numb_steps=1), "init.json")
    assert needs in _error_line(cli(["train", "init.json", "--init-model", "frozen.pth"], case))
    shown = cli(["show", "model.ckpt.pt"], case)  # show needs no plugin
    assert shown.returncode == 0, shown.stderr
    assert "provided by: descriptor 'toy_se_a': pkg-toy 2.0" in shown.stdout
    assert "provided by: descriptor 'toy_se_a': pkg-toy 2.0" in cli(["show", "frozen.pth"], case).stdout
    # an older version installed: works, with a warning
    older = cli(["freeze", "-c", "model.ckpt.pt", "-o", "older.pth"], case, site_old)
    assert older.returncode == 0, older.stderr
    assert "descriptor 'toy_se_a' was saved with 'pkg-toy' 2.0; the installed 1.5 is older" in older.stderr
    assert (case / "older.pth").is_file()


def test_a_checkpoint_from_before_provenance_still_loads(tmp_path):
    from mtcore.freeze import freeze
    from mtcore.train.trainer import Trainer
    from test_training import QUIET

    doc = small_input(tmp_path, numb_steps=2, disp_freq=1, save_freq=2)
    Trainer(normalize(doc, tmp_path, get_registry()), tmp_path, QUIET).run()
    state = torch.load(tmp_path / "model.ckpt.pt", weights_only=False)
    assert state["provenance"]["components"]
    del state["provenance"]
    state[DIGEST_KEY] = state_digest(state)
    old = tmp_path / "old.pt"
    torch.save(state, old)
    loaded = load_checkpoint(old)
    assert "provenance" not in loaded
    assert freeze(loaded, tmp_path / "old.pth")[0].is_file()


# -- plugin API versions ----------------------------------------------------------------------
def _versioned_toy(name: str, api_line: str) -> str:
    return f"""
import dataclasses
from mtcore.hookspecs import hookimpl
from mtcore_builtins.descriptors import se_e2_a as _base
{api_line}

@hookimpl
def mtcore_descriptors():
    return [dataclasses.replace(r, name="{name}", aliases=()) for r in _base.mtcore_descriptors()]
"""


def test_plugin_api_versions_v1_kept_newer_refused_in_one_line(tmp_path, installed_plugins):
    """A module without MTCORE_PLUGIN_API is a v1 plugin and keeps working; one written for a
    newer API than this mtcore's is skipped with one warning saying to upgrade; a malformed
    declaration is skipped naming the value. The others load regardless."""
    from mtcore.hookspecs import PLUGIN_API_VERSION

    assert PLUGIN_API_VERSION == 2
    fake_distribution(tmp_path, "old-pkg", "1.0", _versioned_toy("old_desc", ""), "old")
    fake_distribution(tmp_path, "cur-pkg", "1.0", _versioned_toy("cur_desc", "MTCORE_PLUGIN_API = 2"), "cur")
    fake_distribution(tmp_path, "future-pkg", "3.0", _versioned_toy("future_desc", "MTCORE_PLUGIN_API = 3"), "future")
    fake_distribution(tmp_path, "odd-pkg", "1.0", _versioned_toy("odd_desc", "MTCORE_PLUGIN_API = '2'"), "odd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = installed_plugins(tmp_path)
    names = registry.names("descriptor")
    assert "old_desc" in names and "cur_desc" in names
    assert "future_desc" not in names and "odd_desc" not in names
    assert registry.source("descriptor", "old_desc").api == 1
    assert registry.source("descriptor", "cur_desc").api == 2
    texts = [str(w.message) for w in caught]
    future = [t for t in texts if "future-pkg" in t]
    assert len(future) == 1 and "plugin API v3" in future[0] and "v2" in future[0] and "upgrade mtcore" in future[0]
    assert "\n" not in future[0]
    odd = [t for t in texts if "odd-pkg" in t]
    assert len(odd) == 1 and "MTCORE_PLUGIN_API must be a positive integer" in odd[0]
    # the built-ins declare the current API
    assert registry.source("descriptor", "se_e2_a").api == PLUGIN_API_VERSION
