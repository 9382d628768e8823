"""`mtcore doc-train-input`: the generated input reference, its docs/ copy, outside plugins, -o."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dargs import Argument

from mtcore.doc_input import (
    MARKER,
    generate,
    is_generated,
    only_distributions,
    reference,
    render_markdown,
    write_reference,
)
from mtcore.errors import MtcoreError
from mtcore.hookspecs import DescriptorRegistration, FittingRegistration, LossRegistration
from mtcore.plugins import PluginSource, Registered, Registry, get_registry
from mtcore.schema import check, descriptor_argument, fitting_argument, input_argument, loss_argument

ROOT = Path(__file__).resolve().parents[1]
DOCS_COPY = ROOT / "docs" / "input-reference.md"
REGENERATE = "mtcore doc-train-input -o docs/input-reference.md"


def builtin_registry() -> Registry:
    """mtcore's own plugins only: a plugin package in a developer's venv must not fail the docs check."""
    return only_distributions(get_registry(), ["mtcore"])


def _sections(markdown: str) -> dict[str, str]:
    """Heading title (the key path) → the text of its section."""
    parts = re.split(r"^### (.+)$", markdown, flags=re.M)
    return {parts[i].strip("`"): parts[i + 1] for i in range(1, len(parts), 2)}


def test_docs_copy_is_the_generated_reference():
    fresh = generate(builtin_registry())
    stored = DOCS_COPY.read_text(encoding="utf-8") if DOCS_COPY.exists() else ""
    if fresh != stored:
        diff = next(
            (f"line {i + 1}: docs has {a!r}, generated {b!r}"
             for i, (a, b) in enumerate(zip(stored.splitlines(), fresh.splitlines())) if a != b),
            f"docs has {len(stored.splitlines())} lines, generated {len(fresh.splitlines())}",
        )
        pytest.fail(
            f"docs/input-reference.md is stale ({diff}): run `{REGENERATE}` (add `--only mtcore` if other "
            "plugin packages are installed) and commit it"
        )


def test_every_registered_type_and_key_is_in_the_reference():
    registry = builtin_registry()
    ref = reference(registry)
    sections = _sections(render_markdown(ref))
    for kind, path in (("descriptor", "model/descriptor"), ("fitting_net", "model/fitting_net"), ("loss", "loss")):
        for entry in registry.entries(kind):
            body = sections[f"{path}[type={entry.name}]"]  # KeyError names the missing section
            assert f"Plugin `{entry.source.entry_point}` from distribution `mtcore`" in body
            for alias in entry.aliases:
                assert f"`{alias}`" in body
            for argument in entry.registration.arguments(_ctx(registry)):
                assert f"- `{argument.name}` (" in body, (entry.name, argument.name)
    for path in ("model/fitting_net_dict/<head>", "loss_dict/<head>", "learning_rate_dict/<head>",
                 "training/data_dict/<head>", "training/fitting_weight/<head>", "training/training_data",
                 "training/validation_data", "learning_rate", "learning_rate[type=exp]"):
        assert path in sections, path
    assert "`layer_name`" in sections["model/fitting_net[type=ener]"]
    assert "`fitting_weight`" in sections["training"] and "`data_dict`" in sections["training"]


def _ctx(registry: Registry):
    from mtcore.schema import schema_context

    return schema_context(registry)


def _choices(ref: dict, *path: str) -> dict:
    node = ref["input"]
    for key in path:
        node = node["fields"][key]
    return node["variants"]["type"]["choices"]


@pytest.mark.parametrize("kind,path,make", [
    ("descriptor", ("model", "descriptor"), descriptor_argument),
    ("fitting_net", ("model", "fitting_net"), fitting_argument),
    ("loss", ("loss",), loss_argument),
])
def test_documented_defaults_are_what_the_schema_fills_in(kind, path, make):
    """The JSON form against dargs' own normalisation: a default documented wrongly fails here."""
    registry = builtin_registry()
    choices = _choices(reference(registry), *path)
    compared = 0
    for name, choice in choices.items():
        fields = choice.get("fields", {})
        if any("default" not in f for f in fields.values()) or choice.get("variants"):
            continue  # needs keys without defaults (hybrid's list, tensor loss prefactors)
        filled = check(make(registry), {"type": name})
        for key, field in fields.items():
            assert filled[key] == field["default"], (name, key)
            compared += 1
        assert set(filled) - {"type"} == set(fields), name  # nothing filled in that is not documented
    assert compared >= 10


def test_types_optional_and_aliases_match_the_argument_tree():
    registry = builtin_registry()
    ref = reference(registry)

    def walk(argument: Argument, node: dict, where: str) -> int:
        count = 0
        assert sorted(node.get("fields", {})) == sorted(argument.sub_fields), where
        for name, sub in argument.sub_fields.items():
            doc = node["fields"][name]
            assert doc["optional"] == sub.optional and doc["alias"] == list(sub.alias), f"{where}/{name}"
            names = {"None" if t is type(None) else t.__name__ for t in sub.dtype}
            assert set(doc["type"].split(" | ")) == names, f"{where}/{name}"
            count += 1 + walk(sub, doc, f"{where}/{name}")
        for flag, variant in argument.sub_variants.items():
            documented = node["variants"][flag]["choices"]
            assert sorted(documented) == sorted(variant.choice_dict), where
            for name, choice in variant.choice_dict.items():
                count += walk(choice, documented[name], f"{where}[{flag}={name}]")
        return count

    assert walk(input_argument(registry), ref["input"], "") > 100


def test_output_is_deterministic_whatever_the_registration_order():
    registry = builtin_registry()
    reversed_registry = Registry(list(reversed(registry.entries())))
    assert generate(registry) == generate(reversed_registry)
    assert generate(registry, as_json=True) == generate(reversed_registry, as_json=True)
    text = generate(registry)
    assert text.splitlines()[0] == MARKER
    assert str(ROOT) not in text and str(Path.home()) not in text


def _toy_entries(distribution: str = "toy-plugin-pkg") -> list[Registered]:
    source = PluginSource(distribution, "1.0", "toy_ep")
    descriptor = DescriptorRegistration(
        name="toy_descriptor", aliases=("toy_d",), doc="a descriptor from outside",
        arguments=lambda ctx: [Argument("width", int, optional=True, default=3, doc="toy width")],
        build=lambda params, ctx: None,
    )
    fitting = FittingRegistration(
        name="toy_head", doc="a head from outside", build=lambda params, ctx: None,
        arguments=lambda ctx: [Argument("depth", int, optional=True, default=2, alias=["n_depth"])],
    )
    loss = LossRegistration(
        name="toy_loss", doc="a loss from outside", build=lambda params, ctx: None,
        arguments=lambda ctx: [Argument("pref_toy", float, doc="toy prefactor")],
    )
    return [Registered("descriptor", descriptor, source), Registered("fitting_net", fitting, source),
            Registered("loss", loss, source)]


def test_a_plugin_from_another_distribution_is_documented_and_labelled():
    registry = Registry(builtin_registry().entries() + _toy_entries())
    ref = reference(registry)
    assert ref["distributions"] == ["mtcore", "toy-plugin-pkg"]
    toy = _choices(ref, "model", "descriptor")["toy_descriptor"]
    assert toy["distribution"] == "toy-plugin-pkg" and toy["plugin"] == "toy_ep" and toy["alias"] == ["toy_d"]
    assert toy["fields"]["width"]["default"] == 3
    sections = _sections(render_markdown(ref))
    body = sections["model/descriptor[type=toy_descriptor]"]
    assert "Plugin `toy_ep` from distribution `toy-plugin-pkg`" in body
    assert "- `width` (`int`, optional, default `3`): toy width" in body
    assert "- `depth` (`int`, optional, default `2`, alias `n_depth`)" in sections["model/fitting_net[type=toy_head]"]
    assert "- `pref_toy` (`float`, required): toy prefactor" in sections["loss[type=toy_loss]"]
    # hybrid may hold it too, and the multi-task heads may use the outside head and loss
    assert "`toy_descriptor` (as [`model/descriptor[type=toy_descriptor]`]" in sections["model/descriptor[type=hybrid]/list"]
    assert "`toy_head` (as" in sections["model/fitting_net_dict/<head>"]
    assert "`toy_loss` (as" in sections["loss_dict/<head>"]
    # --only mtcore leaves it out and gives exactly the built-in reference
    assert generate(only_distributions(registry, ["mtcore"])) == generate(builtin_registry())
    with pytest.raises(MtcoreError, match="no plugins from distribution 'nope'; installed: mtcore, toy-plugin-pkg"):
        only_distributions(registry, ["nope"])


def test_a_name_two_packages_register_is_documented_as_ambiguous():
    clash = DescriptorRegistration(
        name="se_e2_a", doc="another se_e2_a", build=lambda params, ctx: None,
        arguments=lambda ctx: [Argument("other_key", int, optional=True, default=1)],
    )
    registry = Registry(builtin_registry().entries() + [Registered("descriptor", clash, PluginSource("rival-pkg", "2.0", "rival"))])
    choices = _choices(reference(registry), "model", "descriptor")
    assert choices["se_e2_a"]["ambiguous"] == [
        {"plugin": "se_e2_a", "distribution": "mtcore"}, {"plugin": "rival", "distribution": "rival-pkg"}]  # sorted
    assert "mtcore_ambiguous_type" not in choices["se_e2_a"]["fields"]
    assert choices["se_a"]["distribution"] == "mtcore"  # mtcore's se_e2_a is still selectable by its alias
    body = _sections(generate(registry))["model/descriptor[type=se_e2_a]"]
    assert "Registered by more than one package (plugin `se_e2_a` from `mtcore` and plugin `rival` from `rival-pkg`)" in body


def test_write_reference_replaces_only_generated_files(tmp_path):
    text = generate(builtin_registry())
    target = tmp_path / "ref.md"
    write_reference(target, text)
    assert target.read_text() == text and is_generated(target)
    write_reference(target, text.replace("# mtcore input reference", "# changed"))  # a previous copy: replaced
    assert "# changed" in target.read_text()
    as_json = tmp_path / "ref.json"
    write_reference(as_json, generate(builtin_registry(), as_json=True))
    assert is_generated(as_json)
    write_reference(as_json, generate(builtin_registry(), as_json=True))  # its own JSON stamp: replaced
    users = tmp_path / "notes.md"
    users.write_text("# my notes\n")
    with pytest.raises(MtcoreError, match="notes.md: exists and is not a reference written by"):
        write_reference(users, text)
    assert users.read_text() == "# my notes\n"
    with pytest.raises(MtcoreError, match="is a folder"):
        write_reference(tmp_path, text)


# --------------------------------------------------------------------------------------------
# The command, with a plugin package installed from outside (a dist-info on PYTHONPATH)
# --------------------------------------------------------------------------------------------

_PLUGIN_MODULE = '''
from dargs import Argument
from mtcore.hookspecs import DescriptorRegistration, hookimpl


@hookimpl
def mtcore_descriptors():
    return [DescriptorRegistration(
        name="outside_descriptor", doc="installed from outside",
        arguments=lambda ctx: [Argument("radius", float, optional=True, default=4.5, doc="outside radius")],
        build=lambda params, ctx: None,
    )]
'''


@pytest.fixture
def outside_site(tmp_path) -> Path:
    site = tmp_path / "site"
    info = site / "outside_plugin_pkg-0.3.dist-info"
    info.mkdir(parents=True)
    (site / "outside_plugin_mod.py").write_text(textwrap.dedent(_PLUGIN_MODULE))
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: outside-plugin-pkg\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[mtcore]\noutside = outside_plugin_mod\n")
    return site


def _mtcore(args: list[str], cwd: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    env.pop("MTCORE_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "mtcore.cli", "doc-train-input", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_documents_an_installed_outside_plugin(tmp_path, outside_site):
    shown = _mtcore([], tmp_path, outside_site)
    assert shown.returncode == 0, shown.stderr
    body = _sections(shown.stdout)["model/descriptor[type=outside_descriptor]"]
    assert "Plugin `outside` from distribution `outside-plugin-pkg`" in body
    assert "- `radius` (`float`, optional, default `4.5`): outside radius" in body
    as_json = _mtcore(["--json"], tmp_path, outside_site)
    assert as_json.returncode == 0, as_json.stderr
    choice = _choices(json.loads(as_json.stdout), "model", "descriptor")["outside_descriptor"]
    assert choice["distribution"] == "outside-plugin-pkg" and choice["fields"]["radius"]["default"] == 4.5
    # the docs copy is regenerated exactly in such a venv with --only mtcore
    (tmp_path / "docs").mkdir()
    written = _mtcore(["--only", "mtcore", "-o", "docs/input-reference.md"], tmp_path, outside_site)
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "docs" / "input-reference.md").read_text() == generate(builtin_registry())


def test_command_refuses_to_overwrite_a_users_file_in_one_line(tmp_path, outside_site):
    users = tmp_path / "input.md"
    users.write_text("my own notes\n")
    refused = _mtcore(["-o", "input.md"], tmp_path, outside_site)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: -o input.md: exists and is not a reference"), refused.stderr
    assert users.read_text() == "my own notes\n"
