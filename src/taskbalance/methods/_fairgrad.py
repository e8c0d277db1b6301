"""FairGrad: fair resource allocation among tasks (Ban & Ji, ICML 2024)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from taskbalance._registry import register
from taskbalance._solvers import fairgrad_weights
from taskbalance._validation import check_in_range, check_positive, check_positive_int
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import GradientBalancer
from taskbalance.methods._nash_mtl import bargaining_weights

#: The α the float64 Newton solver handles on Gramians with condition numbers up to 1e12:
#: below, ``w^{−1/α}`` overflows (α = 0.01 did in 48 of 60 random trials); above, the
#: potential is too flat for Newton to converge within its cap (α = 50 failed in 47 of 60).
ALPHA_RANGE = (0.05, 20.0)


@register("fairgrad")
class FairGrad(GradientBalancer):
    """FairGrad: α-fair allocation of the common update among the tasks.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024. Treating each task's
    loss decrease ``g_kᵀd`` as its utility and maximising the α-fair total utility gives
    ``d = Jᵀw`` with ``w > 0`` solving

    ``(G w)_k = w_k^{−1/α}``  for every k.

    α = 1 is proportional fairness (the Nash-MTL system without its normalisation); α → ∞
    approaches max-min fairness.

    Solver: the system is the stationarity condition of the strictly convex potential
    ``½wᵀGw − Σ φ(w_k)`` with ``φ(w) = w^{1−1/α}/(1−1/α)`` (``log w`` at α = 1), minimised by
    damped Newton in pure torch. The official code solves the same system with scipy's
    ``least_squares``.

    Defaults: ``alpha = 1.0``. α must lie in [0.05, 20]: outside it the Newton system is too
    stiff or too flat in float64 and the first call would fail, so such an α is refused at
    construction.

    Degenerate cases: a task with a zero gradient has no finite weight; it is left out with
    weight 0 and the others share the update (as :class:`NashMTL`). All gradients zero: all
    weights 0.

    Departures: the zero-gradient rule above; otherwise none in the rule; the solver differs
    as above and raises on failure. The official code multiplies the shared direction by K
    ("to match the sum loss"; LibMTL does not) and its training loops then clip the shared
    gradient to norm 1 (``max_norm``); we apply ``Jᵀw`` as LibMTL does. Clipping is the loop's
    business: do it with ``torch.nn.utils.clip_grad_norm_`` to reproduce the paper's runs
    (at ``α = 1``, ``‖Jᵀw‖² = wᵀGw = K ≥ 1``, so after that clip the factor K changes
    nothing).

    Args:
        num_tasks: K.
        alpha: the fairness parameter α, in [0.05, 20].
        max_iter: Newton iteration cap.
        tol: tolerance on the scale-free residual ``max_k |w_k^{1/α}·(Gw)_k − 1|``.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``
            (``"none"`` only), ``group_aggregation``, ``reuse_rows``: see
            :class:`GradientBalancer`; the loop options ``accumulation_steps``, ``on_nonfinite``:
            see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.FairGrad(num_tasks=2, alpha=1.0)
        >>> b.compute_weights(torch.ones(2), gram=torch.eye(2))
        tensor([1., 1.])
    """

    normalization_refused = (
        "its α-fair utilities are the raw loss decreases g_kᵀd by design (and α = 1 is "
        "invariant to rescaling each gradient)"
    )
    per_group_refused = None

    claimed_properties = frozenset({"non_conflicting"})
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = ({"alpha": 2.0}, {"alpha": 0.5})
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"normalization": "l2"}, ValueError, r"normalization: \S+ does not offer gradient"),
        ({"alpha": 1e-12}, ValueError, r"alpha: expected a number in \[0.05, 20.0\]"),
    )

    def __init__(
        self,
        num_tasks: int,
        *,
        alpha: float = 1.0,
        max_iter: int = 100,
        tol: float = 1e-9,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        self.alpha = check_in_range("alpha", alpha, ALPHA_RANGE[0], ALPHA_RANGE[1])
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.tol = check_positive("tol", tol)

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        def solve(unit_gram: Tensor) -> Tensor:
            return fairgrad_weights(unit_gram, self.alpha, max_iter=self.max_iter, tol=self.tol)

        # (s·G) w = w^{−1/α} is solved by s^{−α/(α+1)}·w(G)
        exponent = self.alpha / (self.alpha + 1)
        return bargaining_weights(gram, solve, exponent, self._method_name)
