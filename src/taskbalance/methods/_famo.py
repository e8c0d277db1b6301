"""FAMO: Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._adam import AdamState
from taskbalance._base import Balancer, LossesLike, PresentLike, saved_before_has_loss
from taskbalance._registry import register
from taskbalance._step import Step
from taskbalance._validation import (
    check_choice,
    check_nonnegative,
    check_positive,
    per_task_values,
)
from taskbalance.methods._facts import BadHyperparameters


@register("famo")
class FAMO(Balancer):
    """FAMO: decrease all task losses at an equal rate, in O(1) time and memory per step.

    Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
    Algorithm 1. Task logits ``ξ`` give ``z = softmax(ξ)``; the update direction is the
    gradient of ``Σ_k (z_k / c)·log L_k`` with ``c = Σ_k z_k / L_k``, so

    ``w_k = z_k / (c · L_k)``.

    After each step the logits learn from how much each log-loss actually fell,
    ``δ_k = log L_k(t−1) − log L_k(t)``: their gradient is ``(∂z/∂ξ)ᵀ δ`` (the softmax
    Jacobian times δ), applied by Adam with learning rate ``lr`` and L2 weight decay
    ``weight_decay`` (γ in the paper). A task whose loss fell less gains weight.

    Defaults: ``lr = 0.025``, ``weight_decay = 0.001`` (the paper's Algorithm 2 and its QM9
    runs; the official code's argument default and its CelebA runs use 0.01), ``ξ = 0`` at the
    start, ``min_losses = 0`` (the losses' known lower bounds, one per task or one for all).

    Departures: the official code evaluates the losses a second time on the same batch after
    the parameter update (one extra forward pass) and so measures how much fitting *that* batch
    lowered each loss; ``delta="same_batch"`` with :meth:`update` does exactly that. By default
    (``delta="next_step"``) we read δ from the losses of the next step instead, a different
    batch, so the loop keeps one forward and one backward; δ then also carries the
    batch-to-batch variation of the losses, which is large at small batch sizes. The official
    training loop also clips the shared gradient to norm 1 (``max_norm``): clipping is the
    loop's business, do it with ``torch.nn.utils.clip_grad_norm_`` to reproduce the paper's
    runs. Under DDP δ uses the rank-averaged losses, so every rank's logits agree. With
    ``present=``, an absent task's weight is 0 and the others' are the rule's with its last
    loss read again (as every loss-based rule does); a task not yet present at any step has
    no loss to read, so the softmax and ``c`` run over the tasks that have one (a placeholder
    would rescale the others' weights by its ratio to their losses). Only the present tasks'
    logits learn at a step (through the softmax over them, their Adam moments moving alone);
    an absent task's logit, moments and last loss are left as they were, and its δ spans the
    steps since it was last present. A task has no δ at its first presence (no earlier loss
    of its own): it learns from the next one. With ``delta="same_batch"`` pass the call's
    ``present=`` to :meth:`update` too (under DDP each task's loss after the step is then
    averaged over the ranks that have it, as at the call).

    The loop options every method takes, ``accumulation_steps`` and ``on_nonfinite``: see
    :class:`Balancer`.

    Args:
        num_tasks: K.
        lr: Adam learning rate of the logits.
        weight_decay: γ, L2 decay of the logits.
        min_losses: lower bound of each loss, subtracted before the log (0 for most losses;
            negative for, e.g., a Gaussian NLL); one number, or one per task.
        eps: added to ``L − min_losses`` before the log, as in the official code.
        delta: ``"next_step"`` (δ from the next call's losses, no extra forward) or
            ``"same_batch"`` (the official code: call :meth:`update` with the losses
            re-evaluated on the same batch after ``optimizer.step()``).

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.FAMO(num_tasks=2)
        >>> _ = b(torch.tensor([1.0, 4.0], requires_grad=True))
        >>> b.weights
        tensor([0.8000, 0.2000])
    """

    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"lr": 0.1, "weight_decay": 0.0},
        {"min_losses": -1.0},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"lr": 0.0}, ValueError, r"lr: expected a number > 0"),
        ({"delta": "next"}, ValueError, r"delta: expected one of"),
    )

    requires_positive_losses = True
    # Losses <= 0 are accepted once the lower bounds are set below them.
    positive_losses_hint = "; or set min_losses= below the losses"

    min_losses: Tensor
    logits: Tensor
    previous_log_losses: Tensor
    has_previous_loss: Tensor
    recorded_present: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        lr: float = 0.025,
        weight_decay: float = 0.001,
        min_losses: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
        delta: str = "next_step",
    ) -> None:
        super().__init__(num_tasks)
        self.delta = check_choice("delta", delta, ("next_step", "same_batch"))
        self.lr = check_positive("lr", lr)
        self.weight_decay = check_nonnegative("weight_decay", weight_decay)
        lower_bounds = per_task_values("min_losses", min_losses, self.num_tasks)
        self.eps = check_nonnegative("eps", eps)
        self.logit_optimiser = AdamState(self.num_tasks, lr=self.lr, weight_decay=self.weight_decay)
        self.register_buffer("min_losses", torch.tensor(lower_bounds))
        # With every bound 0, the base's check of positive losses is FAMO's (see _observe)
        self._bounded = any(bound != 0 for bound in lower_bounds)
        # With a negative lower bound a loss may itself be <= 0; _update checks L > min_losses.
        self.requires_positive_losses = min(lower_bounds) >= 0
        self.register_buffer("logits", torch.zeros(self.num_tasks))
        self.register_buffer("previous_log_losses", torch.zeros(self.num_tasks))
        # Which tasks' entry above is a loss of their own, written at an advancing call (the
        # base's has_loss also counts a window's later micro-batches, which FAMO's δ does not
        # see), and which were written at the last one: the "before" of update()
        self.register_buffer("has_previous_loss", torch.zeros(self.num_tasks, dtype=torch.bool))
        self.register_buffer("recorded_present", torch.zeros(self.num_tasks, dtype=torch.bool))
        self._last_weights.fill_(1.0 / self.num_tasks)
        self._skipped_a_call = False

    @property
    def task_probabilities(self) -> Tensor:
        """``z = softmax(ξ)``, the share of attention each task gets (detached)."""
        return torch.softmax(self.logits, dim=0)

    def update(self, losses: LossesLike, *, present: PresentLike = None) -> None:
        """The official code's logit update (``delta="same_batch"``): call after the step.

        Pass the losses re-evaluated on the *same batch* after ``optimizer.step()`` (one extra
        forward pass, without grad); the logits learn from ``δ = log L(before) − log L(after)``.
        Every present loss must be finite and above its lower bound. With partial labels pass
        the call's ``present=`` again: an absent task's entry is not read (NaN will do), and
        under DDP each task's loss is averaged over the ranks that have it, as at the call
        (without it, a rank's value for a task it lacks would enter the task's mean). The
        logits of tasks absent (on every rank) at the call that recorded the losses before,
        the window's first with ``accumulation_steps``, do not learn. Each recorded "before"
        is used once: a second update, or one after a skipped call (``on_nonfinite="skip"``,
        whose step GradScaler skipped, a later micro-batch of the window included), learns
        nothing.

        Args:
            losses: the K task losses after the parameter update.
            present: this rank's bool ``[K]`` mask of the tasks with labels in the batch, as
                given to the call; None: every task.
        """
        if self.delta != "same_batch":
            raise ValueError(
                "delta: FAMO.update() is the same-batch update of delta='same_batch'; this "
                "balancer was created with delta='next_step', which updates at the next call"
            )
        if self._steps_taken == 0 and not self._skipped_a_call:
            raise ValueError("losses: FAMO.update() needs a call first (the losses before)")
        statistics, anywhere = self._mean_over_ranks(losses, present)
        values, bounds, logits, previous, _ = self._on_host(statistics)
        # Only the tasks whose "before" was recorded at the last advancing call (the window's
        # first micro-batch with accumulation: not the last call's) and that are present now
        learning = [
            bool(before and now)
            for before, now in zip(self.recorded_present.tolist(), anywhere.tolist(), strict=True)
        ]
        if any(learning):
            mask = None if all(learning) else learning
            log_losses = self._stored_log_losses(self._shifted(values, bounds, mask)).tolist()
            self._learn_from(log_losses, previous, logits, mask)
        # The "before" is spent: a second update(), or one after a call that GradScaler's
        # skip (on_nonfinite="skip") left unrecorded, has no new step to learn from
        self.recorded_present.fill_(False)

    # K-vector arithmetic in Python floats (float64) on the host: inside a training step the
    # thirty-odd tensor calls it took on K numbers cost more than the rest of the step's work.

    def _on_host(self, values: Tensor) -> tuple[list[float], ...]:
        """``values``, ``min_losses``, the logits, ``previous_log_losses`` and
        ``has_previous_loss`` (as 0/1) as Python floats, in one host transfer (one device
        sync on a GPU)."""
        recorded = self.has_previous_loss.to(self.previous_log_losses.dtype)
        buffers = (self.min_losses, self.logits, self.previous_log_losses, recorded)
        host = torch.cat((values, *buffers)).tolist()
        K = self.num_tasks
        return tuple(host[i * K : (i + 1) * K] for i in range(5))

    def _shifted(
        self, losses: list[float], bounds: list[float], present: list[bool] | None = None
    ) -> list[float]:
        """``L − min_losses + eps``, checked to be > 0 (the method takes its log) for the
        present tasks. An absent task's entry is its carried last loss's, which passed the
        check when it was recorded; one not > 0 (the placeholder of a task not yet present,
        which no rule reads) is 1."""
        shifted = [
            value if present is None or present[k] or value > 0 else 1.0
            for k, value in enumerate(
                loss - bound + self.eps for loss, bound in zip(losses, bounds, strict=True)
            )
        ]
        if any(not value > 0 for value in shifted):
            raise ValueError(
                f"losses: FAMO takes log(L − min_losses) with min_losses = {bounds}, so every "
                f"loss must exceed its bound; got {losses}"
            )
        return shifted

    def _stored_log_losses(self, shifted: list[float]) -> Tensor:
        """``log(L − min_losses + eps)`` rounded as ``previous_log_losses`` stores it: both
        sides of δ then have the same precision, and an unchanged loss gives δ = 0 exactly."""
        logs = [math.log(value) for value in shifted]
        return torch.tensor(logs, dtype=self.previous_log_losses.dtype)

    def _learn_from(
        self,
        log_losses: list[float],
        previous: list[float],
        logits: list[float],
        present: list[bool] | None,
    ) -> list[float]:
        """One Adam step on the logits from the decrease since ``previous`` (the stored
        ``previous_log_losses``); returns the new logits.

        With a ``present`` mask, only the present tasks' logits learn, through the softmax
        over the present tasks alone: an absent task's logit, moments and loss stay as they
        were (its δ would be 0, but the full softmax would still move its logit).
        """
        decrease = [before - after for before, after in zip(previous, log_losses, strict=True)]
        probabilities = _softmax(logits, present)
        # (∂softmax/∂ξ)ᵀ δ = z ⊙ (δ − zᵀδ), over the present tasks (z is 0 elsewhere)
        mean_decrease = math.fsum(
            z * d for z, d in zip(probabilities, decrease, strict=True) if z > 0
        )
        logit_grad = [
            z * (d - mean_decrease) if z > 0 else 0.0
            for z, d in zip(probabilities, decrease, strict=True)
        ]
        updated = self.logit_optimiser.step(logits, logit_grad, present)
        # rounded as the buffer stores them, on the host: no read back from the device
        stored = torch.tensor(updated, dtype=self.logits.dtype)
        self.logits.copy_(stored)
        return stored.tolist()

    def _update(self, step: Step) -> Tensor:
        values, bounds, logits, previous, recorded_flags = self._on_host(step.mean_losses)
        recorded = [flag > 0 for flag in recorded_flags]
        present = None if step.all_present else step.present.tolist()
        shifted = self._shifted(values, bounds, present)
        log_losses = self._stored_log_losses(shifted)
        if self.delta == "next_step" and any(recorded):  # some task has an earlier loss
            # δ needs the task now and an earlier loss of its own
            learning = [
                recorded[k] and (present is None or present[k]) for k in range(self.num_tasks)
            ]
            if any(learning):
                logits = self._learn_from(
                    log_losses.tolist(), previous, logits, None if all(learning) else learning
                )
        if present is None:
            self.previous_log_losses.copy_(log_losses)
            if not all(recorded):
                self.has_previous_loss.fill_(True)
            if self.delta == "same_batch":
                self.recorded_present.fill_(True)
        else:  # an absent task keeps its last loss (or none)
            mask = step.present.to(self.previous_log_losses.device)
            self.previous_log_losses.copy_(torch.where(mask, log_losses, self.previous_log_losses))
            self.has_previous_loss.logical_or_(mask)
            if self.delta == "same_batch":
                self.recorded_present.copy_(mask)
        known = None if step.known is None else step.known.tolist()
        # w_k = z_k / (c·L_k) with c = Σ_k z_k / L_k, over the tasks that have a loss
        ratios = [z / value for z, value in zip(_softmax(logits, known), shifted, strict=True)]
        normaliser = math.fsum(ratios)
        weights = [ratio / normaliser for ratio in ratios]
        return torch.tensor(weights, dtype=torch.float32, device=step.mean_losses.device)

    def _count_skipped_call(self) -> None:
        super()._count_skipped_call()
        # A loop whose first step was skipped still calls update(): it learns nothing
        self._skipped_a_call = True
        if self.delta == "same_batch":
            # GradScaler skips the optimiser step this call (a window's first or a later
            # micro-batch) belongs to: update() then has no parameter update to learn from
            self.recorded_present.fill_(False)

    def _observe(self, step: Step, new: Tensor | None) -> None:
        # A window's later calls record their present losses (the base), which a later
        # window's rule may read as an absent task's: checked against the bounds as at a
        # window's first call, before anything is recorded (one host transfer, only when a
        # bound is not 0: L > 0 is checked for every call already)
        if not self._bounded:
            return
        K = self.num_tasks
        host = torch.cat((step.mean_losses, self.min_losses)).tolist()
        self._shifted(host[:K], host[K:], None if step.all_present else step.present.tolist())

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # A state of format 1 has no recorded_present (its release's update() read the last
        # call's presence, _last_present, and a recorded loss, has_previous_loss), and its
        # has_previous_loss is what it knew of which tasks have a loss (the base's has_loss).
        last = state_dict.get(prefix + "_last_present")
        had = state_dict.get(prefix + "has_previous_loss")
        if saved_before_has_loss(state_dict, prefix) and isinstance(had, Tensor):
            state_dict.setdefault(prefix + "has_loss", had.clone())
            if isinstance(last, Tensor):
                state_dict.setdefault(prefix + "recorded_present", last & had)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _objective(self, step: Step, weights: Tensor) -> Tensor:
        # Shift the value to the paper's Σ (z/c)·log(L − min) without changing the gradient:
        # with z/c = w ⊙ (L − min), the shift is Σ w ⊙ ((L − min)·log(L − min) − L). Not
        # checked here: _update (a window's first call) or _observe (its later ones) has.
        K = self.num_tasks
        # one transfer; the weights are on the losses' device, which may not be the module's
        values = (weights.to(step.mean_losses.device), step.mean_losses, self.min_losses)
        host = torch.cat(values).tolist()
        shift = sum(
            w * (_x_log_x(value - bound + self.eps) - value)
            for w, value, bound in zip(host[:K], host[K : 2 * K], host[2 * K :], strict=True)
            if w != 0  # an absent task's loss is not checked against its bound
        )
        return torch.dot(weights.to(step.losses.dtype), step.losses) + shift


def _x_log_x(x: float) -> float:
    """``x·log(x)``, 0 at 0 and NaN below (``torch.xlogy(x, x)``)."""
    if x > 0:
        return x * math.log(x)
    return 0.0 if x == 0 else math.nan


def _softmax(logits: list[float], present: list[bool] | None) -> list[float]:
    """``softmax(ξ)`` over the present tasks (all of them without a mask), 0 elsewhere."""
    largest = max(v for k, v in enumerate(logits) if present is None or present[k])
    exponentials = [
        math.exp(v - largest) if present is None or present[k] else 0.0
        for k, v in enumerate(logits)
    ]
    total = math.fsum(exponentials)
    return [e / total for e in exponentials]
