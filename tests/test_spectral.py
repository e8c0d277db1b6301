"""The spectral rules' plain-Python paths (ConFIG, Aligned-MTL, IMTL-G) and their kernels.

Each rule runs its arithmetic in Python floats up to ``PYTHON_MAX_K`` and in tensors above;
both paths must give the same weights on random and degenerate Gramians, and the host
kernels must match LAPACK (numpy) and ``torch.linalg.pinv``.
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbalance._solvers import _spectral as spectral
from taskbalance._solvers._spectral import (
    JACOBI_MAX_SIZE,
    PYTHON_MAX_K,
    eigh_py,
    pinv_apply_py,
)
from taskbalance.methods._aligned_mtl import aligned_mtl_weights
from taskbalance.methods._config import config_weights
from taskbalance.methods._gradient_base import spectral_cutoff
from taskbalance.methods._imtl_g import imtl_g_weights

RULES = {
    "imtl_g": lambda G, backend: imtl_g_weights(G, backend=backend),
    "config": lambda G, backend: config_weights(G, backend=backend),
    "aligned_mtl/min": lambda G, backend: aligned_mtl_weights(G, "min", backend=backend),
    "aligned_mtl/median": lambda G, backend: aligned_mtl_weights(G, "median", backend=backend),
    "aligned_mtl/rmse": lambda G, backend: aligned_mtl_weights(G, "rmse", backend=backend),
}


def _jacobians(seed: int, count: int):
    """Random and degenerate task Jacobians, K from 1 to past the crossover."""
    generator = torch.Generator().manual_seed(seed)
    kinds = ["full", "opposite", "parallel", "scaled", "zero", "duplicated", "rank_one"]
    for index in range(count):
        kind = kinds[index % len(kinds)]
        K = 1 + index % (PYTHON_MAX_K + 3)
        J = torch.randn(K, 12, generator=generator, dtype=torch.float64)
        if kind == "opposite" and K > 1:
            J[1] = -J[0]
        if kind == "parallel" and K > 1:
            J[1] = 2.5 * J[0]
        if kind == "scaled":
            J = J * torch.logspace(-6, 6, K, dtype=torch.float64)[:, None]
        if kind == "zero":
            J[0] = 0.0
        if kind == "duplicated" and K > 2:
            J[-1] = J[1]
        if kind == "rank_one":
            J = torch.randn(K, 1, generator=generator, dtype=torch.float64) * J[:1]
        yield kind, J


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", list(RULES))
def test_python_and_torch_paths_agree(rule, dtype):
    solve = RULES[rule]
    for kind, J in _jacobians(7, 140):
        gram = (J @ J.T).to(dtype)
        on_host, with_tensors = solve(gram, "python"), solve(gram, "torch")
        assert on_host.dtype == with_tensors.dtype == torch.float64
        # Gradients scaled from 1e-6 to 1e6 give a graded Gramian (condition ~1e24): LAPACK's
        # decompositions then move Aligned-MTL's weights by up to 6e-5 and IMTL-G's by 2e-9,
        # where the host path's Jacobi rotations are the more exact (checked against 60-digit
        # references below). ConFIG's normalised matrix is not graded: both paths agree.
        graded = {"imtl_g": JACOBI_MAX_SIZE + 1, "config": 0}.get(rule, JACOBI_MAX_SIZE)
        if kind == "scaled" and 3 <= len(J) <= graded:
            continue
        scale = max(float(with_tensors.abs().max()), 1.0)
        torch.testing.assert_close(
            on_host, with_tensors, rtol=0, atol=1e-12 * scale, msg=f"{kind}, K={len(J)}"
        )


def _aligned_mtl_exact(gram: torch.Tensor, scale: str, rtol: float) -> list[float]:
    """Aligned-MTL's ``w = s·V Λ^{-1/2} Vᵀ1`` on the kept eigenpairs, in 60-digit arithmetic."""
    mpmath.mp.dps = 60
    values, vectors = mpmath.eigsy(mpmath.matrix(gram.tolist()))
    K = len(gram)
    kept = [c for c in range(K) if values[c] > rtol * max(values)]
    sigma = sorted(mpmath.sqrt(values[c]) for c in kept)
    common = {
        "min": sigma[0],
        "median": sigma[(len(sigma) - 1) // 2],
        "rmse": mpmath.sqrt(sum(s * s for s in sigma) / len(sigma)),
    }[scale]
    weights = [mpmath.mpf(0)] * K
    for c in kept:
        projection = sum(vectors[i, c] for i in range(K))
        for i in range(K):
            weights[i] += common / mpmath.sqrt(values[c]) * vectors[i, c] * projection
    return [float(w) for w in weights]


def _imtl_g_exact(gram: torch.Tensor) -> list[float]:
    """IMTL-G's α from its definition, in 60 digits: ``Σ α_k = 1`` and ``Jᵀα`` has the same
    projection ``(Gα)_k / ‖g_k‖`` on every unit task gradient (full-rank Gramians)."""
    mpmath.mp.dps = 60
    K = len(gram)
    G = mpmath.matrix(gram.tolist())
    norms = [mpmath.sqrt(G[k, k]) for k in range(K)]
    system, right = mpmath.matrix(K, K), mpmath.matrix(K, 1)
    for k in range(1, K):
        for j in range(K):
            system[k - 1, j] = G[0, j] / norms[0] - G[k, j] / norms[k]
    for j in range(K):
        system[K - 1, j] = 1
    right[K - 1] = 1
    return [float(value) for value in mpmath.lu_solve(system, right)]


def test_imtl_g_host_path_is_exact_on_graded_gramians():
    """Where LAPACK's pseudo-inverse moves the weights by up to 2e-9 of the largest."""
    for kind, J in _jacobians(7, 280):
        if kind != "scaled" or not 3 <= len(J) <= JACOBI_MAX_SIZE + 1:
            continue
        gram = J @ J.T
        expected = torch.tensor(_imtl_g_exact(gram), dtype=torch.float64)
        got = imtl_g_weights(gram, backend="python")
        top = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-14 * top)


@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
def test_aligned_mtl_host_path_is_exact_on_graded_gramians(scale):
    """Where LAPACK's eigenvectors of a graded Gramian are off by up to 1e-5 in the weights."""
    for kind, J in _jacobians(7, 140):
        if kind != "scaled" or not 3 <= len(J) <= JACOBI_MAX_SIZE:
            continue
        gram = J @ J.T
        got = aligned_mtl_weights(gram, scale, backend="python")
        exact = _aligned_mtl_exact(gram, scale, spectral_cutoff(gram, None))
        expected = torch.tensor(exact, dtype=torch.float64)
        top = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-14 * top)


@pytest.mark.parametrize("rule", list(RULES))
def test_auto_picks_the_host_path_up_to_the_crossover(rule, monkeypatch):
    """At K = 2 the host path makes no LAPACK call at all (one Jacobi rotation, a 1×1
    pseudo-inverse); above the crossover the tensor path is taken."""
    solve = RULES[rule]
    small = torch.tensor([[2.0, -0.5], [-0.5, 1.0]])
    big = torch.eye(PYTHON_MAX_K + 1) + 0.1

    def refused(*args, **kwargs):
        raise AssertionError("a LAPACK call on the host path at K = 2")

    expected = solve(small, "torch")
    monkeypatch.setattr(torch.linalg, "eigh", refused)
    monkeypatch.setattr(torch.linalg, "pinv", refused)
    torch.testing.assert_close(solve(small, "auto"), expected, rtol=1e-15, atol=0)
    with pytest.raises(AssertionError, match="LAPACK"):
        solve(big, "auto")


@settings(max_examples=300, deadline=None)
@given(
    st.floats(-1e6, 1e6, allow_subnormal=False),
    st.floats(-1e6, 1e6, allow_subnormal=False),
    st.floats(-1e6, 1e6, allow_subnormal=False),
)
def test_eigh_2x2_matches_lapack(a, b, c):
    values, vectors = eigh_py([[a, b], [b, c]])
    reference = np.linalg.eigvalsh(np.array([[a, b], [b, c]]))
    size = max(abs(a), abs(b), abs(c), 1e-300)
    np.testing.assert_allclose(values, reference, rtol=0, atol=2e-15 * size)
    assert values[0] <= values[1]
    V = np.array(vectors)
    np.testing.assert_allclose(V.T @ V, np.eye(2), atol=1e-15)  # orthonormal columns
    A = np.array([[a, b], [b, c]])
    np.testing.assert_allclose(A @ V, V * np.array(values), rtol=0, atol=4e-15 * size)


@pytest.mark.parametrize(
    ("matrix", "expected"),
    [
        ([[3.0, 0.0], [0.0, 1.0]], [1.0, 3.0]),  # already diagonal, descending
        ([[1.0, 2.0], [2.0, 4.0]], [0.0, 5.0]),  # rank one: an exact zero
        ([[1.0, -1.0], [-1.0, 1.0]], [0.0, 2.0]),  # two opposite unit gradients
        ([[1.0, 1e-300], [1e-300, 1.0 + 1e-15]], [1.0, 1.0 + 1e-15]),  # theta overflows
    ],
)
def test_eigh_2x2_exact_cases(matrix, expected):
    values, _ = eigh_py(matrix)
    assert values == pytest.approx(expected, rel=0, abs=1e-15)


def _check_eigh(A: np.ndarray) -> None:
    """``eigh_py(A)``: LAPACK's eigenvalues to a few ulps of ‖A‖, orthonormal eigenvectors."""
    values, vectors = eigh_py(A.tolist())
    size = max(float(np.abs(A).max()), 1e-300)
    np.testing.assert_allclose(values, np.linalg.eigvalsh(A), rtol=0, atol=1e-14 * size)
    assert values == sorted(values)
    V = np.array(vectors)
    np.testing.assert_allclose(V.T @ V, np.eye(len(A)), rtol=0, atol=1e-14)
    np.testing.assert_allclose(A @ V, V * np.array(values), rtol=0, atol=1e-14 * size)


@pytest.mark.parametrize("size", [3, 4, JACOBI_MAX_SIZE + 1])
def test_eigh_larger_matrices_match_lapack(size):
    """Jacobi rotations up to JACOBI_MAX_SIZE, one LAPACK call above."""
    rng = np.random.default_rng(size)
    for rank in range(size + 1):  # full rank down to the zero matrix
        factor = rng.standard_normal((size, rank)) * 10.0 ** rng.uniform(-8, 8)
        _check_eigh(factor @ factor.T)
    _check_eigh(np.diag(np.arange(size, 0, -1.0)))  # diagonal, descending: no rotation
    _check_eigh(np.ones((size, size)))  # an eigenvalue of multiplicity size − 1
    _check_eigh(np.eye(size) - 2.0 * np.eye(size)[::-1])  # opposite pairs, indefinite
    factor = rng.standard_normal((size, size))
    for exponent in (-1000, 1000):  # products of such entries would underflow or overflow
        _check_eigh(factor @ factor.T * 2.0**exponent)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(3, JACOBI_MAX_SIZE),
    st.lists(st.floats(-1e6, 1e6, allow_subnormal=False), min_size=16, max_size=16),
)
def test_jacobi_eigh_matches_lapack(size, entries):
    A = np.array(entries[: size * size]).reshape(size, size)
    _check_eigh(0.5 * (A + A.T))


def _hard_matrices(size: int) -> list[np.ndarray]:
    """Random, duplicated-row, proportional-row and zero-column matrices: the rows of a
    dependent pair leave a column that only shrinks by an ulp per rotation."""
    rng = np.random.default_rng(size)
    matrices = []
    for kind in range(4):
        matrix = rng.standard_normal((size, size))
        if kind == 1:
            matrix[-1] = matrix[0]
        elif kind == 2:
            matrix[-1] = 0.5 * matrix[0]
        elif kind == 3:
            matrix[:, 0] = 0.0
        matrices.append(matrix)
    return matrices


@pytest.mark.parametrize("size", range(2, JACOBI_MAX_SIZE + 1))
def test_jacobi_is_used_up_to_its_size(size, monkeypatch):
    """No LAPACK call at these sizes, rank-deficient inputs included (the rotations converge
    on them rather than falling back), and the results are LAPACK's."""
    rng = np.random.default_rng(size)
    cases = [(m, rng.standard_normal(size)) for m in _hard_matrices(size)]
    expected_pinv = [x @ np.linalg.pinv(m, rcond=1e-10) for m, x in cases]

    def refused(*args, **kwargs):
        raise AssertionError("a LAPACK call below JACOBI_MAX_SIZE")

    monkeypatch.setattr(torch.linalg, "eigh", refused)
    monkeypatch.setattr(torch.linalg, "svd", refused)
    for (matrix, vector), expected in zip(cases, expected_pinv, strict=True):
        got = pinv_apply_py(vector.tolist(), matrix.tolist(), atol=0.0, rtol=1e-10)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
        _check_eigh(matrix @ matrix.T)
    with pytest.raises(AssertionError, match="LAPACK"):
        eigh_py(np.eye(JACOBI_MAX_SIZE + 1).tolist())


def test_jacobi_falls_back_to_lapack_when_not_converged(monkeypatch):
    """Rotations that have not converged within the sweep cap hand over to one LAPACK call."""
    monkeypatch.setattr(spectral, "_JACOBI_MAX_SWEEPS", 0)
    for matrix in _hard_matrices(JACOBI_MAX_SIZE):
        _check_eigh(matrix @ matrix.T)
        vector = np.arange(1.0, JACOBI_MAX_SIZE + 1)
        expected = vector @ np.linalg.pinv(matrix, rcond=1e-10)
        got = pinv_apply_py(vector.tolist(), matrix.tolist(), atol=0.0, rtol=1e-10)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("size", [1, 2, 3, 4, JACOBI_MAX_SIZE + 1])
@pytest.mark.parametrize("rank", ["full", "deficient"])
def test_pinv_apply_matches_torch(size, rank):
    generator = torch.Generator().manual_seed(size)
    matrix = torch.randn(size, size, generator=generator, dtype=torch.float64)
    if rank == "deficient":
        matrix[-1] = 0.5 * matrix[0]
    vector = torch.randn(size, generator=generator, dtype=torch.float64)
    for atol, rtol in [(0.0, 1e-12), (1e-3, 1e-12), (0.0, 0.5)]:
        expected = vector @ torch.linalg.pinv(matrix, atol=atol, rtol=rtol)
        got = pinv_apply_py(vector.tolist(), matrix.tolist(), atol=atol, rtol=rtol)
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected)


@pytest.mark.parametrize("exponent", [-1000, 1000])
@pytest.mark.parametrize("size", range(2, JACOBI_MAX_SIZE + 2))
def test_pinv_apply_at_extreme_scales(size, exponent):
    """Entries of 2^±1000, whose squares are outside float64's range: the result is the
    pseudo-inverse of the unscaled matrix, rescaled."""
    generator = torch.Generator().manual_seed(size)
    matrix = torch.randn(size, size, generator=generator, dtype=torch.float64)
    vector = torch.randn(size, generator=generator, dtype=torch.float64)
    expected = vector @ torch.linalg.pinv(matrix) * 2.0**-exponent
    got = pinv_apply_py(vector.tolist(), (matrix * 2.0**exponent).tolist(), atol=0, rtol=1e-12)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected)


@pytest.mark.parametrize("size", range(2, JACOBI_MAX_SIZE + 1))
def test_host_pseudo_inverse_is_exact_on_graded_matrices(size):
    """Rows scaled from 1e-6 to 1e6 (what IMTL-G's system looks like when the task gradients'
    norms differ by 1e12): the one-sided Jacobi SVD keeps the small singular values' relative
    accuracy, so ``x M⁻¹`` matches a 60-digit solve to rounding, where LAPACK's SVD (through
    ``torch.linalg.pinv``) is off by ~1e-8."""
    mpmath.mp.dps = 60
    rng = np.random.default_rng(size)
    for _ in range(20):
        matrix = rng.standard_normal((size, size)) * np.logspace(-6, 6, size)[:, None]
        vector = rng.standard_normal(size)
        exact = mpmath.matrix([vector.tolist()]) * mpmath.inverse(mpmath.matrix(matrix.tolist()))
        expected = np.array([float(exact[0, j]) for j in range(size)])
        got = pinv_apply_py(vector.tolist(), matrix.tolist(), atol=0.0, rtol=1e-15)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-14 * np.abs(expected).max())


@pytest.mark.parametrize("value", [0.0, 1e-9, -1e-9, 2e-9])
def test_pinv_apply_scalar_cut_off(value):
    """A 1×1 system at or below the absolute cut-off is rank zero, as torch.linalg.pinv says."""
    got = pinv_apply_py([3.0], [[value]], atol=1e-9, rtol=1e-12)
    expected = torch.tensor([3.0]).double() @ torch.linalg.pinv(
        torch.tensor([[value]], dtype=torch.float64), atol=1e-9, rtol=1e-12
    )
    assert got == expected.tolist()


@pytest.mark.parametrize("backend", ["python", "torch"])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gramian_is_refused_on_both_paths(rule, backend, bad):
    gram = torch.eye(2 if backend == "python" else PYTHON_MAX_K + 1)
    gram[0, 0] = bad
    with pytest.raises(
        ValueError, match=r"_weights: gram has a nan or inf entry; expected a finite"
    ):
        RULES[rule](gram, backend)


@pytest.mark.parametrize("rule", list(RULES))
def test_backend_is_checked_at_every_k(rule):
    with pytest.raises(ValueError, match=r"^backend: expected"):
        RULES[rule](torch.eye(1), "bogus")
