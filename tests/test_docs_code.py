"""Every Python block of the documentation site and of the README runs.

Blocks are self-contained and run in a fresh namespace each. A block preceded by
``<!-- fragment -->`` is a sketch with parts left out (the README's first-screen three lines,
the benchmark page's outline of a benchmark, whose complete version is
``examples/custom_benchmark.py``) and is not run. A block that only includes an example file
(``--8<-- "file.py"``) is checked to name an example the tests run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

BLOCK = re.compile(
    r"(?:(?P<fragment><!--\s*fragment\s*-->)\s*\n)?^```python[^\n]*\n(?P<code>.*?)^```",
    re.MULTILINE | re.DOTALL,
)
SNIPPET = re.compile(r'^--8<-- "(?P<file>[^":]+)(?::[\w-]+)?"\s*$')


def _blocks() -> list[tuple[str, int, str]]:
    found = []
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    for page in pages:
        name = page.relative_to(ROOT).as_posix()
        for index, match in enumerate(BLOCK.finditer(page.read_text())):
            if match["fragment"] is None:
                found.append((name, index, match["code"]))
    return found


BLOCKS = _blocks()


def test_the_pages_have_code_to_run() -> None:
    pages = {name for name, _, _ in BLOCKS}
    for expected in (
        "README.md",
        "docs/getting-started.md",
        "docs/concepts.md",
        "docs/recipes/learning-rates.md",
    ):
        assert expected in pages
    assert len(BLOCKS) >= 15


@pytest.mark.parametrize(
    ("page", "index", "code"),
    BLOCKS,
    ids=[f"{name}#{index}" for name, index, _ in BLOCKS],
)
def test_docs_block_runs(page: str, index: int, code: str) -> None:
    snippet = SNIPPET.match(code.strip())
    if snippet is not None:
        example = ROOT / "examples" / snippet["file"]
        assert example.exists(), f"{page} includes a missing example {example}"
        runners = [
            t for t in (ROOT / "tests").glob("test_*.py") if snippet["file"] in t.read_text()
        ]
        assert runners, f"{page} includes examples/{snippet['file']}, which no test runs"
        return
    exec(compile(code, f"{page}#{index}", "exec"), {"__name__": "__docs__"})
