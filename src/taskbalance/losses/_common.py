"""Argument checks and reductions shared by the loss functions."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]

_REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    """Raises ``ValueError`` for anything but ``"mean"``, ``"sum"`` or ``"none"``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum' or 'none', got {reduction!r}")


def reduce(loss: Tensor, reduction: str) -> Tensor:
    """Applies ``reduction`` to a tensor of per-element (or per-sample) losses."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def check_tensor(x: object, name: str) -> Tensor:
    """Raises ``TypeError`` unless ``x`` is a tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_floating(x: object, name: str) -> Tensor:
    """Raises ``TypeError`` unless ``x`` is a floating-point tensor."""
    check_tensor(x, name)
    assert isinstance(x, Tensor)  # narrowed by check_tensor; keeps type checkers informed
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_same_shape(
    input: Tensor, target: Tensor, input_name: str = "input", target_name: str = "target"
) -> None:
    """Raises ``ValueError`` naming both shapes unless they are equal.

    Losses never broadcast ``input`` against ``target``: a silently broadcast ``(N, 1)`` against
    ``(N,)`` is a classic source of wrong losses.
    """
    if input.shape != target.shape:
        raise ValueError(
            f"{input_name} and {target_name} must have the same shape, got {input_name} shape "
            f"{tuple(input.shape)} and {target_name} shape {tuple(target.shape)}"
        )


def check_broadcastable_to(x: Tensor, shape: torch.Size, name: str, reference: str) -> None:
    """Raises ``ValueError`` unless ``x`` broadcasts to ``shape`` without enlarging it."""
    try:
        broadcast = torch.broadcast_shapes(x.shape, shape)
    except RuntimeError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"{name} must have the shape of {reference} or broadcast to it, got {name} shape "
            f"{tuple(x.shape)} and {reference} shape {tuple(shape)}"
        )


def as_float_target(target: Tensor, like: Tensor) -> Tensor:
    """Returns ``target`` in the dtype of ``like`` so that the loss keeps the input's dtype."""
    return target.to(dtype=like.dtype)


def check_positive(value: float, name: str) -> None:
    """Raises ``ValueError`` unless ``value`` is a finite number > 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_non_negative(value: float, name: str) -> None:
    """Raises ``ValueError`` unless ``value`` is a finite number >= 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_in_unit_interval(x: Tensor, name: str) -> None:
    """Raises ``ValueError`` unless every entry of ``x`` lies in ``[0, 1]``."""
    if x.numel() == 0:
        return
    with torch.no_grad():
        outside = (x < 0) | (x > 1) | torch.isnan(x)
        if bool(outside.any()):
            bad = x[outside][0].item()
            raise ValueError(f"{name} must contain probabilities in [0, 1], got {bad:.6g}")


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
    target: Tensor, num_classes: int, ignore_index: int | None, name: str = "target"
) -> Tensor:
    """Validates integer class indices and returns a mask of the entries that count.

    Raises:
        TypeError: If ``target`` is not an integer tensor.
        ValueError: If an index (other than ``ignore_index``) is outside ``[0, num_classes)``.
    """
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer class indices (e.g. torch.long), got dtype {target.dtype}"
        )
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
                    f"{name} contains class index {bad}, but input has {num_classes} classes "
                    f"(expected values in [0, {num_classes - 1}]{ignored})"
                )
    return valid


def check_index_target_shape(input: Tensor, target: Tensor, name: str = "target") -> None:
    """Checks that class-index targets have the input's shape without the class axis."""
    expected = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size([])
    if target.shape != expected:
        raise ValueError(
            f"input and {name} have incompatible shapes for class-index targets: got input "
            f"shape {tuple(input.shape)} (N, C, ...) and {name} shape {tuple(target.shape)}, "
            f"expected {name} shape {tuple(expected)}"
        )


def check_class_weight(weight: Tensor | None, num_classes: int, name: str = "weight") -> None:
    """Checks an optional per-class weight vector of length ``num_classes``."""
    if weight is None:
        return
    check_floating(weight, name)
    if weight.shape != (num_classes,):
        raise ValueError(
            f"{name} must have shape ({num_classes},) (one entry per class), got shape "
            f"{tuple(weight.shape)}"
        )
