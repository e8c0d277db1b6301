"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._registry import register
from taskbalance._solvers._common import select_backend
from taskbalance._solvers._spectral import (
    PYTHON_MAX_K,
    check_finite,
    host_gram,
    pinv_apply_py,
)
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import (
    SpectralGradientBalancer,
    inverse_norms,
    spectral_cutoff,
)


@register("imtl_g")
class IMTLG(SpectralGradientBalancer):
    """IMTL-G: the aggregate gradient has equal projections onto every unit task gradient.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021, §3.1 (gradient balance). Find ``g = Σ_i α_i g_i`` with ``Σ_i α_i = 1`` and
    ``g·u_1 = g·u_i`` for all i, where ``u_i = g_i/‖g_i‖``. The paper's closed form, with task
    1 as the reference (LibMTL's convention: the first task, index 0):

    ``α_{2:K} = g_1 Uᵀ (D Uᵀ)⁻¹``,  ``α_1 = 1 − Σ_{i≥2} α_i``,

    ``U = [u_1 − u_2; …; u_1 − u_K]`` and ``D = [g_1 − g_2; …; g_1 − g_K]`` (rows).

    As ``Jᵀw`` from G: let ``N = diag(1/‖g_i‖)`` and ``A`` the (K−1)×K matrix with rows
    ``e_1 − e_i``. Then ``D = A J`` and ``U = A N J``, so ``g_1 Uᵀ = (G N Aᵀ)_{1,:}`` and
    ``D Uᵀ = A G N Aᵀ``: both are products of G only, and the direction is ``Jᵀα``, ``w = α``.
    When G is invertible this equals ``α ∝ G⁻¹·diag(G)^{1/2}`` (normalised to sum 1).

    Singular cases: ``(D Uᵀ)⁻¹`` is replaced by the pseudo-inverse (the ConFIG authors' IMTL-G
    does the same; LibMTL uses ``torch.inverse`` and fails there), with singular values below
    ``rtol`` times the largest treated as zero. Unlike ``G⁺·diag(G)^{1/2}``, this keeps the
    equal-projection property where it is still solvable, e.g. for two opposite gradients
    (where it gives the zero direction). A task with a zero gradient has ``u_i = 0``, where
    "zero" means ``‖g_i‖ ≤ 2**-64·max_k ‖g_k‖`` (a bound on ``1/‖g_i‖``). Its
    projection ``g·u_i = 0`` then forces every other projection to 0 as well, so the weights
    go to the zero task (e.g. ``[0, 0, 1]`` for a zero third gradient) and the shared direction
    is 0 for that step: the equal-projection rule, not a fallback.

    Defaults: ``rtol = 100·K·eps`` of the Gramian's dtype (above the Gramian's own rounding
    error, ≈ K·eps at P = 10⁴). The weights sum to 1 (the paper's
    constraint), so the step is about 1/K of an equal-weights sum of the losses.

    Departures: pseudo-inverse instead of inverse (identical when D Uᵀ is invertible); computed
    in float64.

    Args:
        num_tasks: K.
        rtol: relative cut-off of the pseudo-inverse; None for ``100·K·eps`` of G's dtype.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``
            (``"none"`` only), ``group_aggregation``, ``reuse_rows``: see
            :class:`GradientBalancer`; the loop options ``accumulation_steps``, ``on_nonfinite``:
            see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.create("imtl_g", num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        tensor([0.6667, 0.3333])
    """

    normalization_refused = "it already uses the unit task gradients u_k = g_k/‖g_k‖"
    per_group_refused = None

    signed_weights = True
    claimed_properties = frozenset({"scale_equivariant"})
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = ({"rtol": 0.9},)
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"normalization": "l2"}, ValueError, r"normalization: \S+ does not offer gradient"),
        ({"rtol": 0.0}, ValueError, r"rtol: expected a number in \(0.0, 1.0\)"),
    )

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        return imtl_g_weights(gram, self.rtol)


def imtl_g_weights(gram: Tensor, rtol: float | None = None, backend: str = "auto") -> Tensor:
    """IMTL-G's α (float64 ``[K]``, sums to 1) from the Gramian, task 0 as the reference.

    ``backend``: ``"python"`` keeps the arithmetic in Python floats around one pseudo-inverse
    call (Jacobi rotations, no LAPACK call, up to K = 5), ``"torch"`` uses tensors;
    ``"auto"`` picks Python up to :data:`~taskbalance._solvers._spectral.PYTHON_MAX_K` (see
    there for the measurements).
    """
    num_tasks = gram.shape[0]
    rtol = spectral_cutoff(gram, rtol)
    path = select_backend(backend, gram, PYTHON_MAX_K)
    if path == "python":
        rows = host_gram(gram, "imtl_g_weights")
        weights = [1.0] if num_tasks == 1 else _imtl_g_py(rows, rtol)
        return torch.tensor(weights, dtype=torch.float64, device=gram.device)
    check_finite(gram, "imtl_g_weights")
    if num_tasks == 1:
        return torch.ones(1, dtype=torch.float64, device=gram.device)
    g = gram.detach().to(torch.float64)
    squared_norms: list[float] = g.diagonal().tolist()
    n_diagonal = torch.tensor(  # N = diag(1/‖g_k‖)
        inverse_norms(squared_norms), dtype=torch.float64, device=g.device
    )
    # With A = [1, −I] (task 0 minus each other task) and N = diag(1/‖g_k‖): the columns of
    # G N Aᵀ are (G N)[:, 0] − (G N)[:, k], and A G N Aᵀ takes row 0 minus each other row.
    scaled = g * n_diagonal[None, :]  # G N
    right = scaled[:, :1] - scaled[:, 1:]  # G N Aᵀ, K × (K−1)
    reference = right[0]  # g_1 Uᵀ
    system = right[:1] - right[1:]  # D Uᵀ = A G N Aᵀ
    # The cut-off is relative to the gradients' scale as well as to the system's own largest
    # singular value: for exactly parallel gradients the whole system is rounding noise of
    # size ~eps·max‖g_i‖, and a cut relative to that noise alone would invert it.
    scale = math.sqrt(max(max(squared_norms), 0.0))
    rest = (reference @ torch.linalg.pinv(system, atol=rtol * scale, rtol=rtol)).tolist()
    return torch.tensor([1.0 - math.fsum(rest), *rest], dtype=torch.float64, device=g.device)


def _imtl_g_py(gram: list[list[float]], rtol: float) -> list[float]:
    """The torch path's arithmetic, term for term, in Python floats."""
    num_tasks = len(gram)
    squared_norms = [gram[i][i] for i in range(num_tasks)]
    n_diagonal = inverse_norms(squared_norms)
    scaled = [[value * n for value, n in zip(row, n_diagonal, strict=True)] for row in gram]
    right = [[row[0] - row[k] for k in range(1, num_tasks)] for row in scaled]
    reference = right[0]
    system = [[a - b for a, b in zip(reference, row, strict=True)] for row in right[1:]]
    scale = math.sqrt(max(max(squared_norms), 0.0))
    rest = pinv_apply_py(reference, system, atol=rtol * scale, rtol=rtol)
    return [1.0 - math.fsum(rest), *rest]
