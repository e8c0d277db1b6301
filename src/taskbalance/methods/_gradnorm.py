"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., ICML 2018)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._adam import AdamState
from taskbalance._registry import register
from taskbalance._validation import check_choice, check_nonnegative, check_positive
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import GradientBalancer

_INITIAL_LOSSES = ("first", "log_c")
#: Floor applied to the weights after each update, before renormalising, so they stay > 0.
_MIN_WEIGHT = 1e-6


@register("gradnorm")
class GradNorm(GradientBalancer):
    """GradNorm: learn weights that equalise the task gradient norms, scaled by training rates.

    Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", ICML 2018, Algorithm 1. Weights start at
    ``w_k = 1``. At step t, with ``n_k = ‖∇_W L_k‖ = √G_kk`` (W the shared parameters, the last
    shared layer in the paper):

    - ``G_W^(k) = w_k·n_k``, ``Ḡ_W = mean_k G_W^(k)``;
    - inverse training rates ``L̃_k = L_k / L_k(0)`` and ``r_k = L̃_k / mean_j L̃_j``;
    - ``L_grad = Σ_k |G_W^(k) − Ḡ_W·r_k^α|``, minimised over w with the targets
      ``Ḡ_W·r_k^α`` held constant (the paper; LibMTL and the Aligned-MTL authors' copy detach
      the whole target, Ḡ_W included), so ``∂L_grad/∂w_k = sign(w_k n_k − Ḡ_W r_k^α)·n_k``;
    - ``w`` takes one Adam step on that gradient, is floored at 1e-6 (so it stays positive;
      a documented guard the paper does not need to state) and renormalised to ``Σ w = K``.

    The weights returned for step t are ``w(t)``, those *before* this step's update: the
    paper's network step uses ``L(t) = Σ w_k(t) L_k(t)`` and then moves to ``w(t+1)``.

    As ``Jᵀw``: the objective is ``Σ w_k L_k`` with ``w`` detached, whose backward is
    ``Σ_k w_k g_k = Jᵀw``; the norms ``n_k`` are the square roots of G's diagonal, so G is all
    the method needs.

    ``L_k(0)``: ``initial_losses="first"`` (default) takes the losses of the first step (under
    DDP, the rank average); ``"log_c"`` uses ``log C_k`` for a ``C_k``-class cross-entropy
    task (the paper's suggestion), with ``num_classes`` given per task.

    Defaults: ``alpha = 1.5`` (the paper's NYUv2 setting; its synthetic toy uses 0.12),
    ``lr = 0.025`` (the paper's learning rate for w), Adam with torch's default betas.

    Departures: the weights are updated by an Adam kept inside the balancer (its moments are
    buffers in ``state_dict``), not by the user's optimiser; LibMTL parametrises the weights
    through a softmax and learns them with the network's optimiser instead.

    Args:
        num_tasks: K.
        alpha: α ≥ 0, the strength of the restoring force towards a common training rate.
        lr: Adam learning rate of the weights.
        initial_losses: ``"first"`` or ``"log_c"``.
        num_classes: ``C_k`` per task (or one int for all) when ``initial_losses="log_c"``.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``
            (``"none"`` only), ``group_aggregation`` (``"joint"`` only), ``reuse_rows``: see
            :class:`GradientBalancer`; the loop options ``accumulation_steps``, ``on_nonfinite``:
            see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.create("gradnorm", num_tasks=2)
        >>> gram = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
        >>> b.compute_weights(torch.ones(2), gram=gram)
        tensor([1., 1.])
        >>> b.compute_weights(torch.ones(2), gram=gram)
        tensor([1.0250, 0.9750])
    """

    normalization_refused = (
        "its rule equalises the raw gradient norms, which normalising would make all 1"
    )
    per_group_refused = "its learned weights and their Adam moments are state carried across steps"

    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"alpha": 0.5},
        {"initial_losses": "log_c", "num_classes": 10},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"group_aggregation": "per_tensor"}, ValueError, r"does not offer per-group"),
        ({"normalization": "l2"}, ValueError, r"normalization: \S+ does not offer gradient"),
        ({"alpha": -1.0}, ValueError, r"alpha: expected a number >= 0"),
    )

    requires_positive_losses = True

    task_weights: Tensor
    initial_loss_values: Tensor
    has_initial_losses: Tensor

    default_heads = "weighted"

    def __init__(
        self,
        num_tasks: int,
        *,
        alpha: float = 1.5,
        lr: float = 0.025,
        initial_losses: str = "first",
        num_classes: int | Sequence[int] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        self.alpha = check_nonnegative("alpha", alpha)
        self.lr = check_positive("lr", lr)
        self.initial_losses = check_choice("initial_losses", initial_losses, _INITIAL_LOSSES)
        self.weight_optimiser = AdamState(self.num_tasks, lr=self.lr)
        self.register_buffer("task_weights", torch.ones(self.num_tasks))
        self.register_buffer("initial_loss_values", torch.ones(self.num_tasks))
        self.register_buffer("has_initial_losses", torch.zeros((), dtype=torch.bool))
        if self.initial_losses == "log_c":
            classes = _class_counts(num_classes, self.num_tasks)
            self.initial_loss_values.copy_(torch.tensor([math.log(c) for c in classes]))
            self.has_initial_losses.fill_(True)
        elif num_classes is not None:
            raise ValueError(
                "num_classes: only read when initial_losses='log_c', "
                f"got num_classes={num_classes!r} with initial_losses={initial_losses!r}"
            )

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        # float32 whatever dtype the buffer was cast to (a model's .half() reaches it).
        current = self.task_weights.to(torch.float32, copy=True)
        # K-vector arithmetic in Python floats (float64): inside a training step a dozen
        # tensor calls on K numbers cost more than the rest of the rule.
        values = losses.tolist()
        initial = self.initial_loss_values.tolist() if bool(self.has_initial_losses) else values
        for k, start in enumerate(initial):
            if not start > 0:
                raise ValueError(
                    f"initial_loss_values[{k}]: expected a positive initial loss, got {start} "
                    "(GradNorm divides by it: a first-step loss below float32's smallest "
                    "positive value, or a loaded state); the call is rejected and the "
                    "balancer's state is unchanged"
                )
        rows = gram.tolist()
        norms = [math.sqrt(max(rows[k][k], 0.0)) for k in range(self.num_tasks)]
        weights = current.tolist()
        grad = gradnorm_weight_gradient(weights, norms, values, initial, self.alpha)
        # Nothing can fail from here on: commit.
        updated = [max(weight, _MIN_WEIGHT) for weight in self.weight_optimiser.step(weights, grad)]
        total = math.fsum(updated)
        updated = [self.num_tasks * weight / total for weight in updated]
        if not bool(self.has_initial_losses):
            self.initial_loss_values.copy_(torch.tensor(values, dtype=torch.float64))
            self.has_initial_losses.fill_(True)
        self.task_weights.copy_(torch.tensor(updated))
        return current

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, lr={self.lr}, "
            f"initial_losses={self.initial_losses!r}"
        )


def gradnorm_weight_gradient(
    weights: list[float],
    norms: list[float],
    losses: list[float],
    initial: list[float],
    alpha: float,
) -> list[float]:
    """``∂L_grad/∂w_k = sign(w_k n_k − Ḡ r_k^α)·n_k`` with the targets held constant.

    ``Ḡ`` is the mean of ``w_k n_k`` and ``r_k`` the inverse training rate ``(L_k/L_k(0))``
    divided by its mean; positive losses and initial losses (the method requires them).
    """
    count = len(weights)
    weighted_norms = [w * n for w, n in zip(weights, norms, strict=True)]
    mean_norm = sum(weighted_norms) / count
    inverse_rates = [value / start for value, start in zip(losses, initial, strict=True)]
    mean_rate = sum(inverse_rates) / count
    gradient = []
    for weighted, rate, norm in zip(weighted_norms, inverse_rates, norms, strict=True):
        try:
            growth = (rate / mean_rate) ** alpha
        except OverflowError:  # a large alpha: torch's pow gives inf there, and so does this
            growth = math.inf
        gap = weighted - mean_norm * growth
        gradient.append(math.copysign(norm, gap) if gap != 0.0 else 0.0)
    return gradient


def _class_counts(num_classes: int | Sequence[int] | None, num_tasks: int) -> list[int]:
    if num_classes is None:
        raise ValueError(
            "num_classes: initial_losses='log_c' needs the number of classes C_k of each task "
            "(L_k(0) = log C_k), got None"
        )
    if isinstance(num_classes, int):
        values = [num_classes] * num_tasks
    elif isinstance(num_classes, Sequence) and not isinstance(num_classes, str):
        values = list(num_classes)
    else:
        raise TypeError(
            f"num_classes: expected an int or {num_tasks} ints (one per task), got {num_classes!r}"
        )
    if len(values) != num_tasks:
        raise ValueError(
            f"num_classes: expected {num_tasks} values (one per task), got {len(values)}"
        )
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"num_classes[{i}]: expected an int >= 2, got {value!r}")
    return values
