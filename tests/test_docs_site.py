"""The documentation site: a page per registered method, every public tool documented, every
page in the navigation, and a strict build (every warning an error) with the generated pages."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

import taskbalance as tb
from taskbalance import distributions, info, losses, optim
from test_packaging import run_checked

pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') builds the site")

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts/mkdocs_hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages(entries: object) -> list[str]:
    """Every page path in a (nested) mkdocs nav."""
    if isinstance(entries, str):
        return [entries]
    if isinstance(entries, list):
        return [page for entry in entries for page in _nav_pages(entry)]
    if isinstance(entries, dict):
        return [page for value in entries.values() for page in _nav_pages(value)]
    return []


def _config() -> MkDocsConfig:
    from mkdocs.config import load_config

    return load_config(str(ROOT / "mkdocs.yml"))


def test_every_registered_method_gets_a_page_and_a_nav_entry() -> None:
    hooks = _hooks()
    config = hooks.on_config(_config())
    pages = _nav_pages(config.nav)
    for name in tb.available():
        assert hooks.method_page_path(name) in pages
        page = hooks.method_page(name)
        cls = tb.method_class(name)
        assert f"::: taskbalance.{cls.__name__}\n" in page
        for keyword in tb.hyperparameters(name):
            assert f"| `{keyword}` |" in page
    table = hooks.methods_table()
    assert all(f"[`{name}`]({name}.md)" in table for name in tb.available())


def test_every_page_is_in_the_nav() -> None:
    config = _config()
    in_nav = set(_nav_pages(config.nav))
    assert "benchmarks.md" in in_nav
    written = {
        page.relative_to(DOCS).as_posix()
        for page in DOCS.rglob("*.md")
        if not page.name.endswith("-comparison.md")  # CLI output, excluded from the site
    }
    assert written - in_nav == set()
    assert in_nav - written == set()  # the method pages are added by the hook, not here


@pytest.mark.parametrize(
    ("module", "page"),
    [
        (losses, "losses.md"),
        (info, "probability.md"),
        (distributions, "probability.md"),
        (optim, "helpers.md"),
    ],
)
def test_every_public_tool_is_documented(module: ModuleType, page: str) -> None:
    text = (DOCS / page).read_text()
    for name in module.__all__:
        if name in ("Reduction", "SHARED_GROUP"):
            continue  # a type alias and a constant, documented in their functions
        assert re.search(rf"\b{name}\b", text), f"{module.__name__}.{name} is not in {page}"


def test_the_kl_argument_orders_are_stated_both_ways() -> None:
    for page in ("losses.md", "probability.md"):
        text = (DOCS / page).read_text()
        assert "KL(target‖input)" in text
        assert "first" in text


@pytest.mark.slow
def test_the_site_builds_strictly_with_a_page_per_method(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    run_checked(command, ROOT, env)  # --strict: any warning fails the build
    for name in tb.available():
        html = (site / "methods" / name / "index.html").read_text()
        summary = (tb.method_class(name).__doc__ or "").strip().splitlines()[0]
        first_words = re.sub(r"[`*]", "", summary).split(":")[0]
        assert first_words in html, name
        if "Departure" in (tb.method_class(name).__doc__ or ""):
            assert "Departure" in html, name
        assert 'class="gp">&gt;&gt;&gt; </span>' in html, f"{name}: the example is not code"
    recipe = (site / "recipes" / "lightning" / "index.html").read_text()
    assert "MultiTaskModule" in recipe  # the example file, included by the snippet
