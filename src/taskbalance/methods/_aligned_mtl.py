"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._registry import register
from taskbalance._solvers._common import select_backend
from taskbalance._solvers._spectral import PYTHON_MAX_K, check_finite, eigh_py, host_gram
from taskbalance._validation import check_choice
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import SpectralGradientBalancer, spectral_cutoff

_SCALES = ("min", "median", "rmse")


@register("aligned_mtl")
class AlignedMTL(SpectralGradientBalancer):
    """Aligned-MTL: replace the task gradients by the closest system with condition number one.

    Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023, Algorithm 1. Write the K×P Jacobian as ``J = Q Σ Rᵀ`` (SVD). The
    aligned Jacobian ``Ĵ = s·Q Rᵀ`` has all its singular values equal to ``s`` (the paper's
    ``s = σ_min``, the smallest non-zero singular value): it is the solution of the Procrustes
    problem ``min ‖J − Ĵ‖`` under ``ĴĴᵀ = s²I`` on the span of J. The update is
    ``Ĵᵀ·pref`` with the uniform preference vector.

    As ``Jᵀw`` from G: ``G = J Jᵀ = Q Σ² Qᵀ`` is exactly ``torch.linalg.eigh(G)`` with
    eigenvalues ``λ = σ²``. Since ``Q Rᵀ = Q Σ⁻¹ Qᵀ J``, ``Ĵ = B J`` with the symmetric
    ``B = s·V Λ^{-1/2} Vᵀ`` (V, Λ the kept eigenpairs), and ``Ĵᵀ pref = Jᵀ (B pref)``:
    ``w = B·pref``.

    Rank: eigenvalues ``λ ≤ rtol·λ_max`` are dropped. The official code uses ``rtol = K·eps``
    (float32); we default to ``100·K·eps`` of the Gramian's dtype, because the rounding error
    of a Gramian grows with the number of parameters P (measured ≈ K·eps·λ_max at P = 10⁴ for
    an exactly rank-deficient J): the official cut then keeps a rounding-noise eigenvalue as
    σ_min of a rank-deficient system (duplicated tasks, K > P) and shrinks the step to ~0. Pass
    ``rtol`` to choose another cut. When G is zero no
    direction exists; the weights are then ``pref`` (the shared direction is zero either way,
    and the task heads still get their gradients).

    Defaults: preferences ``pref = 1`` for every task, fixed (not an argument: the official
    code sums the aligned gradients, ``weights.sum(-1)``, as does LibMTL; torchjd uses the
    mean ``1/K``),
    ``scale="min"`` (the paper's σ_min; the official code also offers ``"median"`` and
    ``"rmse"``: the median singular value and ``sqrt(mean λ)``).

    Departures: the default rank cut (above); eigenvalues computed in float64 with
    ``torch.linalg.eigh`` (the official code's ``torch.symeig`` no longer exists, which is why
    LibMTL's copy crashes on current torch); a component ``v_cᵀ·pref`` within the
    eigenvectors' own rounding (``4K·eps·Σ_i |v_ic|``) counts as 0, so that exactly opposite
    gradients give exactly ``d = 0`` at every scale rather than rounding noise at some.

    Args:
        num_tasks: K.
        scale: ``"min"``, ``"median"`` or ``"rmse"``: the common singular value s.
        rtol: relative eigenvalue cut-off; None for ``100·K·eps`` of the Gramian's dtype.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``
            (``"none"`` only), ``group_aggregation``, ``reuse_rows``: see
            :class:`GradientBalancer`; the loop options ``accumulation_steps``, ``on_nonfinite``:
            see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.create("aligned_mtl", num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        tensor([1.0000, 0.5000])
    """

    normalization_refused = (
        "it already equalises the task gradients: the aligned system has condition number one"
    )
    per_group_refused = None

    signed_weights = True
    claimed_properties = frozenset({"permutation_invariant", "scale_equivariant"})
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"scale": "median"},
        {"scale": "rmse"},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"normalization": "l2"}, ValueError, r"normalization: \S+ does not offer gradient"),
        ({"scale": "max"}, ValueError, r"scale: expected one of"),
    )

    def __init__(
        self,
        num_tasks: int,
        *,
        scale: str = "min",
        rtol: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, rtol=rtol, **options)
        self.scale = check_choice("scale", scale, _SCALES)

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        return aligned_mtl_weights(gram, self.scale, self.rtol)


def aligned_mtl_weights(
    gram: Tensor, scale: str = "min", rtol: float | None = None, backend: str = "auto"
) -> Tensor:
    """``w = B·1`` with ``B = s·V Λ^{-1/2} Vᵀ`` on the kept eigenpairs (float64 ``[K]``).

    ``backend``: ``"python"`` keeps the arithmetic in Python floats around one
    eigendecomposition (Jacobi rotations, no LAPACK call, up to K = 4), ``"torch"`` uses
    tensors; ``"auto"`` picks Python up to
    :data:`~taskbalance._solvers._spectral.PYTHON_MAX_K` (see there for the measurements).
    """
    num_tasks = gram.shape[0]
    rtol = spectral_cutoff(gram, rtol)
    # B·1 = s·V Λ^{-1/2} (Vᵀ1), without forming B.
    if select_backend(backend, gram, PYTHON_MAX_K) == "python":
        rows = host_gram(gram, "aligned_mtl_weights")
        tasks = range(num_tasks)
        values, vectors = eigh_py([[0.5 * (rows[i][j] + rows[j][i]) for j in tasks] for i in tasks])
        factors = _kept_factors(values, scale, rtol)
        if factors is None:
            return _uniform(num_tasks, gram)
        coefficients = {c: _projection(vectors, c, num_tasks) * f for c, f in factors.items()}
        weights = [sum(row[c] * x for c, x in coefficients.items()) for row in vectors]
        return torch.tensor(weights, dtype=torch.float64, device=gram.device)
    check_finite(gram, "aligned_mtl_weights")
    g = gram.detach().to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (g + g.T))
    factors = _kept_factors(eigenvalues.tolist(), scale, rtol)
    if factors is None:
        return _uniform(num_tasks, gram)
    kept = eigenvectors[:, list(factors)]
    ratios = torch.tensor(list(factors.values()), dtype=torch.float64, device=gram.device)
    sums = kept.sum(dim=0)
    noise = kept.abs().sum(dim=0) * (_ROUNDING * num_tasks)
    return kept @ (torch.where(sums.abs() <= noise, 0.0, sums) * ratios)


#: A component ``v_cᵀ1`` within this many K·eps of ``Σ_i |v_ic|`` is rounding noise: the
#: eigenvectors themselves carry errors of order K·eps.
_ROUNDING = 4 * torch.finfo(torch.float64).eps


def _projection(vectors: list[list[float]], column: int, num_tasks: int) -> float:
    """``v_cᵀ1`` for eigenvector ``c``, exactly 0 when it is rounding noise (e.g. exactly
    opposite gradients, whose eigenvector is orthogonal to 1: the direction is then exactly 0
    at any scale, where the noise would give 1e-16 at one scale and 0 at another)."""
    total = sum(row[column] for row in vectors)
    noise = _ROUNDING * num_tasks * sum(abs(row[column]) for row in vectors)
    return 0.0 if abs(total) <= noise else total


def _uniform(num_tasks: int, gram: Tensor) -> Tensor:
    """Equal weights, for a zero Gramian: no eigenvector to align (the direction is 0)."""
    return torch.ones(num_tasks, dtype=torch.float64, device=gram.device)


def _kept_factors(values: list[float], scale: str, rtol: float) -> dict[int, float] | None:
    """``s/σ_c`` for each kept eigenvalue ``σ_c²`` (by index), on the host; None when no
    eigenvalue is kept (a zero Gramian)."""
    largest = max(values)
    keep = [i for i, value in enumerate(values) if value > rtol * largest]
    if not largest > 0 or not keep:
        return None
    sigma = [math.sqrt(values[i]) for i in keep]
    if scale == "min":
        common = min(sigma)
    elif scale == "median":
        common = sorted(sigma)[(len(sigma) - 1) // 2]  # the lower middle value, as torch's
    else:
        common = math.sqrt(math.fsum(values[i] for i in keep) / len(keep))
    return {i: common / value for i, value in zip(keep, sigma, strict=True)}
