"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from taskbalance._registry import register
from taskbalance._solvers import nash_weights
from taskbalance._validation import check_positive, check_positive_int
from taskbalance.methods._gradient_base import GradientBalancer


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

    Departures: the official training loop also clips the shared gradient to norm 1
    (``max_norm``); clipping is the training loop's business, so do it yourself with
    ``torch.nn.utils.clip_grad_norm_`` to reproduce the paper's runs.

    Args:
        num_tasks: K.
        max_iter: Newton iteration cap.
        tol: tolerance on the scale-free residual ``max_k |α_k·(Gα)_k − 1|``.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``: see
            :class:`GradientBalancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.NashMTL(num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
        tensor([0.5000, 1.0000])
    """

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
        weights = nash_weights(gram.double(), max_iter=self.max_iter, tol=self.tol)
        return weights.to(torch.float32)
