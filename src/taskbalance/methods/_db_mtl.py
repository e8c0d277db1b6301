"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._gramian import add_rows_, widest_dtype
from taskbalance._registry import register
from taskbalance._step import Step
from taskbalance._validation import check_in_range, check_nonnegative, check_positive
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import NEGLIGIBLE_RATIO, GradientBalancer


@register("db_mtl")
class DBMTL(GradientBalancer):
    """DB-MTL: balance loss scales with a log transform and gradient magnitudes with a max-norm.

    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang & Kwok, "Dual-Balancing for Multi-Task
    Learning", 2023, Algorithm 1:

    - loss-scale balancing: train on ``log(L_k + ε)``, whose gradient is
      ``g̃_k = g_k / (L_k + ε)``;
    - gradient-magnitude balancing: an EMA ``ĝ_k ← β_t·ĝ_k + (1 − β_t)·g̃_k`` (``ĝ_k = 0``
      at the start, ``β_t = β / t^{σ}``) and the update ``Σ_k α_k ĝ_k`` with
      ``α_k = max_i ‖ĝ_i‖ / ‖ĝ_k‖``: every task's term gets the largest task's magnitude.

    Parameters mode (``params=``) follows the paper exactly: the balancer keeps the EMA
    ``ĝ_k`` of each task's log-loss gradient *vector* (a ``K×P`` buffer, P the number of
    listed parameter entries: K times the memory of those parameters' gradients, saved in
    ``state_dict``, kept in the rows' precision: float64 once a step's rows or a loaded
    checkpoint are) and sets the listed parameters' gradient to ``d = Σ_k α_k ĝ_k`` in the
    one ordinary backward (see "shared direction" in :class:`GradientBalancer`). Under DDP
    the rows are the global (rank-averaged) task gradients, all-reduced once, so every rank
    applies the same ``d``.
    ``b.weights`` are then ``w_k = α_k / (L_k + ε)``: the weights that give ``d = Jᵀw`` when
    β = 0 (ĝ_k = g̃_k); for β > 0, ``d`` is not ``Jᵀw`` of the current step. Like the paper
    and LibMTL, ĝ starts at zero without bias correction, so the first update is ``(1 − β)``
    times the later ones' scale. ``compute_weights`` (a Gramian only) cannot update a vector
    EMA and is refused in this mode; steps between ``update_every`` refreshes apply ``Jᵀw``
    with the last weights and leave ĝ unchanged.

    Features mode keeps a rule of the current step, ``Jᵀw``: the features are a new batch's
    activations at every step, so an EMA of gradient vectors with respect to them would mix
    the gradients of different samples and has no meaning. There, ``‖g̃_k‖ = √G_kk / (L_k + ε)``;
    we keep the EMA ``n̂_k ← β_t·n̂_k + (1 − β_t)·‖g̃_k‖`` of these norms (buffers) and scale
    the *current* log-loss gradients, ``Σ_k α_k g̃_k = Jᵀw`` with

    ``w_k = (max_i n̂_i / n̂_k) / (L_k + ε)``.

    Task heads (both modes): LibMTL and the official code backpropagate each task's
    ``log(L_k + ε)``, so with the default ``heads="unweighted"`` head k gets the gradient of
    its own log-loss, ``∇L_k / (L_k + ε)``: the loss-scale balancing reaches the heads too.
    (``L_k`` is the rank-averaged loss under DDP, so the ranks' averaged head gradients are
    those of the global batch's log-loss.) The objective's value stays ``Σ_k L_k``, the
    gradient of the objective with respect to ``L_k`` is ``1 / (L_k + ε)``.
    ``heads="weighted"`` gives head k ``w_k ∇L_k`` instead.

    Departures: in features mode (and in ``compute_weights``) the EMA is of gradient *norms*
    applied to the current gradients, as above (it agrees with the paper exactly when β = 0,
    and its balancing ratios agree whenever the gradient directions are stable over the EMA
    window; since every ``n̂_k`` carries the same zero-initialisation bias, the update has its
    full magnitude from the first step). In both modes a task whose averaged norm is zero (at
    most 2**-64·max_i of them: ``α_k`` is bounded by 2**64) gets ``α_k = 1``; LibMTL adds 1e-8
    to the norm instead.

    Defaults: ``beta = 0.9``, ``beta_sigma = 0`` (LibMTL's ``DB_beta``/``DB_beta_sigma``
    defaults, the paper's setting), ``eps = 1e-8`` (LibMTL's ``log(L + 1e-8)``).

    Args:
        num_tasks: K.
        beta: EMA rate β of the gradient vectors (parameters mode) or norms, in [0, 1].
        beta_sigma: σ ≥ 0 in ``β_t = β / t^σ``.
        eps: ε added to each loss before the log.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``
            (``"none"`` only), ``group_aggregation`` (``"joint"`` only), ``reuse_rows``: see
            :class:`GradientBalancer`; the loop options ``accumulation_steps``, ``on_nonfinite``:
            see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.create("db_mtl", num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        tensor([2., 1.])
        >>> shared = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> p = tb.create("db_mtl", num_tasks=2, params=shared, beta=0.0)
        >>> p(torch.stack([2 * shared[0], 8 * shared[1]])).backward()
        >>> shared.grad  # log-loss gradients (1, 0) and (0, 1), rescaled to the largest
        tensor([1., 1.])
    """

    normalization_refused = (
        "it already balances the gradient magnitudes, by the losses and by a max-norm"
    )
    per_group_refused = "its gradient averages are state carried across steps"
    rows_state = ("grad_averages",)

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
    grad_averages: Tensor
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
        # Parameters mode: the EMA of each task's log-loss gradient vector (K×0 otherwise).
        shared = self.shared_params or []
        wide = any(p.dtype == torch.float64 for p in shared)
        self.register_buffer(
            "grad_averages",
            torch.zeros(
                self.num_tasks,
                sum(p.numel() for p in shared),
                dtype=torch.float64 if wide else torch.float32,
            ),
        )
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        return self._norm_rule(losses, gram, torch.float32)

    def _norm_rule(self, losses: Tensor, gram: Tensor, losses_dtype: torch.dtype) -> Tensor:
        """Features mode's rule (EMA of the norms); ``losses_dtype``: the objective's."""
        step = int(self.ema_steps) + 1
        weights, averages = db_mtl_weights(
            losses, gram, self.norm_averages, step, self.beta, self.beta_sigma, self.eps
        )
        self._refuse_unfit_weights(weights, gram, losses_dtype)  # before any state changes
        self.norm_averages.copy_(averages)
        self.ema_steps.fill_(step)
        return weights

    def _direction_from_rows(self) -> bool:
        return self.shared_params is not None

    def _head_coefficients(self, step: Step) -> Tensor:
        # The heads train on log(L_k + ε): ∇ log(L_k + ε) = ∇L_k / (L_k + ε), of the global
        # batch's loss under DDP (rank-averaged), so the ranks' averaged head gradients are it
        return torch.reciprocal(step.mean_losses.to(torch.float64) + self.eps)

    def _rule(self, step: Step, gram: Tensor) -> Tensor:
        if self.shared_params is None:
            return self._norm_rule(step.mean_losses, gram, step.losses.dtype)
        if step.global_rows is None:
            raise ValueError(
                "gram: db_mtl in parameters mode keeps an EMA of the task gradient vectors, "
                "which a Gramian cannot update; call the balancer with the losses instead of "
                "compute_weights (or use features mode)"
            )
        count = int(self.ema_steps) + 1
        rows = step.global_rows
        weights, averages, direction = db_mtl_direction(
            step.mean_losses,
            rows,
            self.grad_averages,
            count,
            self.beta,
            self.beta_sigma,
            self.eps,
            row_scale=step.row_scale,
        )
        self._refuse_unfit_weights(weights, gram, step.losses.dtype)  # before any state changes
        self._keep_rows_state("grad_averages", averages)
        self.ema_steps.fill_(count)
        step.direction = list(direction.split([row.shape[1] for row in rows]))
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
    """DB-MTL's weights and the new norm averages (both float64); inputs are untouched.

    K-vector arithmetic in Python floats (float64): inside a training step a dozen tensor
    calls on K numbers cost more than the rest of the rule. ``math.sqrt`` is correctly
    rounded; torch's vectorised float64 ``sqrt`` is not on every CPU build, so the weights may
    differ from a tensor computation in the last bit.
    """
    shifted = [value + eps for value in losses.tolist()]
    rows = gram.tolist()
    rate = beta / step**beta_sigma
    new = [
        rate * average + (1 - rate) * (math.sqrt(max(rows[k][k], 0.0)) / shifted[k])
        for k, average in enumerate(averages.tolist())
    ]  # the EMA of ‖∇ log(L_k + ε)‖ = √G_kk / (L_k + ε)
    largest = max(new)
    # A norm at most 2**-64·max (zero included) counts as zero: α_k = 1.
    negligible = NEGLIGIBLE_RATIO * largest
    weights = [
        (largest / norm if norm > negligible else 1.0) / divisor
        for norm, divisor in zip(new, shifted, strict=True)
    ]
    return (
        torch.tensor(weights, dtype=torch.float64, device=losses.device),
        torch.tensor(new, dtype=torch.float64, device=averages.device),
    )


def db_mtl_direction(
    losses: Tensor,
    rows: list[Tensor],
    averages: Tensor,
    step: int,
    beta: float,
    beta_sigma: float,
    eps: float,
    *,
    row_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's rule on gradient vectors: weights (float64), new EMA ``[K, P]``, ``d [P]``.

    ``rows`` are the global task gradients times ``row_scale`` (a power of two), one
    ``[K, numel]`` block per listed parameter; the inputs are untouched.
    """
    dtype = widest_dtype(rows, averages)  # see GradientBalancer.rows_state
    device = rows[0].device
    shifted = losses.detach().to(device=device, dtype=torch.float64) + eps
    rate = beta / step**beta_sigma
    # new = rate·EMA + (1 − rate)·∇ log(L_k + ε), with ∇ log(L_k + ε) = g_k / (L_k + ε): the K
    # divisors and the rows' scale go into one K-vector, and each block of rows is added in
    # place (no K×P copy of the rows, no K×P temporaries).
    coefficients = ((1 - rate) / (shifted * row_scale)).to(dtype)[:, None]
    new = add_rows_(averages.to(device=device, dtype=dtype).mul(rate), rows, coefficients)
    norms = torch.linalg.vector_norm(new, dim=1).to(torch.float64)
    largest = norms.max()
    # A norm at most 2**-64·max (zero included) counts as zero: α_k = 1.
    significant = norms > NEGLIGIBLE_RATIO * largest
    ratios = torch.where(significant, largest / norms.clamp_min(1e-300), torch.ones_like(norms))
    direction = torch.mv(new.T, ratios.to(dtype))
    weights = ratios / shifted
    return weights, new.to(averages.device), direction
