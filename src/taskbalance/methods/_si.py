"""Scale-invariant loss (the baseline of Navon et al., ICML 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from taskbalance._base import Balancer
from taskbalance._registry import register
from taskbalance._step import Step


@register("si")
class SI(Balancer):
    """Scale-invariant baseline: minimise ``Σ_k log L_k``.

    From the baselines of Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022:
    taking logs makes the objective invariant to rescaling any one loss.

    Weights: ``w_k = 1/L_k``. The objective returned has the value ``Σ log L_k`` and the
    gradient ``Σ w_k ∇L_k``. Losses must be positive.

    Defaults: none to set (the method has no hyperparameters).

    Departures: none.

    The loop options every method takes, ``accumulation_steps`` and ``on_nonfinite``: see
    :class:`Balancer`.

    Args:
        num_tasks: K.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.SI(num_tasks=2)
        >>> round(b(torch.tensor([1.0, 2.0], requires_grad=True)).item(), 4)
        0.6931
    """

    requires_positive_losses = True

    def _update(self, step: Step) -> Tensor:
        losses = step.mean_losses
        return 1.0 / losses

    def _objective(self, step: Step, weights: Tensor) -> Tensor:
        losses = step.losses
        statistics = step.mean_losses
        weighted = (weights.to(losses.dtype) * losses).sum()
        # A constant shift so the value reads Σ log L without changing the gradient.
        statistics = statistics.to(losses.dtype)
        shift = torch.log(statistics).sum() - (weights.to(losses.dtype) * statistics).sum()
        return weighted + shift.detach()
