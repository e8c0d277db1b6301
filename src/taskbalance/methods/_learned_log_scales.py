"""Shared machinery of the methods that learn one log-scale per task (UW, IMTL-L)."""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import Tensor, nn

from taskbalance._base import Balancer
from taskbalance._step import Step
from taskbalance._validation import check_in_range

# e^{±s} must be a finite, non-zero float32 at the first call, or the weights start at inf or 0.
_LOG_FLOAT32_MAX = math.log(torch.finfo(torch.float32).max)  # 88.72
_LOG_FLOAT32_TINY = math.log(torch.finfo(torch.float32).tiny)  # -87.34


class LearnedLogScales(Balancer):
    """Objective ``Σ_k f_k(s_k)·L_k + Σ_k r(s_k)`` with learnable log-scales ``s``.

    ``s`` is an ``nn.Parameter``: add ``balancer.parameters()`` to your optimiser. The weights
    reported are ``f_k(s_k)``, the factor each loss is multiplied by.

    Under DDP the gradient of ``s`` is taken on the rank-averaged losses, so every rank's ``s``
    receives the same gradient and stays identical, while the gradient of each rank's own losses
    is ``f_k(s_k)`` as usual. Outside DDP this is exactly the textbook objective.

    With ``present=``, an absent task's terms (``f_k·L_k`` and ``r(s_k)``) are left out of
    the objective, so its ``s_k`` gets a zero gradient at that step.
    """

    def __init__(self, num_tasks: int, *, init: float) -> None:
        super().__init__(num_tasks)
        bound = min(_LOG_FLOAT32_MAX, -_LOG_FLOAT32_TINY)
        init = check_in_range("init", init, -round(bound - 0.05, 1), round(bound - 0.05, 1))
        self.log_scales = nn.Parameter(torch.full((self.num_tasks,), init))

    def _current_factors(self) -> Tensor:
        """``f(s)`` of the current log-scales (detached): the weights a call reports."""
        return self.loss_factors(self.log_scales.detach())

    def _set_initial_weights(self) -> None:
        """Report ``f(s_init)`` as the weights before the first call; subclasses call it last."""
        self._last_weights.copy_(self._current_factors())

    def _weights_after_changed_hyperparameters(self) -> Tensor:
        # The new hyperparameters (UW's kinds) on the loaded log-scales
        return self._current_factors()

    @abstractmethod
    def loss_factors(self, log_scales: Tensor) -> Tensor:
        """``f(s)``: the factor each task loss is multiplied by."""

    @abstractmethod
    def regulariser(self, log_scales: Tensor) -> Tensor:
        """``r(s)``, per task: what stops the factors collapsing to zero."""

    def _update(self, step: Step) -> Tensor:
        return self._current_factors().to(step.mean_losses.dtype)

    def _objective(self, step: Step, weights: Tensor) -> Tensor:
        losses = step.losses
        statistics = step.mean_losses
        log_scales = self.log_scales.to(losses.device)
        factors = self.loss_factors(log_scales).to(losses.dtype)
        statistics = statistics.to(losses.dtype)
        # Value: Σ f·L + Σ r. Gradient in L: f. Gradient in s: f'·(rank-averaged L) + r'.
        weighted = factors * statistics + factors.detach() * (losses - statistics)
        regularised = self.regulariser(log_scales).to(losses.dtype)
        if not step.all_present:
            # An absent task's scale learns nothing: its carried-forward loss is not a new
            # observation, and its regulariser alone would drift it. Presence is the global
            # one under DDP, so every rank's s still gets the same gradient.
            present = step.present.to(losses.device)
            weighted = torch.where(present, weighted, 0)
            regularised = torch.where(present, regularised, 0)
        return weighted.sum() + regularised.sum()
