"""Fixed user-given weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._base import Balancer
from taskbalance._registry import register
from taskbalance._step import Step
from taskbalance._validation import per_task_values
from taskbalance.methods._facts import BadHyperparameters


@register("fixed")
class Fixed(Balancer):
    """Constant weights chosen by the user: objective ``Σ_k w_k L_k``.

    The loop options every method takes, ``accumulation_steps`` and ``on_nonfinite``: see
    :class:`Balancer`.

    Args:
        num_tasks: K.
        weights: K non-negative weights (a hand-tuned grid search result, say).

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.create("fixed", num_tasks=2, weights=[1.0, 0.5])
        >>> b(torch.tensor([2.0, 2.0], requires_grad=True)).item()
        3.0
    """

    weights_change = False

    required_hyperparameters: ClassVar[dict[str, Any]] = {"weights": 1.0}
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = ({"weights": 2.0},)
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"weights": [1.0, -2.0, 0.5]}, ValueError, r"weights\[1\] = -2.0: expected"),
    )

    fixed_weights: Tensor

    def __init__(self, num_tasks: int, *, weights: Sequence[float] | Tensor) -> None:
        super().__init__(num_tasks)
        values = per_task_values("weights", weights, self.num_tasks)
        for i, value in enumerate(values):
            if value < 0:
                raise ValueError(f"weights[{i}] = {value}: expected a weight >= 0")
        self.register_buffer("fixed_weights", torch.tensor(values, dtype=torch.float32))
        self._last_weights.copy_(self.fixed_weights)

    def _update(self, step: Step) -> Tensor:
        return self.fixed_weights.clone()

    def _weights_after_changed_hyperparameters(self) -> Tensor:
        return self.fixed_weights.clone()
