"""Pure-torch solvers for Gramian-based multi-task weightings.

Every solver works on the ``K x K`` Gramian ``G = J Jᵀ`` of the task gradients (rows of ``J``)
and returns task weights ``w`` such that the combined direction is ``d = Jᵀ w``.

Numerical conventions shared by all solvers:

* The Gramian is validated (square, finite; otherwise :class:`SolverError`), symmetrised and
  copied to the host in ``float64``. ``K`` is small (1..64), so one device-to-host copy is far
  cheaper than launching dozens of tiny kernels, and the active-set / Newton loops need scalar
  decisions (``.item()``) anyway. The result is returned with the dtype and device of ``G``.
* Results are detached: the weights are treated as constants w.r.t. ``G`` (as in torchjd).
* Iteration caps and tolerances are keyword arguments. An exact solver that does not converge
  within its cap raises :class:`SolverError` naming the solver, the iterations and the residual.
  There is never a silent fallback to another method.
* Linear algebra on faces uses Jacobi (unit-diagonal) scaling and a symmetric eigendecomposition,
  which keeps badly scaled Gramians (task gradient norms spanning many orders of magnitude)
  accurate and handles singular (rank-deficient, duplicated-row) faces exactly.
"""

from __future__ import annotations

import math
from operator import mul as _mul
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "SolverError",
    "cagrad_weights",
    "dual_cone_weights",
    "fairgrad_weights",
    "min_norm_weights",
    "nash_weights",
    "nonneg_qp",
    "project_simplex",
]

_F64 = torch.float64
_EPS = torch.finfo(torch.float64).eps
# Eigenvalues of a unit-diagonal (Jacobi-scaled) PSD block below ``_RANK_RTOL * max(1, λ_max)``
# are treated as exact zeros (duplicated / linearly dependent task gradients).
_RANK_RTOL = 1e-12


class SolverError(RuntimeError):
    """Raised when a solver gets invalid numerical input or does not converge within its cap."""


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: float, *, positive: bool = False) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or v < 0.0 or (positive and v == 0.0):
        kind = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {kind}, got {value!r}")
    return v


def _work_gramian(G: Tensor, solver: str) -> Tensor:
    """Validates ``G`` and returns a symmetric float64 host copy."""
    if not isinstance(G, Tensor):
        raise SolverError(f"{solver}: G must be a torch.Tensor, got {type(G).__name__}")
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise SolverError(f"{solver}: G must be a square K x K matrix, got shape {tuple(G.shape)}")
    if G.shape[0] == 0:
        raise SolverError(f"{solver}: G must have at least one row (K >= 1), got K = 0")
    if G.is_complex() or not G.is_floating_point():
        raise SolverError(f"{solver}: G must be a real floating point tensor, got {G.dtype}")
    Gw = G.detach().to(device="cpu", dtype=_F64)
    if not bool(torch.isfinite(Gw).all()):
        raise SolverError(f"{solver}: G contains non-finite values (nan or inf)")
    Gw = 0.5 * (Gw + Gw.T)
    diag = Gw.diagonal()
    if bool((diag < 0).any()):
        raise SolverError(f"{solver}: G has a negative diagonal entry, so it is not PSD")
    # a PSD matrix with G_ii = 0 has a zero row: other entries there are rounding/underflow
    live = (diag > 0).to(_F64)
    return Gw * live[:, None] * live[None, :]


def _out(x: Tensor, like: Tensor) -> Tensor:
    return x.to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------------------------
# simplex projection
# --------------------------------------------------------------------------------------------


def project_simplex(v: Tensor) -> Tensor:
    r"""Euclidean projection onto the probability simplex along the last dimension.

    Solves :math:`\operatorname{argmin}_{w \ge 0,\ \mathbf 1^\top w = 1} \lVert w - v \rVert_2`
    with the sorting algorithm (Held et al. 1974; Duchi et al. 2008):
    :math:`w = \max(v - \tau, 0)` with :math:`\tau = (\sum_{i \le \rho} u_i - 1) / \rho`, where
    :math:`u` is :math:`v` sorted decreasingly and :math:`\rho` the largest index with
    :math:`u_\rho > (\sum_{i\le\rho} u_i - 1)/\rho`. Fully vectorised, no host synchronisation.

    Args:
        v: Tensor of shape ``[..., K]`` (floating point, finite).

    Returns:
        Tensor of the same shape, dtype and device, each row on the simplex.

    Raises:
        ValueError: If ``v`` is not a floating point tensor with at least one dimension.

    Example:
        >>> project_simplex(torch.tensor([0.5, 0.5, 1.0]))
        tensor([0.1667, 0.1667, 0.6667])
    """
    if not isinstance(v, Tensor) or not v.is_floating_point() or v.ndim == 0 or v.shape[-1] == 0:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"v must be a floating point tensor of shape [..., K], got {shape}")
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = torch.cumsum(u, dim=-1) - 1.0
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    cond = u - css / k > 0
    rho = cond.to(torch.int64).cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    tau = torch.gather(css, -1, rho) / (rho + 1).to(v.dtype)
    return torch.clamp(v - tau, min=0.0)


# --------------------------------------------------------------------------------------------
# MGDA: min-norm point of the convex hull
# --------------------------------------------------------------------------------------------


def _face_min_norm(Gs: Tensor, y_cur: Tensor) -> Tensor:
    """Minimiser of ``yᵀ Gs y`` subject to ``1ᵀ y = 1`` (no sign constraint), nearest ``y_cur``.

    Jacobi scaling ``y = D ỹ`` (``D = diag(Gs)^{-1/2}``) then, unless a Cholesky factorisation
    has well-bounded pivots, an eigendecomposition of the unit-diagonal block ``A``. Eigenvalues
    at the rounding level of ``eigh`` (``n eps λ_max``) are exact zeros. With ``c = D 1`` split
    into range/null components there are two candidates: ``ỹ = A⁺c / (cᵀA⁺c)`` (value
    ``1/(cᵀA⁺c)``) and, if ``c`` has a null component, ``ỹ = c_N / ‖c_N‖²`` (value 0). Both are
    feasible, so the one whose value ``ỹᵀAỹ``, evaluated directly on ``A``, is smaller is
    returned: a tiny but genuine eigenvalue (a nearly singular face, e.g. two almost
    anti-parallel gradients and a tiny third one) is never mistaken for an exact zero, and a
    rounding-level null component of ``c`` (huge ``ỹ``) is never preferred. Flat directions
    (null space orthogonal to ``c``: affinely dependent vertices) keep ``y_cur``.
    """
    n = Gs.shape[0]
    d = Gs.diagonal().clamp_min(1e-300).rsqrt()
    A = d[:, None] * Gs * d[None, :]
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0 and float(L.diagonal().min()) ** 2 > 1e-8:
        # well-conditioned face: y ∝ G⁻¹1, computed as D (DGD)⁻¹ D 1
        y = d * torch.cholesky_solve(d[:, None], L)[:, 0]
        return y / y.sum()
    lam, V = torch.linalg.eigh(A)
    lam_max = float(lam[-1].clamp_min(1.0))
    null = lam <= 8.0 * n * _EPS * lam_max
    c = d
    cv = V.T @ c
    cur = V.T @ (y_cur / d)
    cur_n = torch.where(null, cur, torch.zeros_like(cur))
    cn = torch.where(null, cv, torch.zeros_like(cv))
    cn_norm2 = float(cn @ cn)
    best = None
    best_val = float("inf")
    if cn_norm2 > 0.0:
        # value-0 candidate; keep the current point's component in N ∩ c_N^⊥ (flat directions)
        yt = V @ (cn / cn_norm2 + cur_n - (cur_n @ cn) / cn_norm2 * cn)
        best, best_val = yt, float(yt @ A @ yt)
    inv = torch.where(null, torch.zeros_like(lam), 1.0 / torch.where(null, 1.0, lam))
    z = inv * cv
    denom = float(cv @ z)
    if denom > 0.0:
        yt = V @ (z / denom + cur_n)
        val = float(yt @ A @ yt)
        if best is None or val < best_val:
            best, best_val = yt, val
    if best is None:  # c = 0 cannot happen (d > 0); keep the current point
        return y_cur / y_cur.sum()
    y = d * best
    return y / y.sum()


def _mgda_active_set(G: Tensor, max_iter: int, tol: float) -> Tensor:
    """Wolfe's min-norm-point active-set algorithm on a float64 host Gramian (no special cases)."""
    K = G.shape[0]
    scale = float(G.diagonal().max())
    Gn = G / scale
    diag = Gn.diagonal()
    sq = diag.sqrt()
    i0 = int(torch.argmin(diag))
    S = [i0]
    w = torch.zeros(K, dtype=_F64)
    w[i0] = 1.0
    it = 0
    gap = float("inf")
    thresh = 0.0
    while True:
        Gw = Gn @ w
        val = float(w @ Gw)
        # rounding level of the gap val - (Gw)_j = (w - e_j)ᵀ G w, i.e. of both val and (Gw)_j:
        # K eps (Σ_k sqrt(G_kk) |w - e_j|_k) (Σ_k sqrt(G_kk) w_k)
        m = float(sq @ w)
        noise = 4.0 * K * _EPS * m * (sq + m)
        slack = Gw - val + noise
        mask = torch.ones(K, dtype=torch.bool)
        mask[S] = False
        if not bool(mask.any()):
            break
        slack = torch.where(mask, slack, torch.full_like(slack, float("inf")))
        j = int(torch.argmin(slack))
        gap = val - float(Gw[j])
        thresh = tol * val + float(noise[j])
        if gap <= thresh:
            break
        S.append(j)
        # minor cycles
        while True:
            it += 1
            if it > max_iter:
                raise SolverError(
                    f"min_norm_weights(method='active_set'): no convergence within max_iter="
                    f"{max_iter} iterations (KKT residual {gap:.3e} > {thresh:.3e})"
                )
            idx = torch.tensor(S, dtype=torch.long)
            y = _face_min_norm(Gn[idx][:, idx], w[idx])
            if bool((y > 0).all()):
                w = torch.zeros(K, dtype=_F64)
                w[idx] = y
                break
            wS = w[idx]
            neg = y <= 0
            # step from wS towards y until the first weight reaches 0; a vertex with wS = 0
            # (only the entering one) and y <= 0 blocks at theta = 0 (no 0/0)
            ratios = torch.where(
                neg & (wS > 0), wS / (wS - y).clamp_min(1e-300), torch.full_like(y, float("inf"))
            )
            ratios = torch.where(neg & (wS <= 0), torch.zeros_like(y), ratios)
            theta = float(ratios.min())
            block = int(torch.argmin(ratios))
            if S[block] == j and theta <= 0.0:
                # the entering vertex is rejected at rounding level: KKT holds numerically
                S.pop(block)
                return w
            new = (wS + theta * (y - wS)).clamp_min(0.0)
            new[block] = 0.0
            keep = [k for k in range(len(S)) if new[k] > 0]
            w = torch.zeros(K, dtype=_F64)
            w[idx] = new
            S = [S[k] for k in keep]
            w = w / w.sum()
    return w


def _mgda_frank_wolfe(G: Tensor, max_iter: int, tol: float) -> Tensor:
    """Sener & Koltun's Frank-Wolfe with exact line search, best-pair initialisation."""
    K = G.shape[0]
    scale = float(G.diagonal().max())
    Gn = G / scale
    diag = Gn.diagonal()
    # best pair initialisation (closed form for every pair)
    gi = diag[:, None]
    gj = diag[None, :]
    den = gi + gj - 2.0 * Gn
    gamma = torch.where(den > 0, (gj - Gn) / torch.where(den > 0, den, 1.0), 0.5).clamp(0.0, 1.0)
    cost = gamma**2 * gi + (1 - gamma) ** 2 * gj + 2 * gamma * (1 - gamma) * Gn
    cost = cost + torch.eye(K, dtype=_F64) * float("inf")
    flat = int(torch.argmin(cost))
    a, b = divmod(flat, K)
    w = torch.zeros(K, dtype=_F64)
    w[a] = gamma[a, b]
    w[b] += 1.0 - gamma[a, b]
    for _ in range(max_iter):
        Gw = Gn @ w
        v1v1 = float(w @ Gw)
        t = int(torch.argmin(Gw))
        v1v2 = float(Gw[t])
        if v1v1 - v1v2 <= tol * max(v1v1, 1e-300):
            break
        v2v2 = float(diag[t])
        den_t = v1v1 + v2v2 - 2.0 * v1v2
        g = 1.0 if den_t <= 0 else min(max((v2v2 - v1v2) / den_t, 0.0), 1.0)
        w = g * w
        w[t] += 1.0 - g
    return w


def min_norm_weights(
    G: Tensor,
    *,
    max_iter: int = 250,
    tol: float = 1e-10,
    method: Literal["active_set", "frank_wolfe"] = "active_set",
) -> Tensor:
    r"""MGDA weights: the minimum-norm point of the convex hull of the task gradients.

    Solves :math:`w^\star = \operatorname{argmin}_{w \in \Delta_K} w^\top G w` with
    :math:`\Delta_K = \{w \ge 0, \mathbf 1^\top w = 1\}` (Sener & Koltun, NeurIPS 2018). The
    optimality (KKT) conditions are :math:`(Gw)_i \ge w^\top G w` for all :math:`i`, with equality
    where :math:`w_i > 0`. The value :math:`w^\top G w = \lVert J^\top w\rVert^2` is unique even
    when :math:`w` is not (duplicated or affinely dependent gradients).

    * ``K = 1``: ``[1]``. ``K = 2``: closed form (Sener's Algorithm 1),
      :math:`\gamma = \operatorname{clamp}\big((G_{22} - G_{12}) / (G_{11} + G_{22} - 2G_{12}),
      0, 1\big)`, :math:`w = (\gamma, 1 - \gamma)` (``0.5`` if both gradients are equal).
    * ``G = 0``: every simplex point is optimal; the uniform ``1/K`` is returned. Zero rows
      (:math:`G_{ii} = 0`) give value 0: the weight is spread uniformly over them.
    * ``method="active_set"`` (default): Wolfe's (1976) exact min-norm-point active-set method on
      Jacobi-scaled faces with an eigendecomposition, exact on singular faces. It stops when the
      Frank-Wolfe gap :math:`w^\top G w - \min_i (Gw)_i \le` ``tol`` :math:`\cdot w^\top G w` plus
      the rounding level of the gap; each face solve counts as one iteration and reaching
      ``max_iter`` raises :class:`SolverError`.
    * ``method="frank_wolfe"``: the paper's Frank-Wolfe with exact line search, started from the
      best pair. It stops when the duality gap is ``<= tol * wᵀGw`` or after ``max_iter``
      iterations. Reaching the cap is **not** an error: Frank-Wolfe converges sublinearly and the
      paper uses it as an approximate solver, so the current iterate is returned. (The official
      code's loop never incremented its counter; its line search also clamps at 0.999/0.001
      instead of the exact 1/0 used here.)

    Args:
        G: Gramian ``J Jᵀ`` of shape ``[K, K]`` (symmetric PSD, float32 or float64).
        max_iter: Iteration cap (face solves for ``active_set``, steps for ``frank_wolfe``).
        tol: Relative tolerance on the duality gap.
        method: ``"active_set"`` or ``"frank_wolfe"``.

    Returns:
        Weights of shape ``[K]`` on the simplex, dtype and device of ``G``.

    Raises:
        SolverError: Non-square or non-finite ``G``, or ``active_set`` hit ``max_iter``.
        ValueError: Invalid ``max_iter``, ``tol`` or ``method``.

    Example:
        >>> G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
        >>> min_norm_weights(G)
        tensor([0.5000, 0.5000])
    """
    _check_int("max_iter", max_iter, 1)
    tol = _check_float("tol", tol)
    if method not in ("active_set", "frank_wolfe"):
        raise ValueError(f"method must be 'active_set' or 'frank_wolfe', got {method!r}")
    if method == "active_set" and isinstance(G, Tensor) and G.ndim == 2 and G.shape[0] <= _PY_MAX_K:
        Gl = _work_list(G, "min_norm_weights")
        wl = _min_norm_special_py(Gl)
        return _out_list(wl if wl is not None else _mgda_active_set_py(Gl, max_iter, tol), G)
    Gw = _work_gramian(G, "min_norm_weights")
    K = Gw.shape[0]
    diag = Gw.diagonal()
    if float(diag.max()) == 0.0:
        return _out(torch.full((K,), 1.0 / K, dtype=_F64), G)
    zero = diag == 0
    if bool(zero.any()):
        w = zero.to(_F64)
        return _out(w / w.sum(), G)
    if K == 1:
        return _out(torch.ones(1, dtype=_F64), G)
    if K == 2:
        g11, g12, g22 = float(Gw[0, 0]), float(Gw[0, 1]), float(Gw[1, 1])
        den = g11 + g22 - 2.0 * g12
        gamma = 0.5 if den <= 0 else min(max((g22 - g12) / den, 0.0), 1.0)
        return _out(torch.tensor([gamma, 1.0 - gamma], dtype=_F64), G)
    if method == "active_set":
        w = _mgda_active_set(Gw, max_iter, tol)
    else:
        w = _mgda_frank_wolfe(Gw, max_iter, tol)
    return _out(w, G)


# --------------------------------------------------------------------------------------------
# non-negative QP
# --------------------------------------------------------------------------------------------


def _face_qp(A: Tensor, c: Tensor, x_cur: Tensor) -> tuple[Tensor, bool]:
    """Minimiser of ``½xᵀAx + cᵀx`` (unit-diagonal PSD ``A``) nearest ``x_cur``.

    Returns ``(x, True)``, or ``(p, False)`` with a descent direction ``p`` along which the
    objective decreases linearly without bound (``c`` has a significant null-space component).
    """
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0 and float(L.diagonal().min()) ** 2 > 1e-8:
        # well-conditioned face (pivots bounded away from 0): fast exact path
        return -torch.cholesky_solve(c[:, None], L)[:, 0], True
    lam, V = torch.linalg.eigh(A)
    lam_max = float(lam[-1].clamp_min(1.0))
    null = lam <= _RANK_RTOL * lam_max
    cv = V.T @ c
    cn = torch.where(null, cv, torch.zeros_like(cv))
    # near-null directions of a consistent problem carry at most ~sqrt(rtol) of c
    if float(cn.norm()) > 1e-4 * max(float(c.norm()), 1e-300):
        return -(V @ cn), False
    inv = torch.where(null, torch.zeros_like(lam), 1.0 / torch.where(null, 1.0, lam))
    cur = V.T @ x_cur
    xv = torch.where(null, cur, -inv * cv)
    return V @ xv, True


def _nnqp(Q: Tensor, b: Tensor, max_iter: int, tol: float, solver: str) -> Tensor:
    """Lawson-Hanson style primal active set for ``min ½uᵀQu + bᵀu, u ≥ 0`` (float64 host)."""
    n = b.shape[0]
    d = Q.diagonal()
    zero = d <= 0
    if bool((zero & (b < 0)).any()):
        i = int(torch.nonzero(zero & (b < 0))[0])
        raise SolverError(
            f"{solver}: objective unbounded below (Q[{i},{i}] = 0 and b[{i}] = {float(b[i]):.3e})"
        )
    s = torch.where(zero, torch.zeros_like(d), d.clamp_min(1e-300).rsqrt())
    Qs = s[:, None] * Q * s[None, :]
    bs = s * b
    u = torch.zeros(n, dtype=_F64)
    bscale = float(bs.abs().max()) if n else 0.0
    if bscale == 0.0:
        return u
    F: list[int] = []
    it = 0
    worst = 0.0
    thr = 0.0
    while True:
        g = Qs @ u + bs
        thr = tol * (bscale + float(u.abs().sum()))
        mask = ~zero
        if F:
            mask[F] = False
        cand = torch.where(mask, g, torch.full_like(g, float("inf")))
        j = int(torch.argmin(cand))
        worst = -float(cand[j])
        if worst <= thr:
            break
        F.append(j)
        while True:
            it += 1
            if it > max_iter:
                raise SolverError(
                    f"{solver}: no convergence within max_iter={max_iter} iterations "
                    f"(KKT residual {worst:.3e} > {thr:.3e})"
                )
            idx = torch.tensor(F, dtype=torch.long)
            uF = u[idx]
            x, bounded = _face_qp(Qs[idx][:, idx], bs[idx], uF)
            if bounded and bool((x > 0).all()):
                u = torch.zeros(n, dtype=_F64)
                u[idx] = x
                break
            if bounded:
                p = x - uF
                neg = x <= 0
            else:
                p = x
                neg = p < 0
                if not bool(neg.any()):
                    raise SolverError(
                        f"{solver}: objective unbounded below along a non-negative direction "
                        f"of the null space of Q (after {it} iterations)"
                    )
            ratios = torch.where(
                neg, uF / torch.where(neg, -p, 1.0), torch.full_like(uF, float("inf"))
            )
            theta = float(ratios.min())
            block = int(torch.argmin(ratios))
            if F[block] == j and theta <= 0.0 and bounded:
                # the entering index is rejected at rounding level: KKT holds numerically
                F.pop(block)
                return s * u
            new = (uF + theta * p).clamp_min(0.0)
            new[block] = 0.0
            u = torch.zeros(n, dtype=_F64)
            u[idx] = new
            F = [F[k] for k in range(len(F)) if new[k] > 0]
            if not F:
                break
    return s * u


def nonneg_qp(Q: Tensor, b: Tensor, *, max_iter: int = 500, tol: float = 1e-12) -> Tensor:
    r"""Exact solution of the non-negatively constrained convex QP.

    .. math:: u^\star = \operatorname{argmin}_{u \ge 0}\ \tfrac12 u^\top Q u + b^\top u

    for symmetric PSD :math:`Q` (possibly singular). KKT: :math:`g = Qu + b \ge 0`,
    :math:`u \ge 0`, :math:`u_i g_i = 0`. Lawson-Hanson style primal active-set method: start
    at :math:`u = 0`, free the index with the most negative gradient, solve the face problem,
    and step back to the boundary when it leaves the orthant. Each face problem is solved on the
    Jacobi-scaled (unit-diagonal) block with an eigendecomposition: on singular faces the
    minimiser nearest to the current point is taken (exact, no ridge); if the face is unbounded
    the method follows the linear descent ray until a bound blocks it, and raises if none does.
    Converged when :math:`\min_i g_i \ge -` ``tol`` :math:`\cdot(\lVert \tilde b\rVert_\infty +
    \lVert \tilde u\rVert_1)` in Jacobi-scaled variables.

    Args:
        Q: Symmetric PSD matrix ``[n, n]``.
        b: Linear term ``[n]``.
        max_iter: Cap on face solves; exceeding it raises :class:`SolverError`.
        tol: Relative KKT tolerance.

    Returns:
        ``u*`` of shape ``[n]`` (dtype/device of ``Q``). Not unique when ``Q`` is singular; the
        value and ``Qu*`` are.

    Raises:
        SolverError: Non-square/non-finite ``Q``, non-finite ``b``, unbounded problem, or cap hit.
        ValueError: Shape mismatch or invalid ``max_iter``/``tol``.

    Example:
        >>> nonneg_qp(torch.eye(2), torch.tensor([-1.0, 2.0]))
        tensor([1., 0.])
    """
    _check_int("max_iter", max_iter, 1)
    tol = _check_float("tol", tol)
    Qw = _work_gramian(Q, "nonneg_qp")
    if not isinstance(b, Tensor) or b.shape != (Qw.shape[0],):
        shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise ValueError(f"b must be a tensor of shape ({Qw.shape[0]},), got {shape}")
    bw = b.detach().to(device="cpu", dtype=_F64)
    if not bool(torch.isfinite(bw).all()):
        raise SolverError("nonneg_qp: b contains non-finite values (nan or inf)")
    if Qw.shape[0] <= _PY_MAX_K:
        return _out_list(_nnqp_py(Qw.tolist(), bw.tolist(), max_iter, tol, "nonneg_qp"), Q)
    return _out(_nnqp(Qw, bw, max_iter, tol, "nonneg_qp"), Q)


# --------------------------------------------------------------------------------------------
# dual cone projection (UPGrad / DualProj)
# --------------------------------------------------------------------------------------------


def dual_cone_weights(
    G: Tensor,
    prefs: Tensor,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    max_iter: int = 500,
    tol: float = 1e-12,
) -> Tensor:
    r"""Weights of the projection of :math:`J^\top p` onto the dual cone of the rows of :math:`J`.

    The dual cone is :math:`C = \{v : Jv \ge 0\}` (directions that conflict with no task). For a
    preference vector :math:`p`, :math:`\pi_C(J^\top p) = J^\top w` with
    :math:`w = \operatorname{argmin}_{w \ge p} w^\top G w` (Quinton & Rey 2024, Prop. 1).
    Writing :math:`w = p + u`:

    .. math:: u^\star = \operatorname{argmin}_{u \ge 0}\ \tfrac12 u^\top G u + u^\top (G p),
              \qquad w = p + u^\star,

    solved exactly by :func:`nonneg_qp`. Its KKT condition :math:`G(p + u^\star) \ge 0` is
    exactly non-conflict: :math:`g_i^\top J^\top w \ge 0` for every task.

    Following torchjd (``UPGradWeighting`` / ``DualProj``, ``_utils/gramian.py``): the Gramian
    is first normalised by its trace, :math:`G/\operatorname{tr}(G)` (the Gramian of the
    Frobenius-normalised Jacobian), replaced by zeros when :math:`\operatorname{tr}(G) <`
    ``norm_eps``, and regularised as :math:`+` ``reg_eps`` :math:`\cdot I`. Defaults are
    torchjd's (``norm_eps = reg_eps = 1e-4``). Caveats inherited from those defaults:
    ``norm_eps`` is absolute, so Jacobians with :math:`\lVert J\rVert_F^2 < 10^{-4}` are not
    projected at all (``w = max(p, 0)``); ``reg_eps > 0`` guarantees only
    :math:`(G/\operatorname{tr} G + \text{reg\_eps}\, I)\, w \ge 0`. Pass ``norm_eps=0`` and
    ``reg_eps=0`` for the exact projection (singular ``G`` is handled exactly). UPGrad uses
    ``prefs = diag(pref)/...`` rows and sums the returned rows; DualProj uses one row.

    Args:
        G: Gramian ``[K, K]``.
        prefs: Preference vectors ``[K]`` or ``[M, K]``.
        norm_eps: Trace threshold below which ``G`` is treated as zero.
        reg_eps: Ridge added to the trace-normalised Gramian.
        max_iter: Cap per QP (see :func:`nonneg_qp`).
        tol: Relative KKT tolerance of the QP.

    Returns:
        Weights ``p + u*`` with the shape of ``prefs``, dtype/device of ``G``.

    Raises:
        SolverError: Invalid ``G``, non-finite ``prefs`` or a QP hit its cap.
        ValueError: Bad ``prefs`` shape or invalid keyword values.

    Example:
        >>> G = torch.tensor([[1.0, -1.5], [-1.5, 4.0]])
        >>> dual_cone_weights(G, torch.tensor([0.5, 0.5]), norm_eps=0.0, reg_eps=0.0)
        tensor([0.7500, 0.5000])
    """
    norm_eps = _check_float("norm_eps", norm_eps)
    reg_eps = _check_float("reg_eps", reg_eps)
    _check_int("max_iter", max_iter, 1)
    tol = _check_float("tol", tol)
    if isinstance(G, Tensor) and G.ndim == 2 and G.shape[0] <= _PY_MAX_K:
        Gl = _work_list(G, "dual_cone_weights")
        K = len(Gl)
    else:
        Gw = _work_gramian(G, "dual_cone_weights")
        K = Gw.shape[0]
    if not isinstance(prefs, Tensor) or prefs.ndim not in (1, 2) or prefs.shape[-1] != K:
        shape = tuple(prefs.shape) if isinstance(prefs, Tensor) else type(prefs).__name__
        raise ValueError(f"prefs must have shape [{K}] or [M, {K}], got {shape}")
    if K <= _PY_MAX_K:
        Pl = prefs.detach().to(dtype=_F64).reshape(-1, K).tolist()
        if not all(math.isfinite(v) for row in Pl for v in row):
            raise SolverError("dual_cone_weights: prefs contains non-finite values (nan or inf)")
        tr = sum(Gl[i][i] for i in range(K))
        if tr < norm_eps or tr == 0.0:
            Gl = [[0.0] * K for _ in range(K)]
        else:
            Gl = [[v / tr for v in row] for row in Gl]
        for i in range(K):
            Gl[i][i] += reg_eps
        rows = []
        for p in Pl:
            bq = [sum(map(_mul, row, p)) for row in Gl]
            u = _nnqp_py(Gl, bq, max_iter, tol, "dual_cone_weights")
            rows.append([a + b for a, b in zip(p, u, strict=False)])
        return _out_list(rows, G).reshape(prefs.shape)
    P = prefs.detach().to(device="cpu", dtype=_F64).reshape(-1, K)
    if not bool(torch.isfinite(P).all()):
        raise SolverError("dual_cone_weights: prefs contains non-finite values (nan or inf)")
    tr = float(Gw.diagonal().sum())
    Gn = torch.zeros_like(Gw) if (tr < norm_eps or tr == 0.0) else Gw / tr
    Gn = Gn + reg_eps * torch.eye(K, dtype=_F64)
    out = torch.empty_like(P)
    for m in range(P.shape[0]):
        p = P[m]
        u = _nnqp(Gn, Gn @ p, max_iter, tol, "dual_cone_weights")
        out[m] = p + u
    return _out(out.reshape(prefs.shape), G)


# --------------------------------------------------------------------------------------------
# damped Newton on strictly convex potentials (Nash-MTL, FairGrad)
# --------------------------------------------------------------------------------------------


def _barrier_newton(
    C: Tensor, w0: Tensor, p: float, max_iter: int, tol: float, solver: str
) -> Tensor:
    """Solves ``(C w)_i = w_i^{-p}`` (``p = 1/α > 0``), ``w > 0``, by damped Newton on
    ``f(w) = ½wᵀCw − Σ φ(w_i)`` with ``φ' = w^{-p}``.

    Convergence: ``max_i |w_i^p (Cw)_i − 1| <= tol`` above the rounding level of ``w^p (Cw)``.
    Where that rounding level is large (``(Cw)_i`` a tiny difference of large terms, e.g. an
    exactly rank-deficient ``C`` plus a ridge) the residual is only accepted together with a
    Newton decrement below both ``tol`` and the rounding level of the gradient. Armijo
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

    w = w0.clone()
    res = float("inf")
    for it in range(max_iter + 1):
        Cw = C @ w
        wp = w**p
        # rounding level of w^p (Cw): 4 K eps w^p (|C| w)
        noise = (4.0 * K * _EPS) * wp * (Cabs @ w)
        err = (wp * Cw - 1.0).abs()
        res = float((err - noise.clamp_max(1e-2)).max())
        if res <= tol:
            return w
        grad = Cw - 1.0 / wp
        H = C + torch.diag(p * w ** (-p - 1.0))
        s = H.diagonal().rsqrt()
        Hs = s[:, None] * H * s[None, :]
        L, info = torch.linalg.cholesky_ex(Hs)
        if int(info) == 0:
            step = -s * torch.cholesky_solve((s * grad)[:, None], L)[:, 0]
        else:  # PD in exact arithmetic; rounding made it indefinite: clamp the spectrum
            lam, V = torch.linalg.eigh(Hs)
            lam = lam.clamp_min(_EPS * float(lam[-1].clamp_min(1.0)))
            step = -s * (V @ ((V.T @ (s * grad)) / lam))
        dec = -float(grad @ step)  # Newton decrement squared
        # rounding level of gᵀp: 4 K eps |p|ᵀ(|C| w + w^{-p})
        dec_noise = 4.0 * K * _EPS * float(step.abs() @ (Cabs @ w + 1.0 / wp))
        if float((err - noise).max()) <= tol and dec <= min(dec_noise, tol):
            # the residual is at its (large) rounding level and Newton cannot improve f (the
            # affine-invariant decrement bounds f - f*; an unbounded f keeps it O(1))
            return w
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
    # Only then, clamp the spectrum at 0 (restoring PSD) before adding the ridge.
    if eps > 0 and float(torch.linalg.eigvalsh(Gr).min()) <= 0.0:
        eigenvalues, eigenvectors = torch.linalg.eigh(Gw)
        Gw = (eigenvectors * eigenvalues.clamp_min(0.0)) @ eigenvectors.T
        Gr = 0.5 * (Gw + Gw.T) + torch.diag(eps * r)
    if bool((Gr.diagonal() <= 0).any()):
        raise SolverError(
            f"{solver}: G has a zero row and eps=0; the weights are unbounded (use eps > 0)"
        )
    return Gr, r


def nash_weights(
    G: Tensor, *, max_iter: int = 100, tol: float = 1e-10, eps: float = 1e-8
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

    Returns:
        :math:`\alpha > 0` of shape ``[K]`` (dtype/device of ``G``).

    Raises:
        SolverError: Invalid ``G``, zero ``G``, or no convergence.
        ValueError: Invalid keyword values.

    Example:
        >>> nash_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), eps=0.0)
        tensor([0.5000, 1.0000])
    """
    _check_int("max_iter", max_iter, 1)
    tol = _check_float("tol", tol, positive=True)
    eps = _check_float("eps", eps)
    if isinstance(G, Tensor) and G.ndim == 2 and G.shape[0] <= min(_PY_MAX_K, _PY_MAX_K_NEWTON):
        Gr = _ridged_py(_work_list(G, "nash_weights"), eps, "nash_weights")
        sl = [1.0 / math.sqrt(Gr[i][i]) for i in range(len(Gr))]
        C = [[sl[i] * v * sl[k] for k, v in enumerate(row)] for i, row in enumerate(Gr)]
        beta = _barrier_newton_py(C, [1.0] * len(Gr), 1.0, max_iter, tol, "nash_weights")
        return _out_list([a * b for a, b in zip(sl, beta, strict=False)], G)
    Gw = _work_gramian(G, "nash_weights")
    Gr, _ = _ridged(Gw, eps, "nash_weights")
    s = Gr.diagonal().rsqrt()
    C = s[:, None] * Gr * s[None, :]
    beta = _barrier_newton(C, torch.ones_like(s), 1.0, max_iter, tol, "nash_weights")
    return _out(s * beta, G)


def fairgrad_weights(
    G: Tensor, alpha: float, *, max_iter: int = 100, tol: float = 1e-10, eps: float = 1e-8
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

    Returns:
        :math:`w > 0` of shape ``[K]`` (dtype/device of ``G``).

    Raises:
        SolverError: Invalid ``G``, zero ``G``, or no convergence.
        ValueError: Invalid ``alpha`` or keyword values.

    Example:
        >>> fairgrad_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), 1.0, eps=0.0)
        tensor([0.5000, 1.0000])
    """
    alpha = _check_float("alpha", alpha, positive=True)
    _check_int("max_iter", max_iter, 1)
    tol = _check_float("tol", tol, positive=True)
    eps = _check_float("eps", eps)
    if isinstance(G, Tensor) and G.ndim == 2 and G.shape[0] <= min(_PY_MAX_K, _PY_MAX_K_NEWTON):
        Gr = _ridged_py(_work_list(G, "fairgrad_weights"), eps, "fairgrad_weights")
        K = len(Gr)
        sigma = sum(Gr[i][i] for i in range(K)) / K
        C = [[v / sigma for v in row] for row in Gr]
        expo = alpha / (alpha + 1.0)
        w0 = [C[i][i] ** (-expo) for i in range(K)]
        w = _barrier_newton_py(C, w0, 1.0 / alpha, max_iter, tol, "fairgrad_weights")
        return _out_list([v * sigma ** (-expo) for v in w], G)
    Gw = _work_gramian(G, "fairgrad_weights")
    Gr, _ = _ridged(Gw, eps, "fairgrad_weights")
    K = Gr.shape[0]
    sigma = float(Gr.diagonal().sum()) / K
    C = Gr / sigma
    expo = alpha / (alpha + 1.0)
    w0 = C.diagonal() ** (-expo)
    w = _barrier_newton(C, w0, 1.0 / alpha, max_iter, tol, "fairgrad_weights")
    return _out(w * sigma ** (-expo), G)


# --------------------------------------------------------------------------------------------
# CAGrad
# --------------------------------------------------------------------------------------------


def cagrad_weights(
    G: Tensor,
    c: float = 0.4,
    *,
    max_iter: int = 200,
    tol: float = 1e-12,
    rescale: int = 1,
    inner_max_iter: int = 250,
) -> Tensor:
    r"""CAGrad weights (Liu et al., NeurIPS 2021, "Conflict-Averse Gradient Descent").

    With :math:`g_0 = J^\top \mathbf 1/K`, :math:`b = G\mathbf 1/K` (:math:`b_i = g_i^\top g_0`)
    and :math:`r = c\lVert g_0\rVert`, :math:`\lVert g_0\rVert^2 = \mathbf 1^\top G \mathbf 1/K^2`,
    the inner problem is the convex

    .. math:: w^\star = \operatorname{argmin}_{w\in\Delta_K} F(w) = b^\top w + r\sqrt{w^\top G w},

    and the update is :math:`d = g_0 + (r/\lVert g_{w^\star}\rVert)\, g_{w^\star}`, divided by
    :math:`1 + c^2` (``rescale=1``, the official default), :math:`1` (``rescale=0``) or
    :math:`1 + c` (``rescale=2``). The returned weights satisfy :math:`d = J^\top w_{out}`:

    .. math:: w_{out} = \big(\mathbf 1/K + (r/\sqrt{w^{\star\top} G w^\star})\, w^\star\big)
              / \text{factor}.

    The official code (Cranial-XIX/CAGrad, also copied in AvivNavon/nash-mtl) minimises
    :math:`F` with ``scipy.optimize.minimize`` (SLSQP, ``x0 = 1/K``) and adds absolute ``1e-8``
    guards (``sqrt(GG.mean() + 1e-8)``, ``sqrt(wᵀGw + 1e-8)``, ``c/(‖g_w‖ + 1e-8)``) which we
    drop (they make the result scale dependent). Here :math:`F` is minimised exactly with
    :math:`\sqrt q = \min_{t>0} q/(2t) + t/2`: for fixed :math:`t`,
    :math:`\min_{w\in\Delta} b^\top w + \tfrac{r}{2t} w^\top G w` is the min-norm problem of the
    shifted gradients :math:`g_i + (t/r) g_0` (:func:`min_norm_weights`, exact active set) and
    the optimal :math:`t` is the root of :math:`t = \lVert g_{w(t)}\rVert`, found by safeguarded
    regula falsi (Illinois) to relative ``tol``; for small ``K`` the trial points are instead
    predicted exactly on the current face (there :math:`w(t)` is affine in :math:`t`), which
    needs a handful of inner solves instead of ~17, with the same bracketing stopping rule.
    Degenerate cases: :math:`g_0 = 0` or :math:`c = 0` give :math:`d = g_0`. If the optimum
    has :math:`g_{w^\star} = 0` (the hull contains 0 and :math:`F^\star = 0`; detected as
    :math:`\lVert g_{w^\star}\rVert \le 10^{-6}\max_i \lVert g_i\rVert`, the rounding level
    of a norm computed from :math:`G`), the direction :math:`g_{w^\star}/\lVert g_{w^\star}
    \rVert` is undefined (the official code then amplifies rounding noise by ``c/(‖g_w‖+1e-8)``)
    and we return :math:`d = g_0`, i.e. ``1/K / factor``.

    Args:
        G: Gramian ``[K, K]``.
        c: Conflict-aversion radius :math:`c \ge 0` (official default for the function 0.5,
            experiments use 0.4).
        max_iter: Cap on root-finding iterations (exceeding it raises).
        tol: Relative tolerance on :math:`t`.
        rescale: 0, 1 or 2 as in the official code.
        inner_max_iter: ``max_iter`` of each inner min-norm solve.

    Returns:
        Weights of shape ``[K]`` (dtype/device of ``G``).

    Raises:
        SolverError: Invalid ``G`` or no convergence.
        ValueError: Invalid ``c``, ``rescale`` or keyword values.

    Example:
        >>> cagrad_weights(torch.eye(2), c=0.0)
        tensor([0.5000, 0.5000])
    """
    c = _check_float("c", c)
    _check_int("max_iter", max_iter, 1)
    _check_int("inner_max_iter", inner_max_iter, 1)
    tol = _check_float("tol", tol)
    if rescale not in (0, 1, 2) or isinstance(rescale, bool):
        raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
    factor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    if isinstance(G, Tensor) and G.ndim == 2 and G.shape[0] <= _PY_MAX_K:
        Gl = _work_list(G, "cagrad_weights")
        K = len(Gl)
        m = 1.0 / K
        bl = [sum(row) * m for row in Gl]
        gg = sum(bl) * m
        r = c * math.sqrt(max(gg, 0.0))
        dmax = max(Gl[i][i] for i in range(K))
        if c < 1e-12 or r <= 0.0 or gg <= 1e-300 * max(dmax, 1e-300):
            return _out_list([m / factor] * K, G)

        def inner_py(t: float) -> tuple[list[float], float]:
            beta = t / r
            b2 = beta * beta * gg
            Gs = [
                [v + beta * (bl[i] + bl[k]) + b2 for k, v in enumerate(row)]
                for i, row in enumerate(Gl)
            ]
            if K == 1:
                w = [1.0]
            else:
                w = _min_norm_special_py(Gs) or _mgda_active_set_py(Gs, inner_max_iter, 1e-12)
            Gw_w = [sum(map(_mul, row, w)) for row in Gl]
            q = sum(map(_mul, w, Gw_w))
            st = math.sqrt(max(q, 0.0))
            # root of s(t) = t predicted on the current face S = {w > 0}: there the minimiser of
            # wᵀGw + 2β bᵀw, 1ᵀw = 1 is affine in β, w(β) = w + (β - β_c) w1, so s(t)² = t² is
            # a quadratic equation in β (a trial point only: the bracket decides)
            S = [i for i in range(K) if w[i] > 0]
            if len(S) < 2:
                return w, st, None
            if not all(Gs[i][i] > 0 for i in S):
                return w, st, None
            dS = [1.0 / math.sqrt(Gs[i][i]) for i in S]
            A = [[dS[a] * Gs[i][k] * dS[e] for e, k in enumerate(S)] for a, i in enumerate(S)]
            L = _chol_py(A, 1e-8)
            if L is None:  # singular face: no prediction
                return w, st, None
            av = [x * y for x, y in zip(dS, _chol_solve_py(L, dS), strict=False)]
            bS = [dS[a] * bl[i] for a, i in enumerate(S)]
            ev = [x * y for x, y in zip(dS, _chol_solve_py(L, bS), strict=False)]
            sa, se = sum(av), sum(ev)
            if not sa > 0.0:
                return w, st, None
            w1 = [0.0] * K
            for a, i in enumerate(S):
                w1[i] = av[a] * se / sa - ev[a]
            Gw1 = [sum(map(_mul, row, w1)) for row in Gl]
            q1 = sum(map(_mul, w, Gw1))
            q2 = sum(map(_mul, w1, Gw1))
            r2 = r * r
            qa, qb, qc = q2 - r2, q1 - r2 * beta, q - r2 * beta * beta  # qa δ² + 2 qb δ + qc = 0
            roots = []
            if qa != 0.0:
                disc = qb * qb - qa * qc
                if disc >= 0.0:
                    sd = math.sqrt(disc)
                    # numerically stable pair of roots
                    big = -(qb + math.copysign(sd, qb))
                    if big != 0.0:
                        roots = [big / qa, qc / big]
            elif qb != 0.0:
                roots = [-qc / (2.0 * qb)]
            ts = [r * (beta + dl) for dl in roots if r * (beta + dl) > 0.0]
            return w, st, (min(ts, key=lambda x: abs(x - t)) if ts else None)

        smax = math.sqrt(dmax)
        w_star, s_star = _cagrad_root(inner_py, smax, max_iter, tol)
        if s_star <= 1e-6 * smax:
            return _out_list([m / factor] * K, G)
        return _out_list([(m + (r / s_star) * v) / factor for v in w_star], G)
    Gw = _work_gramian(G, "cagrad_weights")
    K = Gw.shape[0]
    mean = torch.full((K,), 1.0 / K, dtype=_F64)
    gg = float(mean @ Gw @ mean)
    r = c * math.sqrt(max(gg, 0.0))
    # c < 1e-12: the conflict-averse term is below rounding relative to g0, d = g0
    if c < 1e-12 or r <= 0.0 or gg <= 1e-300 * max(float(Gw.diagonal().max()), 1e-300):
        return _out(mean / factor, G)
    b = Gw @ mean

    def inner(t: float) -> tuple[Tensor, float]:
        beta = t / r
        Gs = Gw + beta * (b[:, None] + b[None, :]) + beta * beta * gg
        Gs = 0.5 * (Gs + Gs.T)
        w = torch.ones(1, dtype=_F64) if K == 1 else _min_norm_host(Gs, inner_max_iter)
        return w, math.sqrt(max(float(w @ Gw @ w), 0.0)), None

    smax = math.sqrt(float(Gw.diagonal().max()))
    w_star, s_star = _cagrad_root(inner, smax, max_iter, tol)
    if s_star <= 1e-6 * smax:
        # g_{w*} = 0 up to rounding (sqrt(eps) relative): degenerate, return d = g0
        return _out(mean / factor, G)
    return _out((mean + (r / s_star) * w_star) / factor, G)


def _cagrad_root(inner, smax: float, max_iter: int, tol: float):  # noqa: ANN001
    """Root of ``h(t) = s(t) - t`` on ``[0, smax]`` for CAGrad.

    ``inner(t)`` returns ``(w(t), s(t), t_pred)`` with an optional predicted root ``t_pred``
    (``None`` if unknown). Bracketing: safeguarded regula falsi (Illinois, every other step a
    bisection). A prediction from the latest evaluation, nudged by ``tol·hi/4`` past the root
    so that the next evaluation closes the bracket, replaces the regula falsi step while it lies
    strictly inside the bracket and the bracket keeps halving at least every two iterations.
    The stopping rule (bracket width ``<= tol·hi``) is the same either way. Returns
    ``(w*, s*)``."""
    hi = smax
    w_hi, s_hi, pred = inner(hi)
    if s_hi - hi > 0:  # cannot happen in exact arithmetic (s <= smax)
        return w_hi, s_hi
    lo = 0.0
    h_hi = s_hi - hi
    pred_hi, h_last = pred, h_hi
    w_lo, s_lo, pred = inner(0.0)
    h_lo = s_lo - lo
    # the prediction of the evaluation nearer the root (|h| smaller) is the better one
    if pred_hi is not None and (pred is None or abs(h_hi) < abs(h_lo)):
        pred, h_last = pred_hi, h_hi
    else:
        h_last = h_lo
    w_star, s_star = w_hi, s_hi
    side = 0
    it = 0
    floor = 1e-7 * smax  # below 1e-6 smax the result is declared degenerate anyway
    widths = [float("inf"), float("inf")]
    while True:
        it += 1
        if it > max_iter:
            raise SolverError(
                f"cagrad_weights: root finding did not converge within max_iter={max_iter} "
                f"iterations (bracket [{lo:.3e}, {hi:.3e}], residual {h_hi:.3e})"
            )
        if hi - lo <= tol * hi or hi <= floor:
            break
        t = None
        if pred is not None and hi - lo <= 0.5 * widths[-2]:
            t = pred + (0.25 * tol * hi if h_last > 0 else -0.25 * tol * hi)
            if not (lo < t < hi):
                t = None
        if t is None:
            t = (lo * h_hi - hi * h_lo) / (h_hi - h_lo) if h_hi != h_lo else 0.5 * (lo + hi)
            if not (lo < t < hi):
                t = 0.5 * (lo + hi)
            if it % 2 == 0:  # guaranteed interval reduction (h may jump at a kink)
                t = 0.5 * (lo + hi)
        widths.append(hi - lo)
        w_t, s_t, pred = inner(t)
        h_t = s_t - t
        h_last = h_t
        if h_t == 0.0:
            w_star, s_star = w_t, s_t
            break
        if h_t > 0:
            lo, h_lo, w_lo, s_lo = t, h_t, w_t, s_t
            if side == -1:
                h_hi *= 0.5
            side = -1
        else:
            hi, h_hi, w_hi = t, h_t, w_t
            w_star, s_star = w_t, s_t
            if side == 1:
                h_lo *= 0.5
            side = 1
    if lo > 0.0 and s_lo > 0.0 and abs(s_lo - lo) < abs(s_star - hi):
        w_star, s_star = w_lo, s_lo
    return w_star, s_star


def _min_norm_host(Gs: Tensor, max_iter: int) -> Tensor:
    """min_norm_weights on a validated float64 host Gramian (special cases included)."""
    K = Gs.shape[0]
    diag = Gs.diagonal()
    if float(diag.max()) <= 0.0:
        return torch.full((K,), 1.0 / K, dtype=_F64)
    zero = diag <= 0
    if bool(zero.any()):
        w = zero.to(_F64)
        return w / w.sum()
    if K == 2:
        g11, g12, g22 = float(Gs[0, 0]), float(Gs[0, 1]), float(Gs[1, 1])
        den = g11 + g22 - 2.0 * g12
        gamma = 0.5 if den <= 0 else min(max((g22 - g12) / den, 0.0), 1.0)
        return torch.tensor([gamma, 1.0 - gamma], dtype=_F64)
    return _mgda_active_set(Gs, max_iter, 1e-12)


# --------------------------------------------------------------------------------------------
# small-K host paths in plain Python floats
# --------------------------------------------------------------------------------------------
#
# For small K every torch call on a K x K tensor costs several microseconds of dispatch, far
# more than its arithmetic. The functions below run the *same* algorithms (same iterates, stopping
# rules, caps, tolerances and error messages) on lists of Python floats, with a hand-written
# Cholesky factorisation for the well-conditioned faces / Newton systems. Whenever that fast
# factorisation is not applicable (a face with a small pivot, an indefinite Newton matrix) the
# step is delegated to the torch helper above (eigendecomposition), so singular and degenerate
# faces are handled exactly as on the torch path. The public solvers use these for
# ``K <= _PY_MAX_K`` (``_PY_MAX_K_NEWTON`` for Nash-MTL / FairGrad); the crossovers were
# measured on CPU with one thread, and both paths agree to rounding.

_PY_MAX_K = 16
# damped Newton (Nash-MTL, FairGrad): dense K x K Cholesky per step, crossover lower
_PY_MAX_K_NEWTON = 12


def _work_list(G: Tensor, solver: str) -> list[list[float]]:
    """:func:`_work_gramian` on a list of Python floats (same checks, same messages)."""
    if not isinstance(G, Tensor):
        raise SolverError(f"{solver}: G must be a torch.Tensor, got {type(G).__name__}")
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise SolverError(f"{solver}: G must be a square K x K matrix, got shape {tuple(G.shape)}")
    if G.shape[0] == 0:
        raise SolverError(f"{solver}: G must have at least one row (K >= 1), got K = 0")
    if G.is_complex() or not G.is_floating_point():
        raise SolverError(f"{solver}: G must be a real floating point tensor, got {G.dtype}")
    rows = G.detach().tolist()  # float16/32/64 values are exact in Python floats
    isfinite = math.isfinite
    for row in rows:
        if not all(map(isfinite, row)):
            raise SolverError(f"{solver}: G contains non-finite values (nan or inf)")
    K = len(rows)
    A = [[0.5 * (rows[i][j] + rows[j][i]) for j in range(K)] for i in range(K)]
    for i in range(K):
        if A[i][i] < 0:
            raise SolverError(f"{solver}: G has a negative diagonal entry, so it is not PSD")
    for i in range(K):
        if not A[i][i] > 0:  # a PSD matrix with G_ii = 0 has a zero row
            for j in range(K):
                A[i][j] = 0.0
                A[j][i] = 0.0
    return A


def _out_list(x: list, like: Tensor) -> Tensor:
    return torch.tensor(x, dtype=like.dtype, device=like.device)


def _chol_py(A: list[list[float]], min_pivot2: float) -> list[list[float]] | None:
    """Cholesky factor of ``A`` or ``None`` when a squared pivot is ``<= min_pivot2`` (or nan)."""
    n = len(A)
    L = [[0.0] * n for _ in range(n)]
    for i in range(n):
        Li = L[i]
        Ai = A[i]
        for j in range(i):
            Lj = L[j]
            s = Ai[j]
            for k in range(j):
                s -= Li[k] * Lj[k]
            Li[j] = s / Lj[j]
        s = Ai[i]
        for k in range(i):
            s -= Li[k] * Li[k]
        if not s > min_pivot2:
            return None
        Li[i] = math.sqrt(s)
    return L


def _chol_solve_py(L: list[list[float]], b: list[float]) -> list[float]:
    n = len(b)
    y = [0.0] * n
    for i in range(n):
        Li = L[i]
        s = b[i]
        for k in range(i):
            s -= Li[k] * y[k]
        y[i] = s / Li[i]
    x = [0.0] * n
    for i in range(n - 1, -1, -1):
        s = y[i]
        for k in range(i + 1, n):
            s -= L[k][i] * x[k]
        x[i] = s / L[i][i]
    return x


def _t(x: list) -> Tensor:
    return torch.tensor(x, dtype=_F64)


def _face_min_norm_py(Gn: list[list[float]], S: list[int], y_cur: list[float]) -> list[float]:
    """:func:`_face_min_norm` on the face ``S`` of ``Gn``."""
    d = [1.0 / math.sqrt(max(Gn[i][i], 1e-300)) for i in S]
    n = len(S)
    A = [[d[a] * Gn[S[a]][S[b]] * d[b] for b in range(n)] for a in range(n)]
    L = _chol_py(A, 1e-8)
    if L is None:  # (nearly) singular face: exact eigendecomposition path
        Gs = [[Gn[i][k] for k in S] for i in S]
        return _face_min_norm(_t(Gs), _t(y_cur)).tolist()
    z = _chol_solve_py(L, d)
    y = [d[a] * z[a] for a in range(n)]
    tot = sum(y)
    return [v / tot for v in y]


def _mgda_active_set_py(G: list[list[float]], max_iter: int, tol: float) -> list[float]:
    """:func:`_mgda_active_set` in Python floats."""
    K = len(G)
    scale = max(G[i][i] for i in range(K))
    Gn = [[v / scale for v in row] for row in G]
    diag = [Gn[i][i] for i in range(K)]
    sq = [math.sqrt(v) for v in diag]
    i0 = diag.index(min(diag))
    S = [i0]
    w = [0.0] * K
    w[i0] = 1.0
    it = 0
    gap = float("inf")
    thresh = 0.0
    noise_c = 4.0 * K * _EPS
    while True:
        Gw = [sum([row[k] * w[k] for k in S]) for row in Gn]
        val = sum(w[k] * Gw[k] for k in S)
        m = sum(sq[k] * w[k] for k in S)
        if len(S) >= K:
            break
        inS = set(S)
        j = -1
        best = float("inf")
        for i in range(K):
            if i in inS:
                continue
            sl = Gw[i] - val + noise_c * m * (sq[i] + m)
            if j < 0 or sl < best:
                j, best = i, sl
        gap = val - Gw[j]
        thresh = tol * val + noise_c * m * (sq[j] + m)
        if gap <= thresh:
            break
        S.append(j)
        while True:
            it += 1
            if it > max_iter:
                raise SolverError(
                    f"min_norm_weights(method='active_set'): no convergence within max_iter="
                    f"{max_iter} iterations (KKT residual {gap:.3e} > {thresh:.3e})"
                )
            wS = [w[k] for k in S]
            y = _face_min_norm_py(Gn, S, wS)
            if all(v > 0 for v in y):
                w = [0.0] * K
                for k, v in zip(S, y, strict=False):
                    w[k] = v
                break
            inf = float("inf")
            ratios = [
                (ws / max(ws - yv, 1e-300) if ws > 0 else 0.0) if yv <= 0 else inf
                for ws, yv in zip(wS, y, strict=False)
            ]
            theta = min(ratios)
            block = ratios.index(theta)
            if S[block] == j and theta <= 0.0:
                S.pop(block)
                return w
            new = [max(ws + theta * (yv - ws), 0.0) for ws, yv in zip(wS, y, strict=False)]
            new[block] = 0.0
            w = [0.0] * K
            for k, v in zip(S, new, strict=False):
                w[k] = v
            S = [S[k] for k in range(len(S)) if new[k] > 0]
            tot = sum(w)
            w = [v / tot for v in w]
    return w


def _min_norm_special_py(G: list[list[float]]) -> list[float] | None:
    """The closed-form cases of :func:`min_norm_weights` (``None`` if none applies)."""
    K = len(G)
    diag = [G[i][i] for i in range(K)]
    if max(diag) <= 0.0:
        return [1.0 / K] * K
    nz = sum(1 for v in diag if v <= 0)
    if nz:
        return [(1.0 if v <= 0 else 0.0) / nz for v in diag]
    if K == 1:
        return [1.0]
    if K == 2:
        g11, g12, g22 = G[0][0], G[0][1], G[1][1]
        den = g11 + g22 - 2.0 * g12
        gamma = 0.5 if den <= 0 else min(max((g22 - g12) / den, 0.0), 1.0)
        return [gamma, 1.0 - gamma]
    return None


def _face_qp_py(
    Qs: list[list[float]], bs: list[float], F: list[int], x_cur: list[float]
) -> tuple[list[float], bool]:
    """:func:`_face_qp` on the face ``F`` of the unit-diagonal ``Qs``."""
    A = [[Qs[i][k] for k in F] for i in F]
    c = [bs[i] for i in F]
    L = _chol_py(A, 1e-8)
    if L is None:  # (nearly) singular face: exact eigendecomposition path
        x, bounded = _face_qp(_t(A), _t(c), _t(x_cur))
        return x.tolist(), bounded
    return [-v for v in _chol_solve_py(L, c)], True


def _nnqp_py(
    Q: list[list[float]], b: list[float], max_iter: int, tol: float, solver: str
) -> list[float]:
    """:func:`_nnqp` in Python floats."""
    n = len(b)
    d = [Q[i][i] for i in range(n)]
    zero = [v <= 0 for v in d]
    for i in range(n):
        if zero[i] and b[i] < 0:
            raise SolverError(
                f"{solver}: objective unbounded below (Q[{i},{i}] = 0 and b[{i}] = {b[i]:.3e})"
            )
    s = [0.0 if zero[i] else 1.0 / math.sqrt(max(d[i], 1e-300)) for i in range(n)]
    Qs = [[s[i] * Q[i][k] * s[k] for k in range(n)] for i in range(n)]
    bs = [s[i] * b[i] for i in range(n)]
    u = [0.0] * n
    bscale = max(abs(v) for v in bs) if n else 0.0
    if bscale == 0.0:
        return u
    F: list[int] = []
    it = 0
    worst = 0.0
    thr = 0.0
    inf = float("inf")
    while True:
        thr = tol * (bscale + sum(abs(v) for v in u))
        inF = set(F)
        j = -1
        gj = inf
        for i in range(n):
            if zero[i] or i in inF:
                continue
            row = Qs[i]
            g = sum(row[k] * u[k] for k in F) + bs[i]
            if j < 0 or g < gj:
                j, gj = i, g
        if j < 0:
            break
        worst = -gj
        if worst <= thr:
            break
        F.append(j)
        while True:
            it += 1
            if it > max_iter:
                raise SolverError(
                    f"{solver}: no convergence within max_iter={max_iter} iterations "
                    f"(KKT residual {worst:.3e} > {thr:.3e})"
                )
            uF = [u[k] for k in F]
            x, bounded = _face_qp_py(Qs, bs, F, uF)
            if bounded and all(v > 0 for v in x):
                u = [0.0] * n
                for k, v in zip(F, x, strict=False):
                    u[k] = v
                break
            if bounded:
                p = [xv - uv for xv, uv in zip(x, uF, strict=False)]
                neg = [xv <= 0 for xv in x]
            else:
                p = x
                neg = [pv < 0 for pv in p]
                if not any(neg):
                    raise SolverError(
                        f"{solver}: objective unbounded below along a non-negative direction "
                        f"of the null space of Q (after {it} iterations)"
                    )
            # -p >= u_F >= 0 where neg; -p == 0 only for the entering index at x = 0 (blocks)
            ratios = [
                (uv / -pv if pv < 0 else 0.0) if ng else inf
                for uv, pv, ng in zip(uF, p, neg, strict=False)
            ]
            theta = min(ratios)
            block = ratios.index(theta)
            if F[block] == j and theta <= 0.0 and bounded:
                F.pop(block)
                return [s[i] * u[i] for i in range(n)]
            new = [max(uv + theta * pv, 0.0) for uv, pv in zip(uF, p, strict=False)]
            new[block] = 0.0
            u = [0.0] * n
            for k, v in zip(F, new, strict=False):
                u[k] = v
            F = [F[k] for k in range(len(F)) if new[k] > 0]
            if not F:
                break
    return [s[i] * u[i] for i in range(n)]


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
        if _chol_py(A, 1e-6) is None:
            Grt, _ = _ridged(_t(Gw), eps, solver)
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
        return [sum(map(_mul, row, v)) for row in M]

    nc = 4.0 * K * _EPS
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
        L = _chol_py(Hs, 0.0)
        if L is not None:
            z = _chol_solve_py(L, [a * b for a, b in zip(s, grad, strict=False)])
            step = [-a * b for a, b in zip(s, z, strict=False)]
        else:  # PD in exact arithmetic; rounding made it indefinite: clamp the spectrum
            lam, V = torch.linalg.eigh(_t(Hs))
            lam = lam.clamp_min(_EPS * float(lam[-1].clamp_min(1.0)))
            st = _t(s)
            step = (-st * (V @ ((V.T @ (st * _t(grad))) / lam))).tolist()
        dec = -sum(map(_mul, grad, step))
        dec_noise = nc * sum(abs(a) * (b + 1.0 / c) for a, b, c in zip(step, Caw, wp, strict=False))
        if max(e - nz for e, nz in zip(err, noise, strict=False)) <= tol and dec <= min(
            dec_noise, tol
        ):
            return w
        if it == max_iter:
            break
        tmax = min(
            (-wv / sv for wv, sv in zip(w, step, strict=False) if sv < 0), default=float("inf")
        )
        t = min(1.0, 0.99 * tmax)
        if dec < 1e-3 and t == 1.0:
            w = [a + b for a, b in zip(w, step, strict=False)]
            continue
        sCs = sum(map(_mul, step, matvec(C, step)))
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
