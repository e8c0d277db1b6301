"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._registry import register
from taskbalance._validation import check_in_range, check_nonnegative, check_positive
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import GradientBalancer


@register("db_mtl")
class DBMTL(GradientBalancer):
    """DB-MTL: balance loss scales with a log transform and gradient magnitudes with a max-norm.

    Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing for Multi-Task Learning", 2023, Algorithm 1:

    - loss-scale balancing: train on ``log(L_k + ε)``, whose gradient is
      ``g̃_k = g_k / (L_k + ε)``;
    - gradient-magnitude balancing: an EMA ``ĝ_k ← β_t·ĝ_k + (1 − β_t)·g̃_k`` (``ĝ_k = 0``
      at the start, ``β_t = β / t^{σ}``) and the update ``Σ_k α_k ĝ_k`` with
      ``α_k = max_i ‖ĝ_i‖ / ‖ĝ_k‖``: every task's term gets the largest task's magnitude.

    As ``Jᵀw``, with the departure below: ``‖g̃_k‖ = √G_kk / (L_k + ε)``; we keep the EMA
    ``n̂_k ← β_t·n̂_k + (1 − β_t)·‖g̃_k‖`` of these norms (buffers) and scale the *current*
    log-loss gradients, ``Σ_k α_k g̃_k = Jᵀw`` with

    ``w_k = (max_i n̂_i / n̂_k) / (L_k + ε)``.

    Departure (documented, necessary): the paper's EMA of gradient *vectors* is a combination
    of past Jacobians and cannot be written as ``Jᵀw`` of the current step, which is what one
    ordinary backward computes. We therefore average the gradient *norms* and apply the
    magnitude balancing to the current gradients. The two agree exactly when β = 0, and the
    balancing ratios agree whenever the gradient directions are stable over the EMA window.
    Because every ``n̂_k`` carries the same zero-initialisation bias, the ratios need no bias
    correction, and the update has its full magnitude from the first step (LibMTL's vector EMA
    starts at ``(1 − β)`` times it). A task whose averaged norm is zero (at most eps·max_i n̂_i,
    eps of the Gramian's dtype) gets ``α_k = 1``; LibMTL adds 1e-8 to the norm instead.

    Defaults: ``beta = 0.9``, ``beta_sigma = 0`` (LibMTL's ``DB_beta``/``DB_beta_sigma``
    defaults, the paper's setting), ``eps = 1e-8`` (LibMTL's ``log(L + 1e-8)``).

    Args:
        num_tasks: K.
        beta: EMA rate β of the gradient norms, in [0, 1].
        beta_sigma: σ ≥ 0 in ``β_t = β / t^σ``.
        eps: ε added to each loss before the log.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``: see
            :class:`GradientBalancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.create("db_mtl", num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        tensor([2., 1.])
    """

    normalization_refused = (
        "it already balances the gradient magnitudes, by the losses and by a max-norm"
    )
    per_group_refused = "its gradient-norm averages are state carried across steps"

    claimed_properties = frozenset({"permutation_invariant", "scale_equivariant"})
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"beta": 0.5},
        {"beta_sigma": 0.5},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"group_aggregation": "per_tensor"}, ValueError, r"does not offer per-group"),
        ({"normalization": "l2"}, ValueError, r"normalization: \S+ does not offer gradient"),
        ({"beta": -0.1}, ValueError, r"beta: expected a number in \[0.0, 1.0\]"),
    )

    requires_positive_losses = True

    norm_averages: Tensor
    ema_steps: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        eps: float = 1e-8,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        self.beta = check_in_range("beta", beta, 0.0, 1.0)
        self.beta_sigma = check_nonnegative("beta_sigma", beta_sigma)
        self.eps = check_positive("eps", eps)
        self.register_buffer("norm_averages", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        step = int(self.ema_steps) + 1
        weights, averages = db_mtl_weights(
            losses, gram, self.norm_averages, step, self.beta, self.beta_sigma, self.eps
        )
        self.norm_averages.copy_(averages)
        self.ema_steps.fill_(step)
        return weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, beta_sigma={self.beta_sigma}"


def db_mtl_weights(
    losses: Tensor,
    gram: Tensor,
    averages: Tensor,
    step: int,
    beta: float,
    beta_sigma: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """DB-MTL's weights (float32) and the new norm averages (float64); inputs are untouched."""
    shifted = losses.detach().to(torch.float64) + eps
    g = gram.detach().to(device=shifted.device, dtype=torch.float64)
    log_norms = g.diagonal().clamp_min(0).sqrt() / shifted  # ‖∇ log(L_k + ε)‖
    rate = beta / step**beta_sigma
    new = rate * averages.to(device=shifted.device, dtype=torch.float64) + (1 - rate) * log_norms
    largest = new.max()
    # A norm at most eps·max (eps of G's dtype; zero included) counts as zero: α_k = 1.
    significant = new > torch.finfo(gram.dtype).eps * largest
    ratios = torch.where(significant, largest / new.clamp_min(1e-300), torch.ones_like(new))
    return (ratios / shifted).to(torch.float32), new.to(averages.device)
