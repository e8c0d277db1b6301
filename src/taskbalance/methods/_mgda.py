"""MGDA / MGDA-UB (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, cast

from torch import Tensor

from taskbalance._registry import register
from taskbalance._solvers import min_norm_weights
from taskbalance._validation import check_choice, check_positive, check_positive_int
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import GradientBalancer

_SOLVERS = ("active_set", "frank_wolfe")


@register("mgda")
class MGDA(GradientBalancer):
    """MGDA: the min-norm point of the convex hull of the task gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018:

    ``w = argmin_{w ∈ Δ_K} ‖Σ_k w_k g_k‖² = argmin_{w ∈ Δ_K} wᵀ G̃ w``,  direction ``Jᵀw``

    where Δ_K is the probability simplex. The direction decreases every task loss unless the
    point is Pareto-stationary (then it is zero). ``G̃ = D G D`` with the gradient
    normalisation of the reference code: ``none`` (``D = I``), ``l2`` (``1/‖g_k‖``), ``loss``
    (``1/L_k``) or ``loss+`` (``1/(L_k‖g_k‖)``), the option every gradient method that offers
    it shares (see :class:`GradientBalancer`). In features mode this is MGDA-UB, the paper's
    upper-bound variant taken with respect to the shared representation (§3.3).

    Solver: K = 2 in closed form (the paper's Algorithm 1 line search); otherwise an exact
    active-set solve of the simplex QP by default, or the paper's Frank–Wolfe with
    ``solver="frank_wolfe"`` capped at ``max_iter`` iterations (the reference code's loop
    never counted its iterations).

    Defaults: ``normalization="none"`` (the paper's algorithm; the reference configurations
    also use ``loss+``), exact solver.

    Departures: as in the reference code, the normalisation chooses the combination but the
    weights then multiply the raw losses (``Σ w_k L_k``), so the step size keeps the losses'
    scale (``normalization_maps_back = False``, where the other methods map the weights back
    to the raw gradients). The default solver is exact where the paper's Frank–Wolfe is approximate.

    Args:
        num_tasks: K.
        solver: ``"active_set"`` (exact) or ``"frank_wolfe"`` (the paper's).
        max_iter: iteration cap of the solver.
        tol: solver tolerance.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``,
            ``group_aggregation``, ``reuse_rows``: see :class:`GradientBalancer`; the loop options
            ``accumulation_steps``, ``on_nonfinite``: see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.MGDA(num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        tensor([0.8000, 0.2000])
    """

    claimed_properties = frozenset(
        {"non_conflicting", "permutation_invariant", "scale_equivariant"}
    )
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"normalization": "l2"},
        {"normalization": "loss"},
        {"normalization": "loss+"},
        {"solver": "frank_wolfe", "max_iter": 2},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"normalization": "L2"}, ValueError, r"normalization: expected one of"),
        ({"max_iter": 0}, ValueError, r"max_iter: expected an int >= 1"),
    )

    default_heads = "weighted"
    normalization_refused = None
    normalization_maps_back = False
    per_group_refused = None

    def __init__(
        self,
        num_tasks: int,
        *,
        solver: str = "active_set",
        max_iter: int = 250,
        tol: float = 1e-10,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        self.solver = cast(
            Literal["active_set", "frank_wolfe"], check_choice("solver", solver, _SOLVERS)
        )
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.tol = check_positive("tol", tol)

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        # float64 inside whatever the Gramian's dtype; returned in that dtype
        return min_norm_weights(gram, max_iter=self.max_iter, tol=self.tol, method=self.solver)
