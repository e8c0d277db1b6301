"""Keeping an absent task's non-finite loss out of the backward.

A task marked absent (``present=``) gets weight 0, but a weight of 0 is still a gradient: the
objective's backward hands a zero to the absent loss, and that loss's own backward multiplies
it by whatever its formula holds. A loss written as a masked mean, ``(mask * err).sum() /
mask.sum()``, is 0/0 = NaN on a batch without labels, and its backward gives 0 · (1/0) = NaN:
every parameter the loss reaches (its head, the whole trunk) would get NaN. So a non-finite
absent loss passes no gradient at all: a hook on the ``torch.stack`` node the K losses were
stacked by (a list passed to a balancer is stacked the same way) drops those entries'
gradients, and their graph is never run backward.

This cannot keep out a loss that comes out of one graph node with the present tasks' losses:
the outputs of a compiled region (AOTAutograd runs its whole backward, with a zero for a
dropped output), or one loss tensor split into K. The call then warns (``RuntimeWarning``).
A loss vector computed in one piece (not stacked from K losses) cannot be split either: its backward
gets a zero for each absent entry, so an absent entry's formula must have a finite backward
there (a masked sum divided by ``count.clamp_min(1)`` rather than by a zero count); a
non-finite absent entry of such a vector warns too. A leaf vector is harmless.

A parameter that only such losses reach (the absent task's head) would then get no gradient
(``.grad`` None), where a finite loss gives it a zero one, and optimisers tell the two apart
(momentum and Adam's moments move on a zero gradient and skip a missing one): those parameters
get an explicit zero gradient through ``0 · p``, which involves no term of the loss. So an
absent task's parameters get the zero gradient a finite loss would give them (sparse for an
embedding read with ``sparse=True``), whatever its loss's value and formula.
(DDP's reducer is satisfied either way: the engine still runs the dropped branch's nodes with
undefined gradients, whose hooks mark the parameters ready.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from taskbalance._warnings import warn_at_callers_line

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
    found = _stack_of(vector)
    if found is None:
        if vector.grad_fn is not None:  # a leaf vector passes its gradient to nothing else
            _warn_one_piece(vector, absent)
        return None
    node, inputs = found
    dropped = frozenset(absent)

    def drop(grad_inputs: tuple[Tensor | None, ...], _: object) -> tuple[Tensor | None, ...]:
        return tuple(None if k in dropped else g for k, g in enumerate(grad_inputs))

    node.register_hook(drop)
    kept = [fn for k, fn in enumerate(inputs) if k not in dropped and fn is not None]
    reached = _reachable(kept, set())
    for k in sorted(dropped):
        if inputs[k] is not None and _shares_its_loss_node(inputs[k], reached):
            warn_at_callers_line(
                f"losses[{k}] is {vector[k].item()} for a task marked absent, but it comes out "
                "of one graph node with the present tasks' losses (a compiled region that "
                "computes the losses, or one tensor of losses split into K), so it cannot be "
                "kept out of the backward: that node runs its whole backward, and a loss that "
                "divides by a zero count gives NaN gradients (0 · ∞). Compute an absent task's "
                "loss finitely (e.g. divide by count.clamp_min(1))"
            )
    cut = [fn for k, fn in enumerate(inputs) if k in dropped and fn is not None]
    orphans = _orphan_leaves(cut, reached)
    if not orphans:
        return None
    return zero_through(orphans, vector.device)


def _warn_one_piece(vector: Tensor, absent: Sequence[int]) -> None:
    first = absent[0]
    made_by = type(vector.grad_fn).__name__.removesuffix("Backward0")
    warn_at_callers_line(
        f"losses[{first}] is {vector[first].item()} for a task marked absent, and the loss "
        f"vector is the output of {made_by} (not a list or a bare torch.stack of K losses), "
        "so its entry cannot be kept out of the backward: that op's backward runs with a zero "
        "for it, and where the absent loss divides by a zero count (a masked mean over no "
        "labels) every parameter it reaches gets NaN (0 · ∞). Compute an absent task's loss "
        "finitely (divide by count.clamp_min(1)), or pass the K losses as a list"
    )


def zero_through(leaves: Sequence[tuple[Tensor, bool]], device: torch.device) -> Tensor:
    """A float32 0-d exact zero on ``device`` whose backward gives each ``(leaf, sparse)`` a
    zero gradient of the kind a loss would (see :func:`_zero_gradient_term`)."""
    zero = torch.zeros((), dtype=torch.float32, device=device)
    for leaf, sparse in leaves:  # (a model split over devices: each term joins the losses')
        zero = zero + _zero_gradient_term(leaf, sparse).to(device)
    return zero


def _stack_of(vector: Tensor) -> tuple[Any, list[object | None]] | None:
    """The stack node ``vector`` is the output of, and its K inputs (None for a constant);
    None if ``vector`` is not a stack of K losses. Only the bare stack: behind another op
    (``torch.where(present, stacked, nan)``) the stack's entry may be finite and have other
    uses, whose gradients a hook there would drop too."""
    node: Any = vector.grad_fn
    if node is None or type(node).__name__ != "StackBackward0":
        return None
    edges = node.next_functions
    if len(edges) != vector.shape[0]:
        return None
    return node, [fn for fn, _ in edges]


def _children(node: object) -> list[object]:
    return [child for child, _ in node.next_functions if child is not None]  # type: ignore[attr-defined]


def _reachable(roots: Sequence[object], stop: set[object]) -> set[object]:
    """The nodes reachable from ``roots`` that are not in ``stop`` (nor below one)."""
    seen: set[object] = set()
    pending = [root for root in roots if root not in stop]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        pending.extend(child for child in _children(node) if child not in stop)
    return seen


#: Backward nodes that only move values (views, copies, dtype casts): no loss formula in them.
_MOVES_VALUES = frozenset(
    {
        "AliasBackward0",
        "AsStridedBackward0",
        "CloneBackward0",
        "ExpandBackward0",
        "ReshapeAliasBackward0",
        "SelectBackward0",
        "SliceBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "ToCopyBackward0",
        "UnsafeViewBackward0",
        "UnsqueezeBackward0",
        "ViewBackward0",
    }
)


def _shares_its_loss_node(root: object, reached: set[object]) -> bool:
    """Whether the dropped loss's own formula sits in a node the kept losses also run.

    Past the nodes that only move values (the reshape of a list entry, the selection of one
    entry of a loss tensor), the first node is where the loss was computed. Only this loss's
    own (the kept losses do not reach it): dropping its gradient skips its backward. Reached by
    the kept losses too (a compiled region's outputs, an unbind or a division of one loss
    tensor): it runs the dropped loss's backward with a zero instead.
    """
    node: object | None = root
    while node is not None:
        if node in reached:
            return not hasattr(node, "variable")  # a leaf (AccumulateGrad) has no formula
        if type(node).__name__ not in _MOVES_VALUES:
            return False
        children = _children(node)
        node = children[0] if len(children) == 1 else None
    return False


def _orphan_leaves(cut: Sequence[object], reached: set[object]) -> list[tuple[Tensor, bool]]:
    """The leaves (with whether their gradient is sparse) that only the ``cut`` nodes reach."""
    orphans: dict[int, tuple[Tensor, bool]] = {}
    for node in _reachable(cut, reached):
        sparse = bool(getattr(node, "_saved_sparse", False))  # embedding(..., sparse=True)
        for child in _children(node):
            leaf = getattr(child, "variable", None)
            if child in reached or not isinstance(leaf, Tensor) or not leaf.requires_grad:
                continue
            if leaf.is_floating_point() or leaf.is_complex():
                known = orphans.get(id(leaf))
                orphans[id(leaf)] = (leaf, sparse or (known is not None and known[1]))
    return list(orphans.values())


def _zero_gradient_term(leaf: Tensor, sparse: bool) -> Tensor:
    """A float32 0-d zero whose backward gives ``leaf`` a zero gradient of the kind a loss
    would: sparse (no rows) for an embedding table read with ``sparse=True``."""
    if sparse and leaf.dim() == 2:
        no_rows = torch.zeros(0, dtype=torch.long, device=leaf.device)
        term = torch.nn.functional.embedding(no_rows, leaf, sparse=True).sum()
    else:
        term = (leaf.reshape(-1)[:1] * 0).sum()
    return (term.real if term.is_complex() else term).to(torch.float32)
