"""IMTL-L, the loss-balancing half of Impartial Multi-Task Learning (Liu et al., ICLR 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._registry import register
from taskbalance._validation import check_real
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._learned_log_scales import LearnedLogScales


@register("imtl_l")
class IMTLL(LearnedLogScales):
    """IMTL-L: learn a log-scale per task so that scaled losses stay equal.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, §3.2: each task loss is
    replaced by ``e^{s_k}·L_k − s_k``. Minimising over ``s_k`` gives ``e^{s_k}·L_k = 1``: every
    scaled loss is driven to the same value, whatever the raw loss scale.

    Weights: ``w_k = e^{s_k}``. Default ``s = 0``. ``s`` is learned by your optimiser: pass
    ``balancer.parameters()`` to it.

    Departures: none.

    The loop options every method takes, ``accumulation_steps`` and ``on_nonfinite``: see
    :class:`Balancer`.

    Args:
        num_tasks: K.
        init: initial ``s`` for every task.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.IMTLL(num_tasks=2)
        >>> b(torch.tensor([2.0, 3.0], requires_grad=True)).item()
        5.0
    """

    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = ({"init": -0.5},)
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"init": 100.0}, ValueError, r"init: expected a number in \[-87.3, 87.3\]"),
    )

    def __init__(self, num_tasks: int, *, init: float = 0.0) -> None:
        super().__init__(num_tasks, init=check_real("init", init))
        self._set_initial_weights()

    def loss_factors(self, log_scales: Tensor) -> Tensor:
        return torch.exp(log_scales)

    def regulariser(self, log_scales: Tensor) -> Tensor:
        return -log_scales
