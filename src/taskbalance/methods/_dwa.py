"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._base import Balancer
from taskbalance._registry import register
from taskbalance._step import Step
from taskbalance._validation import check_positive, check_positive_int
from taskbalance.methods._facts import BadHyperparameters


@register("dwa")
class DWA(Balancer):
    """Dynamic Weight Average: weight each task by how slowly its loss is falling.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, eq. (1):

    ``r_k = L̄_k(t−1) / L̄_k(t−2)``,  ``w_k = K·exp(r_k/T) / Σ_j exp(r_j/T)``

    where ``L̄_k(t)`` is the mean loss of task k over period t. A period is an epoch (the paper;
    call :meth:`end_epoch` at each epoch boundary) or, with ``window=N``, back-to-back blocks of
    N steps, useful when epochs are long. ``w = 1`` for the first two periods, when no ratio
    exists yet (so a loop that never calls :meth:`end_epoch` trains with ``w = 1``: the
    balancer warns once, at the 10,000th step before the first :meth:`end_epoch`).

    Defaults: ``T = 2`` (the paper), per-epoch periods.

    Departures: none in per-epoch mode. ``window=N`` is our adaptation of the Nash-MTL code
    base's iteration variant: that code keeps a sliding buffer of the last 2N steps and
    recomputes every step, and backpropagates the mean ``Σ w_k L_k / K`` (weights summing to 1);
    ours uses consecutive blocks, so the weights change once per block and a resumed run needs
    no buffer of past losses, and keeps the paper's scale (weights summing to K). Losses must be
    positive (the rule takes ratios). With ``present=``, an absent task's last loss is read
    again (as every loss-based rule does); a task not yet present at any step has none, so its
    steps count in no period mean and the softmax and K run over the tasks that have one (weight
    0 for it: a placeholder would take a share from the others, or make a ratio that switches
    them off); once present, its ratio is 1 until two periods have a mean of its own.

    With ``accumulation_steps=N`` a window counts as one step of the period, with the losses of
    its first micro-batch (where the window's weights are decided): the period mean then reads
    one micro-batch in N, where the paper's epoch mean reads every batch.

    The loop options every method takes, ``accumulation_steps`` and ``on_nonfinite``: see
    :class:`Balancer`.

    Args:
        num_tasks: K.
        temperature: T; larger T gives more even weights.
        window: None for per-epoch periods, or the number of steps in a period.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.DWA(num_tasks=2)
        >>> for losses in ([4.0, 2.0], [2.0, 2.0]):
        ...     _ = b(torch.tensor(losses, requires_grad=True)); b.end_epoch()
        >>> b.compute_weights(torch.tensor([1.0, 1.0]))
        tensor([0.8756, 1.1244])
    """

    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"temperature": 0.5},
        {"window": 3},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"temperature": 0.0}, ValueError, r"temperature: expected a number > 0"),
    )

    requires_positive_losses = True

    period_sum: Tensor
    period_count: Tensor
    history: Tensor
    periods_done: Tensor
    period_known: Tensor
    history_known: Tensor

    def __init__(self, num_tasks: int, *, temperature: float = 2.0, window: int | None = None):
        super().__init__(num_tasks)
        self.temperature = check_positive("temperature", temperature)
        self.window = None if window is None else check_positive_int("window", window)
        self.register_buffer("period_sum", torch.zeros(self.num_tasks))
        self.register_buffer("period_count", torch.zeros((), dtype=torch.long))
        # history[0] = L̄(t−2), history[1] = L̄(t−1)
        self.register_buffer("history", torch.ones(2, self.num_tasks))
        self.register_buffer("periods_done", torch.zeros((), dtype=torch.long))
        # Tasks not yet present have no loss (Step.known): how many of this period's steps
        # had one, and which history entries are a mean of their own
        self.register_buffer("period_known", torch.zeros(self.num_tasks, dtype=torch.long))
        self.register_buffer("history_known", torch.zeros(2, self.num_tasks, dtype=torch.bool))

    def _update(self, step: Step) -> Tensor:
        losses = step.mean_losses
        periods_done = int(self.periods_done)
        if periods_done >= 2:
            # 1 where either period has no mean of the task's own (no host sync to ask first)
            ratios = torch.where(
                self.history_known.all(dim=0), self.history[1] / self.history[0], 1.0
            )
            # r/T overflows float32 when a mean loss grows ~1e38-fold between periods; an
            # infinite logit makes softmax NaN, so cap it at the largest finite float.
            scaled = torch.nan_to_num(
                ratios / self.temperature, posinf=torch.finfo(ratios.dtype).max
            )
            if step.known is None:
                weights = self.num_tasks * torch.softmax(scaled, dim=0)
            else:  # over the tasks that have a loss: a task never present takes no share
                known = step.known.to(scaled.device)
                shares = torch.softmax(torch.where(known, scaled, -torch.inf), dim=0)
                weights = torch.where(known, known.sum() * shares, 0.0)
        else:
            weights = torch.ones_like(losses)
        if self.window is None and periods_done == 0:
            self._count_step_before_first_epoch(
                "the weights stay 1 until two epochs have ended",
                "pass window=N for periods of N steps",
            )
        if step.known is None:
            self.period_sum.add_(losses)
            self.period_known.add_(1)
        else:
            self.period_sum.add_(torch.where(step.known, losses, 0.0))
            self.period_known.add_(step.known.to(self.period_known.device))
        self.period_count.add_(1)
        if self.window is not None and int(self.period_count) >= self.window:
            self._close_period()
        return weights

    def end_epoch(self) -> None:
        """Close the current period (per-epoch mode); a no-op with ``window=`` set."""
        if self.window is None and int(self.period_count) > 0:
            self._close_period()

    def _close_period(self) -> None:
        counted = self.period_known > 0
        mean = torch.where(counted, self.period_sum / self.period_known.clamp_min(1), 1.0)
        self.history[0] = self.history[1]
        self.history[1] = mean
        self.history_known[0] = self.history_known[1]
        self.history_known[1] = counted
        self.periods_done.add_(1)
        self.period_sum.zero_()
        self.period_count.zero_()
        self.period_known.zero_()

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, temperature={self.temperature}, window={self.window}"
