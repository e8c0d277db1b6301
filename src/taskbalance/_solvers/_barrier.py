"""Damped Newton on a barrier potential: Nash-MTL and FairGrad, ``(Gw)_i = w_i^{-p}``, ``w > 0``.

Torch and plain-Python paths side by side; the plain-Python path hands an indefinite Newton
matrix (rounding) and a near-singular ridged Gramian to the torch path's eigendecomposition.
"""

from __future__ import annotations

import math
from operator import mul

import torch
from torch import Tensor

from taskbalance._solvers._common import (
    EPS,
    Backend,
    SolverError,
    as_f64,
    chol_py,
    chol_solve_py,
    select_backend,
    to_output,
    work_list,
    work_tensor,
)
from taskbalance._validation import check_nonnegative, check_positive, check_positive_int

__all__ = ["fairgrad_weights", "nash_weights"]

#: Largest K solved on the plain-Python path by ``backend="auto"`` (a dense K x K Cholesky per
#: Newton step: the crossover is lower than the active sets'). Measured inside the training
#: loop of ``benchmarks/overhead.py`` (one thread; Nash-MTL's rule, Python / torch, µs): 453 /
#: 788 at K = 12, 606 / 860 at K = 16, 1113 / 944 at K = 24.
PYTHON_MAX_K = 16


# --------------------------------------------------------------------------------------------
# torch path
# --------------------------------------------------------------------------------------------


def _barrier_newton(
    C: Tensor, w0: Tensor, p: float, max_iter: int, tol: float, solver: str
) -> Tensor:
    """Solves ``(C w)_i = w_i^{-p}`` (``p = 1/α > 0``), ``w > 0``, by damped Newton on
    ``f(w) = ½wᵀCw − Σ φ(w_i)`` with ``φ' = w^{-p}``.

    Convergence: ``max_i |w_i^p (Cw)_i − 1| <= tol`` above the rounding level of ``w^p (Cw)``.
    Where that rounding level is large (``(Cw)_i`` a tiny difference of large terms, e.g. an
    exactly rank-deficient ``C`` plus a ridge, or task gradients spread over 14 orders of
    magnitude, where the iterate solves the system to rounding and no step reduces the residual
    or the decrement further) the residual of every task is accepted at its rounding level plus
    ``tol`` together with a Newton decrement below the rounding level of the gradient and a
    Newton step that moves no weight by more than ``sqrt(tol)`` relative. The step bound is what
    refuses a problem without a solution: for ``p > 1`` the potential then decreases towards
    its infimum as ``w → ∞`` along a null direction of ``C``, its decrement vanishes while each
    step still grows ``w`` by a fixed fraction, so Newton hits its cap. (For ``p = 1`` a
    decrement below ``tol`` bounds the relative step by ``sqrt(tol)``, since the Hessian is at
    least ``diag(w^{-2})``; an unbounded log barrier keeps the decrement O(1).) Armijo
    backtracking with a fraction-to-the-boundary rule keeps ``w > 0``; the decrease
    ``f(w + t p) − f(w)`` is evaluated as ``t gᵀp + ½t² pᵀCp − Σ R_i`` with the second-order
    remainders ``R_i`` of ``φ`` computed by ``log1p``/``expm1``, so it is accurate even when
    ``|f|`` is many orders of magnitude above the decrease (evaluating ``f`` twice and
    subtracting stalls there).
    """
    K = C.shape[0]
    Cabs = C.abs()

    def remainder(x: Tensor, h: Tensor) -> Tensor:
        # φ(x + h) − φ(x) − φ'(x) h, without cancellation (x > 0, x + h > 0)
        u = h / x
        if p == 1.0:
            return torch.log1p(u) - u
        q = 1.0 - p
        return x**q / q * (torch.expm1(q * torch.log1p(u)) - q * u)

    step_tol = math.sqrt(tol)
    w = w0.clone()
    res = float("inf")
    for it in range(max_iter + 1):
        Cw = C @ w
        wp = w**p
        # rounding level of w^p (Cw): 4 K eps w^p (|C| w)
        noise = (4.0 * K * EPS) * wp * (Cabs @ w)
        err = (wp * Cw - 1.0).abs()
        res = float((err - noise.clamp_max(1e-2)).max())
        if res <= tol:
            return w
        if not math.isfinite(res):  # before eigh meets the infinities (a LinAlgError)
            raise _left_range(solver)
        grad = Cw - 1.0 / wp
        H = C + torch.diag(p * w ** (-p - 1.0))
        s = H.diagonal().rsqrt()
        Hs = s[:, None] * H * s[None, :]
        L, info = torch.linalg.cholesky_ex(Hs)
        if int(info) == 0:
            step = -s * torch.cholesky_solve((s * grad)[:, None], L)[:, 0]
        else:  # PD in exact arithmetic; rounding made it indefinite: clamp the spectrum
            if not bool(torch.isfinite(Hs).all()):  # w^{-p-1} overflowed as w went to 0
                raise _left_range(solver)
            lam, V = torch.linalg.eigh(Hs)
            lam = lam.clamp_min(EPS * float(lam[-1].clamp_min(1.0)))
            step = -s * (V @ ((V.T @ (s * grad)) / lam))
        dec = -float(grad @ step)  # Newton decrement squared
        # rounding level of gᵀp: 4 K eps |p|ᵀ(|C| w + w^{-p})
        dec_noise = 4.0 * K * EPS * float(step.abs() @ (Cabs @ w + 1.0 / wp))
        if (
            float((err - noise).max()) <= tol
            and dec <= dec_noise
            and float((step.abs() / w).max()) <= step_tol
        ):
            # every residual is at its rounding level and the decrement is rounding, so the
            # residual no longer measures progress; the pending step (at most sqrt(tol)
            # relative) still does: taken, a case with rows 10^±8 apart went from 6e-6 to 2e-8
            ahead = w + step
            return ahead if bool((ahead > 0).all()) else w
        if it == max_iter:
            break
        neg = step < 0
        tmax = float(torch.where(neg, -w / torch.where(neg, step, -1.0), torch.inf).min())
        t = min(1.0, 0.99 * tmax)
        if dec < 1e-3 and t == 1.0:
            w = w + step
            continue
        sCs = float(step @ (C @ step))
        while True:
            delta = -t * dec + 0.5 * t * t * sCs - float(remainder(w, t * step).sum())
            if delta <= -1e-4 * t * dec + t * dec_noise:
                break
            t *= 0.5
            if t < 1e-20:
                raise SolverError(
                    f"{solver}: line search failed at iteration {it} (residual {res:.3e})"
                )
        w = w + t * step
    raise SolverError(
        f"{solver}: damped Newton did not converge within max_iter={max_iter} iterations "
        f"(residual max|w^p (Gw) - 1| = {res:.3e} above rounding level > tol={tol:.1e})"
    )


def _ridged(Gw: Tensor, eps: float, solver: str) -> tuple[Tensor, Tensor]:
    """Returns ``G + eps·diag(r)`` and ``r`` with ``r_i = G_ii`` (or ``tr(G)/K`` on zero rows)."""
    K = Gw.shape[0]
    diag = Gw.diagonal()
    tr = float(diag.sum())
    if tr == 0.0:
        raise SolverError(f"{solver}: G is zero; the weights are unbounded (no solution exists)")
    r = torch.where(diag > 0, diag, torch.full_like(diag, tr / K))
    Gr = Gw + torch.diag(eps * r)
    # A Gramian accumulated in float32 can be indefinite by more than the ridge (an eigenvalue
    # of -1e-8 where two gradients are opposite); the barrier potential is then unbounded below.
    # Only then, clamp the spectrum at 0 (restoring PSD) before adding the ridge. Decided and
    # clamped on the Jacobi-scaled R^-1/2 G R^-1/2 (same inertia, by Sylvester's law; unit
    # diagonal, where the ridge is eps·I): eigh's error is relative to the norm of the matrix
    # it is given, which for the unscaled G exceeds whole entries of a task whose gradient is
    # 1e4 times smaller than another's (the clamp then changed its weight by 20%).
    if eps > 0:
        inverse_root = r.rsqrt()
        outer = inverse_root[:, None] * inverse_root[None, :]
        scaled = Gw * outer
        if float(torch.linalg.eigvalsh(scaled).min()) <= -eps:
            eigenvalues, eigenvectors = torch.linalg.eigh(scaled)
            clamped = (eigenvectors * eigenvalues.clamp_min(0.0)) @ eigenvectors.T
            Gr = 0.5 * (clamped + clamped.T) / outer + torch.diag(eps * r)
    if bool((Gr.diagonal() <= 0).any()):
        raise SolverError(
            f"{solver}: G has a zero row and eps=0; the weights are unbounded (use eps > 0)"
        )
    return Gr, r


# --------------------------------------------------------------------------------------------
# plain-Python path
# --------------------------------------------------------------------------------------------


def _ridged_py(Gw: list[list[float]], eps: float, solver: str) -> list[list[float]]:
    """:func:`_ridged` in Python floats (returns ``G + eps·diag(r)``)."""
    K = len(Gw)
    diag = [Gw[i][i] for i in range(K)]
    tr = sum(diag)
    if tr == 0.0:
        raise SolverError(f"{solver}: G is zero; the weights are unbounded (no solution exists)")
    r = [v if v > 0 else tr / K for v in diag]
    Gr = [row[:] for row in Gw]
    for i in range(K):
        Gr[i][i] += eps * r[i]
    if eps > 0:
        # PD test on the Jacobi-scaled Gr (Sylvester: same inertia). A factorisation with all
        # squared pivots > 1e-6 certifies a positive spectrum; anything closer to singular is
        # decided by eigvalsh exactly as on the torch path.
        sc = [1.0 / math.sqrt(Gr[i][i]) for i in range(K)]
        A = [[sc[i] * Gr[i][k] * sc[k] for k in range(K)] for i in range(K)]
        if chol_py(A, 1e-6) is None:
            Grt, _ = _ridged(as_f64(Gw), eps, solver)
            return Grt.tolist()
    for i in range(K):
        if not Gr[i][i] > 0:
            raise SolverError(
                f"{solver}: G has a zero row and eps=0; the weights are unbounded (use eps > 0)"
            )
    return Gr


def _barrier_newton_py(
    C: list[list[float]], w0: list[float], p: float, max_iter: int, tol: float, solver: str
) -> list[float]:
    """:func:`_barrier_newton` in Python floats."""
    try:
        return _barrier_newton_floats(C, w0, p, max_iter, tol, solver)
    except OverflowError:
        raise _left_range(solver) from None


def _left_range(solver: str) -> SolverError:
    return SolverError(
        f"{solver}: damped Newton's iterates left float64's range (a power of w "
        "overflowed); no finite weights were reached"
    )


def _barrier_newton_floats(
    C: list[list[float]], w0: list[float], p: float, max_iter: int, tol: float, solver: str
) -> list[float]:
    K = len(C)
    Cabs = [[abs(v) for v in row] for row in C]
    q = 1.0 - p
    log1p, expm1 = math.log1p, math.expm1

    def remainder_sum(x: list[float], h: list[float]) -> float:
        if p == 1.0:
            return sum(log1p(hv / xv) - hv / xv for xv, hv in zip(x, h, strict=False))
        return sum(
            xv**q / q * (expm1(q * log1p(hv / xv)) - q * (hv / xv))
            for xv, hv in zip(x, h, strict=False)
        )

    def matvec(M: list[list[float]], v: list[float]) -> list[float]:
        return [sum(map(mul, row, v)) for row in M]

    nc = 4.0 * K * EPS
    step_tol = math.sqrt(tol)
    w = list(w0)
    res = float("inf")
    for it in range(max_iter + 1):
        Cw = matvec(C, w)
        Caw = matvec(Cabs, w)
        wp = [v**p for v in w]
        noise = [nc * a * b for a, b in zip(wp, Caw, strict=False)]
        err = [abs(a * b - 1.0) for a, b in zip(wp, Cw, strict=False)]
        res = max(e - min(nz, 1e-2) for e, nz in zip(err, noise, strict=False))
        if res <= tol:
            return w
        grad = [a - 1.0 / b for a, b in zip(Cw, wp, strict=False)]
        H = [row[:] for row in C]
        for i in range(K):
            H[i][i] += p * w[i] ** (-p - 1.0)
        s = [1.0 / math.sqrt(H[i][i]) for i in range(K)]
        Hs = [[s[i] * H[i][k] * s[k] for k in range(K)] for i in range(K)]
        L = chol_py(Hs, 0.0)
        if L is not None:
            z = chol_solve_py(L, [a * b for a, b in zip(s, grad, strict=False)])
            step = [-a * b for a, b in zip(s, z, strict=False)]
        else:  # PD in exact arithmetic; rounding made it indefinite: clamp the spectrum
            lam, V = torch.linalg.eigh(as_f64(Hs))
            lam = lam.clamp_min(EPS * float(lam[-1].clamp_min(1.0)))
            st = as_f64(s)
            step = (-st * (V @ ((V.T @ (st * as_f64(grad))) / lam))).tolist()
        dec = -sum(map(mul, grad, step))
        dec_noise = nc * sum(abs(a) * (b + 1.0 / c) for a, b, c in zip(step, Caw, wp, strict=False))
        if (
            max(e - nz for e, nz in zip(err, noise, strict=False)) <= tol
            and dec <= dec_noise
            and max(abs(a) / b for a, b in zip(step, w, strict=False)) <= step_tol
        ):
            ahead = [a + b for a, b in zip(w, step, strict=False)]  # as on the torch path
            return ahead if min(ahead) > 0 else w
        if it == max_iter:
            break
        tmax = min(
            (-wv / sv for wv, sv in zip(w, step, strict=False) if sv < 0), default=float("inf")
        )
        t = min(1.0, 0.99 * tmax)
        if dec < 1e-3 and t == 1.0:
            w = [a + b for a, b in zip(w, step, strict=False)]
            continue
        sCs = sum(map(mul, step, matvec(C, step)))
        while True:
            delta = -t * dec + 0.5 * t * t * sCs - remainder_sum(w, [t * v for v in step])
            if delta <= -1e-4 * t * dec + t * dec_noise:
                break
            t *= 0.5
            if t < 1e-20:
                raise SolverError(
                    f"{solver}: line search failed at iteration {it} (residual {res:.3e})"
                )
        w = [a + t * b for a, b in zip(w, step, strict=False)]
    raise SolverError(
        f"{solver}: damped Newton did not converge within max_iter={max_iter} iterations "
        f"(residual max|w^p (Gw) - 1| = {res:.3e} above rounding level > tol={tol:.1e})"
    )


# --------------------------------------------------------------------------------------------
# public solvers
# --------------------------------------------------------------------------------------------


def nash_weights(
    G: Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-10,
    eps: float = 1e-8,
    backend: Backend = "auto",
) -> Tensor:
    r"""Nash-MTL bargaining weights (Navon et al., ICML 2022).

    Solves :math:`G\alpha = 1/\alpha` (elementwise), :math:`\alpha > 0`, i.e.
    :math:`\alpha_i\, (G\alpha)_i = 1` for all tasks. This is the stationarity condition of the
    strictly convex potential

    .. math:: f(\alpha) = \tfrac12 \alpha^\top G \alpha - \textstyle\sum_k \log \alpha_k,

    (Hessian :math:`G + \operatorname{diag}(\alpha^{-2}) \succ 0`), solved by damped Newton with
    Armijo backtracking and a fraction-to-the-boundary rule keeping :math:`\alpha > 0`, until
    :math:`\max_i |\alpha_i (G\alpha)_i - 1| \le` ``tol``. The paper/official code instead runs up
    to 20 sequential convex approximations with cvxpy/ECOS (stopping on
    :math:`\lVert\alpha - \alpha_{prev}\rVert < 10^{-6}`); both target the same fixed point, which
    this solver reaches to ``tol``.

    Scaling: identical to the official code (AvivNavon/nash-mtl, ``methods/weight_methods.py``),
    which divides ``GTG`` by its Frobenius norm :math:`N` internally but folds :math:`N` back into
    the constraint :math:`\alpha_i N (G/N\, \alpha)_i \ge 1`, so the returned :math:`\alpha`
    solves the *unnormalised* :math:`\alpha_i (G\alpha)_i = 1`, hence
    :math:`\lVert J^\top\alpha\rVert^2 = \alpha^\top G\alpha = K`. (The official ``max_norm``
    gradient clipping is the caller's job.) Internally we solve on the Jacobi-scaled Gramian
    :math:`D^{-1/2} G D^{-1/2}` (:math:`D = \operatorname{diag} G`), to which the problem is
    exactly equivariant (:math:`\alpha = D^{-1/2}\beta`).

    Existence: the potential is unbounded below iff some :math:`v \ge 0, v \ne 0` has
    :math:`Gv = 0` (e.g. opposite gradients, a zero gradient). We therefore always add the tiny
    documented ridge :math:`\text{eps}\cdot\operatorname{diag}(r)`, :math:`r_i = G_{ii}`
    (or :math:`\operatorname{tr}(G)/K` for a zero row), i.e. ``eps`` times the identity on the
    Jacobi-scaled problem; the solution exists for ``eps > 0`` and moves by :math:`O(\text{eps})`
    when :math:`G` is well conditioned. With ``eps=0`` an unbounded problem makes Newton hit its
    cap and raise. ``G = 0`` always raises :class:`SolverError` (no finite weights exist).

    Args:
        G: Gramian ``[K, K]``.
        max_iter: Newton iteration cap (exceeding it raises).
        tol: Tolerance on :math:`\max_i |\alpha_i (G\alpha)_i - 1|` (scale free).
        eps: Relative diagonal ridge.
        backend: ``"auto"`` (plain Python for ``K <= 16``), ``"python"`` or ``"torch"``.

    Returns:
        :math:`\alpha > 0` of shape ``[K]`` (dtype/device of ``G``).

    Raises:
        SolverError: Invalid ``G``, zero ``G``, or no convergence.
        ValueError: Invalid keyword values.

    Example:
        >>> nash_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), eps=0.0)
        tensor([0.5000, 1.0000])
    """
    check_positive_int("max_iter", max_iter)
    tol = check_positive("tol", tol)
    eps = check_nonnegative("eps", eps)
    if select_backend(backend, G, PYTHON_MAX_K) == "python":
        Rl = _ridged_py(work_list(G, "nash_weights"), eps, "nash_weights")
        sl = [1.0 / math.sqrt(Rl[i][i]) for i in range(len(Rl))]
        Cl = [[sl[i] * v * sl[k] for k, v in enumerate(row)] for i, row in enumerate(Rl)]
        beta_l = _barrier_newton_py(Cl, [1.0] * len(Rl), 1.0, max_iter, tol, "nash_weights")
        return to_output([a * b for a, b in zip(sl, beta_l, strict=True)], G)
    Gw = work_tensor(G, "nash_weights")
    Gr, _ = _ridged(Gw, eps, "nash_weights")
    s = Gr.diagonal().rsqrt()
    C = s[:, None] * Gr * s[None, :]
    beta = _barrier_newton(C, torch.ones_like(s), 1.0, max_iter, tol, "nash_weights")
    return to_output(s * beta, G)


def fairgrad_weights(
    G: Tensor,
    alpha: float,
    *,
    max_iter: int = 100,
    tol: float = 1e-10,
    eps: float = 1e-8,
    backend: Backend = "auto",
) -> Tensor:
    r"""FairGrad weights (Ban & Ji, ICML 2024, "Fair Resource Allocation in Multi-Task Learning").

    Solves :math:`(Gw)_i = w_i^{-1/\alpha}`, :math:`w > 0` (the :math:`\alpha`-fair allocation;
    :math:`\alpha = 1` is Nash-MTL). It is the stationarity condition of the strictly convex
    potential (for :math:`\alpha > 0`)

    .. math:: f(w) = \tfrac12 w^\top G w - \textstyle\sum_i \varphi(w_i),\quad
              \varphi(w) = \frac{w^{1-1/\alpha}}{1-1/\alpha}\ (\alpha\ne1),\quad
              \varphi(w) = \log w\ (\alpha = 1),

    solved by damped Newton (Hessian :math:`G + \operatorname{diag}(\alpha^{-1}
    w^{-1/\alpha-1}) \succ 0`) to :math:`\max_i |w_i^{1/\alpha}(Gw)_i - 1| \le` ``tol``. The
    official code (OptMN-Lab/fairgrad, ``methods/weight_methods.py``) calls
    ``scipy.optimize.least_squares(lambda x: A @ x - (1/x)**(1/alpha), x0=1/K,
    bounds=(0, inf))`` on the raw ``GTG`` (no normalisation) with default ``alpha=1.0`` (its
    experiment scripts use e.g. ``alpha=2.0`` on QM9); the returned :math:`w` solves the same
    equation with the same (unnormalised) scaling. Internally ``G`` is divided by
    :math:`\sigma = \operatorname{tr}(G)/K` and the result rescaled by
    :math:`\sigma^{-\alpha/(\alpha+1)}`. The same existence caveat and relative ridge ``eps`` as in
    :func:`nash_weights` apply.

    Args:
        G: Gramian ``[K, K]``.
        alpha: Fairness parameter, finite and ``> 0``.
        max_iter: Newton iteration cap (exceeding it raises).
        tol: Tolerance on the scale-free residual.
        eps: Relative diagonal ridge.
        backend: ``"auto"`` (plain Python for ``K <= 16``), ``"python"`` or ``"torch"``.

    Returns:
        :math:`w > 0` of shape ``[K]`` (dtype/device of ``G``).

    Raises:
        SolverError: Invalid ``G``, zero ``G``, or no convergence.
        ValueError: Invalid ``alpha`` or keyword values.

    Example:
        >>> fairgrad_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), 1.0, eps=0.0)
        tensor([0.5000, 1.0000])
    """
    alpha = check_positive("alpha", alpha)
    check_positive_int("max_iter", max_iter)
    tol = check_positive("tol", tol)
    eps = check_nonnegative("eps", eps)
    expo = alpha / (alpha + 1.0)
    if select_backend(backend, G, PYTHON_MAX_K) == "python":
        Rl = _ridged_py(work_list(G, "fairgrad_weights"), eps, "fairgrad_weights")
        n = len(Rl)
        sig = sum(Rl[i][i] for i in range(n)) / n
        Cl = [[v / sig for v in row] for row in Rl]
        w0l = [Cl[i][i] ** (-expo) for i in range(n)]
        wl = _barrier_newton_py(Cl, w0l, 1.0 / alpha, max_iter, tol, "fairgrad_weights")
        return to_output([v * sig ** (-expo) for v in wl], G)
    Gw = work_tensor(G, "fairgrad_weights")
    Gr, _ = _ridged(Gw, eps, "fairgrad_weights")
    K = Gr.shape[0]
    sigma = float(Gr.diagonal().sum()) / K
    C = Gr / sigma
    w0 = C.diagonal() ** (-expo)
    w = _barrier_newton(C, w0, 1.0 / alpha, max_iter, tol, "fairgrad_weights")
    return to_output(w * sigma ** (-expo), G)
