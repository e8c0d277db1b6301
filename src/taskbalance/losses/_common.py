"""Shape checks and reductions shared by the loss functions.

The generic checks (a tensor, a positive number, a choice) are :mod:`taskbalance._validation`'s;
the ones here know about losses: class axes, class indices, targets against inputs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from taskbalance._validation import check_choice, check_floating

Reduction = Literal["mean", "sum", "none"]

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    """``reduction``: one of ``"mean"``, ``"sum"``, ``"none"``."""
    check_choice("reduction", reduction, REDUCTIONS)


def reduce(loss: Tensor, reduction: str) -> Tensor:
    """Applies ``reduction`` to a tensor of per-element (or per-sample) losses."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def check_broadcastable_to(name: str, x: Tensor, reference: str, shape: torch.Size) -> None:
    """Raises ``ValueError`` unless ``x`` broadcasts to ``shape`` without enlarging it."""
    try:
        broadcast = torch.broadcast_shapes(x.shape, shape)
    except RuntimeError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"{name}: expected the shape of {reference} or one that broadcasts to it, got {name} "
            f"shape {tuple(x.shape)} and {reference} shape {tuple(shape)}"
        )


def as_float_target(target: Tensor, like: Tensor) -> Tensor:
    """Returns ``target`` in the dtype of ``like`` so that the loss keeps the input's dtype."""
    return target.to(dtype=like.dtype)


def autocast_float32(input: Tensor) -> Tensor:
    """A half-precision ``input`` in float32 under autocast, as autocast runs torch's own losses
    (its float32 list): in float16 a loss summed over a batch overflows to inf. Unchanged
    otherwise (outside autocast a float16 input keeps its dtype, as with torch's losses)."""
    if input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(
        input.device.type
    ):
        return input.float()
    return input


def in_result_dtype(loss: Tensor, input: Tensor) -> Tensor:
    """``loss`` (computed in :func:`~taskbalance._precision.opmath_dtype`) in the dtype a
    caller gets: ``input``'s, except under autocast, where it stays float32 as torch's own
    losses (run in float32 by autocast) return it: rounded to float16, a loss summed over an
    image batch overflows and GradScaler would skip every step."""
    if torch.is_autocast_enabled(input.device.type):
        return loss
    return loss.to(dtype=input.dtype)


def safe_log(x: Tensor, floor: float | None = None) -> Tensor:
    """``log x`` with ``log 0 = -inf`` (or ``floor``) and no NaN in the backward pass.

    The logarithm is evaluated at ``where(x > 0, x, 1)`` so that masked-out zeros never produce
    ``1/0`` in the gradient (``0 · inf = NaN`` would otherwise leak through ``torch.where``).
    """
    positive = x > 0
    log_x = torch.log(torch.where(positive, x, torch.ones_like(x)))
    if floor is None:
        return torch.where(positive, log_x, -torch.inf)
    return torch.where(positive, log_x.clamp(min=floor), floor)


def class_dim(input: Tensor) -> int:
    """Class axis of a logits tensor: 1 for ``(N, C, ...)``, 0 for an unbatched ``(C,)``."""
    return 1 if input.dim() >= 2 else 0


def check_class_indices(
    name: str, target: Tensor, num_classes: int, ignore_index: int | None
) -> tuple[Tensor, Tensor]:
    """Validates integer class indices; returns them as ``torch.long`` and the entries that count.

    Any integer dtype is accepted. The indices are converted to ``torch.long`` first: ``gather``,
    ``one_hot`` and indexing need it, and comparing a ``uint8`` target with a negative
    ``ignore_index`` would wrap the latter (``-100`` would match the class index 156).

    Returns:
        ``(indices, valid)``: the ``torch.long`` indices and a boolean mask of the entries that
        are not ``ignore_index``.

    Raises:
        TypeError: If ``target`` is not an integer tensor.
        ValueError: If an index (other than ``ignore_index``) is outside ``[0, num_classes)``.
    """
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"{name}: expected integer class indices (e.g. torch.long), got dtype {target.dtype}"
        )
    target = target.to(dtype=torch.long)
    valid = (
        torch.ones_like(target, dtype=torch.bool)
        if ignore_index is None
        else (target != ignore_index)
    )
    if target.numel() > 0:
        with torch.no_grad():
            out_of_range = valid & ((target < 0) | (target >= num_classes))
            if bool(out_of_range.any()):
                bad = int(target[out_of_range][0].item())
                ignored = "" if ignore_index is None else f" or ignore_index={ignore_index}"
                raise ValueError(
                    f"{name}: expected class indices in [0, {num_classes - 1}]{ignored} (input "
                    f"has {num_classes} classes), got {bad}"
                )
    return target, valid


def check_index_target_shape(name: str, target: Tensor, input: Tensor) -> None:
    """Checks that class-index targets have the input's shape without the class axis."""
    expected = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size([])
    if target.shape != expected:
        raise ValueError(
            f"{name}: expected shape {tuple(expected)} (class indices for input of shape "
            f"{tuple(input.shape)}, (N, C, ...)), got shape {tuple(target.shape)}"
        )


def check_class_weight(name: str, weight: Tensor | None, num_classes: int) -> None:
    """Checks an optional per-class weight vector of length ``num_classes``."""
    if weight is None:
        return
    check_floating(name, weight)
    if weight.shape != (num_classes,):
        raise ValueError(
            f"{name}: expected shape ({num_classes},) (one entry per class), got shape "
            f"{tuple(weight.shape)}"
        )
