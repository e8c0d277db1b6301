"""MkDocs hooks: one page per registered method, generated from ``tb.available()``.

A method added to the registry gets its page (summary table, hyperparameters with their
defaults, and the class docstring rendered by mkdocstrings: paper, formula, defaults,
departures, example) and its entry under "Methods" in the navigation, with no edit here.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import taskbalance as tb  # noqa: E402  (after the path set-up above)

METHODS_SECTION = "Methods"
METHODS_DIR = "methods"


def method_page_path(name: str) -> str:
    """Where the page of method ``name`` lives in the site's sources."""
    return f"{METHODS_DIR}/{name}.md"


def _kind(cls: type[tb.Balancer]) -> str:
    if issubclass(cls, tb.GradientBalancer):
        return f"gradient (Gramian of the task gradients; heads `{cls.default_heads}` by default)"
    return "loss-based, learned weights" if _has_parameters(cls) else "loss-based"


def _has_parameters(cls: type[tb.Balancer]) -> bool:
    try:
        balancer = tb.create(cls.name, num_tasks=2, **_required(cls.name))
    except (TypeError, ValueError):
        return False
    return any(True for _ in balancer.parameters())


def _required(name: str) -> dict[str, Any]:
    """Hyperparameters without a default (``fixed``'s ``weights``), filled for a probe."""
    return {
        key: [1.0, 1.0]
        for key, default in tb.hyperparameters(name).items()
        if default is inspect.Parameter.empty
    }


def _show(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    return f"`{value!r}`"


def method_page(name: str) -> str:
    """The Markdown source of method ``name``'s page."""
    cls = tb.method_class(name)
    first_line = (inspect.getdoc(cls) or "").splitlines()[0]
    rows = "\n".join(
        f"| `{key}` | {_show(default)} |" for key, default in tb.hyperparameters(name).items()
    )
    facts = [
        f"| registry name | `{name}`: `tb.create({name!r}, num_tasks=K, ...)` |",
        f"| class | `tb.{cls.__name__}` |",
        f"| kind | {_kind(cls)} |",
        f"| losses must be > 0 | {'yes' if cls.requires_positive_losses else 'no'} |",
        f"| reads `kpis=` | {'yes' if cls.requires_kpis else 'no'} |",
        f"| learned parameters for your optimiser | {'yes' if _has_parameters(cls) else 'no'} |",
    ]
    return "\n".join(
        [
            f"# `{name}`: {first_line}",
            "",
            "| | |",
            "|---|---|",
            *facts,
            "",
            "## Hyperparameters",
            "",
            "Keyword arguments of `tb.create` (and of the class), with their defaults.",
            "",
            "| keyword | default |",
            "|---|---|",
            rows,
            "",
            "## Reference",
            "",
            f"::: taskbalance.{cls.__name__}",
            "    options:",
            "      show_root_heading: false",
            "      show_root_toc_entry: false",
            "      members: false",
            "",
        ]
    )


METHODS_TABLE_MARKER = "<!-- methods-table -->"


def methods_table() -> str:
    """A Markdown table of every registered method, linking to its page."""
    rows = []
    for name in tb.available():
        cls = tb.method_class(name)
        summary = (inspect.getdoc(cls) or "").splitlines()[0]
        kind = "gradient" if cls.requires_gram else "loss"
        rows.append(f"| [`{name}`]({name}.md) | `tb.{cls.__name__}` | {kind} | {summary} |")
    return "\n".join(["| name | class | kind | summary |", "|---|---|---|---|", *rows])


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Add every registered method's page to the "Methods" section of the navigation."""
    pages = [{name: method_page_path(name)} for name in tb.available()]
    for entry in config.nav or []:
        if isinstance(entry, dict) and METHODS_SECTION in entry:
            section = entry[METHODS_SECTION]
            listed = section if isinstance(section, list) else [section]
            entry[METHODS_SECTION] = [*listed, *pages]
            return config
    raise ValueError(f"mkdocs.yml: the nav has no {METHODS_SECTION!r} section for method pages")


def on_page_markdown(markdown: str, page: Any, config: MkDocsConfig, files: Files) -> str:
    """Fill the methods table into the page that asks for it."""
    return markdown.replace(METHODS_TABLE_MARKER, methods_table())


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Generate the method pages (they exist only in the built site)."""
    for name in tb.available():
        files.append(File.generated(config, method_page_path(name), content=method_page(name)))
    return files
