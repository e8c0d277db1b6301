"""The registry: the single list of balancing methods, by lower-case name."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from taskbalance._base import Balancer, constructor_defaults

_REGISTRY: dict[str, type[Balancer]] = {}

BalancerType = TypeVar("BalancerType", bound=type[Balancer])


def register(name: str) -> Callable[[BalancerType], BalancerType]:
    """Class decorator: make a :class:`Balancer` subclass available under ``name``.

    Example:
        >>> import taskbalance as tb
        >>> "dwa" in tb.available()
        True
    """

    def decorate(cls: BalancerType) -> BalancerType:
        if name in _REGISTRY:
            raise ValueError(f"name: {name!r} is already registered to {_REGISTRY[name].__name__}")
        if name != name.lower():
            raise ValueError(f"name: registry names are lower-case, got {name!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    """Sorted names of every registered method: the single source of truth.

    Example:
        >>> import taskbalance as tb
        >>> "mgda" in tb.available() and tb.available() == sorted(tb.available())
        True
    """
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Balancer]:
    """The class registered under ``name``; a ValueError lists the valid names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"name: {unknown_method_message(name)}")
    return _REGISTRY[name]


def unknown_method_message(name: object) -> str:
    """``unknown method 'x'``, the nearest registered name if one is close (``nash-mtl``,
    ``MGDA``), and the valid names."""
    close = (
        difflib.get_close_matches(name.strip().lower().replace("-", "_"), available(), n=1)
        if isinstance(name, str)
        else []
    )
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown method {name!r}{hint}; expected one of {available()}"


def hyperparameters(name: str) -> dict[str, Any]:
    """The keyword hyperparameters of method ``name`` with their defaults.

    Includes the loop options every method accepts (``accumulation_steps``, ``on_nonfinite``)
    and, through ``**options``, the keywords of a method's base classes.
    """
    return constructor_defaults(method_class(name))


def create(name: str, num_tasks: int, **hparams: Any) -> Balancer:
    """Create the balancer registered under ``name``; same as calling its class.

    Args:
        name: a name from :func:`available`.
        num_tasks: K, the number of tasks.
        **hparams: the method's keyword hyperparameters.

    Example:
        >>> import taskbalance as tb
        >>> b = tb.create("dwa", num_tasks=3, temperature=2.0)
        >>> b.weights
        tensor([1., 1., 1.])
    """
    cls = method_class(name)
    accepted = hyperparameters(name)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise TypeError(
            f"{name}: unknown hyperparameter(s) {unknown}; expected some of {sorted(accepted)}"
        )
    # Required by the class's own __init__: a subclass may supply its base's through **options
    own_init = next(vars(klass)["__init__"] for klass in cls.__mro__ if "__init__" in vars(klass))
    missing = [
        key
        for key, parameter in inspect.signature(own_init).parameters.items()
        if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        and parameter.default is parameter.empty
        and key not in ("self", "num_tasks", *hparams)
    ]
    if missing:
        examples_of = getattr(cls, "required_hyperparameters", {})
        examples = ", ".join(f"{key}={examples_of[key]!r}" for key in missing if key in examples_of)
        raise TypeError(
            f"{name}: missing the required hyperparameter(s) {missing}"
            + (
                f", e.g. tb.create({name!r}, num_tasks={num_tasks!r}, {examples})"
                if examples
                else ""
            )
        )
    return cls(num_tasks, **hparams)
