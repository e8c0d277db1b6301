"""Eigendecomposition and pseudo-inverse of small matrices, with the arithmetic on the host.

ConFIG and Aligned-MTL decompose a K×K Gramian; IMTL-G applies the pseudo-inverse of a
(K−1)×(K−1) system. For small K their torch code spends its time in the dispatch of a dozen
tensor calls around one LAPACK call, and inside a training step each of those calls costs
several times what it does in a micro-benchmark: the forward and backward passes evict the
dispatcher's code and data from the caches between two calls. Measured inside the overhead
benchmark's training loop (one thread), ConFIG's rule took 243 / 200 / 236 µs at K = 2 / 4 /
8 with torch code and 114 / 101 / 153 µs with its arithmetic in Python floats around the one
LAPACK call, and 249 against 275 µs at K = 16. So the methods' plain-Python paths run up to
``PYTHON_MAX_K``.

Up to ``JACOBI_MAX_SIZE`` the decompositions make no LAPACK call either: Jacobi rotations in
Python floats (one rotation for a 2×2 matrix; should the rotations not converge within
``_JACOBI_MAX_SWEEPS`` sweeps, which no test case comes near, one LAPACK call finishes). They
are also the more exact: with the relative stopping test of Demmel & Veselić ("Jacobi's
method is more accurate than QR", 1992) a positive definite matrix ``A = D H D`` (D
diagonal, H well conditioned: graded scales) keeps the relative accuracy of its small
eigenvalues and their eigenvectors, and the one-sided (Hestenes) SVD that of singular values
down to ``n·eps·‖M‖_F``, where LAPACK's QR-based routines lose ``eps·‖A‖`` absolutely. On
Gramians of gradients whose norms span 1e-6 to 1e6, LAPACK's decompositions move
Aligned-MTL's weights by up to 6e-5 and IMTL-G's by up to 2e-9 of the largest weight, where
the host paths are exact to rounding (tests/test_spectral.py checks both against 60-digit
references).
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from taskbalance._solvers._common import F64

__all__ = [
    "JACOBI_MAX_SIZE",
    "PYTHON_MAX_K",
    "check_finite",
    "eigh_py",
    "host_gram",
    "pinv_apply_py",
]

#: The largest K whose spectral rules (ConFIG, Aligned-MTL, IMTL-G) run on the host by default.
PYTHON_MAX_K = 8
#: The largest matrix decomposed by Jacobi rotations in Python floats rather than one LAPACK
#: call (see above). Inside a training step the LAPACK call is the dearer one up to here
#: (IMTL-G's whole step 0.02 faster at K = 3 to 5 in the overhead benchmark's loop, ConFIG's
#: and Aligned-MTL's 0 to 0.02 at K = 3 and 4, 0.01 slower at K = 6), although it is the
#: cheaper one in a micro-benchmark (10 against 29 µs at 4×4).
JACOBI_MAX_SIZE = 4
_JACOBI_MAX_SWEEPS = 30
_EPS = 2.0**-53


def host_gram(gram: Tensor, function: str) -> list[list[float]]:
    """The Gramian as nested lists of float64 values, refused when an entry is not finite."""
    rows: list[list[float]] = gram.tolist()  # exact: every float32 is a float64
    if not all(math.isfinite(value) for row in rows for value in row):
        raise _nonfinite(function)
    return rows


def check_finite(gram: Tensor, function: str) -> None:
    """The torch paths' version of :func:`host_gram`'s check."""
    if not bool(torch.isfinite(gram).all()):
        raise _nonfinite(function)


def _nonfinite(function: str) -> ValueError:
    return ValueError(f"{function}: gram has a nan or inf entry; expected a finite Gramian")


def eigh_py(matrix: list[list[float]]) -> tuple[list[float], list[list[float]]]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix given as nested lists.

    ``vectors[i][j]`` is entry ``i`` of the eigenvector of ``values[j]`` (the columns of the
    eigenvector matrix, as ``torch.linalg.eigh`` returns them). Size 2 is one rotation in
    closed form, sizes up to ``JACOBI_MAX_SIZE`` Jacobi rotations; larger ones make one
    ``torch.linalg.eigh`` call in float64.
    """
    size = len(matrix)
    if size == 1:
        return [matrix[0][0]], [[1.0]]
    if size == 2:
        return _eigh_2x2(matrix[0][0], matrix[0][1], matrix[1][1])
    if size <= JACOBI_MAX_SIZE:
        converged = _jacobi_eigh(matrix)
        if converged is not None:
            return converged
    values, vectors = torch.linalg.eigh(torch.tensor(matrix, dtype=F64))
    return values.tolist(), vectors.tolist()


def _jacobi_eigh(matrix: list[list[float]]) -> tuple[list[float], list[list[float]]] | None:
    """:func:`eigh_py` by cyclic Jacobi rotations (None if it has not converged).

    Each rotation is :func:`_eigh_2x2`'s on one off-diagonal pair. A pair is rotated while
    ``|a_pq| > n·2⁻⁵³·√|a_pp·a_qq|`` (Demmel & Veselić's relative test) and the sweeps stop
    once none is: eigenvalues to a few ulps of ``‖A‖`` at worst, as LAPACK's, and to a few ulps
    of themselves on a positive definite matrix with graded scales; convergence is
    quadratic (a handful of sweeps).
    """
    size = len(matrix)
    # Scaled by a power of two (exact) to a largest entry in [1, 2): no product below
    # overflows or underflows, whatever the Gramian's scale.
    scale = _power_of_two_scale(matrix)
    a = [[value / scale for value in row] for row in matrix]
    vectors = [[1.0 if i == j else 0.0 for j in range(size)] for i in range(size)]
    pairs = [(p, q) for p in range(size - 1) for q in range(p + 1, size)]
    tolerance = size * _EPS
    for _ in range(_JACOBI_MAX_SWEEPS):
        rotated = False
        for p, q in pairs:
            row_p, row_q = a[p], a[q]
            off = row_p[q]
            if abs(off) <= tolerance * math.sqrt(abs(row_p[p] * row_q[q])):
                continue
            rotated = True
            tangent, cosine, sine = _rotation(row_p[p], off, row_q[q])
            for k in range(size):
                if k != p and k != q:
                    kp, kq = row_p[k], row_q[k]
                    row_p[k] = a[k][p] = cosine * kp - sine * kq
                    row_q[k] = a[k][q] = sine * kp + cosine * kq
            row_p[p] -= tangent * off
            row_q[q] += tangent * off
            row_p[q] = row_q[p] = 0.0
            for row in vectors:
                vp, vq = row[p], row[q]
                row[p], row[q] = cosine * vp - sine * vq, sine * vp + cosine * vq
        if not rotated:
            order = sorted(range(size), key=lambda i: a[i][i])
            values = [a[i][i] * scale for i in order]
            return values, [[row[i] for i in order] for row in vectors]
    return None


def _power_of_two_scale(matrix: list[list[float]]) -> float:
    """The power of two at or below the largest ``|entry|`` (1.0 for a zero matrix)."""
    largest = max(abs(value) for row in matrix for value in row)
    return math.ldexp(1.0, math.frexp(largest)[1] - 1) if largest > 0 else 1.0


def _eigh_2x2(a: float, b: float, c: float) -> tuple[list[float], list[list[float]]]:
    """``[[a, b], [b, c]]`` by one Jacobi rotation (the smaller of the two angles, |t| ≤ 1).

    The rotation zeroes ``b``: the new diagonal ``a − t·b``, ``c + t·b`` carries the
    eigenvalues, to a few ulps of the larger one, as LAPACK's are.
    """
    if b == 0.0:
        if a <= c:
            return [a, c], [[1.0, 0.0], [0.0, 1.0]]
        return [c, a], [[0.0, 1.0], [1.0, 0.0]]
    tangent, cosine, sine = _rotation(a, b, c)
    first, second = a - tangent * b, c + tangent * b
    if first <= second:
        return [first, second], [[cosine, sine], [-sine, cosine]]
    return [second, first], [[sine, cosine], [cosine, -sine]]


def _rotation(a: float, b: float, c: float) -> tuple[float, float, float]:
    """Tangent, cosine and sine of the Jacobi rotation that zeroes ``b`` in ``[[a, b], [b, c]]``
    (``b ≠ 0``), the smaller of the two angles (``|t| ≤ 1``)."""
    theta = (c - a) / (2.0 * b)
    # hypot keeps theta² from overflowing; theta = ±inf (b tiny against c − a) gives t = 0.
    tangent = math.copysign(1.0, theta) / (abs(theta) + math.hypot(theta, 1.0))
    cosine = 1.0 / math.hypot(tangent, 1.0)
    return tangent, cosine, tangent * cosine


def pinv_apply_py(
    vector: list[float], matrix: list[list[float]], *, atol: float, rtol: float
) -> list[float]:
    """``vector @ pinv(matrix)`` with ``torch.linalg.pinv``'s cut-off: singular values at or
    below ``max(atol, rtol·σ_max)`` count as zero. Size 1 in closed form, sizes up to
    ``JACOBI_MAX_SIZE`` a one-sided Jacobi SVD; larger sizes make one ``torch.linalg.svd``
    call (``pinv`` would wrap it in half a dozen more)."""
    if len(matrix) == 1:
        value = matrix[0][0]
        # One singular value |m|, kept when above the cut-off; the pseudo-inverse is then
        # 1/m, exactly as sign(m)·(1/|m|) from the SVD.
        kept = abs(value) > max(atol, rtol * abs(value))
        return [vector[0] * (1.0 / value)] if kept else [0.0]
    decomposed = _jacobi_svd(matrix) if len(matrix) <= JACOBI_MAX_SIZE else None
    if decomposed is None:
        left, singular, right = torch.linalg.svd(torch.tensor(matrix, dtype=F64))
        decomposed = left.tolist(), singular.tolist(), right.tolist()
    columns, values, right_rows = decomposed
    cutoff = max(atol, rtol * max(values))  # σ_max
    # x M⁺ = x V Σ⁺ Uᵀ: the coefficient of each left singular vector u_j is (x·v_j)/σ_j.
    coefficients = [
        (sum(map(operator.mul, vector, v)) / sigma, j)
        for j, (sigma, v) in enumerate(zip(values, right_rows, strict=True))
        if sigma > cutoff
    ]
    return [sum(c * row[j] for c, j in coefficients) for row in columns]


def _jacobi_svd(
    matrix: list[list[float]],
) -> tuple[list[list[float]], list[float], list[list[float]]] | None:
    """``M = U diag(σ) Vᵀ`` by one-sided Jacobi rotations (Hestenes), as ``torch.linalg.svd``
    returns it (``U`` as rows, σ, ``Vᵀ`` as rows, σ unsorted), or None if not converged.

    The columns of ``W = M V`` are rotated until every pair is orthogonal to rounding
    (``|w_pᵀw_q| ≤ n·2⁻⁵³·‖w_p‖‖w_q‖``), or one of the two is negligible (``‖w‖ ≤
    n·2⁻⁵³·‖M‖_F``: what is left of a repeated or dependent row, which lies in the span of
    the others and would only shrink by an ulp per rotation); then ``σ_j = ‖w_j‖`` and
    ``u_j = w_j/σ_j`` (0 where ``σ_j = 0``). Singular values come out with a small relative
    error, a few ulps of σ_max at worst, as LAPACK's.
    """
    size = len(matrix)
    scale = _power_of_two_scale(matrix)  # as in _jacobi_eigh: exact, no overflow below
    w = [[value / scale for value in row] for row in matrix]
    v = [[1.0 if i == j else 0.0 for j in range(size)] for i in range(size)]
    tolerance = size * _EPS
    # ‖W‖_F is invariant under the rotations: one floor for every sweep
    negligible = tolerance**2 * sum(value * value for row in w for value in row)
    for _ in range(_JACOBI_MAX_SWEEPS):
        rotated = False
        for p in range(size - 1):
            for q in range(p + 1, size):
                alpha = sum(row[p] * row[p] for row in w)
                beta = sum(row[q] * row[q] for row in w)
                if alpha <= negligible or beta <= negligible:
                    continue
                gamma = sum(row[p] * row[q] for row in w)
                if abs(gamma) <= tolerance * math.sqrt(alpha * beta):
                    continue
                rotated = True
                _, cosine, sine = _rotation(alpha, gamma, beta)
                for rows in (w, v):
                    for row in rows:
                        xp, xq = row[p], row[q]
                        row[p], row[q] = cosine * xp - sine * xq, sine * xp + cosine * xq
        if not rotated:
            singular = [math.sqrt(sum(row[j] * row[j] for row in w)) for j in range(size)]
            left = [
                [
                    value / sigma if sigma > 0 else 0.0
                    for value, sigma in zip(row, singular, strict=True)
                ]
                for row in w
            ]
            values = [sigma * scale for sigma in singular]
            return left, values, [list(column) for column in zip(*v, strict=True)]
    return None
