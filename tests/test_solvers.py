"""Tests for taskbalance._solvers against independent references (quadprog / scipy, dev only)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import quadprog
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import least_squares, minimize, root

import taskbalance as tb
from taskbalance._solvers import (
    ActiveSets,
    SolverError,
    cagrad_weights,
    dual_cone_weights,
    fairgrad_weights,
    min_norm_weights,
    nash_weights,
    nonneg_qp,
    project_simplex,
    project_simplex_py,
)
from taskbalance._solvers._min_norm import solve_min_norm
from taskbalance._solvers._shifted_min_norm import ShiftedMinNorm

KINDS = ["full", "rankdef", "dup", "scaled", "k1", "zero", "neg", "full", "scaled", "k64"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # tiny K x K problems: thread start-up dominates on shared cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_gramian(rng: np.random.Generator, kind: str) -> np.ndarray:
    """Random Gramian J Jᵀ of the given family (float64)."""
    K = {"k1": 1, "k64": 64}.get(kind, int(rng.integers(2, 9)))
    n = int(rng.integers(1, K)) if kind == "rankdef" else int(rng.integers(K, 2 * K + 3))
    if kind == "k64":
        n = int(rng.choice([16, 80]))
    J = rng.standard_normal((K, n))
    if kind == "neg":  # opposite / conflicting gradients
        J[0] = -0.5 * J[1]
    if kind == "dup":
        J[int(rng.integers(K))] = J[0]
        J[-1] = J[1]
    if kind == "scaled":  # row norms spanning 1e-4 .. 1e4, so G entries 1e-8 .. 1e8
        J = J * 10.0 ** rng.uniform(-4, 4, size=(K, 1))
    if kind == "zero":
        J = np.zeros_like(J) if rng.random() < 0.3 else J * (rng.random((K, 1)) < 0.6)
    J = J * 10.0 ** rng.uniform(-3, 3)
    return J @ J.T


def gramians(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        yield kind, make_gramian(rng, kind)


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------


def ref_min_norm(G: np.ndarray) -> np.ndarray:
    """quadprog on the Jacobi-scaled simplex QP (tiny ridge for PSD)."""
    K = len(G)
    if np.any(np.diag(G) == 0):  # a zero gradient is a min-norm point
        return (np.diag(G) == 0) / np.sum(np.diag(G) == 0)
    D = 1.0 / np.sqrt(np.diag(G))
    A = D[:, None] * G * D[None, :] + 1e-13 * np.eye(K)
    C = np.hstack([D[:, None], np.eye(K)])
    v = quadprog.solve_qp(A, np.zeros(K), C, np.r_[1.0, np.zeros(K)], meq=1)[0]
    w = np.maximum(D * v, 0.0)
    return w / w.sum()


def ref_dual_cone(G: np.ndarray, p: np.ndarray) -> np.ndarray:
    """torchjd's formulation: min vᵀGv s.t. v >= p with quadprog (G must be PD)."""
    K = len(G)
    return quadprog.solve_qp(G, np.zeros(K), np.eye(K), p)[0]


def torchjd_gramian(G: np.ndarray, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> np.ndarray:
    tr = np.trace(G)
    Gn = np.zeros_like(G) if tr < norm_eps else G / tr
    return Gn + reg_eps * np.eye(len(G))


def kkt_simplex(G: np.ndarray, w: np.ndarray, rtol: float) -> None:
    Gw = G @ w
    val = w @ Gw
    slack = 1e-11 * np.max(np.diag(G)) + rtol * val
    assert np.all(Gw >= val - slack), (Gw - val).min()
    assert np.all(np.abs(Gw[w > 1e-9] - val) <= slack + 1e-9 * np.abs(Gw[w > 1e-9]))


# --------------------------------------------------------------------------------------------
# MGDA
# --------------------------------------------------------------------------------------------


def test_min_norm_matches_quadprog_on_500_gramians():
    worst = 0.0
    n = 0
    for kind, G in gramians(0, 520):
        w = min_norm_weights(torch.from_numpy(G)).numpy()
        assert w.shape == (len(G),)
        assert np.all(w >= 0)
        assert abs(w.sum() - 1) < 1e-12
        if not np.any(G):
            np.testing.assert_allclose(w, np.full(len(G), 1 / len(G)))
            continue
        val = w @ G @ w
        ref = ref_min_norm(G)
        vref = ref @ G @ ref
        # values below ~1e-11 max(G_ii) are rounding noise for both solvers (0 in the hull)
        floor = 1e-11 * np.max(np.diag(G))
        err = abs(val - vref) / max(vref, floor)
        worst = max(worst, err)
        assert err <= 1e-5, (kind, val, vref)
        # unique direction: ‖Jᵀ(w - w_ref)‖² <= f(w) - f(w_ref) + ... relative to ‖Jᵀ w_ref‖²
        diff = w - ref
        assert diff @ G @ diff <= 1e-5 * max(vref, floor) + 2 * abs(val - vref)
        kkt_simplex(G, w, 1e-8)
        n += 1
    assert n >= 450


def test_min_norm_special_cases():
    G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
    assert torch.allclose(min_norm_weights(G), torch.tensor([0.5, 0.5]))
    # K = 2 closed form with clamping: g1 dominated by g2 = small
    G = torch.tensor([[4.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.equal(min_norm_weights(G), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(min_norm_weights(torch.ones(1, 1)), torch.ones(1))
    assert torch.allclose(min_norm_weights(torch.zeros(4, 4)), torch.full((4,), 0.25))
    # a zero row is optimal (value 0)
    J = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    w = min_norm_weights(J @ J.T)
    assert torch.equal(w, torch.tensor([0.0, 1.0, 0.0]))
    # float32 in, float32 out
    G32 = torch.randn(5, 3) @ torch.randn(5, 3).T
    G32 = G32 @ G32.T
    assert min_norm_weights(G32).dtype == torch.float32


def test_frank_wolfe_is_feasible_and_close():
    for _, G in gramians(1, 100):
        Gt = torch.from_numpy(G)
        w = min_norm_weights(Gt, method="frank_wolfe").numpy()
        assert np.all(w >= 0)
        assert abs(w.sum() - 1) < 1e-12
        exact = min_norm_weights(Gt).numpy()
        floor = 1e-11 * max(np.max(np.diag(G)), 1e-300)
        assert w @ G @ w >= exact @ G @ exact - floor
    # well-conditioned case: FW reaches the exact value to high relative accuracy
    rng = np.random.default_rng(3)
    J = rng.standard_normal((6, 20)) + 2.0
    G = torch.from_numpy(J @ J.T)
    w_fw = min_norm_weights(G, method="frank_wolfe", max_iter=5000, tol=1e-12)
    w = min_norm_weights(G)
    assert float(w_fw @ G @ w_fw) == pytest.approx(float(w @ G @ w), rel=1e-6)
    # hitting the cap is not an error for the approximate FW method
    min_norm_weights(G, method="frank_wolfe", max_iter=1)


# --------------------------------------------------------------------------------------------
# non-negative QP and dual cone
# --------------------------------------------------------------------------------------------


def test_nonneg_qp_matches_quadprog_on_500_problems():
    rng = np.random.default_rng(5)
    worst = 0.0
    for kind, G in gramians(5, 500):
        K = len(G)
        if not np.any(G):
            continue
        # b in range(G) keeps singular problems bounded
        b = (
            G @ rng.standard_normal(K)
            if kind in ("rankdef", "dup", "zero", "neg", "k64")
            else (rng.standard_normal(K) * np.sqrt(np.diag(G)))
        )
        u = nonneg_qp(torch.from_numpy(G), torch.from_numpy(b)).numpy()
        assert np.all(u >= 0)
        dg = np.diag(G)
        D = np.where(dg > 0, 1.0 / np.sqrt(np.where(dg > 0, dg, 1.0)), 0.0)
        A = D[:, None] * G * D[None, :] + 1e-13 * np.eye(K)
        v = quadprog.solve_qp(A, -(D * b), np.eye(K), np.zeros(K))[0]
        ur = np.maximum(D * v, 0.0)

        def f(x, G=G, b=b):
            return 0.5 * x @ G @ x + b @ x

        scale = abs(f(ur)) + 1e-10 * (0.5 * ur @ G @ ur + np.abs(b) @ ur) + 1e-300
        err = (f(u) - f(ur)) / scale
        worst = max(worst, err)
        assert err <= 1e-5, (kind, f(u), f(ur))
        g = G @ u + b  # KKT in Jacobi-scaled units
        us = np.where(D > 0, u / np.where(D > 0, D, 1.0), 0.0)
        assert np.all(D * g >= -1e-8 * (np.abs(D * b).max() + np.abs(us).sum()))


def test_dual_cone_matches_torchjd_formulation():
    rng = np.random.default_rng(7)
    worst = 0.0
    count = 0
    for kind, G in gramians(7, 560):
        K = len(G)
        prefs = np.eye(K) / K if (count % 2 and K < 64) else rng.random((2, K))
        W = dual_cone_weights(
            torch.from_numpy(G), torch.from_numpy(prefs), norm_eps=1e-4, reg_eps=1e-4
        ).numpy()
        Gt = torchjd_gramian(G)
        for m in range(prefs.shape[0]):
            ref = ref_dual_cone(Gt, prefs[m])
            diff = W[m] - ref
            err = (diff @ Gt @ diff) / (ref @ Gt @ ref)
            worst = max(worst, err)
            assert math.sqrt(err) <= 1e-5, (kind, err)
            assert np.all(Gt @ W[m] >= -1e-10 * np.abs(Gt).max())
        count += 1
    assert count >= 500


def test_dual_cone_default_is_exact_vs_quadprog():
    for kind, G in gramians(8, 200):
        if not np.any(G):
            continue
        K = len(G)
        p = np.full(K, 1.0 / K)
        w = dual_cone_weights(torch.from_numpy(G), torch.from_numpy(p)).numpy()
        scale = np.trace(G)
        assert np.all(G @ w >= -1e-9 * scale), kind  # non-conflicting
        dg = np.diag(G)
        D = np.where(dg > 0, 1.0 / np.sqrt(np.where(dg > 0, dg, 1.0)), 1.0)
        A = D[:, None] * G * D[None, :] + 1e-13 * np.eye(K)  # Jacobi-scaled reference
        ref = D * ref_dual_cone(A, p / D)
        diff = w - ref
        # ‖Jᵀ(w - w_ref)‖ <= 1e-4 ‖Jᵀ w_ref‖ up to the rounding level of G
        assert diff @ G @ diff <= 1e-8 * (ref @ G @ ref) + 1e-15 * scale, kind


def test_dual_cone_shapes_and_norm_eps():
    G = torch.tensor([[1.0, -1.5], [-1.5, 4.0]], dtype=torch.float64)
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    w = dual_cone_weights(G, half)
    assert w.shape == (2,)
    # hand value: g2ᵀd = 0 binds, w = (0.75, 0.5)
    torch.testing.assert_close(w, torch.tensor([0.75, 0.5], dtype=torch.float64))
    W = dual_cone_weights(G, torch.eye(2, dtype=torch.float64) / 2)
    assert W.shape == (2, 2)
    # torchjd: trace < norm_eps means no projection at all; the exact default projects
    tiny = G * 1e-6
    w = dual_cone_weights(tiny, half, norm_eps=1e-4, reg_eps=1e-4)
    assert torch.allclose(w, half)
    torch.testing.assert_close(dual_cone_weights(tiny, half), torch.tensor([0.75, 0.5]).double())


# --------------------------------------------------------------------------------------------
# Nash-MTL and FairGrad
# --------------------------------------------------------------------------------------------


def _ridge(G: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    d = np.diag(G).copy()
    d[d <= 0] = np.trace(G) / len(G)
    return G + eps * np.diag(d)


def test_nash_matches_scipy_on_500_gramians():
    worst_res = 0.0
    worst_ref = 0.0
    n = 0
    compared = 0
    for kind, G in gramians(11, 520):
        if not np.any(G):
            with pytest.raises(SolverError, match="nash_weights"):
                nash_weights(torch.from_numpy(G))
            continue
        a = nash_weights(torch.from_numpy(G)).numpy()
        assert np.all(a > 0)
        assert np.all(np.isfinite(a))
        Gr = _ridge(G)
        noise = 16 * len(G) * 2.2e-16 * a * (np.abs(Gr) @ a)  # rounding level
        res = (np.abs(a * (Gr @ a) - 1) - noise).max()
        worst_res = max(worst_res, res)
        assert res <= 1e-6, (kind, res)
        n += 1
        if kind in ("full", "scaled", "neg", "k1") or (kind == "k64" and n % 3 == 0):
            # independent reference: scipy root (hybr) in log space on the Jacobi-scaled system
            s = 1 / np.sqrt(np.diag(Gr))
            C = s[:, None] * Gr * s[None, :]
            with np.errstate(all="ignore"):  # the reference may wander before failing
                sol = root(
                    lambda y, C=C: np.exp(y) * (C @ np.exp(y)) - 1,
                    np.zeros(len(G)),
                    jac=lambda y, C=C: (
                        (C * np.exp(y)[None, :] + np.diag(C @ np.exp(y))) * np.exp(y)[:, None]
                    ),
                    method="hybr",
                    tol=1e-14,
                )
            if not sol.success or np.abs(np.exp(sol.x) * (C @ np.exp(sol.x)) - 1).max() > 1e-9:
                continue  # the reference itself failed; our residual was checked above
            compared += 1
            sol.x = np.exp(sol.x)
            ref = s * sol.x
            err = np.abs(a - ref).max() / np.abs(ref).max()
            worst_ref = max(worst_ref, err)
            assert err <= 1e-5, (kind, err)
    assert n >= 450
    assert compared >= 90


def test_fairgrad_matches_official_least_squares():
    worst = 0.0
    n = 0
    compared = 0
    for i, (kind, G) in enumerate(gramians(13, 520)):
        if not np.any(G):
            continue
        alpha = [0.5, 1.0, 2.0, 5.0][i % 4]
        w = fairgrad_weights(torch.from_numpy(G), alpha).numpy()
        assert np.all(w > 0)
        assert np.all(np.isfinite(w))
        Gr = _ridge(G)
        noise = 16 * len(G) * 2.2e-16 * w ** (1 / alpha) * (np.abs(Gr) @ w)
        res = (np.abs(w ** (1 / alpha) * (Gr @ w) - 1) - noise).max()
        assert res <= 1e-6, (kind, alpha, res)
        n += 1
        if kind in ("full", "neg", "k1", "dup"):
            # the official call: least_squares(A x - (1/x)^(1/alpha), x0=1/K, bounds=(0, inf))
            sig = np.trace(Gr) / len(G)
            A = Gr / sig
            sol = least_squares(
                lambda x, A=A, al=alpha: A @ x - (1 / x) ** (1 / al),
                np.ones(len(G)) / len(G),
                bounds=(0, np.inf),
                xtol=1e-15,
                ftol=1e-15,
                gtol=1e-15,
            )
            if np.abs(sol.x ** (1 / alpha) * (A @ sol.x) - 1).max() > 1e-9:
                continue  # the reference stalled (e.g. at the bound 0); residual checked above
            compared += 1
            ref = sol.x * sig ** (-alpha / (alpha + 1))
            err = np.abs(w - ref).max() / np.abs(ref).max()
            worst = max(worst, err)
            assert err <= 1e-5, (kind, alpha, err)
    assert n >= 450
    assert compared >= 100


def test_fairgrad_regressions_rank_deficient():
    # opposite tiny/huge gradients plus zero rows: (Cw)_i is a tiny difference of large terms, so
    # the residual's rounding level is ~1 (was: clamped at 1e-2, never reached)
    J = torch.tensor([[0.0], [0.0], [0.0], [0.0], [1e-3], [-5500.0]], dtype=torch.float64)
    G = J @ J.T
    for alpha in (0.5, 1.0, 2.0):
        w = fairgrad_weights(G, alpha)
        assert bool((w > 0).all())
        assert bool(torch.isfinite(w).all())
    # rank-16 K=64, alpha=5: |f| ~ 1e7 >> decrease, the f-difference Armijo test stalled at 1e-4
    G = next(G for i, (k, G) in enumerate(gramians(13, 140)) if i == 139)
    w = fairgrad_weights(torch.from_numpy(G), 5.0).numpy()
    Gr = _ridge(G)
    noise = 16 * len(G) * 2.2e-16 * w**0.2 * (np.abs(Gr) @ w)
    assert (np.abs(w**0.2 * (Gr @ w) - 1) - noise).max() <= 1e-6


@pytest.mark.parametrize("backend", ["python", "torch"])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_barrier_solvers_on_gradients_of_graded_scales(backend, alpha):
    # Gradient norms from 1e-4 to 1e4: eigvalsh of the unscaled G errs by ~eps·‖G‖ ~ 1e-7,
    # more than whole entries of the smallest rows. Where it read G as indefinite, the spectrum
    # clamp on the unscaled G moved a small task's weight by 20-40% (torch path: 1 of these 30
    # Gramians); decided and clamped on the Jacobi-scaled G, every residual is at rounding.
    rng = np.random.default_rng(5)
    p = 1.0 / alpha
    for _ in range(30):
        K = int(rng.choice([6, 12, 17, 24]))
        J = rng.standard_normal((K, K + 3)) * 10.0 ** rng.uniform(-4, 4, size=(K, 1))
        G = J @ J.T
        w = fairgrad_weights(torch.from_numpy(G), alpha, backend=backend).numpy()
        assert np.abs(w**p * (_ridge(G) @ w) - 1).max() <= 1e-8


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_fairgrad_on_rank_deficient_gradients_spread_over_fourteen_orders(backend):
    # Row norms 1e-7 .. 1e7 and rank < K: the iterate reaches the solution to rounding, where
    # the residual of some task and the Newton decrement are rounding, which no step reduces.
    # The exit required a decrement below tol as well; Newton then wandered at rounding until
    # max_iter (2 of these 90 problems on each path, all alpha = 2). Accepted now with every
    # residual at its rounding level, the decrement at its own and a relative step <= sqrt(tol).
    rng = np.random.default_rng(1270)
    for _ in range(30):
        K = int(rng.integers(2, 9))
        J = rng.standard_normal((K, int(rng.integers(1, K)))) * 10.0 ** rng.uniform(
            -7, 7, size=(K, 1)
        )
        G = J @ J.T
        Gr = _ridge(G)
        for alpha in (0.5, 1.0, 2.0):
            w = fairgrad_weights(torch.from_numpy(G), alpha, backend=backend).numpy()
            assert np.all(w > 0)
            assert np.all(np.isfinite(w))
            wp = w ** (1 / alpha)
            noise = 16 * K * 2.2e-16 * wp * (np.abs(Gr) @ w)  # rounding level of w^p (Gr w)
            assert (np.abs(wp * (Gr @ w) - 1) - noise).max() <= 1e-8, (K, alpha)


def test_fairgrad_alpha_one_is_nash():
    for _, G in gramians(17, 30):
        if not np.any(G):
            continue
        Gt = torch.from_numpy(G)
        torch.testing.assert_close(fairgrad_weights(Gt, 1.0), nash_weights(Gt), rtol=1e-7, atol=0)


# --------------------------------------------------------------------------------------------
# CAGrad
# --------------------------------------------------------------------------------------------


def cagrad_objective(G: np.ndarray, w: np.ndarray, c: float) -> float:
    K = len(G)
    b = G @ np.full(K, 1 / K)
    r = c * math.sqrt(max(np.full(K, 1 / K) @ b, 0.0))
    return b @ w + r * math.sqrt(max(w @ G @ w, 0.0))


def slsqp_cagrad(G: np.ndarray, c: float) -> np.ndarray:
    """The official code's inner solve: SLSQP on the dual from x0 = 1/K (independent reference).

    SLSQP may end off the simplex (e.g. sum 1.13 on a rank-deficient G), and F is 1-homogeneous,
    so the result is put back on the simplex: unnormalised it would look better than it is.
    """
    K = len(G)
    ref = minimize(
        lambda x: cagrad_objective(G, x, c),
        np.full(K, 1 / K),
        bounds=[(0, 1)] * K,
        constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    x = np.maximum(ref.x, 0.0)
    return x / x.sum()


def test_cagrad_kkt_and_scipy_on_500_gramians():
    worst = 0.0
    n = 0
    for i, (kind, G) in enumerate(gramians(19, 520)):
        K = len(G)
        c = [0.4, 0.2, 0.8, 1.5][i % 4]
        wo = cagrad_weights(torch.from_numpy(G), c).numpy()
        assert wo.shape == (K,)
        assert np.all(np.isfinite(wo))
        mean = np.full(K, 1 / K)
        gg = mean @ G @ mean
        if gg <= 1e-300 * max(np.max(np.diag(G)), 1e-300):
            continue
        r = c * math.sqrt(gg)
        # recover the inner solution w* from the output: wo (1 + c²) = 1/K + (r/s) w*
        lam_w = wo * (1 + c * c) - mean
        d = lam_w + mean
        radius = math.sqrt(max(lam_w @ G @ lam_w, 0.0))
        if abs(radius - r) > 1e-6 * r:
            # degenerate (g_w* = 0, F* = 0): d is the projection of g0 onto the dual cone,
            # inside the ball and conflicting with no task, i.e. it attains the value F* = 0
            assert radius <= r * (1 + 1e-6), kind
            assert np.all(G @ d >= -1e-9 * np.trace(G)), kind
            if K <= 6:  # and F* = 0 indeed (weak duality: the value min_i g_iᵀd <= F*)
                Fscale = np.abs(G @ mean).max() + r * math.sqrt(np.max(np.diag(G)))
                assert cagrad_objective(G, slsqp_cagrad(G, c), c) >= -1e-6 * Fscale, kind
            continue
        w = lam_w / lam_w.sum()
        s = math.sqrt(max(w @ G @ w, 0.0))
        F = cagrad_objective(G, w, c)
        Fscale = np.abs(G @ mean).max() + r * math.sqrt(np.max(np.diag(G)))
        # exact optimality certificate (Euler + KKT of a 1-homogeneous convex F):
        grad = G @ mean + r * (G @ w) / s
        assert np.all(grad >= F - 1e-7 * Fscale), (kind, (grad - F).min() / Fscale)
        if K <= 12 and kind != "scaled":
            Fref = cagrad_objective(G, slsqp_cagrad(G, c), c)
            err = (F - Fref) / Fscale
            worst = max(worst, err)
            assert err <= 1e-5, (kind, F, Fref)
        n += 1
    assert n >= 350  # the rest are degenerate (g0 = 0 or g_w* = 0: d = g0)


def _degenerate_mgda_cases():
    """Anti-parallel / collinear rows plus a tiny orthogonal row, shifted as CAGrad's inner
    problem does (rows g_i + beta g_0): cycled forever (NaN step ratio, restart guard) or hit a
    singular-face misclassification (eigenvalue 1.6e-12 treated as 0)."""
    rng = np.random.default_rng(7)
    for v in (1.57421875, 1.574, 1.5742187500000002, 2.0):
        J = np.array([[0, 0, v], [0, 0, 1.0], [0.01, 0, 0], [0, 0, 0.8], [0, 0, -1.0]])
        for beta in (0.0, 1e-8, 1e-4, 0.3, 1.0, 7.0):
            Jb = J + beta * J.mean(0)
            yield Jb @ Jb.T
    for _ in range(300):
        K, n = int(rng.integers(3, 9)), int(rng.integers(1, 5))
        base = rng.standard_normal(n)
        J = np.outer(rng.choice([-1.0, 1.0, 0.8, 1.5742, 0.5], size=K), base)
        for i in rng.choice(K, size=int(rng.integers(1, 3)), replace=False):
            o = rng.standard_normal(n)
            J[i] = (o - (o @ base) / (base @ base) * base) * 10.0 ** rng.integers(-4, 0)
        J = np.round(J, int(rng.integers(1, 4)))
        Jb = J + rng.choice([0.0, 1e-4, 0.1, 1.0, 10.0]) * J.mean(0)
        yield Jb @ Jb.T


def test_min_norm_degenerate_regressions():
    n = 0
    for G in _degenerate_mgda_cases():
        if not np.any(G) or np.any(np.diag(G) == 0):
            continue
        w = min_norm_weights(torch.from_numpy(G)).numpy()
        assert np.all(w >= 0)
        assert abs(w.sum() - 1) < 1e-12
        kkt_simplex(G, w, 1e-8)
        val = w @ G @ w
        floor = 1e-11 * np.max(np.diag(G))
        try:
            ref = ref_min_norm(G)
        except ValueError:  # quadprog: not PD even with its ridge (indefinite by rounding)
            continue
        assert val <= ref @ G @ ref + 1e-5 * max(ref @ G @ ref, floor)
        n += 1
    assert n >= 250


def test_cagrad_degenerate_regression():
    # hypothesis: CAGrad's inner min-norm solve cycled (SolverError, KKT residual 4e-5)
    for v in (1.57421875, 1.574):
        J = torch.tensor(
            [[0.0, 0.0, v], [0.0, 0.0, 1.0], [0.01, 0.0, 0.0], [0.0, 0.0, 0.8], [0.0, 0.0, -1.0]],
            dtype=torch.float64,
        )
        for c in (1.0, 0.4, 1.5):
            w = cagrad_weights(J @ J.T, c, rescale=0)
            g0 = J.mean(0)
            assert float((J.T @ w - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-6) + 1e-12


def test_cagrad_special_cases():
    G = torch.eye(2)
    torch.testing.assert_close(cagrad_weights(G, c=0.0), torch.tensor([0.5, 0.5]))
    # orthogonal unit gradients: w* = (1/2, 1/2) by symmetry, d = (1 + c sqrt2 ...) g0
    c = 0.4
    w = cagrad_weights(G.double(), c, rescale=0)
    r = c * math.sqrt(0.5)
    expected = 0.5 + r / math.sqrt(0.5) * 0.5
    torch.testing.assert_close(w, torch.full((2,), expected, dtype=torch.float64))
    assert torch.equal(cagrad_weights(torch.zeros(3, 3)), torch.zeros(3) + 1 / 3 / 1.16)


# --------------------------------------------------------------------------------------------
# property tests
# --------------------------------------------------------------------------------------------


@st.composite
def jacobians(draw):
    K = draw(st.integers(1, 7))
    n = draw(st.integers(1, 7))
    # entries 0 or 1e-3 <= |x| <= 10 (no subnormal-range values), rows scaled by 10^[-3, 3]
    entry = st.one_of(st.just(0.0), st.floats(1e-3, 10), st.floats(-10, -1e-3))
    vals = draw(st.lists(entry, min_size=K * n, max_size=K * n))
    scales = draw(st.lists(st.integers(-3, 3), min_size=K, max_size=K))
    J = torch.tensor(vals, dtype=torch.float64).reshape(K, n)
    return J * (10.0 ** torch.tensor(scales, dtype=torch.float64))[:, None]


@settings(max_examples=60, deadline=None)
@given(jacobians(), st.sampled_from(["active_set", "frank_wolfe"]))
def test_property_min_norm(J, method):
    G = J @ J.T
    w = min_norm_weights(G, method=method)
    assert w.shape == (J.shape[0],)
    assert bool(torch.isfinite(w).all())
    assert bool((w >= 0).all())
    assert abs(float(w.sum()) - 1) < 1e-12
    if method == "active_set" and bool(G.any()):
        kkt_simplex(G.numpy(), w.numpy(), 1e-8)


@settings(max_examples=60, deadline=None)
@given(jacobians())
@example(
    J=torch.tensor(
        [[-33.3333001, 0], [0, 0], [0, 0], [0, 0], [0.00499999, 9.9999e-07], [0, -69.99999]],
        dtype=torch.float64,
    )
)
def test_property_dual_cone_non_conflicting(J):
    G = J @ J.T
    K = G.shape[0]
    scale = float(G.diagonal().sum()) + 1e-300
    upgrad = dual_cone_weights(G, torch.eye(K, dtype=G.dtype) / K, norm_eps=0.0, reg_eps=0.0)
    dualproj = dual_cone_weights(G, torch.full((K,), 1 / K, dtype=G.dtype), norm_eps=0, reg_eps=0)
    norms = G.diagonal().clamp_min(0).sqrt()
    for w in (upgrad.sum(0), dualproj):
        assert w.shape == (K,)
        assert bool(torch.isfinite(w).all())
        # relative to the trace, and to the size of the terms of g_iᵀJᵀw: where the dual cone
        # is {0} the exact weights reach 1e7 (found by a stress run: a conflict of 1.2e-9 of
        # the trace, 1e-12 of the terms, for J = [[−33.3, 0], [5e-3, 1e-6], [0, −70], 0, 0, 0])
        terms = float(norms.max() * (w.abs() @ norms))
        assert float((G @ w).min()) >= -1e-9 * scale - 1e-11 * terms
    # torchjd defaults: non-conflicting w.r.t. the normalised, regularised Gramian
    w = dual_cone_weights(G, torch.eye(K, dtype=G.dtype) / K).sum(0)
    Gt = torch.from_numpy(torchjd_gramian(G.numpy()))
    assert float((Gt @ w).min()) >= -1e-10


@settings(max_examples=60, deadline=None)
@given(jacobians(), st.sampled_from(["python", "torch"]), st.sampled_from([0.0, 1e-4]))
# found by hypothesis: G.float() has a negative eigenvalue with a non-negative eigenvector
@example(
    J=torch.tensor([[0, 0], [-1, 0], [0, 0], [0, 0], [0, 1], [1e-3, -6]], dtype=torch.float64),
    backend="python",
    eps=0.0,
)
def test_property_dual_cone_sum_rows_is_the_float64_sum_of_the_rows(J, backend, eps):
    G = J @ J.T
    K = G.shape[0]
    prefs = torch.eye(K, dtype=G.dtype) / K
    rows = dual_cone_weights(G, prefs, norm_eps=eps, reg_eps=eps, backend=backend)
    summed = dual_cone_weights(G, prefs, norm_eps=eps, reg_eps=eps, backend=backend, sum_rows=True)
    assert summed.shape == (K,)
    torch.testing.assert_close(
        summed, rows.sum(0), rtol=1e-13, atol=1e-13 * float(rows.abs().max())
    )
    # float32 G: one rounding of the float64 sum, not a float32 sum of rounded rows
    single = dual_cone_weights(G.float(), prefs, norm_eps=eps, reg_eps=eps, backend=backend,
                               sum_rows=True)  # fmt: skip
    assert single.dtype == torch.float32
    exact = dual_cone_weights(G.float().double(), prefs, norm_eps=eps, reg_eps=eps,
                              backend=backend).sum(0)  # fmt: skip
    torch.testing.assert_close(single, exact.float(), rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(jacobians(), st.sampled_from([0.5, 1.0, 2.0]))
def test_property_nash_fairgrad_positive(J, alpha):
    G = J @ J.T
    if not bool(G.any()):
        return
    a = nash_weights(G)
    assert a.shape == (J.shape[0],)
    assert bool((a > 0).all())
    assert bool(torch.isfinite(a).all())
    w = fairgrad_weights(G, alpha)
    assert bool((w > 0).all())
    assert bool(torch.isfinite(w).all())


@settings(max_examples=60, deadline=None)
@given(jacobians(), st.floats(0.0, 2.0))
def test_property_cagrad_in_ball(J, c):
    G = J @ J.T
    K = G.shape[0]
    w = cagrad_weights(G, c, rescale=0)
    assert w.shape == (K,)
    assert bool(torch.isfinite(w).all())
    g0 = J.mean(0)
    d = J.T @ w
    # rounding of Jᵀw vs J.mean(0) is ~K eps max|J| (absolute, so scaled; c = 0 gives d = g0)
    atol = 1e-12 + 1e-14 * K * float(J.abs().max())
    assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-6) + atol


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e18, 1e18, allow_nan=False), min_size=1, max_size=20))
def test_property_project_simplex(v):
    x = torch.tensor(v, dtype=torch.float64)
    p = project_simplex(x)
    assert bool((p >= 0).all())
    assert abs(float(p.sum()) - 1) < 1e-9
    torch.testing.assert_close(project_simplex(p), p, atol=1e-12, rtol=0)
    # the plain-Python path (MoCo's step on λ up to K = 40) takes the same steps: equal bits
    assert project_simplex_py(v) == p.tolist()


@pytest.mark.parametrize(
    ("v", "expected"),
    [([1e17, 0.0], [1.0, 0.0]), ([2.0**53 + 2, 0.0], [1.0, 0.0]), ([-1e300], [1.0]),
     ([1e300, 1e300], [0.5, 0.5]), ([-3.0, 5e20, -7e20], [0.0, 1.0, 0.0])],
)  # fmt: skip
def test_project_simplex_of_entries_beyond_2_53(v, expected):
    """Past 2**53, u − (u − 1) rounds to 0: shifted by the largest entry first, the first
    prefix still passes the sorting algorithm's test."""
    assert project_simplex(torch.tensor(v, dtype=torch.float64)).tolist() == expected
    assert project_simplex_py(v) == expected


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

ALL = [
    ("min_norm_weights", lambda G: min_norm_weights(G)),
    ("min_norm_weights", lambda G: min_norm_weights(G, method="frank_wolfe")),
    ("dual_cone_weights", lambda G: dual_cone_weights(G, torch.ones(G.shape[-1]))),
    ("nash_weights", lambda G: nash_weights(G)),
    ("fairgrad_weights", lambda G: fairgrad_weights(G, 2.0)),
    ("cagrad_weights", lambda G: cagrad_weights(G)),
    ("nonneg_qp", lambda G: nonneg_qp(G, torch.ones(G.shape[-1]))),
]


@pytest.mark.parametrize(("name", "fn"), ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises(name, fn, bad):
    G = torch.eye(3)
    G[0, 1] = bad
    with pytest.raises(SolverError, match=f"{name}.*non-finite"):
        fn(G)


@pytest.mark.parametrize(("name", "fn"), ALL)
def test_non_square_raises(name, fn):
    with pytest.raises(SolverError, match=f"{name}.*square"):
        fn(torch.ones(3, 2))


def _hard(K: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(K, 3 * K, generator=g, dtype=torch.float64)
    J[:, 0] += 3.0
    return J @ J.T


def test_cap_raises_with_message():
    G = _hard()
    with pytest.raises(SolverError, match=r"min_norm_weights.*max_iter=1 .*residual"):
        min_norm_weights(G, max_iter=1)
    with pytest.raises(SolverError, match=r"nonneg_qp.*max_iter=1 .*residual"):
        nonneg_qp(G, -torch.ones(8, dtype=torch.float64), max_iter=1)
    with pytest.raises(SolverError, match=r"nash_weights.*max_iter=1 .*residual"):
        nash_weights(G * 1e6, max_iter=1)
    with pytest.raises(SolverError, match=r"fairgrad_weights.*max_iter=1 .*residual"):
        fairgrad_weights(G, 3.0, max_iter=1)
    with pytest.raises(SolverError, match=r"cagrad_weights.*max_iter=1 .*residual"):
        cagrad_weights(G, max_iter=1)
    with pytest.raises(SolverError, match=r"dual_cone_weights.*max_iter=1 .*residual"):
        dual_cone_weights(-G + 2 * torch.diag(G.diagonal()), torch.ones(8), max_iter=1)


def test_unbounded_problems_raise():
    # opposite gradients: v = (1, 1) >= 0 with Gv = 0, Nash potential unbounded without a ridge
    G = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(SolverError, match="nash_weights"):
        nash_weights(G, eps=0.0)
    assert bool((nash_weights(G) > 0).all())  # default ridge: finite
    with pytest.raises(SolverError, match="unbounded"):
        nonneg_qp(G, torch.tensor([-1.0, -1.0], dtype=torch.float64))
    with pytest.raises(SolverError, match=r"nash_weights.*zero"):
        nash_weights(torch.zeros(2, 2))
    # FairGrad on the same G has no solution either. alpha >= 1: unbounded below, as Nash's.
    # alpha < 1: the potential decreases towards its infimum 0 as w = t·(1, 1), t -> inf, with a
    # Newton decrement ~ t^(1 - 1/alpha) -> 0 but relative steps of alpha; at alpha = 0.05 the
    # residual's rounding level passed 1 near t = 5 and w = (5, 5) was returned (residual 1).
    for alpha in (0.05, 0.1, 0.5, 1.0, 2.0):
        for backend in ("python", "torch"):
            with pytest.raises(SolverError, match=r"fairgrad_weights.*did not converge"):
                fairgrad_weights(G, alpha, eps=0.0, backend=backend)
    # a singular G with a solution: w = 2^(-alpha/(alpha + 1)) (1, 1)
    ones = torch.ones(2, 2, dtype=torch.float64)
    for alpha in (0.05, 1.0, 2.0):
        w = fairgrad_weights(ones, alpha, eps=0.0)
        torch.testing.assert_close(w, torch.full_like(w, 2.0 ** (-alpha / (alpha + 1))))


@pytest.mark.parametrize(
    "J",
    [
        [[-28438657.322970327], [1.5780955530921922e-08]],
        [[-7.2077645086840175e-06], [-11871263.0466422], [20777.54928714261], [7.76575e-09]],
    ],
)
def test_fairgrad_iterates_beyond_float64_end_in_a_solver_error(J):
    """alpha = 0.05 (w^20) on gradients 10^±8 apart: the plain-Python path's Newton iterates
    leave float64's range, where Python floats raised OverflowError (the torch path's
    infinities end in "did not converge", or, for the second, reach a solution)."""
    G = torch.tensor(J, dtype=torch.float64) @ torch.tensor(J, dtype=torch.float64).T
    with pytest.raises(SolverError, match=r"fairgrad_weights: damped Newton's iterates left"):
        fairgrad_weights(G, 0.05, backend="python")


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (lambda G: min_norm_weights(G, method="qp"), "method"),
        (lambda G: min_norm_weights(G, max_iter=0), "max_iter"),
        (lambda G: min_norm_weights(G, tol=-1.0), "tol"),
        (lambda G: nonneg_qp(G, torch.ones(2)), "b"),
        (lambda G: dual_cone_weights(G, torch.ones(4)), "prefs"),
        (lambda G: dual_cone_weights(G, torch.ones(3), reg_eps=-1.0), "reg_eps"),
        (lambda G: nash_weights(G, eps=float("nan")), "eps"),
        (lambda G: fairgrad_weights(G, 0.0), "alpha"),
        (lambda G: fairgrad_weights(G, -1.0), "alpha"),
        (lambda G: cagrad_weights(G, -0.1), "c"),
        (lambda G: cagrad_weights(G, rescale=3), "rescale"),
        (lambda G: project_simplex(torch.tensor(1.0)), "v"),
    ],
)
def test_value_errors_name_argument(call, arg):
    with pytest.raises(ValueError, match=rf"^{arg}: expected "):
        call(torch.eye(3))


# --------------------------------------------------------------------------------------------
# backends: every problem on every path, against an independent reference and each other
# --------------------------------------------------------------------------------------------

BACKENDS = ["python", "torch"]


def _crossover_gramians(seed: int, count: int):
    """Random and degenerate Gramians with K around the Python/torch crossovers."""
    rng = np.random.default_rng(seed)
    kinds = ["full", "rankdef", "dup", "scaled", "zero", "neg"]
    for i in range(count):
        kind = kinds[i % len(kinds)]
        K = int(rng.choice([2, 3, 4, 5, 6, 8, 12, 13, 16, 17, 24]))
        n = int(rng.integers(1, K)) if kind == "rankdef" else int(rng.integers(K, 2 * K + 3))
        J = rng.standard_normal((K, n)) + rng.choice([0.0, 0.5]) * rng.standard_normal(n)
        if kind == "neg":
            J[0] = -0.5 * J[1]
        if kind == "dup":
            J[int(rng.integers(K))] = J[0]
            J[-1] = J[1]
        if kind == "scaled":
            J = J * 10.0 ** rng.uniform(-4, 4, size=(K, 1))
        if kind == "zero":
            J = J * (rng.random((K, 1)) < 0.6)
        yield kind, J @ J.T
    for G in list(_degenerate_mgda_cases())[::15]:
        yield "degenerate", G


def _floor(G: np.ndarray) -> float:
    return 1e-11 * max(np.max(np.diag(G)), 1e-300)


def _check_min_norm(G, w, ref, tight):
    va, vb = w @ G @ w, ref @ G @ ref
    rel = 1e-8 if tight else 1e-5
    # values below ~1e-11 max(G_ii) are rounding noise (0 in the hull)
    assert va - vb <= rel * vb + _floor(G), (va, vb)
    if tight:  # the reference (quadprog with a ridge) may be worse than the exact solver
        assert vb - va <= rel * vb + _floor(G), (va, vb)
    # the direction is unique: ‖Jᵀ(w − ref)‖² <= f(w) − f(ref) + ... (strong convexity in Jᵀw)
    assert (w - ref) @ G @ (w - ref) <= 100 * rel * vb + 2 * abs(va - vb) + 4 * _floor(G)


def _check_dual_cone(Gn):
    def check(G, w, ref, tight):
        w, ref = np.atleast_2d(w).sum(0), np.atleast_2d(ref).sum(0)
        rel = 1e-10 if tight else 1e-8
        assert (w - ref) @ Gn(G) @ (w - ref) <= rel * (ref @ Gn(G) @ ref) + 1e-15 * np.trace(Gn(G))

    return check


def _check_unique(G, w, ref, tight):
    # Nash / FairGrad: the unique solution of a well-posed (ridged) system; ridge-dominated
    # (degenerate) systems are ill-conditioned, so 1e-5 as against scipy
    np.testing.assert_allclose(w, ref, rtol=1e-6 if tight else 1e-5, atol=0)


def _check_nnqp(G, u, ref, tight, b):
    def f(x):
        return 0.5 * x @ G @ x + b @ x

    scale = abs(f(ref)) + 1e-10 * (0.5 * ref @ G @ ref + np.abs(b) @ ref) + 1e-300
    assert f(u) - f(ref) <= (1e-8 if tight else 1e-5) * scale  # quadprog may be worse
    if tight:
        assert f(ref) - f(u) <= 1e-8 * scale


def _check_cagrad(G, w, ref, tight):
    K = len(G)
    gg = np.full(K, 1 / K) @ G @ np.full(K, 1 / K)
    assert (w - ref) @ G @ (w - ref) <= (1e-10 if tight else 1e-6) * gg + _floor(G)


def _ref_min_norm(G):
    return ref_min_norm(G) if np.any(G) else np.full(len(G), 1 / len(G))


def _ref_dual_cone_exact(G, P=None):
    K = len(G)
    P = np.eye(K) / K if P is None else P
    if not np.any(G):
        return P
    dg = np.diag(G)
    D = np.where(dg > 0, 1.0 / np.sqrt(np.where(dg > 0, dg, 1.0)), 1.0)
    A = D[:, None] * G * D[None, :] + 1e-13 * np.eye(K)  # Jacobi-scaled quadprog reference
    return np.stack([D * ref_dual_cone(A, p / D) for p in P])


def _ref_dual_cone_torchjd(G):
    K = len(G)
    return np.stack([ref_dual_cone(torchjd_gramian(G), p) for p in np.eye(K) / K])


def _nnqp_b(G):
    return G @ np.random.default_rng(len(G)).standard_normal(len(G))


def _ref_nnqp(G):
    K, b = len(G), _nnqp_b(G)
    dg = np.diag(G)
    D = np.where(dg > 0, 1.0 / np.sqrt(np.where(dg > 0, dg, 1.0)), 0.0)
    A = D[:, None] * G * D[None, :] + 1e-13 * np.eye(K)
    return np.maximum(D * quadprog.solve_qp(A, -(D * b), np.eye(K), np.zeros(K))[0], 0.0)


def _ref_nash(G):
    # scipy root (hybr) in log space on the Jacobi-scaled ridged system
    Gr = _ridge(G)
    s = 1 / np.sqrt(np.diag(Gr))
    C = s[:, None] * Gr * s[None, :]
    with np.errstate(all="ignore"):
        sol = root(
            lambda y: np.exp(y) * (C @ np.exp(y)) - 1,
            np.zeros(len(G)),
            jac=lambda y: (C * np.exp(y)[None, :] + np.diag(C @ np.exp(y))) * np.exp(y)[:, None],
            method="hybr",
            tol=1e-14,
        )
    if not sol.success or np.abs(np.exp(sol.x) * (C @ np.exp(sol.x)) - 1).max() > 1e-9:
        return None  # the reference itself failed
    return s * np.exp(sol.x)


def _ref_cagrad(G):
    # c = 0.8: SLSQP on the dual (as the official code), then the output weights
    K = len(G)
    c, mean = 0.8, np.full(K, 1 / K)
    gg = mean @ G @ mean
    dg = np.diag(G)
    if not np.any(G) or K > 12 or dg.max() > 1e4 * dg.min():
        return None  # SLSQP is unreliable on badly scaled problems
    x = slsqp_cagrad(G, c)
    s = math.sqrt(max(x @ G @ x, 0.0))
    if s <= 1e-3 * math.sqrt(np.max(np.diag(G))):
        return None  # degenerate: checked by the regression tests
    return (mean + c * math.sqrt(gg) / s * x) / (1 + c * c)


# problem -> (solve(G, backend), independent reference(G) or None, check(G, w, ref, tight))
PROBLEMS = {
    "min_norm": (
        lambda G, be: min_norm_weights(G, backend=be),
        _ref_min_norm,
        _check_min_norm,
    ),
    "nonneg_qp": (
        lambda G, be: nonneg_qp(G, torch.from_numpy(_nnqp_b(G.numpy())), backend=be),
        _ref_nnqp,
        lambda G, u, ref, tight: _check_nnqp(G, u, ref, tight, _nnqp_b(G)),
    ),
    "dualproj": (
        lambda G, be: dual_cone_weights(G, torch.full((len(G),), 1 / len(G)).double(), backend=be),
        lambda G: _ref_dual_cone_exact(G, np.full((1, len(G)), 1 / len(G)))[0],
        _check_dual_cone(lambda G: G),
    ),
    "upgrad": (  # K rows sharing G: the batched torch path
        lambda G, be: dual_cone_weights(G, torch.eye(len(G)).double() / len(G), backend=be),
        _ref_dual_cone_exact,
        _check_dual_cone(lambda G: G),
    ),
    "upgrad_torchjd": (
        lambda G, be: dual_cone_weights(
            G, torch.eye(len(G)).double() / len(G), norm_eps=1e-4, reg_eps=1e-4, backend=be
        ),
        _ref_dual_cone_torchjd,
        _check_dual_cone(torchjd_gramian),
    ),
    "nash": (lambda G, be: nash_weights(G, backend=be), _ref_nash, _check_unique),
    "fairgrad": (
        lambda G, be: fairgrad_weights(G, 2.0, backend=be),
        None,
        _check_unique,
    ),
    "cagrad": (lambda G, be: cagrad_weights(G, 0.8, backend=be), _ref_cagrad, _check_cagrad),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_backend_matches_reference(problem, backend):
    solve, reference, check = PROBLEMS[problem]
    compared = 0
    for _, G in _crossover_gramians(23, 40):
        if not np.any(G) or reference is None:
            continue
        if problem in ("nash", "fairgrad") and not np.any(G):
            continue
        ref = reference(G)
        if ref is None:
            continue
        w = solve(torch.from_numpy(G), backend).numpy()
        check(G, w, ref, False)
        compared += 1
    assert reference is None or compared >= 15


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_backends_agree(problem):
    solve, _, check = PROBLEMS[problem]
    n = 0
    for _, G in _crossover_gramians(31, 50):
        if not np.any(G):
            continue
        Gt = torch.from_numpy(G)
        fast, general = (solve(Gt, be).numpy() for be in BACKENDS)
        check(G, fast, general, True)
        n += 1
    assert n >= 40


def test_backend_selection():
    from taskbalance._solvers import select_backend

    small, big = torch.eye(4), torch.eye(40)
    assert select_backend("auto", small, 16) == "python"
    assert select_backend("auto", big, 16) == "torch"
    assert select_backend("torch", small, 16) == "torch"
    assert select_backend("python", big, 16) == "python"
    with pytest.raises(ValueError, match=r"^backend: expected "):
        min_norm_weights(small, backend="cuda")
    with pytest.raises(ValueError, match=r"^backend: expected .*frank_wolfe"):
        min_norm_weights(small, method="frank_wolfe", backend="python")


def test_float32_in_float32_out_and_errors():
    G32 = torch.randn(4, 6) @ torch.randn(4, 6).T
    G32 = G32 @ G32.T
    for backend in BACKENDS:
        for w in (
            min_norm_weights(G32, backend=backend),
            nash_weights(G32, backend=backend),
            fairgrad_weights(G32, 2.0, backend=backend),
            cagrad_weights(G32, backend=backend),
            dual_cone_weights(G32, torch.eye(4) / 4, backend=backend),
        ):
            assert w.dtype == torch.float32
        with pytest.raises(SolverError, match="negative diagonal"):
            min_norm_weights(-torch.eye(3), backend=backend)


# --------------------------------------------------------------------------------------------
# UPGrad / DualProj: exact by default, torchjd on request
# --------------------------------------------------------------------------------------------


def _degenerate_jacobians():
    """Rank-deficient, duplicated, exactly opposite and 1e±15-scaled task gradients."""
    rng = np.random.default_rng(41)
    g = np.array([0.3, -1.2, 0.5])
    yield np.stack([g, -g])  # exactly opposite
    yield np.stack([g, -g, np.array([0.0, 0.4, 1.0])])
    yield np.stack([np.array([0.3, -1.2, 0.5]), np.array([-0.7, 2.8, -7 / 6])])  # issue 12
    yield np.stack([g, g, -0.5 * g, np.array([1.0, 0.0, 0.0])])  # duplicated + opposite
    for _ in range(40):
        K, n = int(rng.integers(2, 9)), int(rng.integers(1, 4))
        J = rng.standard_normal((K, n))  # K > n often: rank-deficient
        if rng.random() < 0.5:
            J[int(rng.integers(K))] = -J[0] * rng.uniform(0.1, 3)
        if rng.random() < 0.3:
            J[-1] = J[0]
        yield J * 10.0 ** rng.choice([-15, 0, 15])


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_never_conflict_by_default(name):
    import taskbalance as tb

    n = 0
    for J in _degenerate_jacobians():
        K = len(J)
        b = tb.create(name, num_tasks=K)
        G = torch.from_numpy(J @ J.T)
        w = b._gradient_weights(torch.ones(K, dtype=torch.float64), G)
        assert w.dtype == torch.float64
        d = J.T @ w.numpy()
        row_norms = np.linalg.norm(J, axis=1)
        # g_iᵀd >= -1e-9 relative to ‖g_i‖ times the size of the terms of d = Σ w_k g_k (the
        # rounding level of d; d = 0 is the answer for two exactly opposite gradients, and
        # then d is rounding noise of any direction)
        terms = np.abs(w.numpy()) @ row_norms
        assert np.all(J @ d >= -1e-9 * row_norms * terms), (name, J, J @ d / row_norms / terms)
        n += 1
    assert n >= 40


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_train_through_a_float32_gramian_indefinite_by_rounding(name):
    """In a training call (features mode, the default float32 Gramian) six tasks whose
    gradients at a 2-d feature leave only 0 in their dual cone: the step goes through (UPGrad
    raised SolverError before) and its direction conflicts with no task beyond the float32
    Gramian's rounding (G₆₆ = 36.000001 is stored as 36), amplified by the weights."""
    import taskbalance as tb

    J = torch.tensor([[0, 0], [-1, 0], [0, 0], [0, 0], [0, 1], [1e-3, -6]])
    z = torch.zeros(1, 2, requires_grad=True)
    losses = torch.stack([(z * J[k]).sum() for k in range(6)]) + 1.0
    b = tb.create(name, num_tasks=6)
    (z_grad,) = torch.autograd.grad(b(losses, features=z), z)
    weights = b.weights.double()
    assert bool(torch.isfinite(weights).all())
    d, row_norms = z_grad[0].double(), J.double().norm(dim=1)
    terms = weights.abs() @ row_norms
    assert bool((J.double() @ d >= -1e-4 * row_norms * terms).all()), J.double() @ d


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_reproduce_torchjd_with_its_eps(name):
    import taskbalance as tb

    rng = np.random.default_rng(43)
    for _ in range(30):
        K = int(rng.integers(2, 9))
        J = rng.standard_normal((K, int(rng.integers(1, 12))))
        G = J @ J.T
        b = tb.create(name, num_tasks=K, norm_eps=1e-4, reg_eps=1e-4)
        w = b._gradient_weights(torch.ones(K, dtype=torch.float64), torch.from_numpy(G))
        # independent reference: quadprog on torchjd's normalised, regularised Gramian
        rows = np.eye(K) / K if name == "upgrad" else np.full((1, K), 1 / K)
        ref = sum(ref_dual_cone(torchjd_gramian(G), p) for p in rows)
        np.testing.assert_allclose(J.T @ w.numpy(), J.T @ ref, rtol=1e-7, atol=1e-9)


def test_upgrad_matches_installed_torchjd():
    aggregation = pytest.importorskip("torchjd.aggregation")
    import taskbalance as tb

    rng = np.random.default_rng(47)
    for _ in range(10):
        K = int(rng.integers(2, 7))
        J = torch.from_numpy(rng.standard_normal((K, 5)))
        for name, theirs in (
            ("upgrad", aggregation.UPGrad()),
            ("dualproj", aggregation.DualProj()),
        ):
            b = tb.create(name, num_tasks=K, norm_eps=1e-4, reg_eps=1e-4)
            w = b._gradient_weights(torch.ones(K, dtype=torch.float64), J @ J.T)
            torch.testing.assert_close(J.T @ w, theirs(J), rtol=1e-5, atol=1e-7)


def test_dual_cone_hyperparameters_are_checked():
    import taskbalance as tb

    for name in ("upgrad", "dualproj"):
        for arg in ("norm_eps", "reg_eps"):
            with pytest.raises(ValueError, match=arg):
                tb.create(name, num_tasks=2, **{arg: -1e-4})


# --------------------------------------------------------------------------------------------
# CAGrad: the degenerate optimum (0 in the convex hull)
# --------------------------------------------------------------------------------------------


def _brute_force_cagrad(J: np.ndarray, c: float, n: int = 801):
    """Primal max_{‖d − g0‖ ≤ c‖g0‖} min_i g_iᵀd over a polar grid of the (2-D) ball."""
    g0 = J.mean(0)
    radius = c * np.linalg.norm(g0)
    rho = radius * np.sqrt(np.linspace(0, 1, n))[:, None]
    phi = np.linspace(0, 2 * np.pi, n)[None, :]
    D = np.stack([g0[0] + rho * np.cos(phi), g0[1] + rho * np.sin(phi)], axis=-1).reshape(-1, 2)
    values = (D @ J.T).min(axis=1)
    return D, values


@pytest.mark.parametrize("backend", BACKENDS)
def test_cagrad_zero_in_hull_gives_the_exact_maximiser(backend):
    # issue 12: J = [[2, 0], [-1, 0]], c = 1: the ball touches 0 and 0 is in the hull; the only
    # maximiser of min_i g_iᵀd is d = 0 (the old fallback d = g0 conflicts with task 2)
    J = np.array([[2.0, 0.0], [-1.0, 0.0]])
    w = cagrad_weights(torch.from_numpy(J @ J.T), 1.0, rescale=0, backend=backend).numpy()
    d = J.T @ w
    D, values = _brute_force_cagrad(J, 1.0)
    best = D[values >= values.max() - 1e-12]
    assert values.max() == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(best, 0.0, atol=1e-12)  # the brute force's unique maximiser
    np.testing.assert_allclose(d, 0.0, atol=1e-15)
    # c > 1 and a third gradient: many maximisers (value 0); ours is the one nearest g0
    J = np.array([[2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    c = 1.5
    w = cagrad_weights(torch.from_numpy(J @ J.T), c, rescale=0, backend=backend).numpy()
    d = J.T @ w
    np.testing.assert_allclose(d, [0.0, 1 / 3], atol=1e-12)  # the projection of g0 = (1/3, 1/3)
    D, values = _brute_force_cagrad(J, c)
    assert (J @ d).min() >= values.max() - 1e-12  # optimal
    # grid points within the grid's resolution of the optimal value 0: none is nearer g0
    maximisers = D[values >= -1e-3]
    g0 = J.mean(0)
    assert np.linalg.norm(d - g0) <= np.linalg.norm(maximisers - g0, axis=1).min() + 1e-3


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-3, 3), st.floats(-3, 3)).filter(lambda v: abs(v[0]) + abs(v[1]) > 0.1),
        min_size=2,
        max_size=5,
    ),
    st.floats(0.1, 2.0),
    st.sampled_from(BACKENDS),
)
# Two nearly opposite gradients: 0 is 4e-5 from their hull (found by hypothesis).
@example(rows=[(0.0, -1.0), (6.103515625e-05, 0.5)], c=2.0, backend="python")
# 0 in the hull but c < 1: the dual cone's projection of g0 lies outside the ball, and the
# root search's answer stands (found by hypothesis against a first cut of the exact check)
@example(rows=[(0.0, -1.0), (2.0, 0.00390625), (-2.0, 0.0)], c=0.5, backend="python")
@example(rows=[(0.0, -1.0), (2.0, 0.00390625), (-2.0, 0.0)], c=0.5, backend="torch")
def test_property_cagrad_optimal_vs_brute_force(rows, c, backend):
    J = np.array(rows, dtype=np.float64)
    if np.linalg.norm(J.mean(0)) < 1e-3:
        return  # g0 = 0: d = g0 = 0 by definition
    w = cagrad_weights(torch.from_numpy(J @ J.T), c, rescale=0, backend=backend).numpy()
    d = J.T @ w
    g0 = J.mean(0)
    # d − g0 = (r/‖g_w*‖)·g_w* with w* = (w − 1/K)/Σ(w − 1/K), and ‖g_w*‖ comes from G: where
    # the hull nearly contains 0 its relative rounding is ~eps·(Σ w*_i‖g_i‖ / ‖g_w*‖)².
    shift = w - 1.0 / len(J)
    amplification = 1.0
    if shift.sum() > 0:
        w_star = shift / shift.sum()
        hull_norm = max(np.linalg.norm(J.T @ w_star), 1e-300)
        amplification = float(w_star @ np.linalg.norm(J, axis=1)) / hull_norm
    rounding = 1e-9 + 4 * np.finfo(np.float64).eps * amplification**2
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + rounding) + 1e-12
    _, values = _brute_force_cagrad(J, c, n=301)
    # the grid lies inside the ball, so no grid point may beat the exact maximiser
    scale = np.abs(J).max() * np.linalg.norm(g0) * (1 + c)
    assert (J @ d).min() >= values.max() - 1e-9 * scale


def _cagrad_primal_reference(J: np.ndarray, c: float, starts: int = 8):
    """CAGrad's optimal value from its primal, independently of the solvers.

    ``max_{‖u‖ ≤ 1} min_i b_i + r g_iᵀu`` (``d = g0 + r u``) with ``b_i = g_iᵀg0`` exact
    (fractions of J's entries), shifted by ``min b`` and divided by ``r`` so that a tiny radius
    keeps its digits: ``f(u) = min_i a_i + g_iᵀu`` with ``a = (b − min b)/r``. SLSQP in
    ``(u, z)`` from several starts; rows with ``a_i > 2 max‖g‖`` can never be the minimum and are
    left out. Returns ``(f_ref, exact)``: the value at a feasible ``u`` (a lower bound of the
    optimum ``f*``, so no answer can be below it unless it is suboptimal) and the exact
    ``(J, g0, min b, r)`` that ``_cagrad_value`` needs.
    """
    K, n = J.shape
    Jf = [[Fraction(float(x)) for x in row] for row in J]
    g0 = [sum(Jf[i][j] for i in range(K)) / K for j in range(n)]
    b = [sum(Jf[i][j] * g0[j] for j in range(n)) for i in range(K)]
    r = c * math.sqrt(float(sum(x * x for x in g0)))
    bmin = min(b)
    a = np.array([float(bi - bmin) / r for bi in b])
    keep = a <= 2 * np.linalg.norm(J, axis=1).max() + 1e-9
    A, Jk = a[keep], J[keep]
    below = {  # z <= a_i + g_iᵀu
        "type": "ineq",
        "fun": lambda x: A + Jk @ x[:-1] - x[-1],
        "jac": lambda x: np.hstack([Jk, -np.ones((len(A), 1))]),
    }
    ball = {
        "type": "ineq",
        "fun": lambda x: 1.0 - x[:-1] @ x[:-1],
        "jac": lambda x: np.r_[-2.0 * x[:-1], 0.0][None, :],
    }
    rng = np.random.default_rng(0)
    best = -math.inf
    for k in range(starts):
        u0 = np.zeros(n) if k == 0 else rng.standard_normal(n) / math.sqrt(n)
        res = minimize(
            lambda x: -x[-1],
            np.r_[u0, np.min(A + Jk @ u0)],
            jac=lambda x: np.r_[np.zeros(n), -1.0],
            constraints=[below, ball],
            method="SLSQP",
            options={"ftol": 1e-16, "maxiter": 1000},
        )
        u = res.x[:-1] / max(1.0, float(np.linalg.norm(res.x[:-1])))
        best = max(best, float(np.min(A + Jk @ u)))
    return best, (Jf, g0, bmin, r)


def _cagrad_value(exact, w: np.ndarray) -> tuple[float, float]:
    """``(‖d − g0‖/r, (min_i g_iᵀd − min b)/r)`` for ``d = Jᵀw``, both exact but the last
    rounding (fractions of ``w``'s float entries)."""
    Jf, g0, bmin, r = exact
    wf = [Fraction(float(x)) for x in w]
    d = [sum(row[j] * wi for row, wi in zip(Jf, wf, strict=True)) for j in range(len(g0))]
    dist = math.sqrt(float(sum((x - y) ** 2 for x, y in zip(d, g0, strict=True))))
    value = min(sum(x * y for x, y in zip(row, d, strict=True)) for row in Jf)
    return dist / r, float(value - bmin) / r


def _assert_cagrad_maximiser(J: np.ndarray, c: float, w: np.ndarray) -> None:
    """``d = Jᵀw`` (``rescale=0``) lies in the ball and is as good as the primal reference, to
    the rounding of ``b = G1/K`` from a float Gramian (``~K eps max‖g‖‖g0‖``, divided by the
    scale ``r max‖g‖`` of the conflict-averse term) and of the float64 weights (``eps`` of
    ``Σ|w_i|‖g_i‖``)."""
    f_ref, exact = _cagrad_primal_reference(J, c)
    dist, f = _cagrad_value(exact, w)
    norms = np.linalg.norm(J, axis=1)
    g0 = np.linalg.norm(J.mean(0))
    eps = np.finfo(np.float64).eps
    assert dist <= 1 + 1e-6 + 4 * eps * float(np.abs(w) @ norms) / (c * g0), dist
    assert f >= f_ref - (1e-7 + 100 * len(J) * eps * norms.max() / (c * g0)) * norms.max(), (
        f,
        f_ref,
    )


def _shifted_problems():
    """Dyadic Jacobians (G exact in float64) with opposite, duplicated and tiny rows; no zero
    rows (the caller of the shifted solve leaves them out)."""
    rng = np.random.default_rng(3)
    for k in range(24):
        K, n = int(rng.integers(3, 8)), int(rng.integers(1, 5))
        J = np.round(rng.standard_normal((K, n)) * 8) / 8
        if k % 3 == 0:
            J[1] = -2 * J[0]  # 0 in the hull
        if k % 4 == 1:
            J[-1] = J[0]
        if k % 5 == 2:
            J[2] = J[2] / 1024
        J[np.linalg.norm(J, axis=1) == 0, 0] = 0.5
        yield J


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 1.0, 1e4, 1e8, 1e12, 1e15])
def test_shifted_min_norm_is_exact_at_any_shift(beta, backend):
    # argmin_{w in the simplex} wᵀGw + 2β bᵀw, CAGrad's inner problem at β = t/r, i.e. the
    # min-norm point of g_i + β g0. Solved on the Gramian of those shifted gradients, whose
    # constant β²‖g0‖² swamps G once β ≳ 1e7, the faces' curvature was rounding: warm started at
    # w(0), as CAGrad's root search does, the solve kept its start (11 of these 24 at β = 1e8,
    # 22 at 1e15). The KKT certificate (h = Gw + βb, h_j >= wᵀh for all j), exact in fractions:
    for J in _shifted_problems():
        G = J @ J.T
        b = G.mean(1)
        if backend == "torch":
            args: tuple = (torch.from_numpy(G), torch.from_numpy(b))
        else:
            args = (G.tolist(), b.tolist())
        problem = ShiftedMinNorm(*args)
        w0 = np.asarray(problem.solve(0.0, 250, 1e-12)[0], dtype=np.float64)
        for start in (None, list(w0)):
            w_any, w1 = problem.solve(beta, 250, 1e-12, start)
            w = np.asarray(w_any, dtype=np.float64)
            assert np.all(w >= 0)
            assert abs(w.sum() - 1) <= 1e-12
            Gf = [[Fraction(float(x)) for x in row] for row in G]
            bf = [sum(row) / len(G) for row in Gf]
            wf = [Fraction(float(x)) for x in w]
            h = [sum(x * y for x, y in zip(row, wf, strict=True)) + Fraction(beta) * bi
                 for row, bi in zip(Gf, bf, strict=True)]  # fmt: skip
            wh = sum(x * y for x, y in zip(wf, h, strict=True))
            scale = float(np.diag(G).max() + beta * np.abs(b).max())
            assert float(min(h) - wh) >= -1e-10 * scale, (J.tolist(), start)
            if w1 is not None and beta > 0:
                # on the final face w(β) is affine, with slope w1
                slope = np.asarray(w1, dtype=np.float64)
                step = 1e-6 * beta
                w_next = problem.solve(beta + step, 250, 1e-12, list(w))[0]
                tol = 1e-9 + 1e-6 * step * np.abs(slope).max()  # slope's own rounding
                np.testing.assert_allclose(np.asarray(w_next), w + step * slope, atol=tol)


# hypothesis (test_property_cagrad_in_ball): 0 in the hull through a zero row and two opposite
# rows; at a tiny radius the inner solves, on the shifted gradients' Gramian, kept their warm
# start on the zero row, s* = 0 came out and the projection of g0 onto the dual cone was
# returned, 0.125 from g0 for a ball of radius 2.8e-13
_TINY_RADIUS_JACOBIANS = {
    "zero row": [[0, 0.5, 0], [0, -1, 0], [0, 0, 1], [0, 0, 0]],
    "two zero rows": [[0, 0, 0], [0, 0.5, 0], [0, -1, 0], [0, 0, 0], [0, 0, 1]],
    "opposite rows": [[0, 0.5, 0], [0, -1, 0], [0, 0, 1]],
    # fuzz: 0 in the hull of two nearly opposite rows, no zero row (the projection at c = 1e-12)
    "near-opposite rows": [
        [0.7813114007004275, 0.2644556303293035, -0.3139228145364278],
        [-2.0737222219264195, -0.7019064573175312, 0.8332000734793836],
        [1.31510376473437, 0.357380410658956, -1.2083186322821715],
    ],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [1e-12, 1e-10, 1e-8, 1e-6, 1e-3])
@pytest.mark.parametrize("case", list(_TINY_RADIUS_JACOBIANS))
def test_cagrad_tiny_radius_with_zero_in_the_hull_gives_the_exact_maximiser(case, c, backend):
    J = np.array(_TINY_RADIUS_JACOBIANS[case], dtype=np.float64)
    w = cagrad_weights(torch.from_numpy(J @ J.T), c, rescale=0, backend=backend).numpy()
    _assert_cagrad_maximiser(J, c, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("rows", "c"),
    [
        pytest.param([[1, 0.1], [-0.5, 0.3], [0, 0]], 0.4, id="conflict-c0.4"),
        pytest.param([[1, 0.1], [-0.5, 0.3], [0, 0]], 1.0, id="conflict-c1"),
        pytest.param([[0, 0, 0], [0, 0.5, 0], [0, -1, 0], [0, 0, 1]], 1.0, id="opposite-c1"),
    ],
)
def test_cagrad_task_without_gradient_gets_the_projection_not_a_runaway_weight(rows, c, backend):
    # A zero gradient puts 0 in the hull, so the best worst-case improvement is at most 0; with
    # these radii it is 0 (F* = 0). As w(t) tends to the zero row, ‖g_w‖ and Σ w_i‖g_i‖ vanish
    # together, the test ‖g_w*‖ <= 1e-6 Σ w_i‖g_i‖ missed it and g0 + r g_w/‖g_w‖ came out:
    # weights up to 1.6e17 on the task without a gradient, and (third case) d conflicting with
    # a task (g_2ᵀd = −0.15 where 0 is attainable). The answer is the projection of g0 onto the
    # dual cone {d : Jd >= 0}, the maximiser nearest g0.
    J = np.array(rows, dtype=np.float64)
    K = len(J)
    w = cagrad_weights(torch.from_numpy(J @ J.T), c, rescale=0, backend=backend).numpy()
    _assert_cagrad_maximiser(J, c, w)
    g0 = J.mean(0)
    # independent projection: min ‖d − g0‖² s.t. Jd >= 0 (quadprog)
    projection = quadprog.solve_qp(np.eye(J.shape[1]), g0, J.T, np.zeros(K))[0]
    np.testing.assert_allclose(J.T @ w, projection, atol=1e-12)
    assert w.max() <= 1.0  # 1/K plus the projection's multipliers, which are O(1) here
    zero = np.linalg.norm(J, axis=1) == 0
    np.testing.assert_allclose(w[zero], 1.0 / K, rtol=1e-15)  # no share of the correction


@settings(max_examples=60, deadline=None)
@given(
    jacobians(),
    st.integers(0, 2),
    st.sampled_from([1e-12, 1e-10, 1e-8, 1e-6, 1e-3, 0.4, 1.0, 2.0]),
    st.sampled_from(BACKENDS),
)
# Found by hypothesis: 0 in the hull, which the root search approached only to 1.18e-6 of
# Σ w_i‖g_i‖, above the degeneracy test's 1e-6: weights up to 9.2e6 whose cancellation left
# d = (−0.05, 1.5e-4), conflicting with task 4 and 4.4e-6 outside the ball; the exact
# min-norm point now decides (d = (−0.05, 0), the projection of g0 onto the dual cone)
@example(
    J=torch.tensor([[-0.25, 0], [0, -10], [0, 1], [0, -100], [0, 1]], dtype=torch.float64),
    zeros=0, c=1.0, backend="python",
)  # fmt: skip
@example(
    J=torch.tensor([[-0.25, 0], [0, -9], [0, 3], [0, -90], [0, 1]], dtype=torch.float64),
    zeros=0, c=1.0, backend="torch",
)  # fmt: skip
def test_property_cagrad_matches_its_primal_with_zero_rows_and_any_radius(J, zeros, c, backend):
    J = torch.cat([J, torch.zeros(zeros, J.shape[1], dtype=J.dtype)]).numpy()
    g0 = J.mean(0)
    if np.linalg.norm(g0) <= 1e-3 * np.abs(J).max(initial=0.0):
        return  # g0 ≈ 0: nothing to compare at the reference's resolution
    w = cagrad_weights(torch.from_numpy(J @ J.T), c, rescale=0, backend=backend).numpy()
    _assert_cagrad_maximiser(J, c, w)


# Found by a fuzz of CAGrad on float32 Gramians of degenerate Jacobians (zero, collinear and
# nearly opposite rows): each killed the solve on the code before the fix, on the backend named.
_CAGRAD_FLOAT32_CASES = {
    # identical shifted rows: a rounding-level null component of the face won the face solve,
    # whose weights then summed to ~0 (RuntimeError on an empty face)
    "identical rows, torch": (
        [[0.0], [0.0], [0.0], [1.6032443106096679], [2.0232004088045836], [0.0]],
        0.4,
        "torch",
    ),
    # 0 in the hull: the projection of g0 met a direction of negative curvature (unbounded)
    "unbounded projection, python": (
        [
            [0.5204765768688866, 0.24368485674292795],
            [0.0005204765768688866, 0.00024368485674292796],
            [1.0791099538313154, -1.390229412585951],
            [0.0, 0.0],
            [-1.758770060079511, -0.8233648859353884],
            [-0.5774886412656152, -0.2681699050845973],
            [1.798532355450446, 0.029579364629633672],
        ],
        2.0,
        "python",
    ),
    "unbounded projection, torch": (
        [
            [-1.606341617592505, 0.028603866728703967],
            [-0.01606341617592505, 0.00028603866728703966],
            [-1.924246287222187, -0.9240469781250786],
            [4.74305314311959, -0.08382025417713358],
            [0.005616336974670279, -0.00892312217020865],
            [-0.7657575202751746, -0.36561538554650697],
            [0.0, 0.0],
            [-0.17020721872598685, -0.12869654615059467],
        ],
        2.0,
        "torch",
    ),
    # rank 1: Wolfe's min-norm faces cycled until the iteration cap
    "min-norm cycle, torch": (
        [
            [0.40462939690496186],
            [0.41302427259513935],
            [-0.6322711796728887],
            [-1.4404947625478084],
            [0.004046293969049619],
            [-0.782206096239896],
            [2.1630528923801213],
        ],
        1.0,
        "torch",
    ),
    "min-norm cycle, python": (
        [
            [1.4961676501370267],
            [-0.9908487047170575],
            [-1.4648183931548742],
            [-2.411606176970068],
            [-0.392969586623503],
            [0.0],
        ],
        1.0,
        "python",
    ),
    # the projection on the repaired (nearest PSD) Gramian, reached on both backends
    "repaired projection, python": (
        _REPAIRED := [
            [1.380328016818507, -0.17265138480871597],
            [-4.573697561510957, 0.5731214991138304],
            [0.0, 0.0],
            [0.0, 0.0],
            [1.380328016818507, -0.17265138480871597],
            [-0.756313943557434, -2.672648692372602],
        ],
        1.0,
        "python",
    ),
    "repaired projection, torch": (_REPAIRED, 1.0, "torch"),
    # the projection's active set cycled until its cap
    "projection cycle, torch": (
        [
            [0.43557000536535045, -1.1274017529721847],
            [-1.0496885167016288, -0.32677542172511787],
            [-1.6687286157328873, 2.7225110729913706],
            [0.00043557000536535045, -0.0011274017529721847],
            [0.0, 0.0],
            [-0.6426047579806955, 1.6438291482641856],
            [0.1287990808600797, 0.10281393442628109],
        ],
        2.0,
        "torch",
    ),
}


@pytest.mark.parametrize("case", list(_CAGRAD_FLOAT32_CASES))
def test_cagrad_solves_float32_gramians_of_degenerate_jacobians(case):
    rows, c, backend = _CAGRAD_FLOAT32_CASES[case]
    J = np.array(rows, dtype=np.float64)
    G = torch.from_numpy(J @ J.T)
    w = cagrad_weights(G.float(), c, rescale=0, backend=backend).double().numpy()
    exact = cagrad_weights(G, c, rescale=0, backend=backend).numpy()
    d, d_exact = J.T @ w, J.T @ exact
    g0 = J.mean(0)
    # in the ball and as good as the float64 Gramian's answer, both to the float32 Gramian's
    # rounding amplified by these nearly singular problems (measured: at most 2.3e-5 outside
    # the ball, on the repaired projection, and 6e-6 of the scale below the answer)
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-4)
    scale = np.abs(J).max() * np.linalg.norm(g0) * (1 + c)
    assert (J @ d).min() >= (J @ d_exact).min() - 1e-4 * scale


def test_min_norm_of_identical_vertices_is_a_point_of_the_simplex():
    # Four identical vertices (CAGrad's shifted gradients of four tasks without a gradient),
    # started on their face: every point of it is optimal, and the face solve returned a
    # rounding-level null direction scaled up to ~1e16, whose weights summed to ~0.
    for shift in (0.6, 0.7, 1.3):
        v = torch.tensor([0, 0, 0, 1.6032443106096679, 2.0232004088045836, 0], dtype=torch.float64)
        v = v + shift
        G = torch.outer(v, v)
        start = [0.25, 0.25, 0.25, 0.0, 0.0, 0.25]
        for matrix in (G, G.tolist()):
            w = torch.as_tensor(solve_min_norm(matrix, 250, 1e-12, start), dtype=torch.float64)
            assert bool(torch.isfinite(w).all())
            assert bool((w >= 0).all())
            assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
            assert float(w @ G @ w) == pytest.approx(float(G.min()), rel=1e-12)  # the minimum


@settings(max_examples=40, deadline=None)
@given(jacobians(), st.sampled_from(BACKENDS))
@example(  # found by hypothesis: dual cone {0}, reached with weights up to 6.7e5 (see below)
    J=torch.tensor([[0.0, 1.0], [1e-6, -4e-3], [-2.0, 0.0]], dtype=torch.float64),
    backend="python",
)
def test_property_dual_cone_kkt(J, backend):
    """KKT of each projection to 1e-9 of the trace, times the size of the correction ``u``.

    The size of ``u`` enters because G's own rounding does: in the example the three gradients
    span a dual cone of {0}, reached on the face of tasks 1 and 2 whose 2×2 determinant
    (1e-12) is a difference of entries 1.6e-5 that cancel, so float64 G fixes ``u`` (up to
    6.7e5) to ~2e-9 relative and ``(Gw)_3`` to −7.7e-9 (torch: −2.9e-9), for a direction
    ``Jᵀw`` of length ~4e-9 against gradients of length 1–2: zero to that rounding."""
    G = J @ J.T
    K = G.shape[0]
    scale = float(G.diagonal().sum()) + 1e-300
    P = torch.eye(K, dtype=G.dtype) / K
    W = dual_cone_weights(G, P, backend=backend)
    for p, w in zip(P, W, strict=True):
        Gw = G @ w
        tolerance = 1e-9 * scale * float((w - p).abs().sum() + 1)
        assert bool((w >= p - 1e-12).all())  # primal feasibility, w = p + u, u >= 0
        assert float(Gw.min()) >= -tolerance  # dual feasibility: non-conflicting
        assert abs(float((w - p) @ Gw)) <= tolerance  # complementary slackness


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_dual_cone_of_a_float32_gramian_indefinite_by_rounding_is_solved(backend):
    """Found by hypothesis: the float32 Gramian of these nearly collinear, conflicting rows has
    an eigenvalue of −2.7e-8 whose eigenvector is non-negative, so the QP on it as given has no
    minimum ("unbounded below"). A Gramian is PSD: the QP is solved on the nearest PSD matrix,
    and the projection of each row, whose dual cone is {0} here, is 0 to that rounding."""
    J = torch.tensor([[0, 0], [-1, 0], [0, 0], [0, 0], [0, 1], [1e-3, -6]], dtype=torch.float64)
    G = (J @ J.T).float()
    assert float(torch.linalg.eigvalsh(G.double())[0]) < 0
    P = torch.eye(6) / 6
    W = dual_cone_weights(G, P, backend=backend)
    assert bool(torch.isfinite(W).all())
    assert bool((W >= P - 1e-7).all())
    projections = W.double() @ J  # Jᵀw of each row: the dual cone of these rows is {0}
    assert float(projections.abs().max()) < 1e-3 * float(W.abs().max())


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_dual_cone_repair_keeps_the_weights_of_tasks_without_a_gradient(backend):
    """Found by a fuzz run: rebuilt from all of G's eigenvectors, the zero rows of tasks 3-5
    came back as rounding noise, which the Jacobi scaling blew up into weights far from p.
    Only the rows with a gradient are rebuilt."""
    rows = [
        [-0.3186497986316681, -1.5997711420059204, 1.3623380661010742],
        [2.1239399909973145, -1.1363130807876587, -0.10205785185098648],
        [0.4685111343860626, 2.3532989025115967, -2.0057015419006348],
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [-0.2575564682483673, -1.4422223567962646, 2.7210309505462646],
        [0.2805713713169098, 0.004418996162712574, 0.016275977715849876],
    ]
    J = torch.tensor(rows, dtype=torch.float64)
    G = (J @ J.T).float()
    assert float(torch.linalg.eigvalsh(G.double())[0]) < 0
    P = torch.eye(8) / 8
    W = dual_cone_weights(G, P, backend=backend)
    assert torch.equal(W[:, 3:6], P[:, 3:6])
    assert bool(torch.isfinite(W).all())


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_dual_cone_of_a_half_precision_gramian_ends_where_its_active_set_would_cycle(backend):
    """Found by a fuzz run: on this bfloat16 Gramian (indefinite by its rounding, though the QP
    is bounded) the active set met the same free set again and again until its cap. A free set
    met again can only come back through rounding: the solve ends there."""
    J = torch.tensor([[-2.4503087749659853], [0.3443731495085143], [-1.16646823535387], [0.0]])
    J = torch.cat([J, J[:1]]).double()
    G = (J @ J.T).to(torch.bfloat16)
    P = torch.eye(5) / 5
    W = dual_cone_weights(G, P, backend=backend).double()
    assert bool(torch.isfinite(W).all())
    assert bool((W - P.double() >= -1e-2).all())
    # the dual cone of these opposite rows is {0}: each projection Jᵀw is 0 to bf16's rounding
    assert float((W @ J).abs().max()) <= 2**-4 * float(W.abs().max() * J.abs().max())


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_dual_cone_judges_a_null_component_of_gp_at_the_problems_scale(backend):
    """Found by hypothesis: a face of the nearly opposite rows 1 and 4 catches a null component
    of rounding size of b = Gp for row 3's projection (nearly orthogonal to them), which was
    read as unbounded descent even on the repaired Gramian. The dual cone of these rows is
    {0}; the float32 Gramian, where G_44 = 4 + 1.5e-11 is stored as 4, cannot tell it from
    {d : d_1 = 0, d_2 ≥ 0}: no projection may conflict beyond that rounding."""
    J = torch.zeros(11, 2, dtype=torch.float64)
    J[0], J[2], J[9], J[10] = torch.tensor([[2.0, 0], [0, 1], [-2, 0], [-2, -3.9063e-06]])
    G = (J @ J.T).float()
    W = dual_cone_weights(G, torch.eye(11) / 11, backend=backend).double()
    assert bool(torch.isfinite(W).all())
    D = W @ J  # each row's projection
    norms = J.norm(dim=1)
    terms = (W.abs() @ norms)[:, None] * norms[None, :]  # the size of the terms of g_iᵀd
    assert float((D @ J.T / terms.clamp_min(1e-300)).min()) >= -1e-5


def test_dual_cone_of_a_matrix_that_is_not_psd_is_refused():
    G = torch.tensor([[1.0, -2.0], [-2.0, 1.0]])  # eigenvalue −1 along (1, 1) ≥ 0
    for backend in ("python", "torch"):
        with pytest.raises(SolverError, match=r"G is not positive semi-definite \(smallest"):
            dual_cone_weights(G, torch.eye(2) / 2, backend=backend)


def test_dual_cone_start_on_a_problem_with_several_minimisers_gives_the_cold_answer():
    """J = [[1], [−1], [−2]]: task 0's QP has a segment of minimisers. Started from {2} it
    would settle at (1/3, 0, 1/6) where a cold start finds (1/3, 1/3, 0): the start is
    dropped (index 1 is bound with a zero gradient) and the answer is the cold one."""
    J = torch.tensor([[1.0], [-1.0], [-2.0]], dtype=torch.float64)
    G, P = J @ J.T, torch.eye(3, dtype=torch.float64) / 3
    cold = dual_cone_weights(G, P, backend="torch")
    start = ActiveSets()
    start.free = torch.tensor([[False, False, True], [True, False, False], [True, False, False]])
    warm = dual_cone_weights(G, P, backend="torch", start=start)
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-15)
    torch.testing.assert_close(cold[0], torch.tensor([1 / 3, 1 / 3, 0.0], dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(jacobians(), jacobians(), st.integers(0, 2**16))
# found by hypothesis: from a random start the batched iteration met a singular face for one
# row, whose sequential solve then found another of its QP's minimisers than a cold start
@example(
    J=torch.tensor([[0.25, -1], [0, 0], [0, 0], [0, 1], [-1, -1], [-1, 0]], dtype=torch.float64),
    other=torch.zeros(1, 1, dtype=torch.float64),
    seed=0,
)
def test_property_dual_cone_answer_does_not_depend_on_where_it_starts(J, other, seed):
    """The torch path started from another problem's active sets, from random ones or from
    sets of the wrong shape reaches the answer of a cold start; it keeps the solution's."""
    G = J @ J.T
    K = G.shape[0]
    P = torch.eye(K, dtype=G.dtype) / K
    cold = dual_cone_weights(G, P, backend="torch")
    last = ActiveSets()
    dual_cone_weights(other @ other.T, torch.eye(other.shape[0], dtype=G.dtype), backend="torch",
                      start=last)  # fmt: skip
    random_sets = ActiveSets()
    random_sets.free = torch.rand(K, K, generator=torch.Generator().manual_seed(seed)) < 0.5
    for start in (last, random_sets, ActiveSets()):
        warm = dual_cone_weights(G, P, backend="torch", start=start)
        scale = float(cold.abs().max()) + 1e-300
        torch.testing.assert_close(warm, cold, rtol=1e-9, atol=1e-9 * scale)
        if start.free is not None:  # kept where the batched iteration settled every row
            assert start.free.shape == (K, K)
            # a started solve from the kept sets confirms them in one sweep: same answer again
            torch.testing.assert_close(
                dual_cone_weights(G, P, backend="torch", start=start), warm, rtol=0, atol=0
            )


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-3, 3), min_size=6, max_size=6).map(lambda v: np.array(v).reshape(3, 2)),
    st.sampled_from(BACKENDS),
)
def test_property_min_norm_optimal_vs_brute_force(J, backend):
    G = J @ J.T
    w = min_norm_weights(torch.from_numpy(G), backend=backend).numpy()
    a, b = np.meshgrid(np.linspace(0, 1, 201), np.linspace(0, 1, 201))
    grid = np.stack([a.ravel(), b.ravel(), 1 - a.ravel() - b.ravel()], axis=1)
    grid = grid[grid[:, 2] >= 0]
    values = np.einsum("ni,ij,nj->n", grid, G, grid)
    assert w @ G @ w <= values.min() + 1e-12 * (1 + np.trace(G))
    assert (w >= 0).all()  # a point of the simplex
    assert abs(w.sum() - 1) <= 1e-12


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_min_norm_with_a_gradient_156_decades_shorter_is_exact(backend):
    """Found by the property test above: rows (0, 1), (1, 1), (−3.3e-156, 0). A diagonal floor
    of 1e-300 mis-scaled the 1.1e-311 diagonal, and the face solve's D² (1e310) overflowed:
    the torch path crashed on an empty face, the Python one returned [0, 0, 0]. The exact
    minimum lies on the edge of the last two: w = (0, t, 1 − t), t ≈ 1.66e-156."""
    J = torch.tensor([[0.0, 1.0], [1.0, 1.0], [-3.3186284881481737e-156, 0.0]], dtype=torch.float64)
    G = J @ J.T
    w = min_norm_weights(G, backend=backend)
    g3 = -3.3186284881481737e-156
    exact_w2 = (
        -g3 * (1 - g3) / ((1 - g3) ** 2 + 1)
    )  # the edge's minimiser, t = −g3·(g2 − g3)/‖g2 − g3‖²
    assert w[0] == 0.0
    assert float(w[1]) == pytest.approx(exact_w2, rel=1e-12)
    assert float(w.sum()) == 1.0
    d = J.T @ w
    # MGDA's direction conflicts with no task: gᵢ·d ≥ ‖d‖², to rounding of gᵢ·d
    for row in J:
        assert float(row @ d) >= float(d @ d) - 1e-15 * float(row.norm() * d.norm())


def _exact_two_task_weights(J: list[list[float]]) -> tuple[Fraction, Fraction]:
    """Sener's K = 2 min-norm weights in fractions, each from its own numerator."""
    rows = [[Fraction(x) for x in row] for row in J]
    g11, g12, g22 = (
        sum(a * b for a, b in zip(rows[i], rows[j], strict=True))
        for i, j in ((0, 0), (0, 1), (1, 1))
    )
    den = g11 + g22 - 2 * g12
    return (g22 - g12) / den, (g11 - g12) / den


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_two_task_min_norm_keeps_a_weight_below_epsilon(backend):
    """g1 = (1e-3, 0), g2 = (−1e9, 1e12): the exact weights are (1 − 1e-18, 1e-18). As
    ``1 − γ`` the second rounded to 0, and d = g1 conflicted with task 2 (g2·d = −1e6) where
    the exact d conflicts with neither (g1·d = g2·d ≈ 1e-6): each weight has its own
    numerator now, and d is exact."""
    J = [[1e-3, 0.0], [-1e9, 1e12]]
    G = torch.tensor(J, dtype=torch.float64) @ torch.tensor(J, dtype=torch.float64).T
    w = min_norm_weights(G, backend=backend).tolist()
    exact = _exact_two_task_weights(J)
    assert w[1] == pytest.approx(float(exact[1]), rel=1e-12)
    direction = [sum(Fraction(w[k]) * Fraction(J[k][c]) for k in range(2)) for c in range(2)]
    for row in J:
        assert sum(Fraction(x) * d for x, d in zip(row, direction, strict=True)) > 0


@pytest.mark.parametrize("tensor", [False, True])
def test_two_task_shifted_min_norm_keeps_a_weight_below_epsilon(tensor):
    """CAGrad's K = 2 closed form at a shift β had the same ``1 − γ`` cancellation."""
    J = [[1e-3, 0.0], [-1e9, 1e12]]
    G = np.asarray(J) @ np.asarray(J).T
    b = [1e-7, 1e-7]  # b1 = b2: the shift does not move γ, and the answer is Sener's
    args: tuple = (torch.from_numpy(G), torch.tensor(b)) if tensor else (G.tolist(), b)
    w, _ = ShiftedMinNorm(*args).solve(5.0, 250, 1e-12)
    exact = _exact_two_task_weights(J)
    assert [float(v) for v in w] == pytest.approx([float(v) for v in exact], rel=1e-12)
    assert float(w[1]) > 0


_CAGRAD_SPREAD_CASES = {
    # c < 1, norms 1e-7 … 1e5: ‖g_w‖ = 1.7e-7 Σ w_i‖g_i‖ read as degenerate, and the
    # projection of g0 onto the dual cone, 1.9 r from g0, was returned outside the ball
    "outside the ball": (
        0.5245029074895969,
        [
            [-0.0010760856504201026, 0.010629446623099868],
            [-1.995247779108485e-07, -5.4795407601779e-07],
            [-1.7482141625913344e-06, -3.750402436909296e-07],
            [90159.8538770532, 48527.14037946088],
        ],
    ),
    # c ≥ 1 with 0 in the hull, norms 5e-10 … 7e5: F* = 0 at the feasible d = 0, but the root
    # search ended at t = 1e-10 with an unresolved inner solve, and d conflicted at −4e10
    "zero in the hull": (
        1.2332789607137191,
        [
            [2.289699188602505, -2.583197067709251],
            [669009.2151707406, -261443.65831232138],
            [-4.3981792505623437e-10, 3.565248122968807e-10],
        ],
    ),
}


@pytest.mark.parametrize("backend", ["python", "torch"])
@pytest.mark.parametrize("case", sorted(_CAGRAD_SPREAD_CASES))
def test_cagrad_with_gradient_norms_spanning_many_orders_stays_in_the_ball(case, backend):
    """Found by the adversarial audit: the direction must lie in the ball ‖d − g0‖ <= r and
    improve the worst task as the optimum does, to the problem's rounding; where 0 is in the
    hull and the ball holds 0, the optimum F* = 0 (weak duality, Σ w_i g_i = 0), so no task
    may be made worse beyond rounding."""
    c, J = _CAGRAD_SPREAD_CASES[case]
    Jn = np.asarray(J)
    w = cagrad_weights(torch.from_numpy(Jn @ Jn.T), c, rescale=0, backend=backend).numpy()
    d = Jn.T @ w
    g0 = Jn.mean(0)
    r = c * np.linalg.norm(g0)
    scale = np.linalg.norm(Jn, axis=1).max() * (np.linalg.norm(g0) + r)
    assert np.linalg.norm(d - g0) <= r * (1 + 1e-6)
    worst = float((Jn @ d).min())
    if case == "zero in the hull":
        assert worst >= -1e-12 * scale
    else:
        assert worst >= -1e-9 * scale


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_barrier_newton_leaving_float64s_range_raises_a_solver_error_on_both_backends(backend):
    """eps = 0 on six nearly (anti)collinear float32 gradients: no finite weights exist to
    float64's range. The Python path raised SolverError; the torch path let w^{-p-1}
    overflow into its Hessian and raised torch's LinAlgError from eigh."""
    first = [2.769347047433257e-4, -3.0776692437939346e-4]
    rest = [-3.0776692437939346e-4, 3.420318244025111e-4]
    G = torch.tensor([first + [first[1]] * 4] + [rest + [rest[1]] * 4] * 5, dtype=torch.float32)
    G[0, 2] = G[2, 0] = -3.077669534832239e-4
    G[1, 2] = G[2, 1] = G[2, 2] = 3.420318535063416e-4
    with pytest.raises(SolverError, match="left float64's range"):
        fairgrad_weights(G, 0.5, eps=0.0, backend=backend)


def _near_parallel_pairs(count: int) -> list[list[list[float]]]:
    """Two-task Jacobians whose rows are parallel up to a relative 1e-17…1e-9 (so that
    ‖g1 − g2‖² is at or near the rounding level of G): every other pair of equal length (an
    interior optimum, where the rounding shows), the others of random lengths."""
    generator = torch.Generator().manual_seed(11)
    pairs = []
    for index in range(count):
        u = torch.randn(4, generator=generator, dtype=torch.float64)
        drawn = 10 ** (4 * torch.rand((), generator=generator, dtype=torch.float64) - 2)
        length = 1.0 if index % 2 else float(drawn)
        noise = 10 ** float(8 * torch.rand((), generator=generator, dtype=torch.float64) - 17)
        v = length * u + noise * torch.randn(4, generator=generator, dtype=torch.float64)
        pairs.append([u.tolist(), v.tolist()])
    return pairs


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_two_task_min_norm_weights_stay_on_the_simplex_for_near_parallel_gradients(backend):
    """Each weight's numerator over the separately rounded ‖g1 − g2‖² left the simplex where
    that is at rounding level: two equal unit rows (MGDA's "loss+" of g1 = (0, 1, 0) and
    g2 = (0, 5, 0), found by the property test under another seed) gave (0.625, 0.5), whose
    direction is 1.125 times the min-norm point. Over the numerators' own sum they add to 1."""
    b = tb.create("mgda", num_tasks=2, normalization="loss+", gram_dtype=torch.float64)
    J = torch.tensor([[0.0, 1.0, 0.0], [0.0, 5.0, 0.0]], dtype=torch.float64)
    w = b.compute_weights(torch.ones(2), gram=J @ J.T).double()
    assert float(w.sum()) == pytest.approx(1.0, abs=4e-16)
    for rows in _near_parallel_pairs(300):
        J = torch.tensor(rows, dtype=torch.float64)
        w = min_norm_weights(J @ J.T, backend=backend).tolist()
        assert min(w) >= 0.0
        assert sum(w) == pytest.approx(1.0, abs=4e-16), (rows, w)


@pytest.mark.parametrize("tensor", [False, True])
def test_two_task_shifted_min_norm_weights_stay_on_the_simplex(tensor):
    """CAGrad's K = 2 closed form had the same denominator (see the test above): on two unit
    rows whose Gramian is rounded as a normalisation leaves it (G12 a few ulps inside its
    Cauchy-Schwarz bound, G22 an ulp off 1) it gave (0.625, 0.5); and random near-parallel
    pairs, at β = 0 and at a small shift."""
    eps = 2.0**-52
    grams = []
    for g22 in (1.0 + eps, 1.0 + 2 * eps, 1.0 - eps / 2):
        g12 = (1 - 4 * eps) * math.sqrt(g22)
        grams.append(([[1.0, g12], [g12, g22]], [0.3, 0.3]))
    for rows in _near_parallel_pairs(300):
        G = np.asarray(rows) @ np.asarray(rows).T
        grams.append((G.tolist(), (G.sum(axis=1) / 2).tolist()))
    for G, b in grams:
        for beta in (0.0, 1e-3):
            args: tuple = (torch.tensor(G), torch.tensor(b)) if tensor else (G, b)
            w, slope = ShiftedMinNorm(*args).solve(beta, 250, 1e-12)
            weights = [float(v) for v in w]
            assert min(weights) >= 0.0
            assert sum(weights) == pytest.approx(1.0, abs=4e-16), (G, beta, weights)
            assert float(sum(slope)) == 0.0


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_two_task_weights_where_the_numerators_sum_overflows(backend):
    """G near the float's limit: a + c overflowed to inf and both weights became 0 (a review
    found it); the answer is that of G / 1e300, (1/2, 1/2)."""
    G = torch.tensor([[0.85e308, -0.8e308], [-0.8e308, 0.85e308]], dtype=torch.float64)
    assert min_norm_weights(G, backend=backend).tolist() == [0.5, 0.5]
    w, _ = ShiftedMinNorm(G.tolist(), [0.0, 0.0]).solve(0.0, 250, 1e-12)
    assert [float(v) for v in w] == [0.5, 0.5]


@pytest.mark.parametrize("backend", ["python", "torch"])
def test_cagrad_keeps_its_floor_on_rows_150_decades_apart(backend):
    """The min-norm face solves' smaller diagonal floor, carried into CAGrad's shifted faces
    (which keep their scale), let D² overflow there: an empty face and a crash (review)."""
    J = torch.tensor(
        [[1.01, 1.33], [0.0256, -2.48], [-8.78e-158, 6.9e-158], [-2.04e-150, -5.32e-151]],
        dtype=torch.float64,
    )
    w = cagrad_weights(J @ J.T, 0.4, backend=backend)
    assert bool(torch.isfinite(w).all())
