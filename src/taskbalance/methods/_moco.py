"""MoCo: multi-objective gradient correction (Fernando et al., ICLR 2023)."""

from __future__ import annotations

from operator import mul
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._gramian import add_rows_, widest_dtype
from taskbalance._registry import register
from taskbalance._solvers import project_simplex, project_simplex_py
from taskbalance._step import Step
from taskbalance._validation import check_in_range, check_nonnegative, check_positive
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import GradientBalancer

#: Up to this K the step on λ runs in Python floats, on the CPU. Inside the training loop of
#: ``benchmarks/overhead.py`` (one thread) MoCo's rule took 678 µs with the tensor calls and
#: 424 with Python floats at K = 2, and was no slower with Python floats at K = 16 and 40.
_PYTHON_MAX_K = 40


@register("moco")
class MoCo(GradientBalancer):
    """MoCo: min-norm weights of tracked gradient estimates, which removes MGDA's bias.

    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023, Algorithm 1. With
    ``H`` the K×P Jacobian of this step's task losses (the listed parameters) and
    ``β_t = β / t^{σ_β}``, ``γ_t = γ / t^{σ_γ}`` at refresh t:

    - tracked gradients ``Y ← Y − β_t (Y − H)`` (``Y = 0`` at the start);
    - weights ``λ ← Π_Δ(λ − γ_t (Y Yᵀ + ρI) λ)`` (``λ = 1/K`` at the start; ``Π_Δ`` the
      Euclidean projection onto the simplex), one projected gradient step on MGDA's
      min-norm problem for the tracked gradients;
    - the shared direction ``d = Yᵀλ``.

    ``d`` is not ``Jᵀw`` of the current step: it is set on the listed parameters in the one
    ordinary backward (see "shared direction" in :class:`GradientBalancer`), and the heads get
    their own unweighted gradients (as in LibMTL). ``b.weights`` are λ. Under DDP the rows
    are the global (rank-averaged) task gradients, all-reduced once per step, so every rank
    tracks the same ``Y``.

    Parameters mode only: give ``params=`` (e.g. ``trunk[-1].parameters()``). ``Y`` is a
    ``K×P`` buffer (P the number of listed parameter entries), K times the memory of those
    parameters' gradients, and is saved in ``state_dict``: list the last shared layer rather
    than the whole trunk when memory matters. It is kept in the rows' precision (float64
    once a step's rows or a loaded checkpoint are, even for a balancer built before
    ``model.double()``). Features mode is refused: the features are a
    new batch's activations at every step, so tracking their gradients over steps has no
    meaning.

    Defaults: ``beta = 0.5``, ``beta_sigma = 0.5``, ``gamma = 0.1``, ``gamma_sigma = 0.5``,
    ``rho = 0`` (LibMTL's ``MoCo_*`` flags, from the authors' code). ``Y Yᵀ`` is accumulated
    in ``gram_dtype`` (float32 unless asked otherwise), as every Gramian of the library; the
    λ step is float64.

    Departures: none from the paper's Algorithm 1. LibMTL (after the authors' shared code)
    differs in two ways we do not follow: it rescales each task gradient to norm ``L_k``
    (``h_k ← L_k·h_k/(‖h_k‖ + 1e-8)``) before tracking it, and replaces ``Π_Δ`` by a softmax.
    ``compute_weights`` is refused (``Y`` needs the gradients, not their Gramian); steps
    between ``update_every`` refreshes apply ``Jᵀλ`` with the last λ and leave ``Y``
    unchanged.

    Args:
        num_tasks: K.
        beta: step size β of the tracking update, in (0, 1].
        beta_sigma: σ_β ≥ 0 in ``β_t = β / t^{σ_β}``.
        gamma: step size γ > 0 of the λ update.
        gamma_sigma: σ_γ ≥ 0 in ``γ_t = γ / t^{σ_γ}``.
        rho: ρ ≥ 0, the ℓ2 regularisation of the λ update.
        **options: ``params`` (required), ``update_every``, ``gram_dtype``, ``heads``,
            ``normalization`` (``"none"`` only), ``group_aggregation`` (``"joint"`` only),
            ``reuse_rows``: see :class:`GradientBalancer`; the loop options ``accumulation_steps``,
            ``on_nonfinite``: see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> shared = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> b = tb.create("moco", num_tasks=2, params=shared, beta=1.0)
        >>> b(torch.stack([shared[0], 2 * shared[1]])).backward()
        >>> b.weights  # λ = Π_Δ((1/2, 1/2) − 0.1·diag(1, 4)·(1/2, 1/2))
        tensor([0.5750, 0.4250])
        >>> shared.grad  # d = Yᵀλ with Y = H = diag(1, 2)
        tensor([0.5750, 0.8500])
    """

    requires_params = True
    weights_from_gram = False
    normalization_refused = (
        "its direction is computed from the task gradients themselves, which the normalisation "
        "(applied to the Gramian) does not reach"
    )
    per_group_refused = "its state and direction are kept for the listed tensors as a whole"
    rows_state = ("tracked",)
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"beta": 0.9, "beta_sigma": 0.0},
        {"gamma": 0.5, "rho": 0.1},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"beta": 0.0}, ValueError, r"beta: expected a number in \(0.0, 1.0\]"),
        ({"gamma": -1.0}, ValueError, r"gamma: expected a number"),
        ({"rho": -0.5}, ValueError, r"rho: expected"),
    )

    tracked: Tensor
    lambdas: Tensor
    moco_steps: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        self.beta = check_in_range("beta", beta, 0.0, 1.0, low_open=True)
        self.beta_sigma = check_nonnegative("beta_sigma", beta_sigma)
        self.gamma = check_positive("gamma", gamma)
        self.gamma_sigma = check_nonnegative("gamma_sigma", gamma_sigma)
        self.rho = check_nonnegative("rho", rho)
        if self.shared_params is None:
            raise ValueError(
                "params: moco tracks each task's gradient over steps, which only means "
                "something for parameters (features are a new batch's activations at every "
                "step): give the shared parameters, e.g. tb.create('moco', num_tasks=..., "
                "params=trunk[-1].parameters()); got none (features mode)"
            )
        wide = any(p.dtype == torch.float64 for p in self.shared_params)
        size = sum(p.numel() for p in self.shared_params)
        dtype = torch.float64 if wide else torch.float32
        self.register_buffer("tracked", torch.zeros(self.num_tasks, size, dtype=dtype))
        self.register_buffer(
            "lambdas", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64)
        )
        self.register_buffer("moco_steps", torch.zeros((), dtype=torch.long))
        # Steps before the first refresh (a task absent at the first call) apply λ's start.
        self._last_weights.fill_(1.0 / self.num_tasks)

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        raise ValueError(
            "gram: moco tracks the task gradients themselves (a K×P estimate), which a Gramian "
            "cannot update; compute_weights cannot apply it: call the balancer with the losses"
        )

    def _direction_from_rows(self) -> bool:
        return True

    def _rule(self, step: Step, gram: Tensor) -> Tensor:
        if step.global_rows is None:
            return self._gradient_weights(step.mean_losses, gram)
        count = int(self.moco_steps) + 1
        rows = step.global_rows
        tracked, lambdas, direction = moco_update(
            rows,
            self.tracked,
            self.lambdas,
            self.beta / count**self.beta_sigma,
            self.gamma / count**self.gamma_sigma,
            self.rho,
            row_scale=step.row_scale,
            gram_dtype=self.gram_dtype,
        )
        self._keep_rows_state("tracked", tracked)
        self.lambdas.copy_(lambdas)
        self.moco_steps.fill_(count)
        step.direction = list(direction.split([row.shape[1] for row in rows]))
        return lambdas  # float64: _update casts them to the Gramian's dtype

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, beta={self.beta}, beta_sigma={self.beta_sigma}, "
            f"gamma={self.gamma}, gamma_sigma={self.gamma_sigma}, rho={self.rho}"
        )


def moco_update(
    rows: list[Tensor],
    tracked: Tensor,
    lambdas: Tensor,
    beta: float,
    gamma: float,
    rho: float,
    *,
    row_scale: float = 1.0,
    gram_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    """One MoCo step: the new ``Y [K, P]``, ``λ [K]`` (float64) and ``d = Yᵀλ [P]``.

    ``rows`` are the global task gradients times ``row_scale`` (a power of two), one
    ``[K, numel]`` block per listed parameter; ``Y Yᵀ`` is accumulated in ``gram_dtype``; the
    inputs are untouched.
    """
    # Y ← Y − β(Y − H) = (1 − β)·Y + β·H, each block of H added in place with the rows' scale
    # folded into β (no K×P copy of the rows, no K×P temporaries).
    dtype = widest_dtype(rows, tracked)  # see GradientBalancer.rows_state
    new = tracked.to(device=rows[0].device, dtype=dtype).mul(1 - beta)
    add_rows_(new, rows, new.new_full((1, 1), beta / row_scale))
    # Y Yᵀ is a Gramian: accumulated in gram_dtype, as every Gramian here (no K×P copy of Y
    # when they agree); the K-vector arithmetic is float64.
    accumulated = new.to(gram_dtype)
    gram = accumulated @ accumulated.T
    if gram.shape[0] <= _PYTHON_MAX_K and gram.device.type == "cpu":
        # The same float64 arithmetic in Python floats (equal to rounding, not bit for bit:
        # the sums run in another order): a dozen tensor calls on K numbers cost more than
        # their arithmetic. Not on an accelerator, where the host copies would each sync.
        previous = lambdas.tolist()
        moved = [
            value - gamma * (sum(map(mul, row, previous)) + rho * value)
            for row, value in zip(gram.tolist(), previous, strict=True)
        ]
        lam = torch.tensor(project_simplex_py(moved), dtype=torch.float64, device=new.device)
    else:
        lam = lambdas.to(device=new.device, dtype=torch.float64)
        identity = torch.eye(lam.shape[0], dtype=torch.float64, device=lam.device)
        hessian = gram.to(torch.float64) + rho * identity
        lam = project_simplex(lam - gamma * (hessian @ lam))
    direction = new.T @ lam.to(new.dtype)
    return new.to(tracked.device), lam.to(lambdas.device), direction
