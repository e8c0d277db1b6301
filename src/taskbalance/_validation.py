"""The input checks of the whole package: balancers, losses, probability tools and solvers.

Every check takes the argument's name first and its value second, raises before any state
changes, and words its message as ``"NAME: expected WHAT, got VALUE"``, so a user can fix the
call without reading our source. A ``TypeError`` means the wrong kind of object, a
``ValueError`` the right kind with a wrong value.
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Sequence
from typing import TypeGuard

import torch
from torch import Tensor


def check_num_tasks(num_tasks: object) -> int:
    """Return ``num_tasks`` as an int after checking it is a positive integer."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
        raise TypeError(f"num_tasks: expected a positive int, got {num_tasks!r}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks: expected a positive int, got {num_tasks}")
    return num_tasks


def check_real(name: str, value: object) -> float:
    """Return ``value`` as a float after checking it is a finite real number."""
    return _as_real(name, value)


def check_nonnegative(name: str, value: object) -> float:
    """Return ``value`` as a float after checking it is a finite number ≥ 0."""
    number = _as_real(name, value)
    if number < 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
    return number


def check_positive(name: str, value: object) -> float:
    """Return ``value`` as a float after checking it is a finite number > 0."""
    number = _as_real(name, value)
    if number <= 0:
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    return number


def check_in_range(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float after checking ``low (<|<=) value (<|<=) high``."""
    number = _as_real(name, value)
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name}: expected a number in {left}{low}, {high}{right}, got {value!r}")
    return number


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` after checking it is an int ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def check_int(name: str, value: object) -> int:
    """Return ``value`` as an int after checking it is an integer (NumPy's too), not a bool."""
    if not _is_int(value):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_optional_int(name: str, value: object) -> int | None:
    """Return ``value`` after checking it is None or an int (see :func:`check_int`)."""
    if value is None:
        return None
    if not _is_int(value):
        raise TypeError(f"{name}: expected None or an int, got {type(value).__name__} {value!r}")
    return int(value)


def _is_int(value: object) -> TypeGuard[numbers.Integral]:
    # bool is an Integral too, but True given for a count is a mistake, not the number 1
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` as a bool after checking it is True or False (NumPy's too): a flag
    given as a string (``"False"`` from a configuration file) would otherwise count as true."""
    if isinstance(value, bool):
        return value
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):  # np.True_, np.False_
        return bool(value)
    raise TypeError(f"{name}: expected True or False, got {kind.__name__} {value!r}")


def check_generator(name: str, value: object) -> torch.Generator | None:
    """Return ``value`` after checking it is None or a ``torch.Generator``."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(
            f"{name}: expected None or a torch.Generator, got {type(value).__name__} {value!r}"
        )
    return value


def check_seed(value: object) -> int:
    """Return ``value`` after checking it is an int ≥ 0 (a generator seed)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed: expected an int in [0, 2**64), got {value!r}")
    if not 0 <= value < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64), got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` after checking it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return str(value)


def check_tensor(name: str, value: object) -> Tensor:
    """Return ``value`` after checking it is a tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, value: object) -> Tensor:
    """Return ``value`` after checking it is a floating-point tensor."""
    tensor = check_tensor(name, value)
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")
    return tensor


def check_probabilities(name: str, value: Tensor) -> None:
    """Check that every entry of ``value`` lies in ``[0, 1]`` (NaN does not)."""
    if value.numel() == 0:
        return
    with torch.no_grad():
        outside = (value < 0) | (value > 1) | torch.isnan(value)
        if bool(outside.any()):
            bad = value[outside][0].item()
            raise ValueError(f"{name}: expected probabilities in [0, 1], got {bad:.6g}")


def check_nonnegative_entries(name: str, value: Tensor) -> None:
    """Check that every entry of ``value`` is a finite number ≥ 0 (a weight)."""
    with torch.no_grad():
        bad = ~(torch.isfinite(value) & (value >= 0))
        if bool(bad.any()):
            raise ValueError(
                f"{name}: expected finite weights >= 0, got {value[bad][0].item():.6g}"
            )


def check_same_shape(first_name: str, first: Tensor, second_name: str, second: Tensor) -> None:
    """Check that two tensors have the same shape, naming both shapes otherwise.

    Nothing here broadcasts one argument against the other: a silently broadcast ``(N, 1)``
    against ``(N,)`` is a classic source of wrong losses.
    """
    if first.shape != second.shape:
        raise ValueError(
            f"{first_name}, {second_name}: expected the same shape, got {first_name} shape "
            f"{tuple(first.shape)} and {second_name} shape {tuple(second.shape)}"
        )


def check_axis(name: str, value: Tensor, dim: int) -> int:
    """Return ``dim`` as a non-negative axis of ``value``; a 0-d tensor has no axis."""
    dim = check_int("dim", dim)
    if value.dim() == 0:
        raise ValueError(
            f"{name}: expected at least one dimension (the distribution axis), got a 0-d tensor"
        )
    if not -value.dim() <= dim < value.dim():
        raise ValueError(
            f"dim: expected an axis in [{-value.dim()}, {value.dim() - 1}] for {name} of shape "
            f"{tuple(value.shape)}, got {dim}"
        )
    return dim % value.dim()


#: Sums of probabilities are accepted within this relative distance of 1. Half precision cannot
#: represent 1 ± 1e-4, so the tolerance grows with the dtype's machine epsilon.
_SUM_TOLERANCE = 1e-4


def check_distribution(name: str, value: Tensor, dim: int) -> None:
    """Check that ``value`` is non-negative and sums to 1 along ``dim`` (to a tolerance), an
    axis with at least one outcome (an empty batch is fine; an empty distribution is none)."""
    if value.dim() > 0 and value.shape[dim] == 0:
        raise ValueError(
            f"{name}: expected a probability distribution with at least one outcome along "
            f"dim {dim}, got shape {tuple(value.shape)}"
        )
    if value.numel() == 0:
        return
    with torch.no_grad():
        minimum = value.min()
        if bool(torch.isnan(minimum)):
            raise ValueError(f"{name}: expected a probability distribution, got NaN entries")
        if minimum < 0:
            raise ValueError(
                f"{name}: expected a probability distribution with non-negative entries, "
                f"got a minimum of {minimum.item():.6g}"
            )
        sums = value.sum(dim=dim)
        tolerance = max(_SUM_TOLERANCE, 10.0 * torch.finfo(value.dtype).eps)
        if bool(((sums - 1.0).abs() > tolerance).any()):
            raise ValueError(
                f"{name}: expected sums of 1 along dim {dim} (relative tolerance "
                f"{tolerance:.0e}), got sums in [{sums.min().item():.6g}, {sums.max().item():.6g}]"
            )


def per_task_values(
    name: str, value: float | Sequence[float] | Tensor, num_tasks: int
) -> list[float]:
    """Broadcast a scalar, or check a length-``num_tasks`` sequence, into a list of floats."""
    if isinstance(value, Tensor):
        value = value.detach().item() if value.dim() == 0 else value.detach().flatten().tolist()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return [_as_real(name, value)] * num_tasks
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name}: expected a number or {num_tasks} numbers, got {value!r}")
    values = [_as_real(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if len(values) != num_tasks:
        raise ValueError(f"{name}: expected {num_tasks} values (one per task), got {len(values)}")
    return values


def _as_real(name: str, value: object) -> float:
    # numbers.Real: NumPy's scalars too (a value read from an array), not bool or a tensor
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return number


def as_loss_vector(losses: Tensor | Sequence[Tensor], num_tasks: int) -> Tensor:
    """Turn ``losses`` (a 1-D tensor or a sequence of 0-d tensors) into a [K] tensor.

    The result stays in the autograd graph: the objective is built from it.
    """
    if isinstance(losses, Tensor):
        vector = losses
        if vector.dim() != 1:
            raise ValueError(
                f"losses: expected a 1-D tensor of {num_tasks} task losses, "
                f"got shape {tuple(vector.shape)}"
            )
    elif isinstance(losses, Sequence) and not isinstance(losses, str):
        items = list(losses)
        for i, item in enumerate(items):
            if not isinstance(item, Tensor):
                advice = (
                    " (pass the loss tensors themselves, not their .item() values)"
                    if isinstance(item, (int, float))
                    else ""
                )
                raise TypeError(
                    f"losses[{i}]: expected a tensor, got {type(item).__name__}{advice}"
                )
            if item.numel() != 1:
                raise ValueError(
                    f"losses[{i}]: expected a scalar (0-d) loss, got shape {tuple(item.shape)}"
                )
        if not items:
            raise ValueError(f"losses: expected {num_tasks} task losses, got an empty sequence")
        devices = sorted({str(item.device) for item in items})
        if len(devices) > 1:
            raise ValueError(f"losses: expected every loss on one device, got {devices}")
        vector = torch.stack([item.reshape(()) for item in items])
    else:
        raise TypeError(
            f"losses: expected a 1-D tensor or a list of 0-d tensors, got {type(losses).__name__}"
        )
    if vector.shape[0] != num_tasks:
        raise ValueError(f"losses: expected {num_tasks} task losses, got {vector.shape[0]}")
    if not vector.is_floating_point():
        raise TypeError(f"losses: expected a floating-point tensor, got dtype {vector.dtype}")
    return vector


#: The largest finite float32, and the smallest positive one (subnormal).
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FLOAT32_TINY = 2.0**-149


def check_loss_values(values: list[float], *, positive: bool, method: str, hint: str = "") -> None:
    """Check host copies of the losses: finite in float32, and > 0 where the method takes logs
    or ratios. Values are given in the losses' own precision, so a float64 loss that float32
    cannot hold is named as such rather than as inf or 0."""
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"losses[{i}] is {value}: every task loss must be finite")
        if abs(value) > _FLOAT32_MAX:
            raise ValueError(
                f"losses[{i}] = {value:g} does not fit in float32 (max {_FLOAT32_MAX:.4g}), "
                "the precision of the balancer's statistics; rescale the loss"
            )
        if positive and 0 < value < _FLOAT32_TINY:
            raise ValueError(
                f"losses[{i}] = {value:g} does not fit in float32 (it rounds to 0) and "
                f"{method} takes logs or ratios of the losses; every loss must be > 0 in float32"
            )
        if positive and 0 < value < 1 / _FLOAT32_MAX:
            raise ValueError(
                f"losses[{i}] = {_shortest_float32(value)}: {method} takes logs or ratios of "
                f"the losses, and 1/L overflows float32 below {1 / _FLOAT32_MAX:.3g}; add a "
                "small constant to the loss"
            )
        if positive and value <= 0:
            raise ValueError(
                f"losses[{i}] = {value}: {method} takes logs or ratios of the losses, "
                f"so every loss must be > 0{hint}"
            )


def _shortest_float32(value: float) -> str:
    """The shortest decimal naming the same float32 as ``value`` (1e-40, not 9.99995e-41)."""
    packed = struct.pack("f", value)
    for digits in range(1, 10):
        shown = f"{value:.{digits}g}"
        if struct.pack("f", float(shown)) == packed:
            return shown
    return repr(value)


def as_present_mask(
    present: Tensor | Sequence[bool] | None,
    num_tasks: int,
    device: torch.device,
    *,
    allow_all_absent: bool = False,
) -> Tensor | None:
    """Check ``present=``: None, or a bool ``[K]`` mask with at least one task present.

    ``allow_all_absent`` accepts a mask with no task present (a DDP rank whose batch has no
    labels; the caller refuses the call when no rank has any task).
    """
    if present is None:
        return None
    if isinstance(present, Tensor):
        mask = present.detach()
    elif isinstance(present, Sequence) and not isinstance(present, str):
        if not all(isinstance(item, bool) for item in present):
            raise TypeError(f"present: expected {num_tasks} bools, got {list(present)!r}")
        mask = torch.tensor(list(present), dtype=torch.bool)
    else:
        raise TypeError(
            f"present: expected a bool tensor of shape [{num_tasks}], got {type(present).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"present: expected a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != (num_tasks,):
        raise ValueError(f"present: expected shape ({num_tasks},), got {tuple(mask.shape)}")
    if not allow_all_absent and not bool(mask.any()):
        raise ValueError("present: every task is absent; skip the call instead")
    return mask.to(device)


def as_kpi_vector(kpis: Tensor | Sequence[float] | None, num_tasks: int, method: str) -> Tensor:
    """Check per-task KPIs: present, K of them, each in [0, 1]. Returns a detached float tensor."""
    if kpis is None:
        raise ValueError(f"kpis: {method} needs per-task KPIs in [0, 1] (kpis=...), got None")
    if isinstance(kpis, str) or not isinstance(kpis, (Tensor, Sequence)):
        raise TypeError(
            f"kpis: expected a tensor or a sequence of {num_tasks} numbers, got {kpis!r}"
        )
    try:
        vector = torch.as_tensor(kpis).detach().to(torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"kpis: expected {num_tasks} numbers, got {kpis!r}") from error
    if vector.dim() != 1 or vector.shape[0] != num_tasks:
        raise ValueError(
            f"kpis: expected {num_tasks} per-task KPIs, got shape {tuple(vector.shape)}"
        )
    for i, value in enumerate(vector.tolist()):
        if not (0.0 <= value <= 1.0):
            raise ValueError(f"kpis[{i}] = {value}: expected a value in [0, 1]")
    return vector
