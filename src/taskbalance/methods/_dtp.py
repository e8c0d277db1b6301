"""Dynamic Task Prioritization (Guo et al., ECCV 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._base import Balancer
from taskbalance._registry import register
from taskbalance._step import Step
from taskbalance._validation import check_in_range, per_task_values
from taskbalance.methods._facts import BadHyperparameters


@register("dtp")
class DTP(Balancer):
    """Dynamic Task Prioritization: focus on the tasks whose KPI is lowest.

    Guo, Haque, Huang, Yeung & Fei-Fei, "Dynamic Task Prioritization for Multitask Learning",
    ECCV 2018, §3.3. Each step reads a per-task key performance indicator ``κ_k ∈ [0, 1]``
    (accuracy, mIoU, ...), smooths it and turns it into a focal-loss-style weight:

    ``κ̄_k ← α·κ_k + (1 − α)·κ̄_k``,  ``w_k = −(1 − κ̄_k)^{γ_k} · log κ̄_k``

    A task that is learned (κ̄ → 1) fades out; a hard task (κ̄ small) dominates. The weights are
    not learned and carry no gradient.

    Defaults: ``γ = 2`` for every task (a common choice; the paper tunes γ per task),
    ``α = 0.1``, ``κ̄`` starts at the first observed KPI, and ``κ̄`` is clamped to ``[eps, 1]``
    with ``eps = 1e-4`` so that a KPI of 0 gives a large finite weight (≈ 9.2) instead of ∞.

    Departures: the paper leaves α open; 0.1 averages over roughly the last 10 steps, which
    steadies per-batch KPIs. The paper also prioritises examples within a task with the focal
    loss: use :func:`taskbalance.losses.focal_loss` for that part. With ``present=``, an
    absent task's KPI is not an observation: its κ̄ keeps its value, or, before the task's
    first present call, starts at the KPI of that call (with ``accumulation_steps``, a task
    absent from a window's first call is observed at its first call in the window that has
    it); under DDP each KPI averages over the ranks that have the task, as the losses do.

    The loop options every method takes, ``accumulation_steps`` and ``on_nonfinite``: see
    :class:`Balancer`.

    Args:
        num_tasks: K.
        gamma: the focusing parameter γ, for all tasks or one per task (≥ 0).
        smoothing: α in (0, 1], the weight of the newest KPI in the moving average.
        eps: lower clamp of κ̄ in (0, 1).

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.DTP(num_tasks=2, gamma=2.0)
        >>> _ = b(torch.ones(2, requires_grad=True), kpis=torch.tensor([0.9, 0.5]))
        >>> b.weights
        tensor([0.0011, 0.1733])
    """

    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"gamma": 0.5},
        {"smoothing": 0.6},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"smoothing": 0.0}, ValueError, r"smoothing: expected a number in \(0.0, 1.0\]"),
    )

    requires_kpis = True

    gamma: Tensor
    smoothed_kpis: Tensor
    has_kpis: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        gamma: float | Sequence[float] = 2.0,
        smoothing: float = 0.1,
        eps: float = 1e-4,
    ) -> None:
        super().__init__(num_tasks)
        gammas = per_task_values("gamma", gamma, self.num_tasks)
        for i, value in enumerate(gammas):
            if value < 0:
                raise ValueError(f"gamma[{i}] = {value}: expected a focusing parameter >= 0")
        self.smoothing = check_in_range("smoothing", smoothing, 0.0, 1.0, low_open=True)
        self.eps = check_in_range("eps", eps, 0.0, 1.0, low_open=True, high_open=True)
        self.register_buffer("gamma", torch.tensor(gammas))
        self.register_buffer("smoothed_kpis", torch.ones(self.num_tasks))
        # Per task: whether κ̄ holds an observed KPI (a task absent so far has none).
        self.register_buffer("has_kpis", torch.zeros(self.num_tasks, dtype=torch.bool))

    def _update(self, step: Step) -> Tensor:
        kpis = step.kpis
        assert kpis is not None  # the base class has checked them
        smoothed = self._smoothed(kpis)
        if not step.all_present:  # an absent task's KPI is not a new observation
            smoothed = torch.where(step.present, smoothed, self.smoothed_kpis)
            self.has_kpis |= step.present
        else:
            self.has_kpis.fill_(True)
        self.smoothed_kpis.copy_(smoothed)
        return self._focal_weights(smoothed)

    def _focal_weights(self, smoothed: Tensor) -> Tensor:
        """``w_k = −(1 − κ̄_k)^γ_k log κ̄_k``, with κ̄ clamped to ``[eps, 1]``."""
        clamped = smoothed.clamp(min=self.eps, max=1.0)
        return -((1 - clamped) ** self.gamma) * torch.log(clamped)

    def _weights_after_changed_hyperparameters(self) -> Tensor | None:
        # The new γ and eps on the loaded κ̄; before a first call there is no κ̄ (the weights
        # are the initial ones)
        if self._steps_taken == 0:
            return None
        return self._focal_weights(self.smoothed_kpis)

    def _smoothed(self, kpis: Tensor) -> Tensor:
        """``α·κ + (1 − α)·κ̄``; a task's κ̄ starts at its first observed KPI (decided on the
        device: no host read)."""
        smoothed = self.smoothing * kpis + (1 - self.smoothing) * self.smoothed_kpis
        return torch.where(self.has_kpis, smoothed, kpis)

    def _observe(self, step: Step, new: Tensor | None) -> None:
        # A task absent from the window's first micro-batch is observed at its first presence
        # in a later one, once per window as at a first call: without it, a task only
        # labelled in later micro-batches would keep κ̄ = 1 (weight 0) for good.
        if new is None or step.kpis is None:
            return
        self.smoothed_kpis.copy_(torch.where(new, self._smoothed(step.kpis), self.smoothed_kpis))
        self.has_kpis |= new
