"""CAGrad: Conflict-Averse Gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from taskbalance._registry import register
from taskbalance._solvers import cagrad_weights
from taskbalance._validation import (
    check_nonnegative,
    check_positive,
    check_positive_int,
)
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import GradientBalancer


@register("cagrad")
class CAGrad(GradientBalancer):
    """CAGrad: the best worst-case improvement within a ball around the average gradient.

    Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021. With ``g₀ = (1/K)Σ g_k`` and ``φ = c²‖g₀‖²``, solve the dual

    ``w* = argmin_{w ∈ Δ_K} g_wᵀg₀ + √φ·‖g_w‖``,  ``g_w = Σ w_k g_k``,

    and step along ``d = g₀ + (√φ/‖g_w*‖)·g_w*``, divided by ``1 + c²`` (the official code's
    ``rescale=1``). Every term is a combination of the task gradients, so ``d = Jᵀw`` with
    ``w = (1/K + (√φ/‖g_w*‖)·w*) / (1 + c²)``; all the norms come from ``G``.

    That ``d`` is the exact maximiser of ``min_i g_iᵀd`` over the ball ``‖d − g₀‖ ≤ c‖g₀‖``.
    When 0 is in the convex hull of the gradients and ``c ≥ 1`` (more generally, when the dual
    optimum has ``g_w* = 0``) the best worst-case improvement is 0 and the maximiser is not
    unique; we return the one nearest ``g₀``, the projection of ``g₀`` onto the dual cone
    ``{d : Jd ≥ 0}``, which conflicts with no task (e.g. ``J = [[2, 0], [−1, 0]]``, ``c = 1``:
    ``d = 0``).

    Defaults: ``c = 0.4`` (the Nash-MTL benchmark setting; the paper uses 0.5 on its toy and
    0.4 on NYUv2/Cityscapes), ``rescale = 1``.

    Departures: the official code solves the inner problem with scipy's SLSQP and guards the
    norms with absolute ``1e-8`` terms (so it amplifies rounding noise where ``g_w* = 0``); we
    solve the same convex problem exactly in pure torch, without the guards, and take the
    maximiser nearest ``g₀`` in the degenerate case above. The official training
    loops also clip the shared gradient to norm 1 (``max_norm``); clipping is the loop's
    business, do it with ``torch.nn.utils.clip_grad_norm_`` to reproduce the paper's runs.

    Args:
        num_tasks: K.
        c: radius of the ball around the average gradient, ≥ 0 (0 gives the average).
        rescale: 0 (no rescaling), 1 (divide by 1 + c², the default) or 2 (divide by 1 + c).
        max_iter: iteration cap of the search for the step radius (each iteration is one
            exact min-norm solve).
        tol: relative tolerance of that search.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``,
            ``group_aggregation``, ``reuse_rows``: see :class:`GradientBalancer`; the loop options
            ``accumulation_steps``, ``on_nonfinite``: see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.CAGrad(num_tasks=2, c=0.0)
        >>> b.compute_weights(torch.ones(2), gram=torch.eye(2))
        tensor([0.5000, 0.5000])
    """

    normalization_refused = None
    per_group_refused = None

    claimed_properties = frozenset({"permutation_invariant", "scale_equivariant"})
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"c": 0.9},
        {"rescale": 0},
        {"normalization": "l2"},
        {"normalization": "loss+"},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"c": -1.0}, ValueError, r"c: expected a number >= 0"),
        ({"rescale": 3}, ValueError, r"rescale"),
    )

    def __init__(
        self,
        num_tasks: int,
        *,
        c: float = 0.4,
        rescale: int = 1,
        max_iter: int = 500,
        tol: float = 1e-9,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        self.c = check_nonnegative("c", c)
        if isinstance(rescale, bool) or rescale not in (0, 1, 2):
            raise ValueError(f"rescale: expected 0, 1 or 2, got {rescale!r}")
        self.rescale = int(rescale)
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.tol = check_positive("tol", tol)

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        # float64 inside whatever the Gramian's dtype; returned in that dtype
        return cagrad_weights(
            gram, self.c, max_iter=self.max_iter, tol=self.tol, rescale=self.rescale
        )
