"""The documentation site: `mkdocs build --strict` passes (a warning fails it: broken links or
anchors, pages missing from the nav), every page in docs/ is in the nav, and strict mode does
catch a broken link (so a green build means something)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"


def _require(*modules: str) -> None:
    """The `test` extra includes the docs tools (README's test command and CI install it), so a
    missing one is a failure naming the install step, never a skip that hides an unbuilt site."""
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            pytest.fail(f"{module} is not installed: pip install -e \".[test]\" (or \".[docs]\")")


def _nav_pages(nav) -> list[str]:
    """The Markdown files a mkdocs `nav` names, in order, at any depth."""
    pages: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            pages += _nav_pages(value)
        elif isinstance(value, str) and not value.startswith(("http://", "https://")):
            pages.append(value)
    return pages


def _config() -> dict:
    _require("yaml")  # PyYAML comes with mkdocs
    import yaml

    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    config = _config()
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    missing = sorted(set(pages) - set(nav))
    assert not missing, f"docs pages not in mkdocs.yml's nav: {missing} (add them under `nav:`)"
    dangling = sorted(set(nav) - set(pages))
    assert not dangling, f"mkdocs.yml's nav names pages that do not exist: {dangling}"
    assert len(nav) == len(set(nav)), f"a page is in the nav twice: {nav}"
    assert nav[:2] == ["index.md", "quickstart.md"]


def test_strict_mode_is_on_for_every_check():
    """`mkdocs build` (and `mkdocs serve`) warn, and with strict fail, on each kind of broken reference."""
    config = _config()
    assert config["strict"] is True
    for group, checks in (("nav", ("omitted_files", "not_found", "absolute_links")),
                          ("links", ("not_found", "anchors", "absolute_links", "unrecognized_links"))):
        for check in checks:
            assert config["validation"][group][check] == "warn", f"validation/{group}/{check}"


def _build(config_file: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config_file),
                           "-d", str(site)], capture_output=True, text=True, timeout=300, env=env)


def test_site_builds_strict(tmp_path):
    _require("mkdocs", "material")
    built = _build(CONFIG, tmp_path / "site")
    log = built.stdout + built.stderr
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    warnings = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert not warnings, warnings
    for page in _nav_pages(_config()["nav"]):
        html = tmp_path / "site" / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert html.is_file(), f"{page} was not rendered ({html})"
    quickstart = (tmp_path / "site" / "quickstart" / "index.html").read_text(encoding="utf-8")
    fences = (DOCS / "quickstart.md").read_text(encoding="utf-8").count("\n```") // 2
    assert '<h1 id="quick-start">Quick start' in quickstart
    assert quickstart.count('<div class="highlight">') == fences > 0, "a code block of the quick start was not rendered"


@pytest.mark.parametrize("broken", [
    ("index.md", "\nSee [nowhere](no-such-page.md).\n", "no-such-page.md"),
    ("index.md", "\nSee [a section](multitask.md#no-such-section).\n", "no-such-section"),
    ("orphan.md", "# Orphan\n\nA page nobody put in the nav.\n", "orphan.md"),
], ids=["missing-page", "missing-anchor", "page-not-in-nav"])
def test_strict_build_fails_on_a_broken_reference(tmp_path, broken):
    """The same configuration on a copy of docs/ with one defect: the build must fail naming it."""
    _require("mkdocs", "material")
    page, text, named = broken
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    with open(docs / page, "a", encoding="utf-8") as handle:
        handle.write(text)
    config_file = tmp_path / "mkdocs.yml"
    config_file.write_text(CONFIG.read_text(encoding="utf-8"), encoding="utf-8")  # docs_dir: docs, beside it
    built = _build(config_file, tmp_path / "site")
    log = built.stdout + built.stderr
    assert built.returncode != 0, f"strict build passed despite {named}:\n{log[-3000:]}"
    assert "WARNING" in log and named in log, log[-3000:]
