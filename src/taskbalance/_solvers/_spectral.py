"""Eigendecomposition and pseudo-inverse of small matrices, with the arithmetic on the host.

ConFIG and Aligned-MTL decompose a K×K Gramian; IMTL-G applies the pseudo-inverse of a
(K−1)×(K−1) system. For small K their torch code spends its time in the dispatch of a dozen
tensor calls around one LAPACK call, and inside a training step each of those calls costs
several times what it does in a micro-benchmark: the forward and backward passes evict the
dispatcher's code and data from the caches between two calls. Measured inside the overhead
benchmark's training loop (one thread), ConFIG's rule took 243 / 200 / 236 µs at K = 2 / 4 /
8 with torch code and 114 / 101 / 153 µs with its arithmetic in Python floats around the one
LAPACK call, and 249 against 275 µs at K = 16. So the methods' plain-Python paths run up to
``PYTHON_MAX_K``; a 2×2 (or 1×1) matrix needs no torch call at all, its eigendecomposition
being one Jacobi rotation.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from taskbalance._solvers._common import F64

__all__ = ["PYTHON_MAX_K", "check_finite", "eigh_py", "host_gram", "pinv_apply_py"]

#: The largest K whose spectral rules (ConFIG, Aligned-MTL, IMTL-G) run on the host by default.
PYTHON_MAX_K = 8


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
    eigenvector matrix, as ``torch.linalg.eigh`` returns them). Sizes 1 and 2 are solved in
    closed form; larger ones make one ``torch.linalg.eigh`` call in float64.
    """
    size = len(matrix)
    if size == 1:
        return [matrix[0][0]], [[1.0]]
    if size == 2:
        return _eigh_2x2(matrix[0][0], matrix[0][1], matrix[1][1])
    values, vectors = torch.linalg.eigh(torch.tensor(matrix, dtype=F64))
    return values.tolist(), vectors.tolist()


def _eigh_2x2(a: float, b: float, c: float) -> tuple[list[float], list[list[float]]]:
    """``[[a, b], [b, c]]`` by one Jacobi rotation (the smaller of the two angles, |t| ≤ 1).

    The rotation zeroes ``b``: the new diagonal ``a − t·b``, ``c + t·b`` carries the
    eigenvalues, to a few ulps of the larger one, as LAPACK's are.
    """
    if b == 0.0:
        if a <= c:
            return [a, c], [[1.0, 0.0], [0.0, 1.0]]
        return [c, a], [[0.0, 1.0], [1.0, 0.0]]
    theta = (c - a) / (2.0 * b)
    # hypot keeps theta² from overflowing; theta = ±inf (b tiny against c − a) gives t = 0.
    tangent = math.copysign(1.0, theta) / (abs(theta) + math.hypot(theta, 1.0))
    cosine = 1.0 / math.hypot(tangent, 1.0)
    sine = tangent * cosine
    first, second = a - tangent * b, c + tangent * b
    if first <= second:
        return [first, second], [[cosine, sine], [-sine, cosine]]
    return [second, first], [[sine, cosine], [cosine, -sine]]


def pinv_apply_py(
    vector: list[float], matrix: list[list[float]], *, atol: float, rtol: float
) -> list[float]:
    """``vector @ pinv(matrix)`` with ``torch.linalg.pinv``'s cut-off: singular values at or
    below ``max(atol, rtol·σ_max)`` count as zero. Size 1 in closed form; larger sizes make
    one ``torch.linalg.svd`` call (``pinv`` would wrap it in half a dozen more)."""
    if len(matrix) == 1:
        value = matrix[0][0]
        # One singular value |m|, kept when above the cut-off; the pseudo-inverse is then
        # 1/m, exactly as sign(m)·(1/|m|) from the SVD.
        kept = abs(value) > max(atol, rtol * abs(value))
        return [vector[0] * (1.0 / value)] if kept else [0.0]
    left, singular, right = torch.linalg.svd(torch.tensor(matrix, dtype=F64))
    values: list[float] = singular.tolist()
    cutoff = max(atol, rtol * values[0])  # descending: values[0] is σ_max
    # x M⁺ = x V Σ⁺ Uᵀ: the coefficient of each left singular vector u_j is (x·v_j)/σ_j.
    coefficients = [
        (sum(map(operator.mul, vector, v)) / sigma, j)
        for j, (sigma, v) in enumerate(zip(values, right.tolist(), strict=True))
        if sigma > cutoff
    ]
    columns = left.tolist()
    return [sum(c * row[j] for c, j in coefficients) for row in columns]
