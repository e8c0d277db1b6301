"""Every Python block of the documentation site runs.

Blocks are self-contained and run in a fresh namespace each. A block preceded by
``<!-- requires: FEATURE -->`` uses an option of this release that lands separately; it runs as
soon as :data:`FEATURES` finds the option, and is skipped (with the reason) until then. A block
that only includes an example file (``--8<-- "file.py"``) is checked to name an example the
tests run.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import taskbalance as tb

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Pages written by hand elsewhere (the benchmark write-up has only console blocks).
NOT_SCANNED = {"benchmarks.md"}

BLOCK = re.compile(
    r"(?:<!--\s*requires:\s*(?P<requires>[\w-]+)\s*-->\s*\n)?^```python[^\n]*\n(?P<code>.*?)^```",
    re.MULTILINE | re.DOTALL,
)
SNIPPET = re.compile(r'^--8<-- "(?P<file>[^":]+)(?::[\w-]+)?"\s*$')


def _parameters(function: Callable[..., object] | None) -> set[str]:
    return set() if function is None else set(inspect.signature(function).parameters)


def _features_list_supported() -> bool:
    z1 = torch.randn(3, 2, requires_grad=True)
    z2 = torch.randn(3, 2, requires_grad=True)
    losses = torch.stack([(z1 * z2).sum(), (z1 + z2).pow(2).sum()])
    try:
        tb.create("mgda", num_tasks=2)(losses, features=[z1, z2])
    except (TypeError, ValueError):
        return False
    return True


#: Options of this release that land separately, and how to tell whether they are there.
FEATURES: dict[str, Callable[[], bool]] = {
    "accumulation_steps": lambda: "accumulation_steps" in tb.hyperparameters("ew"),
    "on_nonfinite": lambda: "on_nonfinite" in tb.hyperparameters("ew"),
    "present": lambda: "present" in inspect.signature(tb.Balancer.forward).parameters,
    "log_dict": lambda: "prefix" in _parameters(getattr(tb.Balancer, "log_dict", None)),
    "features_list": _features_list_supported,
}


def _blocks() -> list[tuple[str, int, str | None, str]]:
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        name = page.relative_to(DOCS).as_posix()
        if name in NOT_SCANNED:
            continue
        for index, match in enumerate(BLOCK.finditer(page.read_text())):
            found.append((name, index, match["requires"], match["code"]))
    return found


BLOCKS = _blocks()


def test_the_pages_have_code_to_run() -> None:
    pages = {name for name, _, _, _ in BLOCKS}
    for expected in ("getting-started.md", "concepts.md", "recipes/learning-rates.md"):
        assert expected in pages
    assert len(BLOCKS) >= 15


@pytest.mark.parametrize(
    ("page", "index", "requires", "code"),
    BLOCKS,
    ids=[f"{name}#{index}" for name, index, _, _ in BLOCKS],
)
def test_docs_block_runs(page: str, index: int, requires: str | None, code: str) -> None:
    snippet = SNIPPET.match(code.strip())
    if snippet is not None:
        example = ROOT / "examples" / snippet["file"]
        assert example.exists(), f"{page} includes a missing example {example}"
        runners = [
            t for t in (ROOT / "tests").glob("test_*.py") if snippet["file"] in t.read_text()
        ]
        assert runners, f"{page} includes examples/{snippet['file']}, which no test runs"
        return
    if requires is not None:
        assert requires in FEATURES, f"{page}: unknown feature {requires!r}"
        if not FEATURES[requires]():
            pytest.skip(f"{page}: needs {requires}, which lands separately in this release")
    exec(compile(code, f"{page}#{index}", "exec"), {"__name__": "__docs__"})
