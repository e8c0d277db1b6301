"""Griffe extension for the documentation site: the package's docstrings as Markdown.

The docstrings are written for ``help()`` and doctest, in the Google style with two habits
from reStructuredText that Markdown renders badly:

- doctests under ``Example:`` (singular): griffe's Google parser knows only ``Examples:`` and
  would render the doctest as Markdown (``>>>`` becoming nested quotes);
- Sphinx roles such as ``:func:`stop_gradient``` and ``:meth:`update```, which would show
  literally.

This rewrites both at load time, for the site only; the source docstrings are unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_SPHINX_ROLE = re.compile(r":(?:py:)?(?:meth|class|func|mod|attr|data|obj|exc):`~?([^`]+)`")


class DocstringsAsMarkdown(griffe.Extension):
    """Renames ``Example:`` headings to ``Examples:`` and turns Sphinx roles into code spans."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Called by griffe for every object it loads."""
        if obj.docstring is not None:
            value = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _SPHINX_ROLE.sub(r"`\1`", value)
