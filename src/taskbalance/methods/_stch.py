"""STCH: smooth Tchebycheff scalarisation (Lin, Zhang, Yang, Liu, Wang & Zhang, ICML 2024)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._base import Balancer
from taskbalance._registry import register
from taskbalance._step import Step
from taskbalance._validation import check_positive, check_positive_int, per_task_values
from taskbalance.methods._facts import BadHyperparameters


@register("stch")
class STCH(Balancer):
    """STCH: minimise a smooth maximum of the normalised log-losses.

    Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization", ICML 2024. The Tchebycheff scalarisation ``max_k λ_k (f_k − z_k)`` is
    smoothed into

    ``g_μ = μ · log Σ_k exp(λ_k (f_k − z_k)/μ)``

    which tends to the maximum as ``μ → 0`` and to ``Σ_k λ_k (f_k − z_k)`` plus a constant as
    ``μ → ∞``. For multi-task learning the official code (and LibMTL's copy) take
    ``f_k = log L_k``, ``λ = 1`` and ``z_k = log n_k`` with ``n_k`` the mean loss of task k over
    the last warm-up epoch (the code's "nadir vector"), and scale the objective by K:

    ``objective = K·μ·log Σ_k (L_k/n_k)^{1/μ}``,  ``w_k = K·softmax_k(log(L_k/n_k)/μ) / L_k``.

    So ``Σ_k w_k L_k = K`` at every step, and the task furthest above its reference point gets
    most of the weight. During the warm-up (no reference point yet) the objective is
    ``Σ log L_k`` (the scale-invariant loss, :class:`~taskbalance.SI`), ``w_k = 1/L_k``.

    Warm-up: call :meth:`end_epoch` at every epoch boundary. The first ``warmup_epochs``
    epochs train on ``Σ log L_k``; the mean loss of the last of them becomes ``n``; STCH
    starts with the next epoch. (LibMTL's ``STCH_warmup_epoch=4`` is ``warmup_epochs=5``
    here: its epochs 0–3 warm up and epoch 4 measures ``n``.) Each ``n_k`` is the mean over
    the steps where task k was present (``present=``; with ``accumulation_steps``, a window
    counts a task's first presence in it); a task absent throughout that epoch
    extends the measuring into the next ones (with a warning at each :meth:`end_epoch`) until
    it has been seen. An epoch without a call does not count towards measuring ``n``. Give
    ``nadir=`` to skip the warm-up. (A first epoch of 10,000 steps warns once: the loop
    probably never calls :meth:`end_epoch`.)

    Defaults: ``mu = 1.0`` and ``warmup_epochs = 5`` (LibMTL's ``STCH_mu = 1`` and
    ``STCH_warmup_epoch = 4``). Losses must be positive (logs and ``1/L``), and at least
    ``2.9e-39`` so that ``1/L`` is a finite float32.

    Departures: none in the rule. The reference code adds ``1e-20`` inside each log; we do not
    (a loss that small is refused instead, as :class:`~taskbalance.SI` does). Under DDP ``n``
    and the weights use the rank-averaged losses, so every rank agrees. With ``present=``
    (the paper has every task in every batch) an absent task's weight is 0 and its last loss
    is read again, as every loss-based rule does; a task not present at any step yet has no
    loss to read, so the softmax and K run over the ``m`` tasks that have one (a placeholder
    would take a share of the softmax from the others).

    The loop options every method takes, ``accumulation_steps`` and ``on_nonfinite``: see
    :class:`Balancer`.

    Args:
        num_tasks: K.
        mu: smoothing μ > 0 (smaller: closer to the hard maximum).
        warmup_epochs: epochs of ``Σ log L`` training; the mean loss over the last one is ``n``.
        nadir: the reference losses ``n_k > 0`` (one number, or one per task), to skip the
            warm-up (``warmup_epochs`` is then not read); None measures them.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.create("stch", num_tasks=2, nadir=[1.0, 2.0])
        >>> losses = torch.tensor([1.0, 2.0], requires_grad=True)  # from the model, in the graph
        >>> round(b(losses).item(), 4)  # 2·log(1/1 + 2/2)
        1.3863
        >>> b.weights
        tensor([1.0000, 0.5000])
    """

    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"mu": 0.2, "warmup_epochs": 1},
        {"nadir": 2.0},
        {"warmup_epochs": 1},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"mu": 0.0}, ValueError, r"mu: expected a number > 0"),
        ({"nadir": 0.0}, ValueError, r"nadir\[0\] = 0.0: expected a reference loss > 0"),
        ({"warmup_epochs": 0}, ValueError, r"warmup_epochs: expected an int >= 1"),
    )

    requires_positive_losses = True

    nadir: Tensor
    has_nadir: Tensor
    nadir_sum: Tensor
    nadir_count: Tensor
    epochs_done: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        mu: float = 1.0,
        warmup_epochs: int = 5,
        nadir: float | Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__(num_tasks)
        self.mu = check_positive("mu", mu)
        self.warmup_epochs = check_positive_int("warmup_epochs", warmup_epochs)
        given = None if nadir is None else per_task_values("nadir", nadir, self.num_tasks)
        if given is not None:
            for i, value in enumerate(given):
                if value <= 0:
                    raise ValueError(f"nadir[{i}] = {value}: expected a reference loss > 0")
        self.register_buffer("nadir", torch.tensor(given or [1.0] * self.num_tasks))
        self.register_buffer("has_nadir", torch.tensor(given is not None))
        self.register_buffer("nadir_sum", torch.zeros(self.num_tasks))
        # Per task: an absent task's statistic is its last loss, not an observation.
        self.register_buffer("nadir_count", torch.zeros(self.num_tasks, dtype=torch.long))
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))

    def _update(self, step: Step) -> Tensor:
        losses = step.mean_losses
        if bool(self.has_nadir):
            return stch_weights(losses, self.nadir.float(), self.mu, step.known)
        epochs_done = int(self.epochs_done)
        if epochs_done == 0:
            self._count_step_before_first_epoch(
                f"the warm-up (Σ log L) lasts until {self.warmup_epochs} epochs have ended",
                "pass nadir= to skip the warm-up",
            )
        if epochs_done >= self.warmup_epochs - 1:  # the epoch that measures n
            self._measure(step.present, losses)
        return 1.0 / losses

    def _measure(self, present: Tensor, losses: Tensor) -> None:
        present = present.to(losses.device)
        self.nadir_sum.add_(torch.where(present, losses, 0))
        self.nadir_count.add_(present.to(self.nadir_count.device))

    def _observe(self, step: Step, new: Tensor | None) -> None:
        # A task absent from the window's first micro-batch counts at its first presence in a
        # later one, once per window: else a task labelled only there never ends the warm-up
        if new is None or bool(self.has_nadir):
            return
        if int(self.epochs_done) >= self.warmup_epochs - 1:
            self._measure(new, step.mean_losses)

    def end_epoch(self) -> None:
        """Count a warm-up epoch; after the last one, fix the reference losses ``n``."""
        if bool(self.has_nadir):
            return
        measured = int(self.epochs_done) + 1 >= self.warmup_epochs and bool(self.nadir_count.any())
        unseen = (self.nadir_count == 0).nonzero().flatten().tolist() if measured else []
        if unseen:
            # Before any state changes: under -W error the warning is the call's error.
            warnings.warn(
                f"stch: tasks {unseen} were absent at every step of the epoch that measures "
                "the reference losses n; the warm-up goes on until each was seen (or pass "
                "nadir=)",
                stacklevel=2,
            )
        self.epochs_done.add_(1)
        if measured and not unseen:
            self.nadir.copy_(self.nadir_sum / self.nadir_count)
            self.has_nadir.fill_(True)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # Saved by an earlier release, one count served every task (a 0-d tensor): each gets it.
        count = state_dict.get(prefix + "nadir_count")
        if isinstance(count, Tensor) and count.dim() == 0:
            state_dict[prefix + "nadir_count"] = count.expand(self.num_tasks).clone()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _objective(self, step: Step, weights: Tensor) -> Tensor:
        losses, statistics = step.losses, step.mean_losses
        weighted = (weights.to(losses.dtype) * losses).sum()
        # A constant shift so the value reads the STCH objective (Σ log L during the warm-up)
        # without changing the gradient.
        values = statistics.double()
        if bool(self.has_nadir):
            ratios = torch.log(values / self.nadir.to(values.device).double()) / self.mu
            count: int | Tensor = self.num_tasks
            if step.known is not None:  # over the tasks that have a loss, as the weights
                ratios = torch.where(step.known.to(values.device), ratios, -math.inf)
                count = step.known.sum()
            value = count * self.mu * torch.logsumexp(ratios, dim=0)
        else:
            value = torch.log(values).sum()
        shift = value - (weights.double() * values).sum()
        return weighted + shift.to(losses.dtype).detach()

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, mu={self.mu}, warmup_epochs={self.warmup_epochs}, "
            f"has_nadir={bool(self.has_nadir)}"
        )


def stch_weights(losses: Tensor, nadir: Tensor, mu: float, known: Tensor | None = None) -> Tensor:
    """``w_k = K·softmax_k(log(L_k/n_k)/μ) / L_k``, in float64 so that a small μ cannot
    overflow the softmax's logits; returned in the losses' dtype. With ``known`` (bool
    ``[K]``), over those tasks only (K their count; 0 elsewhere): the others' entries are
    placeholders, not losses."""
    values = losses.double()
    logits = torch.log(values / nadir.to(values.device).double()) / mu
    if known is None:
        weights = losses.shape[0] * torch.softmax(logits, dim=0) / values
    else:
        known = known.to(values.device)
        shares = torch.softmax(torch.where(known, logits, -math.inf), dim=0)
        weights = torch.where(known, known.sum() * shares / values, 0.0)
    return weights.to(losses.dtype)
