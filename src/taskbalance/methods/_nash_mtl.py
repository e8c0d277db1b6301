"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._registry import register
from taskbalance._solvers import nash_weights
from taskbalance._validation import check_positive, check_positive_int
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import GradientBalancer, negligible_squared_norm


@register("nash_mtl")
class NashMTL(GradientBalancer):
    """Nash-MTL: the Nash bargaining solution among the tasks.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022. The update ``d = Jᵀα`` uses the ``α > 0`` solving

    ``G α = 1/α``  (element-wise reciprocal),

    i.e. each task's directional derivative ``g_kᵀd = 1/α_k``: the proportionally fair
    agreement. The scaling is the official code's: it divides ``G`` by its Frobenius norm ``N``
    but folds ``N`` back into its constraint ``α_k·N·(Gα/N)_k ≥ 1``, so the weights solve the
    unnormalised system and ``‖Jᵀα‖² = αᵀGα = K``.

    Solver: ``Gα = 1/α`` is exactly the stationarity condition of the strictly convex
    potential ``½αᵀGα − Σ log α_k``, which we minimise by damped Newton in pure torch. The
    paper reaches the same fixed point through a sequence of convex approximations solved with
    cvxpy/ECOS (20 iterations in the official code); there is no fallback: if the solve fails,
    an error is raised rather than equal weights used.

    Defaults: recompute every step (``update_every=1``; the paper reports speed-ups with 5 or
    50 and so can you).

    Degenerate cases: a task with a zero gradient has no finite α (its ``g_kᵀd`` is 0 for
    every d); it is left out of the bargaining with weight 0, and the others bargain among
    themselves. All gradients zero: all weights 0.

    Departures: the zero-gradient rule above (the official code's solver fails there and it
    keeps the previous weights). The official training loop also clips the shared gradient to norm 1
    (``max_norm``); clipping is the training loop's business, so do it yourself with
    ``torch.nn.utils.clip_grad_norm_`` to reproduce the paper's runs.

    Args:
        num_tasks: K.
        max_iter: Newton iteration cap.
        tol: tolerance on the scale-free residual ``max_k |α_k·(Gα)_k − 1|``.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``
            (``"none"`` only), ``group_aggregation``, ``reuse_rows``: see
            :class:`GradientBalancer`; the loop options ``accumulation_steps``, ``on_nonfinite``:
            see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.NashMTL(num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
        tensor([0.5000, 1.0000])
    """

    normalization_refused = (
        "its bargaining solution is invariant to rescaling each task gradient: a no-op"
    )
    per_group_refused = None

    claimed_properties = frozenset({"non_conflicting"})
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = ({"tol": 0.1},)
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"normalization": "l2"}, ValueError, r"normalization: \S+ does not offer gradient"),
        ({"max_iter": 0}, ValueError, r"max_iter: expected an int >= 1"),
    )

    default_heads = "weighted"

    def __init__(
        self,
        num_tasks: int,
        *,
        max_iter: int = 100,
        tol: float = 1e-9,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.tol = check_positive("tol", tol)

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        def solve(unit_gram: Tensor) -> Tensor:
            return nash_weights(unit_gram, max_iter=self.max_iter, tol=self.tol)

        return bargaining_weights(gram, solve, 0.5, self._method_name)


def bargaining_weights(
    gram: Tensor, solve: Callable[[Tensor], Tensor], exponent: float, method: str
) -> Tensor:
    """Weights of ``(G w)_k = f(w_k)`` (Nash-MTL, FairGrad) on the tasks with a gradient.

    The system is homogeneous: ``w(s·G) = s^{−exponent}·w(G)``, so it is solved on ``G``
    divided by its largest diagonal entry (the solver's tolerances are then scale-free, and
    gradients of 1e-15 or 1e15 solve as well as gradients of 1) and scaled back. A task whose
    gradient is zero (``‖g_k‖ ≤ 2**-64·max_j ‖g_j‖``, see ``NEGLIGIBLE_SQUARED_RATIO``) has
    no finite weight (its utility ``g_kᵀd`` is 0 for every d): it is left out of the game
    with weight 0.
    ``[K]``, float64 for a float64 Gramian, else float32.
    """
    # K×K numbers: on the host, where each is one float operation rather than a tensor call.
    g: list[list[float]] = gram.tolist()  # exact: float32 and float64 entries are floats
    K = len(g)
    squared_norms = [g[k][k] for k in range(K)]
    largest = max(squared_norms)
    output = torch.float64 if gram.dtype == torch.float64 else torch.float32
    weights = [0.0] * K
    if largest > 0:
        negligible = negligible_squared_norm(squared_norms)
        active = [k for k in range(K) if squared_norms[k] > negligible]
        unit = [[0.5 * (g[i][j] + g[j][i]) / largest for j in active] for i in active]
        solved = solve(torch.tensor(unit, dtype=torch.float64, device=gram.device)).tolist()
        factor = largest**-exponent
        for k, value in zip(active, solved, strict=True):
            weights[k] = value * factor
    result = torch.tensor(weights, dtype=output, device=gram.device)
    if not all(math.isfinite(value) for value in result.tolist()):
        raise ValueError(
            f"gram: the task gradients are so small (largest ‖g_k‖² = {largest:.3g}) "
            f"that {method}'s weights, which grow like 1/‖g‖, overflow {output}; rescale "
            "the losses"
        )
    return result
