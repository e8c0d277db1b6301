"""Scale-invariant loss (the baseline of Navon et al., ICML 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from taskbalance._base import Balancer
from taskbalance._registry import register

#: The smallest loss whose inverse is a finite float32.
SMALLEST_INVERTIBLE_LOSS = 1.0 / torch.finfo(torch.float32).max


def check_inverse_is_finite(losses: Tensor, method: str) -> None:
    """Refuse a loss whose weight ``1/L`` would overflow float32 (e.g. a subnormal 1e-40)."""
    too_small = (losses < SMALLEST_INVERTIBLE_LOSS).nonzero().flatten().tolist()
    if too_small:
        k = too_small[0]
        raise ValueError(
            f"losses[{k}] = {losses[k].item():.3g}: {method} weights each loss by 1/L, which "
            f"overflows float32 below {SMALLEST_INVERTIBLE_LOSS:.3g}; add a small constant to "
            "this loss or rescale it"
        )


@register("si")
class SI(Balancer):
    """Scale-invariant baseline: minimise ``Σ_k log L_k``.

    From the baselines of Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022:
    taking logs makes the objective invariant to rescaling any one loss.

    Weights: ``w_k = 1/L_k``. The objective returned has the value ``Σ log L_k`` and the
    gradient ``Σ w_k ∇L_k``. Losses must be positive, and at least ``1/float32_max ≈ 2.9e-39``
    so that the weight ``1/L_k`` is a finite float32 (a smaller loss is refused with an error
    naming it, before any state changes, rather than giving an inf weight and a NaN objective).

    Defaults: none to set (the method has no hyperparameters).

    Departures: none.

    Args:
        num_tasks: K.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.SI(num_tasks=2)
        >>> round(b(torch.tensor([1.0, 2.0])).item(), 4)
        0.6931
    """

    requires_positive_losses = True

    def _update(self, losses: Tensor, gram: Tensor | None, kpis: Tensor | None) -> Tensor:
        check_inverse_is_finite(losses, self._method_name)
        return 1.0 / losses

    def _objective(self, losses: Tensor, weights: Tensor, statistics: Tensor) -> Tensor:
        weighted = (weights.to(losses.dtype) * losses).sum()
        # A constant shift so the value reads Σ log L without changing the gradient.
        statistics = statistics.to(losses.dtype)
        shift = torch.log(statistics).sum() - (weights.to(losses.dtype) * statistics).sum()
        return weighted + shift.detach()
