"""Training helpers: per-task learning rates and stopping gradients.

**Per-task learning rates.** :func:`task_param_groups` builds the parameter groups of a single
optimiser from a shared trunk and named task heads, each with its own learning rate (and
optionally weight decay), and checks that no parameter is in two groups and, given the whole
``model``, that none is left out::

    groups = task_param_groups(
        shared=model.trunk,
        tasks={"seg": model.seg_head, "depth": model.depth_head},
        lr={"shared": 1e-3, "seg": 1e-2, "depth": 5e-3},
        weight_decay=1e-4,
        model=model,
    )
    optimizer = torch.optim.SGD(groups, momentum=0.9)
    # optimizer.param_groups[i]["name"] is "shared", "seg" or "depth".

**Keeping a term out of the backward pass.** :func:`stop_gradient` (``Tensor.detach``) uses a
value without differentiating through it. A typical case in loss balancing: the weights of
GradNorm-style methods must scale the task losses in the total loss, but the loss *values* used
to compute the weights must not be trained towards::

    losses = torch.stack([seg_loss, depth_loss])
    weights = torch.softmax(stop_gradient(losses), dim=0)  # constants: larger loss, more weight
    total = (weights * losses).sum()
    total.backward()  # d total / d θ = Σ_k w_k · d L_k / d θ, no term from d w / d θ

Example:
    >>> import torch
    >>> x = torch.tensor(2.0, requires_grad=True)
    >>> total = x**2 + stop_gradient(x**3)  # the cubic term is a constant for autograd
    >>> total.backward()
    >>> x.grad  # 2x, not 2x + 3x²
    tensor(4.)
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from taskbalance._validation import check_nonnegative, check_tensor

__all__ = ["SHARED_GROUP", "stop_gradient", "task_param_groups"]

SHARED_GROUP = "shared"
"""Name of the group of shared parameters in :func:`task_param_groups`."""

ParameterSource = nn.Module | Iterable[nn.Parameter]


def stop_gradient(x: Tensor) -> Tensor:
    """Returns ``x`` as a constant for autograd: same values, no gradient flows back through it.

    This is :meth:`torch.Tensor.detach` (the ``sg[·]`` / stop-gradient operator of e.g. van den
    Oord et al., NeurIPS 2017, "Neural Discrete Representation Learning"): the result shares
    storage with ``x`` and has ``requires_grad=False``. In-place changes to either are visible
    in both, so do not modify the result in place if ``x`` is still needed for a backward pass.

    Args:
        x: Any tensor.

    Returns:
        ``x.detach()``.

    Example:
        >>> import torch
        >>> w = torch.tensor(3.0, requires_grad=True)
        >>> stop_gradient(w * 2).requires_grad
        False
    """
    return check_tensor("x", x).detach()


def _named_trainable(source: ParameterSource, group: str) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters of a module (with qualified names) or of an iterable."""
    if isinstance(source, nn.Module):
        named = [(f"{group}.{name}", p) for name, p in source.named_parameters()]
    elif isinstance(source, Tensor):
        raise TypeError(
            f"group {group!r}: expected an nn.Module or an iterable of parameters, got a single "
            "tensor; wrap it in a list"
        )
    else:
        named = []
        for index, parameter in enumerate(source):
            if not isinstance(parameter, Tensor):
                raise TypeError(
                    f"group {group!r}: expected tensors, got {type(parameter).__name__} at "
                    f"position {index}"
                )
            named.append((f"{group}[{index}]", parameter))
    return [(name, p) for name, p in named if p.requires_grad]


def _per_group_values(
    value: float | Mapping[str, float] | None, groups: list[str], argument: str, required: bool
) -> dict[str, float]:
    """Expands a scalar or checks a mapping of per-group values, each a finite number >= 0
    (``torch.optim`` checks a group's ``lr`` and ``weight_decay`` only at construction)."""
    if value is None:
        if required:
            raise TypeError(f"{argument}: expected a number or a mapping group -> number, got None")
        return {}
    if not isinstance(value, Mapping):
        return dict.fromkeys(groups, check_nonnegative(argument, _plain_number(value)))
    unknown = sorted(set(value) - set(groups))
    if unknown:
        raise ValueError(
            f"{argument}: expected keys among {groups}, got entries for unknown groups {unknown}"
        )
    missing = [group for group in groups if group not in value]
    if required and missing:
        raise ValueError(
            f"{argument}: expected one key per group {groups} (or a single float for all), got "
            f"no entry for groups {missing}"
        )
    return {
        group: check_nonnegative(f"{argument}[{group!r}]", _plain_number(value[group]))
        for group in groups
        if group in value
    }


def _plain_number(value: object) -> object:
    """A real number as a float (numpy scalars, a one-element real tensor, as torch.optim
    takes them); anything else (a bool, a string, None) unchanged, for the check to name."""
    if (
        isinstance(value, Tensor)
        and value.numel() == 1
        and not value.is_complex()
        and value.dtype != torch.bool
    ):
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def task_param_groups(
    shared: ParameterSource | None,
    tasks: Mapping[str, ParameterSource],
    lr: float | Mapping[str, float],
    weight_decay: float | Mapping[str, float] | None = None,
    model: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Builds optimiser parameter groups with one learning rate per task (and for the trunk).

    Per-task learning rates are a simple form of task balancing: scaling task ``k``'s head
    updates by ``lr_k`` is what scaling its loss by ``w_k`` does to plain SGD on head-only
    parameters, without affecting the gradient the trunk receives. Each returned group is a
    dict ``{"name": ..., "params": [...], "lr": ..., ["weight_decay": ...]}`` accepted by any
    :class:`torch.optim.Optimizer`; ``"name"`` is kept by the optimiser, so
    ``optimizer.param_groups`` can be looked up (or schedulers adjusted) by name. Loading an
    optimiser's ``state_dict`` matches groups by position, not by name (torch's rule): build
    the groups with the tasks in the same order when resuming.

    Only parameters with ``requires_grad=True`` are included. The shared group is named
    ``"shared"`` and comes first; task groups follow in the order of ``tasks``. Groups with no
    trainable parameters (e.g. a frozen trunk) are omitted.

    Args:
        shared: Module (or iterable of parameters) shared by all tasks, or ``None``.
        tasks: Task name → module (or iterable of parameters) specific to that task.
        lr: One learning rate for all groups, or a mapping with one entry per group
            (``"shared"`` and each task name).
        weight_decay: Optional: one value for all groups, or a mapping with entries for some
            groups (the others keep the optimiser's default).
        model: Optional whole model: every trainable parameter of it must be in exactly one
            group, and no group may hold a parameter that is not in it.

    Returns:
        The list of parameter-group dicts.

    Raises:
        ValueError: If a parameter is in two groups, a trainable parameter of ``model`` is in
            none (or a group has one that ``model`` lacks), a task is called ``"shared"``, or
            ``lr``/``weight_decay`` name unknown groups, ``lr`` misses one, or a value is
            negative or not finite.
        TypeError: If ``tasks`` is not a mapping, ``lr`` is None, a value is not a number,
            or a group is neither a module nor an iterable of tensors.

    Example:
        >>> import torch
        >>> trunk, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        >>> groups = task_param_groups(trunk, {"depth": head}, lr={"shared": 0.1, "depth": 0.5})
        >>> optimizer = torch.optim.SGD(groups)
        >>> [(group["name"], group["lr"]) for group in optimizer.param_groups]
        [('shared', 0.1), ('depth', 0.5)]
    """
    if not isinstance(tasks, Mapping):
        raise TypeError(
            f"tasks: expected a mapping task name -> module (or parameters), got "
            f"{type(tasks).__name__}"
        )
    if SHARED_GROUP in tasks:
        raise ValueError(
            f"tasks: expected task names other than {SHARED_GROUP!r} (reserved for the shared "
            f"parameters), got a task named {SHARED_GROUP!r}"
        )
    sources: dict[str, ParameterSource] = {}
    if shared is not None:
        sources[SHARED_GROUP] = shared
    sources.update(tasks)
    if not sources:
        raise ValueError("no parameter groups: pass shared parameters and/or at least one task")
    group_names = list(sources)
    learning_rates = _per_group_values(lr, group_names, "lr", required=True)
    weight_decays = _per_group_values(weight_decay, group_names, "weight_decay", required=False)

    model_names: dict[int, str] = {}
    if model is not None:
        model_names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}

    owner: dict[int, tuple[str, str]] = {}  # id(parameter) -> (group, parameter name)
    groups: list[dict[str, Any]] = []
    for group in group_names:
        parameters: list[nn.Parameter] = []
        for local_name, parameter in _named_trainable(sources[group], group):
            name = model_names.get(id(parameter), local_name)
            if id(parameter) in owner:
                first_group, first_name = owner[id(parameter)]
                where = (
                    f"twice in group {group!r}"
                    if first_group == group
                    else f"in both group {first_group!r} and group {group!r}"
                )
                raise ValueError(
                    f"parameter {first_name!r} (shape {tuple(parameter.shape)}) appears {where}; "
                    "each parameter must belong to exactly one group"
                )
            if model is not None and id(parameter) not in model_names:
                raise ValueError(
                    f"parameter {name!r} of group {group!r} is not a trainable parameter of model"
                )
            owner[id(parameter)] = (group, name)
            parameters.append(parameter)
        if not parameters:
            continue
        entry: dict[str, Any] = {"name": group, "params": parameters, "lr": learning_rates[group]}
        if group in weight_decays:
            entry["weight_decay"] = weight_decays[group]
        groups.append(entry)

    if model is not None:
        left_out = [name for key, name in model_names.items() if key not in owner]
        if left_out:
            shown = ", ".join(repr(name) for name in left_out[:10])
            more = f" and {len(left_out) - 10} more" if len(left_out) > 10 else ""
            raise ValueError(
                f"{len(left_out)} trainable parameter(s) of model are in no group: {shown}{more}; "
                "add their module to shared or to a task, or set requires_grad=False"
            )
    if not groups:
        raise ValueError("no trainable parameters in any group")
    return groups
