"""The documentation site: it builds with ``mkdocs build --strict``, every page is in the
nav, and the API reference documents every public name of ``circuitdiff``."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

import circuitdiff as cd

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"
DIRECTIVE = re.compile(r"^:::\s+(?P<identifier>[\w.]+)\s*$")


def _config() -> dict:
    # mkdocs.yml uses no custom YAML tags, so the safe loader reads it
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def _nav_pages(nav) -> list[str]:
    """Every page path in a mkdocs nav (nested lists of {title: page-or-section})."""
    pages: list[str] = []
    items = nav if isinstance(nav, list) else [nav]
    for item in items:
        if isinstance(item, str):
            pages.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                if isinstance(value, str):
                    if not re.match(r"^[a-z]+://", value):  # external links are not pages
                        pages.append(value)
                else:
                    pages.extend(_nav_pages(value))
    return pages


def _directives() -> list[tuple[Path, str, dict]]:
    """``(page, identifier, options)`` of every ``::: identifier`` block in the reference pages."""
    found = []
    for page in sorted(REFERENCE.glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for index, line in enumerate(lines):
            match = DIRECTIVE.match(line)
            if not match:
                continue
            block = []
            for following in lines[index + 1:]:
                if following.strip() and not following.startswith((" ", "\t")):
                    break
                block.append(following)
            options = (yaml.safe_load("\n".join(block)) or {}).get("options", {}) if any(b.strip() for b in block) else {}
            found.append((page, match["identifier"], options))
    return found


def _import(identifier: str):
    """The object a dotted path names (the longest importable module prefix, then attributes)."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(identifier)


def _public_members(module: types.ModuleType) -> set[str]:
    """Names a module directive renders with ``filters: public``: ``__all__`` if defined,
    else the names defined in the module that do not start with an underscore."""
    if hasattr(module, "__all__"):
        return set(module.__all__)
    return {name for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__}


def test_every_docs_page_is_in_the_nav():
    nav = _nav_pages(_config()["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert pages, "no pages found under docs/"
    orphans = sorted(set(pages) - set(nav))
    missing = sorted(set(nav) - set(pages))
    duplicates = sorted({p for p in nav if nav.count(p) > 1})
    assert not orphans, f"pages under docs/ that are not in mkdocs.yml's nav: {orphans}"
    assert not missing, f"nav entries in mkdocs.yml without a file under docs/: {missing}"
    assert not duplicates, f"pages listed twice in mkdocs.yml's nav: {duplicates}"


def test_api_reference_covers_every_public_name():
    directives = _directives()
    assert directives, f"no '::: identifier' blocks in {REFERENCE}"
    covered: set[str] = set()
    for page, identifier, options in directives:
        try:
            target = _import(identifier)
        except (ImportError, AttributeError) as error:
            pytest.fail(f"{page.name}: '::: {identifier}' does not name an importable object ({error})")
        members = options.get("members")
        for name in cd.__all__:
            obj = getattr(cd, name)
            if target is obj:
                covered.add(name)
            elif isinstance(target, types.ModuleType) and members is not False:
                listed = _public_members(target) if members in (None, True) else set(members)
                if name in listed and getattr(target, name, None) is obj:
                    covered.add(name)
    missing = sorted(set(cd.__all__) - covered)
    assert not missing, (f"names in circuitdiff.__all__ that no page of docs/reference/ documents "
                         f"(add a '::: module' or '::: module.name' block): {missing}")


@pytest.fixture(scope="module")
def strict_build(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``python -m mkdocs build --strict`` from the repository root, once per module."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path_factory.mktemp("docs") / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # mkdocs-material's banner, not a build warning
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    return result, site


@pytest.fixture(scope="module")
def built_site(strict_build) -> Path:
    result, site = strict_build
    if result.returncode != 0:
        pytest.fail("the docs site did not build; see test_docs_build_strict", pytrace=False)
    return site


@pytest.mark.slow
def test_docs_build_strict(strict_build):
    result, site = strict_build
    output = result.stdout + result.stderr
    problems = [line for line in output.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0, ("`mkdocs build --strict` failed:\n" + "\n".join(problems)
                                    + "\n\nfull output:\n" + output)
    assert (site / "index.html").is_file()
    assert (site / "reference" / "index.html").is_file()
    # the changelog page includes CHANGELOG.md (pymdownx.snippets) rather than a copy of it
    changelog = (site / "changelog" / "index.html").read_text(encoding="utf-8")
    headings = re.findall(r"(?m)^#+ (.+)$", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"))
    assert "--8<--" not in changelog
    assert headings and all(heading.strip() in changelog for heading in headings[:3])


@pytest.mark.slow  # needs the docs build (built_site)
def test_api_reference_renders_every_public_name(built_site):
    """Every name of ``circuitdiff.__all__`` has an entry (an anchor) in the built reference."""
    anchors: set[str] = set()
    for page in (built_site / "reference").rglob("*.html"):
        anchors.update(re.findall(r'\bid="(circuitdiff[\w.]*)"', page.read_text(encoding="utf-8")))
    # where each name lives or is re-exported, except the top-level package itself (not rendered;
    # ``circuitdiff.agreement`` is a module there, the function is ``circuitdiff.agreement.agreement``)
    modules = [m for n, m in sorted(sys.modules.items()) if n.startswith("circuitdiff.")]
    missing = []
    for name in cd.__all__:
        obj = getattr(cd, name)
        paths = {f"{module.__name__}.{name}" for module in modules if getattr(module, name, None) is obj}
        if isinstance(obj, types.ModuleType):
            paths.add(obj.__name__)
        if not paths & anchors:
            missing.append(name)
    assert not missing, (f"names in circuitdiff.__all__ with no entry in the built API reference "
                         f"(no docstring, or filtered out?): {missing}")
