"""Non-negative QP and the projection onto the dual cone of the task gradients (UPGrad, DualProj).

Torch and plain-Python paths side by side. The torch path of :func:`dual_cone_weights` solves
all of its M problems (UPGrad: one per task, sharing one Gramian) together.
"""

from __future__ import annotations

import functools
import math
from operator import mul

import torch
from torch import Tensor

from taskbalance._solvers._common import (
    F64,
    TINY,
    Backend,
    SolverError,
    as_f64,
    cap_error,
    chol_py,
    chol_solve_py,
    corral_revisited,
    nearest_psd,
    select_backend,
    to_output,
    work_list,
    work_tensor,
)
from taskbalance._validation import check_nonnegative, check_positive_int

__all__ = ["ActiveSets", "dual_cone_weights", "nonneg_qp"]

_NON_FINITE_PREFS = "dual_cone_weights: prefs contains non-finite values (nan or inf)"

#: Largest K solved on the plain-Python path by ``backend="auto"``: one problem, and M problems
#: (the Python path solves them one after another, the torch path all at once). Measured inside
#: the training loop of ``benchmarks/overhead.py`` (one thread; Python / torch, µs): DualProj's
#: rule 376 / 575 at K = 32 and 534 / 655 at K = 40; UPGrad's K problems 434 / 532 at K = 8 and
#: 1031 / 644 at K = 12.
PYTHON_MAX_K = 40
PYTHON_MAX_K_BATCH = 8

# Eigenvalues of a unit-diagonal (Jacobi-scaled) PSD block below ``_RANK_RTOL * max(1, λ_max)``
# are treated as exact zeros (duplicated / linearly dependent task gradients).
_RANK_RTOL = 1e-12
# Primal-dual active-set sweeps of the batched torch path before the sequential fallback.
_PDAS_MAX_SWEEPS = 30


class ActiveSets:
    """Where the batched torch path of :func:`dual_cone_weights` starts its next solve.

    Holds the free sets of the last solve's solutions (None before one, or after a solve that
    the sequential method finished). The gradients of consecutive training steps change
    little, so their QPs mostly share their active sets: started from the last ones, the
    primal-dual active-set iteration usually confirms them in one sweep instead of finding
    them in two (UPGrad at K = 16 inside a training step). The answer does not depend on the
    start, to rounding: a solve from a start is kept only where every row settled with its
    minimiser unique (strict complementarity on a well-conditioned face); otherwise the problem
    is solved cold, as it is without a start. A start of the wrong shape is ignored.
    """

    def __init__(self) -> None:
        self.free: Tensor | None = None


class _UnboundedError(SolverError):
    """The QP is unbounded below: for :func:`dual_cone_weights`, a Gramian that is not PSD."""


def _unbounded(solver: str, i: int, q: float, b: float) -> SolverError:
    return _UnboundedError(
        f"{solver}: objective unbounded below (Q[{i},{i}] = {q} and b[{i}] = {b:.3e})"
    )


# --------------------------------------------------------------------------------------------
# torch path
# --------------------------------------------------------------------------------------------


def _null_floor(bscale: float, consistent: bool) -> float:
    """The least reference for a face's null component of the (Jacobi-scaled) linear term.

    When ``b = Qp`` (the projections of :func:`dual_cone_weights` and CAGrad), ``b`` has no
    component in ``Q``'s null space in exact arithmetic: what a face's null space catches of
    it is rounding of the problem's scale, ``‖Jᵀp‖ ≥`` ``bscale`` (the largest scaled entry of
    ``b``), which may be far above the face's own ``‖c‖`` (a face of nearly opposite gradients,
    nearly orthogonal to ``Jᵀp``). Judged against the face's ``‖c‖`` alone, that rounding
    read as a direction of unbounded descent and killed the solve. For a general ``b``
    (``nonneg_qp``) the face's own ``‖c‖`` is the reference.
    """
    return bscale if consistent else 0.0


def _face_qp(A: Tensor, c: Tensor, x_cur: Tensor, floor: float = 0.0) -> tuple[Tensor, bool]:
    """Minimiser of ``½xᵀAx + cᵀx`` (unit-diagonal PSD ``A``) nearest ``x_cur``.

    Returns ``(x, True)``, or ``(p, False)`` with a descent direction ``p`` along which the
    objective decreases linearly without bound (``c`` has a significant null-space component:
    above 1e-4 of ``max(‖c‖, floor)``).
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
    if float(cn.norm()) > 1e-4 * max(float(c.norm()), floor, 1e-300):
        return -(V @ cn), False
    inv = torch.where(null, torch.zeros_like(lam), 1.0 / torch.where(null, 1.0, lam))
    cur = V.T @ x_cur
    xv = torch.where(null, cur, -inv * cv)
    return V @ xv, True


def _scaling(Q: Tensor) -> tuple[Tensor, Tensor]:
    d = Q.diagonal()
    zero = d <= 0
    s = torch.where(zero, torch.zeros_like(d), d.clamp_min(TINY).rsqrt())
    return s, zero


def _nnqp_torch(
    Q: Tensor, b: Tensor, max_iter: int, tol: float, solver: str, consistent: bool = False
) -> Tensor:
    """Lawson-Hanson style primal active set for ``min ½uᵀQu + bᵀu, u ≥ 0`` (float64 host).

    ``consistent``: ``b = Qp`` for some ``p`` (see :func:`_null_floor`)."""
    n = b.shape[0]
    s, zero = _scaling(Q)
    if bool((zero & (b < 0)).any()):
        i = int(torch.nonzero(zero & (b < 0))[0])
        raise _unbounded(solver, i, 0.0, float(b[i]))
    Qs = s[:, None] * Q * s[None, :]
    bs = s * b
    u = torch.zeros(n, dtype=F64)
    bscale = float(bs.abs().max())
    if bscale == 0.0:
        return u
    floor = _null_floor(bscale, consistent)
    F: list[int] = []
    it = 0
    visited: set[frozenset[int]] = set()
    while True:
        if corral_revisited(visited, F):
            break
        g = Qs @ u + bs
        thr = tol * (bscale + float(u.abs().sum()))
        mask = ~zero
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
                raise cap_error(solver, max_iter, worst, thr)
            idx = torch.tensor(F, dtype=torch.long)
            uF = u[idx]
            x, bounded = _face_qp(Qs[idx][:, idx], bs[idx], uF, floor)
            if bounded and bool((x > 0).all()):
                u = torch.zeros(n, dtype=F64)
                u[idx] = x
                break
            if bounded:
                p = x - uF
                neg = x <= 0
            else:
                p = x
                neg = p < 0
                if not bool(neg.any()):
                    raise _UnboundedError(
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
                return s * u
            new = (uF + theta * p).clamp_min(0.0)
            new[block] = 0.0
            u = torch.zeros(n, dtype=F64)
            u[idx] = new
            F = [F[k] for k in range(len(F)) if new[k] > 0]
            if not F:
                break
    return s * u


def _nnqp_batched(
    Q: Tensor,
    B: Tensor,
    max_iter: int,
    tol: float,
    solver: str,
    start: ActiveSets | None = None,
    consistent: bool = False,
) -> Tensor:
    """Solves ``min ½uᵀQu + b_mᵀu, u ≥ 0`` for every row ``b_m`` of ``B`` together
    (``consistent``: each ``b_m = Q p_m``, see :func:`_null_floor`).

    A primal-dual active-set iteration (Hintermüller, Ito & Kunisch 2002) run on all rows at
    once: with free sets ``F_m``, one batched Cholesky solve of the masked systems
    ``Q_FF u_F = −b_F`` gives every row's face minimiser and gradient ``g = Qu + b``, and
    ``F_m ← {i ∈ F_m : u_i > 0} ∪ {i ∉ F_m : g_i < −thr}``. A row whose set no longer changes
    satisfies exactly the KKT test of :func:`_nnqp_torch` (``u_F > 0``, ``g_F = 0``,
    ``g ≥ −thr`` elsewhere), so it is solved. A row whose face is singular or badly conditioned
    (where Cholesky pivots are not bounded away from 0) or that is not settled within
    ``_PDAS_MAX_SWEEPS`` sweeps is solved by the sequential active set instead, exactly.
    ``start`` (see :class:`ActiveSets`) gives the first free sets and receives the last.
    """
    # Inside a training step each call on these small tensors costs several times its isolated
    # time, so a sweep is kept to about twenty tensor calls (views included) and three small
    # host transfers, the decisions made on the host (it was about 35). A zero row of Q (a zero
    # task gradient) has b_i = 0 and g_i = 0 exactly, so it never enters a free set.
    M, n = B.shape
    factors, zero = _scale_factors(Q.diagonal().tolist())
    if any(zero):
        for row in B.tolist():
            for i in range(n):
                if zero[i] and row[i] < 0:
                    raise _unbounded(solver, i, 0.0, row[i])
    s = torch.tensor(factors, dtype=F64)
    Qs = s[:, None] * Q * s[None, :]  # in this order: s_i·s_j alone overflows for G_ii < 1e-308
    # A = I on the bound indices and Qs (unit diagonal) on the free ones: I + (F ⊗ F) ∘ off
    off_diagonal = Qs.clone()
    off_diagonal.diagonal().zero_()
    eye = torch.eye(n, dtype=F64)
    Bs = B * s
    neg_Bs = -Bs
    base = tol * torch.linalg.vector_norm(Bs, float("inf"), dim=1, keepdim=True)
    given = None if start is None else start.free
    if given is not None and given.shape != (M, n):
        given = None  # another problem's start
    # cold, the most negative gradients at u = 0 start free
    free = Bs < -base if given is None else given
    X = torch.zeros(M, n, dtype=F64)
    settled = [False] * M
    for _ in range(_PDAS_MAX_SWEEPS):
        # every row is re-solved at every sweep (a settled row reproduces itself): gathering the
        # unsettled ones (about half after the first sweep) saved 0% of UPGrad's rule at K = 16
        # and 4% at K = 40 inside a training step, for the one to three sweeps this usually takes
        Fm = free.to(F64)
        A = torch.addcmul(eye, Fm[:, :, None] * Fm[:, None, :], off_diagonal)
        L, info = torch.linalg.cholesky_ex(A)
        X = torch.cholesky_solve((Fm * neg_Bs)[:, :, None], L)[:, :, 0]
        g = torch.addmm(Bs, X, Qs)
        thr = torch.add(base, torch.linalg.vector_norm(X, 1, dim=1, keepdim=True), alpha=tol)
        new = torch.where(free, X, -(g + thr)) > 0
        pivots = L.diagonal(dim1=1, dim2=2).amin(dim=1)
        changed = (new != free).any(dim=1)
        failed, smallest, moved = info.tolist(), pivots.tolist(), changed.tolist()
        ok = [f == 0 and p > 1e-4 for f, p in zip(failed, smallest, strict=True)]
        settled = [o and not c for o, c in zip(ok, moved, strict=True)]
        if all(settled) or not all(ok):  # a singular face: the sequential method takes over
            break
        free = new
    # A started solve is kept only where every row settled with its minimiser unique: strict
    # complementarity (no index at its bound with a zero gradient) on a face whose Cholesky
    # pivots are bounded away from 0. Otherwise (duplicated or collinear task gradients give a
    # QP several minimisers) the rows that settled, or went to the sequential method, from this
    # start may hold other minimisers than a cold start's: the problem is solved cold.
    if (
        given is not None
        and start is not None
        and not (all(settled) and bool((free | (g > thr)).all()))
    ):
        start.free = None
        return _nnqp_batched(Q, B, max_iter, tol, solver, start, consistent)
    if start is not None:
        start.free = free if all(settled) else None
    U = X
    for m in (m for m in range(M) if not settled[m]):
        # the sequential active set rescales by s itself: hand it the unscaled problem
        U[m] = _nnqp_torch(Q, B[m], max_iter, tol, solver, consistent) / torch.where(s == 0, 1.0, s)
    return U * s


# --------------------------------------------------------------------------------------------
# plain-Python path
# --------------------------------------------------------------------------------------------


def _face_qp_py(
    Qs: list[list[float]], bs: list[float], F: list[int], x_cur: list[float], floor: float = 0.0
) -> tuple[list[float], bool]:
    """:func:`_face_qp` on the face ``F`` of the unit-diagonal ``Qs``."""
    if len(F) == 1:  # the entering index alone: chol_py and chol_solve_py's arithmetic, inline
        pivot = Qs[F[0]][F[0]]
        if pivot > 1e-8:
            root = math.sqrt(pivot)
            return [-(bs[F[0]] / root / root)], True
    A = [[Qs[i][k] for k in F] for i in F]
    c = [bs[i] for i in F]
    L = chol_py(A, 1e-8)
    if L is None:  # (nearly) singular face: the exact eigendecomposition path
        x, bounded = _face_qp(as_f64(A), as_f64(c), as_f64(x_cur), floor)
        return x.tolist(), bounded
    return [-v for v in chol_solve_py(L, c)], True


_Scaling = tuple[list[float], list[bool], list[list[float]]]


def _jacobi_scaling(Q: list[list[float]]) -> _Scaling:
    """``s = diag(Q)^{-1/2}`` (0 on zero rows), the zero rows, and the unit-diagonal
    ``Qs = S Q S``: what every QP on ``Q`` shares (UPGrad solves K of them)."""
    n = len(Q)
    s, zero = _scale_factors([Q[i][i] for i in range(n)])
    Qs = [[s[i] * Q[i][k] * s[k] for k in range(n)] for i in range(n)]
    return s, zero, Qs


def _scale_factors(diagonal: list[float]) -> tuple[list[float], list[bool]]:
    """``s = diag^{-1/2}`` (0 on zero rows) and which rows are zero, in Python floats."""
    zero = [d <= 0 for d in diagonal]
    return [0.0 if z else d**-0.5 for d, z in zip(diagonal, zero, strict=True)], zero


def _nnqp_py(
    Q: list[list[float]],
    b: list[float],
    max_iter: int,
    tol: float,
    solver: str,
    scaling: _Scaling | None = None,
    consistent: bool = False,
) -> list[float]:
    """:func:`_nnqp_torch` in Python floats (same iterates and stopping rule); ``scaling`` is
    :func:`_jacobi_scaling` of ``Q`` when the caller solves several QPs on it."""
    n = len(b)
    s, zero, Qs = _jacobi_scaling(Q) if scaling is None else scaling
    for i in range(n):
        if zero[i] and b[i] < 0:
            raise _unbounded(solver, i, 0.0, b[i])
    bs = [s[i] * b[i] for i in range(n)]
    u = [0.0] * n
    bscale = max(abs(v) for v in bs)
    if bscale == 0.0:
        return u
    floor = _null_floor(bscale, consistent)
    F: list[int] = []
    it = 0
    inf = float("inf")
    visited: set[frozenset[int]] = set()
    while True:
        if corral_revisited(visited, F):
            break
        thr = tol * (bscale + sum(abs(v) for v in u))
        inF = set(F)
        j, gj = -1, inf
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
                raise cap_error(solver, max_iter, worst, thr)
            uF = [u[k] for k in F]
            x, bounded = _face_qp_py(Qs, bs, F, uF, floor)
            if bounded and all(v > 0 for v in x):
                u = [0.0] * n
                for k, v in zip(F, x, strict=True):
                    u[k] = v
                break
            if bounded:
                p = [xv - uv for xv, uv in zip(x, uF, strict=True)]
                neg = [xv <= 0 for xv in x]
            else:
                p = x
                neg = [pv < 0 for pv in p]
                if not any(neg):
                    raise _UnboundedError(
                        f"{solver}: objective unbounded below along a non-negative direction "
                        f"of the null space of Q (after {it} iterations)"
                    )
            # -p >= u_F >= 0 where neg; -p == 0 only for the entering index at x = 0 (blocks)
            ratios = [
                (uv / -pv if pv < 0 else 0.0) if ng else inf
                for uv, pv, ng in zip(uF, p, neg, strict=True)
            ]
            theta = min(ratios)
            block = ratios.index(theta)
            if F[block] == j and theta <= 0.0 and bounded:
                return [s[i] * u[i] for i in range(n)]
            new = [max(uv + theta * pv, 0.0) for uv, pv in zip(uF, p, strict=True)]
            new[block] = 0.0
            u = [0.0] * n
            for k, v in zip(F, new, strict=True):
                u[k] = v
            F = [F[k] for k in range(len(F)) if new[k] > 0]
            if not F:
                break
    return [s[i] * u[i] for i in range(n)]


# --------------------------------------------------------------------------------------------
# public solvers
# --------------------------------------------------------------------------------------------


def nonneg_qp(
    Q: Tensor,
    b: Tensor,
    *,
    max_iter: int = 500,
    tol: float = 1e-12,
    backend: Backend = "auto",
) -> Tensor:
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
    \lVert \tilde u\rVert_1)` in Jacobi-scaled variables, or when a free set met before comes
    back (only rounding brings one back: a ``Q`` indefinite at its rounding level).

    Args:
        Q: Symmetric PSD matrix ``[n, n]``.
        b: Linear term ``[n]``.
        max_iter: Cap on face solves; exceeding it raises :class:`SolverError`.
        tol: Relative KKT tolerance.
        backend: ``"auto"`` (plain Python for ``n <= 40``), ``"python"`` or ``"torch"``.

    Returns:
        ``u*`` of shape ``[n]`` (dtype/device of ``Q``). Not unique when ``Q`` is singular; the
        value and ``Qu*`` are.

    Raises:
        SolverError: Non-square/non-finite ``Q``, non-finite ``b``, unbounded problem, or cap hit.
        ValueError: Shape mismatch or invalid ``max_iter``/``tol``/``backend``.

    Example:
        >>> nonneg_qp(torch.eye(2), torch.tensor([-1.0, 2.0]))
        tensor([1., 0.])
    """
    check_positive_int("max_iter", max_iter)
    tol = check_nonnegative("tol", tol)
    path = select_backend(backend, Q, PYTHON_MAX_K)
    Qw = work_tensor(Q, "nonneg_qp")
    if not isinstance(b, Tensor) or b.shape != (Qw.shape[0],):
        shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise ValueError(f"b: expected a tensor of shape ({Qw.shape[0]},), got {shape}")
    bw = b.detach().to(device="cpu", dtype=F64)
    if not bool(torch.isfinite(bw).all()):
        raise SolverError("nonneg_qp: b contains non-finite values (nan or inf)")
    if path == "python":
        return to_output(_nnqp_py(Qw.tolist(), bw.tolist(), max_iter, tol, "nonneg_qp"), Q)
    return to_output(_nnqp_torch(Qw, bw, max_iter, tol, "nonneg_qp"), Q)


def dual_cone_weights(
    G: Tensor,
    prefs: Tensor,
    *,
    norm_eps: float = 0.0,
    reg_eps: float = 0.0,
    max_iter: int = 500,
    tol: float = 1e-12,
    backend: Backend = "auto",
    sum_rows: bool = False,
    start: ActiveSets | None = None,
) -> Tensor:
    r"""Weights of the projection of :math:`J^\top p` onto the dual cone of the rows of :math:`J`.

    The dual cone is :math:`C = \{v : Jv \ge 0\}` (directions that conflict with no task). For a
    preference vector :math:`p`, :math:`\pi_C(J^\top p) = J^\top w` with
    :math:`w = \operatorname{argmin}_{w \ge p} w^\top G w` (Quinton & Rey 2024, Prop. 1).
    Writing :math:`w = p + u`:

    .. math:: u^\star = \operatorname{argmin}_{u \ge 0}\ \tfrac12 u^\top G u + u^\top (G p),
              \qquad w = p + u^\star,

    solved exactly. Its KKT condition :math:`G(p + u^\star) \ge 0` is exactly non-conflict:
    :math:`g_i^\top J^\top w \ge 0` for every task. By default (``norm_eps = reg_eps = 0``) this
    is the exact projection, singular ``G`` included.

    torchjd (``UPGradWeighting`` / ``DualProj``) instead solves on
    :math:`G/\operatorname{tr}(G) +` ``reg_eps`` :math:`\cdot I` (zeros in place of
    :math:`G/\operatorname{tr}(G)` when :math:`\operatorname{tr}(G) <` ``norm_eps``) with
    ``norm_eps = reg_eps = 1e-4``; pass those values to reproduce it. Its guarantee is then only
    :math:`(G/\operatorname{tr} G + \text{reg\_eps}\, I)\, w \ge 0`: the direction may conflict
    with a task, and a Jacobian with :math:`\lVert J\rVert_F^2 <` ``norm_eps`` is not projected
    at all (``w = p``).

    The M rows of ``prefs`` share the Gramian; the torch path solves them together (one batched
    Cholesky solve per primal-dual active-set sweep), the plain-Python path one after another.

    A Gramian is PSD, but its rounding need not be: the float32 Gramian of nearly collinear,
    conflicting gradients can have a negative eigenvalue of rounding size along a non-negative
    direction, where the QP as given has no minimum. It is then solved on the nearest PSD
    matrix (the negative eigenvalues set to 0, the zero rows kept), within that rounding of
    ``G``; where the eigenvalue is below ``−√ε·λ_max`` (ε of ``G``'s dtype) it is not rounding,
    and the call is refused. (An indefinite matrix on which the QP has a minimum is solved as
    given.)

    Args:
        G: Gramian ``[K, K]``.
        prefs: Preference vectors ``[K]`` or ``[M, K]``.
        norm_eps: Trace threshold below which ``G`` is treated as zero (0: exact).
        reg_eps: Ridge added to the trace-normalised Gramian (0: exact).
        max_iter: Cap per QP of the sequential active set (see :func:`nonneg_qp`).
        tol: Relative KKT tolerance of the QP.
        backend: ``"auto"`` (plain Python for ``K <= 40`` with one row, ``K <= 8`` with
            several), ``"python"`` or ``"torch"``.
        sum_rows: Return the sum of the M weight vectors (``[K]``) instead of each of them,
            summed in float64 before the cast to ``G``'s dtype (UPGrad's combination).
        start: Active sets to start the torch path from, updated with this solve's (see
            :class:`ActiveSets`); the plain-Python path does not use them.

    Returns:
        Weights ``p + u*`` with the shape of ``prefs`` (``[K]`` with ``sum_rows``), dtype/device
        of ``G``.

    Raises:
        SolverError: Invalid ``G`` (not PSD beyond rounding included), non-finite ``prefs``
            or a QP hit its cap.
        ValueError: Bad ``prefs`` shape or invalid keyword values.

    Example:
        >>> G = torch.tensor([[1.0, -1.5], [-1.5, 4.0]])
        >>> dual_cone_weights(G, torch.tensor([0.5, 0.5]))
        tensor([0.7500, 0.5000])
    """
    norm_eps = check_nonnegative("norm_eps", norm_eps)
    reg_eps = check_nonnegative("reg_eps", reg_eps)
    check_positive_int("max_iter", max_iter)
    tol = check_nonnegative("tol", tol)
    batch = isinstance(prefs, Tensor) and prefs.ndim == 2 and prefs.shape[0] > 1
    path = select_backend(backend, G, PYTHON_MAX_K_BATCH if batch else PYTHON_MAX_K)
    work = work_list(G, "dual_cone_weights") if path == "python" else None
    Gw = work_tensor(G, "dual_cone_weights") if work is None else None
    K = len(work) if work is not None else int(G.shape[0])
    if not isinstance(prefs, Tensor) or prefs.ndim not in (1, 2) or prefs.shape[-1] != K:
        shape = tuple(prefs.shape) if isinstance(prefs, Tensor) else type(prefs).__name__
        raise ValueError(f"prefs: expected shape [{K}] or [M, {K}], got {shape}")
    solve = functools.partial(
        _dual_cone_solve,
        G,
        prefs,
        norm_eps=norm_eps,
        reg_eps=reg_eps,
        max_iter=max_iter,
        tol=tol,
        sum_rows=sum_rows,
        start=start,
    )
    try:
        return solve(work, Gw)
    except _UnboundedError:
        # A Gramian is PSD: a direction of negative curvature along which the QP has no
        # minimum is its rounding (a float32 Gramian of nearly collinear, conflicting
        # gradients). Solved on the nearest PSD matrix, within that rounding of it.
        Gw = torch.tensor(work, dtype=F64) if Gw is None else Gw
        repaired = nearest_psd(Gw, G.dtype, "dual_cone_weights")
        if work is not None:
            return solve(repaired.tolist(), None)
        return solve(None, repaired)


def _dual_cone_solve(
    G: Tensor,
    prefs: Tensor,
    work: list[list[float]] | None,
    Gw: Tensor | None,
    *,
    norm_eps: float,
    reg_eps: float,
    max_iter: int,
    tol: float,
    sum_rows: bool,
    start: ActiveSets | None,
) -> Tensor:
    """:func:`dual_cone_weights` on the checked Gramian: ``work`` (plain-Python path) or
    ``Gw`` (torch path)."""
    K = len(work) if work is not None else int(prefs.shape[-1])
    out_shape = prefs.shape[-1:] if sum_rows else prefs.shape
    # Without the regularisation the problem is invariant to the scale of G: dividing by the
    # trace would change nothing but the rounding.
    normalise = norm_eps > 0.0 or reg_eps > 0.0
    if work is not None:
        listed = prefs.tolist()
        pref_rows: list[list[float]] = listed if prefs.ndim == 2 else [listed]
        if not all(math.isfinite(v) for row in pref_rows for v in row):
            raise SolverError(_NON_FINITE_PREFS)
        Gl = work
        if normalise:
            tr = sum(work[i][i] for i in range(K))
            scale = 0.0 if (tr < norm_eps or tr == 0.0) else 1.0 / tr
            Gl = [[v * scale for v in row] for row in work]
            for i in range(K):
                Gl[i][i] += reg_eps
        rows = []
        scaling = _jacobi_scaling(Gl)
        for p in pref_rows:
            b = [sum(map(mul, row, p)) for row in Gl]
            u = _nnqp_py(Gl, b, max_iter, tol, "dual_cone_weights", scaling, consistent=True)
            rows.append([a + c for a, c in zip(p, u, strict=True)])
        if sum_rows:
            return to_output([math.fsum(row[k] for row in rows) for k in range(K)], G)
        return to_output(rows, G).reshape(out_shape)
    assert Gw is not None
    P = prefs.detach().to(device="cpu", dtype=F64).reshape(-1, K)
    if not bool(torch.isfinite(P).all()):
        raise SolverError(_NON_FINITE_PREFS)
    Gn = Gw
    if normalise:
        tr = float(Gw.diagonal().sum())
        Gn = torch.zeros_like(Gw) if (tr < norm_eps or tr == 0.0) else Gw / tr
        if reg_eps > 0.0:
            Gn = Gn + reg_eps * torch.eye(K, dtype=F64)
    W = P + _nnqp_batched(Gn, P @ Gn, max_iter, tol, "dual_cone_weights", start, True)
    return to_output(W.sum(dim=0) if sum_rows else W, G).reshape(out_shape)
