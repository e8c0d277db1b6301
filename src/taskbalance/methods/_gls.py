"""Geometric loss strategy (Chennupati et al., CVPRW 2019)."""

from __future__ import annotations

import torch
from torch import Tensor

from taskbalance._base import Balancer
from taskbalance._registry import register
from taskbalance._step import Step


@register("gls")
class GLS(Balancer):
    """Geometric loss strategy: minimise the geometric mean of the losses.

    Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019:
    objective ``(Π_k L_k)^{1/K}``.

    Weights: ``w_k = ∂/∂L_k (Π L)^{1/K} = (Π L)^{1/K} / (K·L_k)``; since the geometric mean is
    homogeneous of degree one, ``Σ w_k L_k`` equals it, so the objective returned is both the
    geometric mean in value and ``Σ w_k L_k`` in gradient. Computed as ``exp(mean log L)`` for
    stability. Losses must be positive.

    Defaults: none to set (the method has no hyperparameters).

    Departures: none. Under DDP the weights use the rank-averaged losses, which makes the
    summed gradient exactly that of the geometric mean of the global losses. With
    ``present=`` (the paper has every task in every batch), an absent task's weight is 0 and
    its last loss is read again in the mean, as every loss-based rule does; a task not yet
    present at any step has no loss to read, so the mean runs over the ``n`` tasks that have
    one, ``w_k = (Π L)^{1/n} / (n·L_k)`` (a placeholder would rescale the others' weights).

    The loop options every method takes, ``accumulation_steps`` and ``on_nonfinite``: see
    :class:`Balancer`.

    Args:
        num_tasks: K.

    Example:
        >>> import torch, taskbalance as tb
        >>> tb.GLS(num_tasks=2)(torch.tensor([1.0, 4.0], requires_grad=True)).item()
        2.0
    """

    requires_positive_losses = True

    def _update(self, step: Step) -> Tensor:
        losses = step.mean_losses
        known = step.known
        if known is None:
            geometric_mean = torch.exp(torch.log(losses).mean())
            return geometric_mean / (self.num_tasks * losses)
        # a placeholder's entry set to 1 (log 0): the sum of logs runs over the known tasks
        log_losses = torch.log(torch.where(known, losses, 1.0))
        count = known.sum()
        geometric_mean = torch.exp(log_losses.sum() / count)
        return torch.where(known, geometric_mean / (count * losses), 0.0)
