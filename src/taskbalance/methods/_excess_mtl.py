"""ExcessMTL: robust multi-task learning with excess risks (He et al., ICML 2024)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._registry import register
from taskbalance._validation import check_nonnegative, check_positive
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import GradientBalancer


@register("excess_mtl")
class ExcessMTL(GradientBalancer):
    """ExcessMTL: give more weight to the tasks whose excess risk has fallen least.

    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess
    Risks", ICML 2024. The excess risk of task k (its loss above its own optimum, unknown) is
    estimated with a second-order approximation ``½·g_kᵀ H_k⁻¹ g_k``, ``H_k`` the AdaGrad
    preconditioner of the task's gradient history; relative to the first step's estimate it
    drives an exponentiated-gradient (mirror ascent) step on the weights, normalised to sum K:

    ``e_k(t) = g_kᵀ H_k⁻¹ g_k``,  ``r_k = e_k(t)/e_k(1)``,  ``λ_k ← λ_k·exp(η·r_k)``,
    ``λ ← K·λ/Σλ``,  direction ``Jᵀλ``.

    The official code and LibMTL use the diagonal AdaGrad preconditioner,
    ``e_k = Σ_p g_{k,p}² / sqrt(Σ_{s≤t} g_{k,p}(s)² + ε)``, per coordinate p.

    From G: a per-coordinate sum is not a function of the inner products ``G = J Jᵀ`` (it
    changes when the coordinates are rotated), so the diagonal preconditioner cannot be
    computed from the Gramian. We use its scalar (AdaGrad-norm) form,

    ``e_k(t) = ‖g_k(t)‖² / sqrt(Σ_{s≤t} ‖g_k(s)‖² + ε)``,  ``‖g_k‖² = G_kk``.

    The two give the same ratio ``r_k`` (for ε → 0) whenever each task's gradient changes only
    in scale from step to step (``|g_{k,p}(t)| = a_k(t)·c_{k,p}``), and in particular for one
    shared coordinate; otherwise the scalar form weighs all coordinates by their common
    history instead of each one's own.

    Steps: the first call measures ``e_k(1)`` and returns ``λ = 1``; every later call updates
    λ as above and returns the updated weights (as the reference code). A task whose first
    excess is 0 (a zero gradient) takes its first non-zero one as reference, with ``r_k = 0``
    until then (the reference code divides by zero there). With ``update_every = N`` the
    history sums only the steps that refresh the weights.

    Defaults: ``step_size = 0.01`` (η, LibMTL's ``robust_step_size``), ``eps = 1e-7``
    (LibMTL's), ``heads="weighted"``: the reference code backpropagates ``Σ λ_k L_k``.

    Departures: the scalar (AdaGrad-norm) preconditioner above instead of the diagonal one;
    in features mode ``g_k`` is the gradient with respect to the whole features tensor (LibMTL
    sums the representation gradient over the batch first); λ is kept as log-weights, which
    is the same update without overflow of ``exp(η·r)``. The paper's experiments (Appendix
    C.1, as torchjd's ``n_warmup_steps`` documents it) take ``e_k(1)`` as the average excess
    over a 3-epoch warm-up with uniform weights; we follow the official code and LibMTL, whose
    reference is the first step's estimate.

    Args:
        num_tasks: K.
        step_size: η, the mirror-ascent step of the weights.
        eps: added to the accumulated squared gradient norm under the square root.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``
            (``"none"`` only), ``group_aggregation`` (``"joint"`` only), ``reuse_rows``: see
            :class:`GradientBalancer`; the loop options ``accumulation_steps``, ``on_nonfinite``:
            see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.create("excess_mtl", num_tasks=2, step_size=1.0, eps=0.0)
        >>> b.compute_weights(torch.ones(2), gram=torch.diag(torch.tensor([1.0, 1.0])))
        tensor([1., 1.])
        >>> w = b.compute_weights(torch.ones(2), gram=torch.diag(torch.tensor([1.0, 4.0])))
        >>> torch.allclose(w, 2 * torch.softmax(torch.tensor([2 ** -0.5, 4 / 5**0.5]), 0))
        True
    """

    normalization_refused = (
        "its excess-risk estimates g_kᵀH_k⁻¹g_k read the raw gradients by design"
    )
    per_group_refused = "its gradient-norm sums are state carried across steps"

    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"step_size": 0.5},
        {"eps": 1e3},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"group_aggregation": "per_tensor"}, ValueError, r"does not offer per-group"),
        ({"normalization": "l2"}, ValueError, r"normalization: \S+ does not offer gradient"),
        ({"step_size": 0.0}, ValueError, r"step_size: expected a number > 0"),
        ({"eps": -1.0}, ValueError, r"eps: expected a number >= 0"),
    )

    default_heads = "weighted"

    squared_norm_sums: Tensor
    initial_excess: Tensor
    log_weights: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        step_size: float = 0.01,
        eps: float = 1e-7,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        self.step_size = check_positive("step_size", step_size)
        self.eps = check_nonnegative("eps", eps)
        self.register_buffer("squared_norm_sums", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("initial_excess", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("log_weights", torch.zeros(self.num_tasks, dtype=torch.float64))

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        squared_norms = gram.detach().double().diagonal().clamp_min(0)
        sums = self.squared_norm_sums.double() + squared_norms
        denominator = (sums + self.eps).sqrt()
        excess = torch.where(denominator > 0, squared_norms / denominator, 0.0)
        first = self._steps_taken == 0
        initial = self.initial_excess.double()
        reference = torch.where(initial > 0, initial, excess)
        log_weights = self.log_weights.double()
        if not first:
            ratios = torch.where(reference > 0, excess / reference.clamp_min(1e-300), 0.0)
            log_weights = log_weights + self.step_size * ratios
            log_weights = log_weights - log_weights.max()  # same weights, bounded logs
        weights = self.num_tasks * torch.softmax(log_weights, dim=0)
        # Nothing can fail from here on: commit.
        self.squared_norm_sums.copy_(sums)
        self.initial_excess.copy_(reference)
        self.log_weights.copy_(log_weights)
        return weights  # float64: _update casts them to the Gramian's dtype

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, step_size={self.step_size}, eps={self.eps}"
