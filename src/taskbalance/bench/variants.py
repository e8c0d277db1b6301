"""Method variants from the command line: ``--set key=value`` and ``name[key=value,...]``.

Values are Python literals read by :func:`ast.literal_eval` (``5``, ``0.5``, ``[1, 2]``,
``True``, ``None``, ``'text'``), with two documented special cases:

- ``torch.float64`` (any ``torch.<dtype>`` name) is that torch dtype;
- a value that is not a literal is kept as text, so ``heads=weighted`` needs no quotes and
  ``params=trunk`` names a submodule of the model (parameters mode on that submodule).

A tuple is given as a list (``weights=1,2`` is ``[1, 2]``).

Example:
    >>> parse_methods("ew,nash_mtl[update_every=5],mgda[params=trunk]")
    ... # doctest: +NORMALIZE_WHITESPACE
    [Method(name='ew', hyperparameters={}, label='ew'),
     Method(name='nash_mtl', hyperparameters={'update_every': 5},
            label='nash_mtl[update_every=5]'),
     Method(name='mgda', hyperparameters={'params': 'trunk'}, label='mgda[params=trunk]')]
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import taskbalance as tb
from taskbalance._registry import unknown_method_message
from taskbalance.bench.harness import Method

_BRACKETS = {"[": "]", "(": ")", "{": "}"}


def parse_value(text: str) -> Any:
    """One ``--set`` value: a Python literal, a ``torch.<dtype>``, or else the text itself."""
    text = text.strip()
    if text.startswith("torch."):
        value = getattr(torch, text[len("torch.") :], None)
        if isinstance(value, torch.dtype):
            return value
        raise ValueError(f"{text!r}: expected a torch dtype such as torch.float64")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return _lists(value)


def _lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_lists(item) for item in value]
    return value


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """Split ``text`` at ``separator`` outside brackets and quotes."""
    parts: list[str] = []
    depth: list[str] = []
    quote = ""
    current = ""
    for character in text:
        if quote:
            quote = "" if character == quote else quote
        elif character in "'\"":
            quote = character
        elif character in _BRACKETS:
            depth.append(_BRACKETS[character])
        elif depth and character == depth[-1]:
            depth.pop()
        elif character == separator and not depth:
            parts.append(current)
            current = ""
            continue
        current += character
    if depth or quote:
        raise ValueError(f"{text!r}: unbalanced brackets or quotes")
    parts.append(current)
    return [part.strip() for part in parts]


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` → ``(key, value)``."""
    key, separator, value = text.partition("=")
    key = key.strip()
    if not separator or not key.isidentifier():
        raise ValueError(f"{text!r}: expected key=value")
    return key, parse_value(value)


def _set_assignment(text: str) -> tuple[str, Any]:
    """One ``--set`` value, its errors naming ``--set``."""
    try:
        return parse_assignment(text)
    except ValueError as error:
        raise ValueError(f"--set {text}: {error}") from None


def _check_keys(name: str, settings: Mapping[str, Any], origin: str) -> None:
    accepted = tb.hyperparameters(name)
    for key in settings:
        if key not in accepted:
            raise ValueError(
                f"{origin}: {name} has no hyperparameter {key!r}; "
                f"expected one of {sorted(accepted) or 'none'}"
            )


def parse_method(text: str) -> Method:
    """``name`` or ``name[key=value,...]`` → :class:`Method`.

    Raises:
        ValueError: unknown method or hyperparameter, malformed text.
    """
    text = text.strip()
    name, bracket, rest = text.partition("[")
    name = name.strip()
    if name not in tb.available():
        raise ValueError(unknown_method_message(name))
    settings: dict[str, Any] = {}
    if bracket:
        if not rest.endswith("]"):
            raise ValueError(f"{text!r}: expected name[key=value,...]")
        inner = rest[:-1].strip()
        if inner:
            for part in split_top_level(inner):
                key, value = parse_assignment(part)
                settings[key] = value
    _check_keys(name, settings, text)
    return Method(name, settings)


def parse_methods(text: str, assignments: Sequence[str] = ()) -> list[Method]:
    """``all`` or a comma-separated list of methods with variants, plus ``--set`` values.

    Each ``--set key=value`` applies to every listed method that accepts ``key`` (a variant's
    own value wins); a key no listed method accepts is an error.

    Args:
        text: ``"all"`` or e.g. ``"ew,nash_mtl[update_every=5],mgda[params=trunk]"``.
        assignments: the ``--set`` strings.

    Returns:
        The methods, in order.

    Raises:
        ValueError: unknown method or key, malformed text, duplicate rows.
    """
    if text.strip() == "all":
        methods = [Method(name) for name in tb.available()]
    else:
        parts = [part for part in split_top_level(text) if part]
        if not parts:
            raise ValueError("expected 'all' or a comma-separated list of methods")
        methods = [parse_method(part) for part in parts]
    common = dict(_set_assignment(assignment) for assignment in assignments)
    used: set[str] = set()
    result = []
    for method in methods:
        accepted = tb.hyperparameters(method.name)
        extra = {key: value for key, value in common.items() if key in accepted}
        used |= set(extra)
        result.append(Method(method.name, {**extra, **method.hyperparameters}))
    unused = sorted(set(common) - used)
    if unused:
        raise ValueError(f"--set {unused[0]}: no listed method has a hyperparameter {unused[0]!r}")
    labels = [method.label for method in result]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"methods listed twice: {duplicates}")
    return result
