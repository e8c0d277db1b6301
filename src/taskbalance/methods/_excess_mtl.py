"""ExcessMTL: robust multi-task learning with excess risks (He et al., ICML 2024)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._registry import register
from taskbalance._validation import check_nonnegative, check_positive, check_positive_int
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

    Steps: the first ``warmup_steps`` calls return ``λ = 1`` and measure the reference
    ``e_k(1)``, the mean of their estimates (the AdaGrad history sums them too); every later
    call updates λ as above and returns the updated weights. ``warmup_steps = 1`` (the
    default) is the official code and LibMTL: the first call's estimate is the reference. The
    paper's experiments (Appendix C.1) warm up for 3 epochs: ``warmup_steps = 3 *
    len(loader)``. A task whose reference is 0 (a zero gradient) takes its first non-zero
    estimate after the warm-up instead, with ``r_k = 0`` until then (the reference code
    divides by zero there). With ``update_every = N`` the history and the warm-up count only
    the steps that refresh the weights. A resume that changes ``warmup_steps`` (on request)
    ends a running warm-up at once if it has had as many steps, with the mean so far; an
    ended one resumes only for a value above the refresh steps taken (the weights then hold
    as they are, and the reference averages the steps since too).

    Defaults: ``step_size = 0.01`` (η, LibMTL's ``robust_step_size``), ``eps = 1e-7``
    (LibMTL's), ``warmup_steps = 1``, ``heads="weighted"``: the reference code backpropagates
    ``Σ λ_k L_k``.

    Departures: the scalar (AdaGrad-norm) preconditioner above instead of the diagonal one;
    in features mode ``g_k`` is the gradient with respect to the whole features tensor (LibMTL
    sums the representation gradient over the batch first); λ is kept as log-weights, which
    is the same update without overflow of ``exp(η·r)``.

    Args:
        num_tasks: K.
        step_size: η, the mirror-ascent step of the weights.
        eps: added to the accumulated squared gradient norm under the square root.
        warmup_steps: refresh steps that keep ``λ = 1`` and average their estimates into the
            reference ``e_k(1)``, ≥ 1.
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
        {"warmup_steps": 3, "step_size": 0.5},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"group_aggregation": "per_tensor"}, ValueError, r"does not offer per-group"),
        ({"normalization": "l2"}, ValueError, r"normalization: \S+ does not offer gradient"),
        ({"step_size": 0.0}, ValueError, r"step_size: expected a number > 0"),
        ({"eps": -1.0}, ValueError, r"eps: expected a number >= 0"),
        ({"warmup_steps": 0}, ValueError, r"warmup_steps: expected an int >= 1"),
    )
    # A state saved before warmup_steps existed acted with one (its refreshes: see below)
    options_acting_before_they_existed: ClassVar[dict[str, Any]] = {"warmup_steps": 1}

    default_heads = "weighted"

    squared_norm_sums: Tensor
    initial_excess: Tensor
    log_weights: Tensor
    refreshes: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        step_size: float = 0.01,
        eps: float = 1e-7,
        warmup_steps: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        self.step_size = check_positive("step_size", step_size)
        self.eps = check_nonnegative("eps", eps)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps)
        self.register_buffer("squared_norm_sums", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("initial_excess", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("log_weights", torch.zeros(self.num_tasks, dtype=torch.float64))
        # Refresh steps so far: the first warmup_steps of them are the warm-up, whose estimates'
        # mean initial_excess holds (counted on past it: a resume that raises warmup_steps
        # restarts an ended warm-up only beyond the refreshes already taken)
        self.register_buffer("refreshes", torch.zeros((), dtype=torch.long))

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        squared_norms = gram.detach().double().diagonal().clamp_min(0)
        sums = self.squared_norm_sums.double() + squared_norms
        denominator = (sums + self.eps).sqrt()
        excess = torch.where(denominator > 0, squared_norms / denominator, 0.0)
        # On the device, with no host read of the count: the warm-up decided per entry
        seen = self.refreshes + 1
        warming = seen <= self.warmup_steps
        initial = self.initial_excess.double()
        # During the warm-up the running mean of its estimates (a resume that lowers
        # warmup_steps then ends it with the mean of the steps seen), after it the reference
        reference = torch.where(
            warming, initial + (excess - initial) / seen, torch.where(initial > 0, initial, excess)
        )
        ratios = torch.where(reference > 0, excess / reference.clamp_min(1e-300), 0.0)
        stepped = self.log_weights.double() + self.step_size * ratios
        stepped = stepped - stepped.max()  # same weights, bounded logs
        log_weights = torch.where(warming, self.log_weights.double(), stepped)
        weights = self.num_tasks * torch.softmax(log_weights, dim=0)
        # Nothing can fail from here on: commit.
        self.squared_norm_sums.copy_(sums)
        self.initial_excess.copy_(reference)
        self.log_weights.copy_(log_weights)
        self.refreshes.copy_(seen)
        return weights  # float64: _update casts them to the Gramian's dtype

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # A state saved before the warm-up existed had one step of it, done once it had taken
        # a step (its reference was then the first estimate): one refresh stands for them
        # (only such a state: one that names warmup_steps and lacks the count is refused)
        steps = state_dict.get(prefix + "num_steps")
        extra = state_dict.get(prefix + "_extra_state")
        saved = extra.get("hyperparameters") if isinstance(extra, dict) else None
        older = isinstance(saved, dict) and "warmup_steps" not in saved
        if older and prefix + "refreshes" not in state_dict and isinstance(steps, Tensor):
            state_dict[prefix + "refreshes"] = (steps > 0).long()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, step_size={self.step_size}, eps={self.eps}, "
            f"warmup_steps={self.warmup_steps}"
        )
