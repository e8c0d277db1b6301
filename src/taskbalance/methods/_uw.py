"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._registry import register
from taskbalance._validation import check_choice, check_num_tasks, check_real
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._learned_log_scales import LearnedLogScales

_KINDS = ("regression", "classification")


@register("uw")
class UW(LearnedLogScales):
    """Uncertainty weighting: learn each task's homoscedastic noise ``s_k = log σ_k²``.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018, eqs. (7) and (10):

    - regression task (Gaussian likelihood): ``½·e^{−s}·L + ½·s``
    - classification task (scaled softmax): ``e^{−s}·L + ½·s``

    Weights: ``w_k = ½·e^{−s_k}`` (regression) or ``e^{−s_k}`` (classification). At the optimum
    of a regression task with a mean-squared-error loss, ``e^{s} = MSE``: the learned ``e^{s}``
    is the noise variance.

    Defaults: every task regression (``kinds``), ``s = 0`` at the start (``init``).

    Departures: none from the paper's equations. Public code differs: LibMTL and mtan start at
    ``s = −0.5`` and several implementations drop the ½ factors; we keep the paper's factors so
    that ``e^{s}`` estimates σ² directly. ``s`` is learned by *your* optimiser: pass
    ``balancer.parameters()`` to it.

    The loop options every method takes, ``accumulation_steps`` and ``on_nonfinite``: see
    :class:`Balancer`.

    Args:
        num_tasks: K.
        kinds: ``"regression"`` or ``"classification"``, for all tasks or one per task.
        init: initial ``s`` for every task.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.UW(num_tasks=2, kinds=["regression", "classification"])
        >>> optimiser = torch.optim.SGD(b.parameters(), lr=0.1)
        >>> b(torch.ones(2, requires_grad=True)).item()
        1.5
    """

    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"kinds": "classification"},
        {"init": 0.5},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"init": -100.0}, ValueError, r"init: expected a number in \[-87.3, 87.3\]"),
    )

    factor: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        kinds: str | Sequence[str] = "regression",
        init: float = 0.0,
    ) -> None:
        check_num_tasks(num_tasks)
        if isinstance(kinds, str):
            kind_list = [kinds] * num_tasks
        elif isinstance(kinds, Sequence):
            kind_list = list(kinds)
        else:
            raise TypeError(
                f"kinds: expected 'regression', 'classification' or one of them per task, "
                f"got {kinds!r}"
            )
        if len(kind_list) != num_tasks:
            raise ValueError(f"kinds: expected {num_tasks} task kinds, got {len(kind_list)}")
        for i, kind in enumerate(kind_list):
            check_choice(f"kinds[{i}]", kind, _KINDS)
        self.kinds = kind_list
        super().__init__(num_tasks, init=check_real("init", init))
        factor = [0.5 if kind == "regression" else 1.0 for kind in kind_list]
        self.register_buffer("factor", torch.tensor(factor))
        self._set_initial_weights()

    def loss_factors(self, log_scales: Tensor) -> Tensor:
        return self.factor.to(log_scales.device) * torch.exp(-log_scales)

    def regulariser(self, log_scales: Tensor) -> Tensor:
        return 0.5 * log_scales

    @property
    def variances(self) -> Tensor:
        """``e^{s}``: the learned noise variances σ_k² (detached)."""
        return torch.exp(self.log_scales.detach())
