"""Equal weighting."""

from __future__ import annotations

import torch
from torch import Tensor

from taskbalance._base import Balancer
from taskbalance._registry import register
from taskbalance._step import Step


@register("ew")
class EW(Balancer):
    """Equal weighting: ``w_k = 1``, so the objective is the plain sum ``Σ_k L_k``.

    The baseline every other method is measured against. Note that the objective is the sum,
    not the mean, of the losses; divide your learning rate by K to reproduce a mean.

    The loop options every method takes, ``accumulation_steps`` and ``on_nonfinite``: see
    :class:`Balancer`.

    Args:
        num_tasks: K.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.EW(num_tasks=2)
        >>> b(torch.tensor([1.0, 3.0], requires_grad=True)).item()
        4.0
    """

    weights_change = False

    def _update(self, step: Step) -> Tensor:
        losses = step.mean_losses
        return torch.ones_like(losses)
