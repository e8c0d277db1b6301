"""ConFIG: conflict-free inverse gradients (Liu, Chu & Thuerey, ICLR 2025)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._registry import register
from taskbalance._solvers._common import select_backend
from taskbalance._solvers._spectral import PYTHON_MAX_K, check_finite, eigh_py, host_gram
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import (
    SpectralGradientBalancer,
    inverse_gradient_norms,
    inverse_norms,
    spectral_cutoff,
)


@register("config")
class ConFIG(SpectralGradientBalancer):
    """ConFIG: the direction with equal cosine to every task gradient, of projected length.

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025, Eq. 2. With unit vectors ``u_i = g_i/‖g_i‖`` stacked as the rows of
    ``U`` (K×P):

    ``g_v = U⁺·1``,  ``ĝ_v = g_v/‖g_v‖``,  direction ``(Σ_i g_iᵀ ĝ_v)·ĝ_v``.

    ``g_v`` solves ``u_iᵀ g_v = 1`` for every i (minimum-norm solution), so it makes the same
    angle with every task gradient and conflicts with none; its length is the sum of the
    projections of the task gradients onto it (the official ``ProjectionLength``).

    As ``Jᵀw`` from G: ``U = D J`` with ``D = diag(1/‖g_i‖)``, and ``U⁺ = Uᵀ(U Uᵀ)⁺`` with
    ``U Uᵀ = D G D =: Ĝ``. So ``g_v = Jᵀc`` with ``c = D Ĝ⁺ 1``, ``‖g_v‖² = cᵀGc`` and
    ``Σ_i g_iᵀ g_v = 1ᵀGc``; the direction is ``(1ᵀGc / cᵀGc)·Jᵀc``, i.e.
    ``w = (1ᵀGc / cᵀGc)·c``.

    Defaults (the official ``ConFIGOperator``): equal weights 1 in ``U⁺·1``, projection
    length. The official code solves ``lstsq(U, 1)`` (the minimum-norm solution, = ``U⁺·1``),
    or ``pinv(U)`` on request, and uses an equivalent closed form for K = 2. Here ``Ĝ⁺`` drops
    eigenvalues at or below ``rtol`` times the largest, default ``100·K·eps`` of the Gramian's
    dtype: eigenvalues of ``Ĝ`` are squared singular values of U, so the Gramian route cannot
    resolve them below its own rounding error (≈ K·eps·λ_max at P = 10⁴), and inverting that
    noise would point the direction at noise.

    Degenerate cases: a task with a zero gradient has ``u_i = 0`` (as the official
    ``nan_to_num``), no equation and weight 0: it adds nothing to the direction either way.
    "Zero" means ``‖g_i‖ ≤ 2**-64·max_k ‖g_k‖`` (a bound on ``1/‖g_i‖``, not on rounding:
    a short gradient is not noise of the long ones), which keeps ``1/‖g_i‖`` finite. When
    every gradient is zero, the direction is zero and the weights
    are 0. When ``u_iᵀ g_v = 1`` has no solution (two opposite gradients; more tasks than
    independent gradients, with mixed signs), no direction makes equal angles with every task
    but 0, and the direction is 0: the system counts as unsolvable when the part of 1 outside
    the span of Ĝ exceeds ``sqrt(rtol)·‖1‖``.

    Departures: on an unsolvable system the official ``lstsq`` returns the least-squares
    ``g_v``, which conflicts with some task (the paper's conflict-free guarantee assumes the
    system is solvable); we return the zero direction, so the direction never conflicts with
    a task. Otherwise none; computed in float64 from G.

    Args:
        num_tasks: K.
        rtol: relative eigenvalue cut-off of ``Ĝ⁺``; None for ``100·K·eps`` of G's dtype.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``
            (``"none"`` only), ``group_aggregation``, ``reuse_rows``: see
            :class:`GradientBalancer`; the loop options ``accumulation_steps``, ``on_nonfinite``:
            see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.create("config", num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        tensor([1.5000, 0.7500])
    """

    normalization_refused = "it already uses the unit task gradients u_k = g_k/‖g_k‖"
    per_group_refused = None

    signed_weights = True
    claimed_properties = frozenset(
        {"non_conflicting", "permutation_invariant", "scale_equivariant"}
    )
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = ({"rtol": 0.9},)
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"normalization": "l2"}, ValueError, r"normalization: \S+ does not offer gradient"),
        ({"rtol": -1.0}, ValueError, r"rtol: expected a number in \(0.0, 1.0\)"),
    )

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        return config_weights(gram, self.rtol)


def config_weights(gram: Tensor, rtol: float | None = None, backend: str = "auto") -> Tensor:
    """``w = (1ᵀGc / cᵀGc)·c`` with ``c = D Ĝ⁺ 1`` (float64 ``[K]``).

    ``backend``: ``"python"`` keeps the arithmetic in Python floats around one
    eigendecomposition (Jacobi rotations, no LAPACK call, up to K = 4), ``"torch"`` uses
    tensors; ``"auto"`` picks Python up to
    :data:`~taskbalance._solvers._spectral.PYTHON_MAX_K` (see there for the measurements).
    """
    num_tasks = gram.shape[0]
    rtol = spectral_cutoff(gram, rtol)
    if select_backend(backend, gram, PYTHON_MAX_K) == "python":
        weights = _config_py(host_gram(gram, "config_weights"), rtol)
        return torch.tensor(weights, dtype=torch.float64, device=gram.device)
    check_finite(gram, "config_weights")
    g = gram.detach().to(torch.float64)
    g = 0.5 * (g + g.T)
    inverse_norms = inverse_gradient_norms(g)
    eigenvalues, vectors = torch.linalg.eigh(torch.outer(inverse_norms, inverse_norms) * g)
    # The K eigenvalues and the decisions on them on the host.
    values: list[float] = eigenvalues.tolist()
    largest = max(values)
    keep = [i for i, value in enumerate(values) if value > rtol * max(largest, 0.0)]
    if not largest > 0 or not keep:
        return torch.zeros_like(inverse_norms)
    kept = vectors[:, keep]
    # A task with a zero gradient has u_i = 0 and no equation (the official nan_to_num).
    ones = (inverse_norms > 0).to(torch.float64)
    components = ones @ kept
    # ConFIG's direction has equal cosines with every task gradient: U g_v = 1 must be
    # solvable, i.e. 1 must lie in the span of Ĝ. When it does not (two opposite gradients;
    # more tasks than independent gradients with mixed signs), the only direction with equal
    # cosines is 0, and the least-squares g_v of the official lstsq conflicts with a task. The
    # tolerance sits far above the rounding of a solvable system (~K·eps) and far below the
    # residual of an unsolvable one (order 1).
    residual = float((ones - kept @ components).norm()) / num_tasks**0.5
    if residual > rtol**0.5:
        return torch.zeros_like(inverse_norms)
    kept_values = torch.tensor([values[i] for i in keep], dtype=torch.float64, device=g.device)
    coefficients = inverse_norms * (kept @ (components / kept_values))  # N Ĝ⁺ 1
    gc = g @ coefficients
    squared_length = float(coefficients @ gc)
    if not squared_length > 0:
        return torch.zeros_like(inverse_norms)
    return (float(gc.sum()) / squared_length) * coefficients


def _config_py(gram: list[list[float]], rtol: float) -> list[float]:
    """The torch path's arithmetic, step for step, in Python floats."""
    num_tasks = len(gram)
    tasks = range(num_tasks)
    g = [[0.5 * (gram[i][j] + gram[j][i]) for j in tasks] for i in tasks]
    inverse = inverse_norms([g[i][i] for i in tasks])
    values, vectors = eigh_py([[inverse[i] * inverse[j] * g[i][j] for j in tasks] for i in tasks])
    largest = max(values)
    keep = [i for i, value in enumerate(values) if value > rtol * max(largest, 0.0)]
    zeros = [0.0] * num_tasks
    if not largest > 0 or not keep:
        return zeros
    ones = [1.0 if value > 0 else 0.0 for value in inverse]
    components = [sum(ones[i] * vectors[i][c] for i in tasks) for c in keep]
    residual = math.sqrt(
        sum(
            (ones[i] - sum(vectors[i][c] * x for c, x in zip(keep, components, strict=True))) ** 2
            for i in tasks
        )
    )
    if residual / num_tasks**0.5 > rtol**0.5:
        return zeros
    ratios = [x / values[c] for c, x in zip(keep, components, strict=True)]
    coefficients = [
        inverse[i] * sum(vectors[i][c] * r for c, r in zip(keep, ratios, strict=True))
        for i in tasks
    ]
    gc = [sum(g[i][j] * coefficients[j] for j in tasks) for i in tasks]
    squared_length = sum(c * x for c, x in zip(coefficients, gc, strict=True))
    if not squared_length > 0:
        return zeros
    factor = sum(gc) / squared_length
    return [factor * c for c in coefficients]
