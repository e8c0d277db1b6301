"""Every public docstring example runs, and every method's docstring carries the standard parts."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import taskbalance as tb
from taskbalance._base import constructor_defaults


def _modules() -> list[str]:
    names = ["taskbalance"]
    for info in pkgutil.walk_packages(tb.__path__, prefix="taskbalance."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("module_name", _modules())
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"


@pytest.mark.parametrize("name", tb.available())
def test_method_docstring_names_paper_formula_defaults_departures(name):
    doc = tb.method_class(name).__doc__ or ""
    for part in ("Args:", "Example:", ">>>"):
        assert part in doc, f"{name}: docstring lacks {part!r}"
    if name not in ("ew", "fixed"):
        assert "Departure" in doc, f"{name}: docstring must say where it departs from the paper"
        assert "Default" in doc, f"{name}: docstring must state its defaults"
        assert any(str(year) in doc for year in range(2015, 2026)), f"{name}: cite the paper"


@pytest.mark.parametrize("name", [*tb.available(), "GradientBalancer"])
def test_every_constructor_argument_is_in_the_docstring(name):
    """``help()`` shows the signature with the loop options and the gradient options: each
    one a user can pass is named in the class's own docstring (directly or as ``**options``)."""
    cls = tb.GradientBalancer if name == "GradientBalancer" else tb.method_class(name)
    doc = cls.__doc__ or ""
    names = [*inspect.signature(cls).parameters, *constructor_defaults(cls)]
    missing = sorted({arg for arg in names if arg not in ("options",) and arg not in doc})
    assert not missing, f"{name}: the docstring does not name {missing}"
