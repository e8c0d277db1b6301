"""Keeping an absent task's non-finite loss out of the backward.

A task marked absent (``present=``) gets weight 0, but a weight of 0 is still a gradient: the
objective's backward hands a zero to the absent loss, and that loss's own backward multiplies
it by whatever its formula holds. A loss written as a masked mean, ``(mask * err).sum() /
mask.sum()``, is 0/0 = NaN on a batch without labels, and its backward gives 0 · (1/0) = NaN:
every parameter the loss reaches (its head, the whole trunk) would get NaN. So a non-finite
absent loss passes no gradient at all: a hook on the ``torch.stack`` node the K losses were
stacked by (a list passed to a balancer is stacked the same way) drops those entries' gradients,
and their graph is never run backward.

A loss vector computed in one piece (not stacked from K losses) cannot be split: its backward
gets a zero for each absent entry, so an absent entry's formula must have a finite backward
there (a masked sum divided by ``count.clamp_min(1)`` rather than by a zero count). A leaf
vector, or NaN put in by ``torch.where(present, losses, nan)``, is harmless either way.

A parameter that only such losses reach (the absent task's head) would then get no gradient
(``.grad`` None), where a finite loss gives it a zero one, and optimisers tell the two apart
(momentum and Adam's moments move on a zero gradient and skip a missing one): those parameters
get an explicit zero gradient through ``0 · p``, which involves no term of the loss. So an
absent task's parameters get the same zero gradient whatever its loss's value and formula.
(DDP's reducer is satisfied either way: the engine still runs the dropped branch's nodes with
undefined gradients, whose hooks mark the parameters ready.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["absent_losses_cut"]


def absent_losses_cut(vector: Tensor, absent: Sequence[int]) -> Tensor | None:
    """Drop the gradients of the ``absent`` entries at ``vector``'s stack node.

    Args:
        vector: the ``[K]`` losses of the call.
        absent: indices of the absent tasks whose loss is not finite.

    Returns:
        A 0-d zero to add to the objective, whose backward gives a zero gradient to each leaf
        (parameter) that only the dropped losses reach; None when there is none, or when
        ``vector`` was not stacked from K losses (its entries then share one backward, which
        gets a zero for each absent entry: see the module docstring).
    """
    inputs = _stack_inputs(vector)
    if inputs is None:
        return None
    dropped = frozenset(absent)

    def drop(grad_inputs: tuple[Tensor | None, ...], _: object) -> tuple[Tensor | None, ...]:
        return tuple(None if k in dropped else g for k, g in enumerate(grad_inputs))

    node = vector.grad_fn
    assert node is not None
    node.register_hook(drop)
    kept = [fn for k, fn in enumerate(inputs) if k not in dropped and fn is not None]
    cut = [fn for k, fn in enumerate(inputs) if k in dropped and fn is not None]
    reached = _reachable(kept, set())
    orphans = [
        leaf
        for leaf in _leaves(_reachable(cut, reached))
        if leaf.requires_grad and leaf.is_floating_point()
    ]
    if not orphans:
        return None
    zero = torch.zeros((), dtype=torch.float32, device=vector.device)
    for leaf in orphans:
        zero = zero + (leaf.reshape(-1)[:1].to(torch.float32) * 0).sum()
    return zero


def _stack_inputs(vector: Tensor) -> list[object | None] | None:
    """The K nodes stacked into ``vector`` (None for a constant), or None if not a stack."""
    node = vector.grad_fn
    if node is None or type(node).__name__ != "StackBackward0":
        return None
    edges = node.next_functions
    if len(edges) != vector.shape[0]:
        return None
    return [fn for fn, _ in edges]


def _reachable(roots: Sequence[object], stop: set[object]) -> set[object]:
    """The nodes reachable from ``roots`` that are not in ``stop`` (nor below one)."""
    seen: set[object] = set()
    pending = [root for root in roots if root not in stop]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:  # type: ignore[attr-defined]
            if child is not None and child not in seen and child not in stop:
                pending.append(child)
    return seen


def _leaves(nodes: set[object]) -> list[Tensor]:
    """The leaf tensors of the AccumulateGrad nodes among ``nodes``."""
    leaves = []
    for node in nodes:
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            leaves.append(variable)
    return leaves
