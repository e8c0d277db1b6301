"""CAGrad's inner problem: a root search in one scalar over exact min-norm solves.

Torch and plain-Python paths side by side: each evaluates ``t ↦ (w(t), ‖g_{w(t)}‖)`` and a
predicted root on the current face, by :class:`ShiftedMinNorm` (the min-norm point of the
shifted gradients, solved on ``G`` and ``b`` themselves); the root search itself
(:func:`_root`) is shared.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from operator import mul
from typing import TypeVar

import torch
from torch import Tensor

from taskbalance._solvers._common import (
    F64,
    Backend,
    SolverError,
    nearest_psd,
    select_backend,
    to_output,
    work_list,
    work_tensor,
)
from taskbalance._solvers._dual_cone import _nnqp_py, _nnqp_torch, _UnboundedError
from taskbalance._solvers._min_norm import solve_min_norm
from taskbalance._solvers._shifted_min_norm import ShiftedMinNorm
from taskbalance._validation import check_nonnegative, check_positive_int

__all__ = ["cagrad_weights"]

#: Largest K solved on the plain-Python path by ``backend="auto"``. Measured inside the training
#: loop of ``benchmarks/overhead.py`` (one thread; CAGrad's rule, Python / torch, µs): 296 / 494
#: at K = 8, 429 / 487 at K = 12, 589 / 501 at K = 16.
PYTHON_MAX_K = 12
# Cap of the dual-cone projection used when the optimum is degenerate (see cagrad_weights).
_PROJECTION_MAX_ITER = 500
#: ‖g_w‖ / Σ w_i‖g_i‖ of the root search's optimum below which the hull's exact min-norm
#: point decides degeneracy: the search approaches a zero min-norm point only to its tolerance
#: (found: 1.18e-6 on a hull holding 0, whose weights r/‖g_w‖ then reached 9e6 and whose
#: cancelling direction conflicted with a task).
_SUSPECT_DEGENERATE = 1e-3
_MIN_NORM_MAX_ITER = 500
#: Duality gap ``F(w) − min_i g_iᵀd`` of the search's point, relative to ``max_i‖g_i‖·(‖g0‖ +
#: r)``, above which its inner solves did not resolve the optimum and 0 in the hull is checked
#: exactly (0 at the optimum, rounding elsewhere: gradient norms spanning 1e15 gave a root of
#: ``s(t) = t`` at t = 1e-10 whose direction conflicted at −4e10 where d = 0 was feasible).
_DUALITY_GAP = 1e-6
# _BALL: every degenerate verdict (‖g_w‖ at rounding level, a task without a gradient, or a
# suspect optimum) is kept only where the projection of g0 onto the dual cone lies in the
# ball (to _ball_rtol), or where the search has no point to offer (‖g_w‖ = 0). Where F* = 0
# some maximiser is in both, so the nearest point of the cone is too; outside, F* < 0 and the
# verdict was the search's tolerance (gradient norms spanning ~1e10: ‖g_w‖ = 1.7e-7 Σ
# w_i‖g_i‖ at F* = −0.02, whose projection lay 1.9 r from g0).


def _ball_rtol(G: Tensor) -> float:
    """How far outside the ball a projection may lie by the rounding of ``G``: √ε of its
    dtype (a float32 Gramian's repaired projection was measured 2.3e-5 outside)."""
    return math.sqrt(torch.finfo(G.dtype).eps)


def _hull_holds_zero(G: Tensor | list[list[float]]) -> bool:
    """Whether 0 is in the convex hull of the gradients, to the detection rule of
    :func:`cagrad_weights` (``‖g_w‖ <= 1e-6 Σ w_i‖g_i‖``), at the exact min-norm point."""
    w = solve_min_norm(G, _MIN_NORM_MAX_ITER, 1e-12)
    if isinstance(G, Tensor):
        assert isinstance(w, Tensor)
        square, size = float(w @ G @ w), float(w @ G.diagonal().clamp(min=0).sqrt())
    else:
        assert not isinstance(w, Tensor)
        square = sum(wi * sum(map(mul, row, w)) for wi, row in zip(w, G, strict=True))
        size = sum(wi * math.sqrt(max(G[i][i], 0.0)) for i, wi in enumerate(w))
    return math.sqrt(max(square, 0.0)) <= 1e-6 * size


W = TypeVar("W", Tensor, list[float])
# t -> (w(t), s(t) = ‖g_{w(t)}‖, Σ_i w_i ‖g_i‖, predicted root or None); the third is the size
# of the terms of g_{w(t)}, of which s(t) is known to ~sqrt(K eps) only
Inner = Callable[[float], tuple[W, float, float, float | None]]


def _predicted_root(
    q: float, q1: float, q2: float, r: float, beta: float, t: float
) -> float | None:
    """Root of ``s(t) = t`` on the current face, where ``w(β) = w + (β − β_c) w1`` is affine.

    With ``δ = β − β_c``, ``s² = q + 2δ q1 + δ² q2`` (``q = wᵀGw``, ``q1 = wᵀGw1``,
    ``q2 = w1ᵀGw1``) and ``t = r β``, so ``s² = t²`` is a quadratic in ``δ``; the positive root
    nearest the current ``t`` is a trial point only (the bracket decides).
    """
    r2 = r * r
    qa, qb, qc = q2 - r2, q1 - r2 * beta, q - r2 * beta * beta  # qa δ² + 2 qb δ + qc = 0
    roots: list[float] = []
    if qa != 0.0:
        disc = qb * qb - qa * qc
        if disc >= 0.0:
            big = -(qb + math.copysign(math.sqrt(disc), qb))  # numerically stable pair
            if big != 0.0:
                roots = [big / qa, qc / big]
    elif qb != 0.0:
        roots = [-qc / (2.0 * qb)]
    ts = [r * (beta + dl) for dl in roots if r * (beta + dl) > 0.0]
    return min(ts, key=lambda x: abs(x - t)) if ts else None


# --------------------------------------------------------------------------------------------
# torch path
# --------------------------------------------------------------------------------------------


def _inner_torch(G: Tensor, b: Tensor, r: float, max_iter: int) -> Inner[Tensor]:
    norms = G.diagonal().sqrt()
    prev: list[list[float] | None] = [None]  # the latest evaluation's weights
    # min-norm point of the shifted gradients g_i + β g0, solved on G and b (not on their
    # Gramian, whose constant β²‖g0‖² swamps G for large β)
    problem = ShiftedMinNorm(G, b)

    def inner(t: float) -> tuple[Tensor, float, float, float | None]:
        beta = t / r
        # warm started from the previous evaluation's solution: t moves little, so does w
        w_any, w1_any = problem.solve(beta, max_iter, 1e-12, prev[0])
        assert isinstance(w_any, Tensor)
        w = w_any
        prev[0] = w.tolist()
        Gw = G @ w
        q = float(w @ Gw)
        st = math.sqrt(max(q, 0.0))
        size = float(w @ norms)
        if w1_any is None:
            return w, st, size, None
        assert isinstance(w1_any, Tensor)
        # on the face, w(β) = w + (β − β_c) w1
        Gw1 = G @ w1_any
        return w, st, size, _predicted_root(q, float(w @ Gw1), float(w1_any @ Gw1), r, beta, t)

    return inner


# --------------------------------------------------------------------------------------------
# plain-Python path
# --------------------------------------------------------------------------------------------


def _inner_py(G: list[list[float]], b: list[float], r: float, max_iter: int) -> Inner[list[float]]:
    K = len(G)
    norms = [math.sqrt(G[i][i]) for i in range(K)]
    prev: list[list[float] | None] = [None]  # the latest evaluation's weights
    problem = ShiftedMinNorm(G, b)  # as on the torch path

    def inner(t: float) -> tuple[list[float], float, float, float | None]:
        beta = t / r
        w, w1 = problem.solve(beta, max_iter, 1e-12, prev[0])
        assert not isinstance(w, Tensor)
        prev[0] = w
        Gw = [sum(map(mul, row, w)) for row in G]
        q = sum(map(mul, w, Gw))
        st = math.sqrt(max(q, 0.0))
        size = sum(map(mul, w, norms))
        if w1 is None:
            return w, st, size, None
        assert not isinstance(w1, Tensor)
        Gw1 = [sum(map(mul, row, w1)) for row in G]
        q1, q2 = sum(map(mul, w, Gw1)), sum(map(mul, w1, Gw1))
        return w, st, size, _predicted_root(q, q1, q2, r, beta, t)

    return inner


# --------------------------------------------------------------------------------------------
# shared root search
# --------------------------------------------------------------------------------------------


def _root(inner: Inner[W], smax: float, max_iter: int, tol: float) -> tuple[W, float, float, bool]:
    """Root of ``h(t) = s(t) − t`` on ``[0, smax]``; returns ``(w*, s*, size*, floored)``,
    ``floored`` where the search stopped at its floor near ``t = 0`` rather than at a root.

    ``inner(t)`` returns ``(w(t), s(t), size(t), t_pred)`` with an optional predicted root
    ``t_pred``. ``h`` changes sign once, from + to − (``h ∝ −Ψ'`` with ``Ψ(t) = min_w bᵀw +
    r wᵀGw/(2t) + rt/2`` convex), and ``h(smax) <= 0`` since ``s(t) <= max_i ‖g_i‖``, so the
    search starts from the bracket ``[0, smax]`` with only ``h(0)`` evaluated.
    Bracketing: safeguarded regula falsi (Illinois, every other step a bisection; a bisection
    while ``h(hi)`` is unknown). A prediction from the latest evaluation, nudged by ``tol·hi/4``
    past the root so that the next evaluation closes the bracket, replaces the regula falsi
    step while it lies strictly inside the bracket and the bracket keeps halving at least every
    two iterations. Stops when the bracket is narrower than ``tol·hi``, or at once when the
    first prediction (tried without a nudge) leaves a residual ``|h| <= tol·t/4``: then two
    inner solves in all.
    """
    lo, hi = 0.0, smax
    w_lo, s_lo, size_lo, pred = inner(0.0)
    h_lo = s_lo
    h_hi: float | None = None
    h_last = h_lo
    # s(0) = ‖g_{w(0)}‖ at rounding level (0 in the convex hull): then t = 0 is a root of h in
    # exact arithmetic whatever the sign of h just right of it, and h(0)'s sign is noise, which
    # would pull regula falsi to a spurious root at 0. Bisect until the lower end moves.
    flat_lo = s_lo <= 1e-6 * size_lo
    if flat_lo:
        pred = None
    best: tuple[W, float, float] | None = None  # the latest evaluation with h <= 0
    side = 0
    it = 0
    # near t = 0, w(t) -> w(0): below 1e-6 size(0) the result is declared degenerate anyway
    # (the caller leaves zero gradients out, so size(0) >= min_i ‖g_i‖ > 0; the 1e-9 smax
    # guard, ~53 bisections, is for gradients tiny against the largest)
    floor = 1e-7 * max(size_lo, 1e-9 * smax)
    widths = [math.inf, math.inf]
    exact_try = True
    pred_used: float | None = None
    floored = False
    while True:
        it += 1
        if it > max_iter:
            raise SolverError(
                f"cagrad_weights: root finding did not converge within max_iter={max_iter} "
                f"iterations (bracket [{lo:.3e}, {hi:.3e}], residual {h_hi})"
            )
        if hi - lo <= tol * hi:
            break
        if hi <= floor:
            floored = True
            break
        t: float | None = None
        if pred is not None and hi - lo <= 0.5 * widths[-2]:
            # the first prediction is tried as it is (exact when the face does not change),
            # later ones nudged past the root so that the next evaluation closes the bracket
            nudge = 0.0 if exact_try else (0.25 * tol * hi if h_last > 0 else -0.25 * tol * hi)
            t = pred + nudge
            pred_used = t
            if not (lo < t < hi):
                t = None
        if t is None:
            t = 0.5 * (lo + hi)
            if h_hi is not None and h_hi != h_lo and not (flat_lo and lo == 0.0):
                falsi = (lo * h_hi - hi * h_lo) / (h_hi - h_lo)
                # every other step a bisection: guaranteed reduction (h may jump at a kink)
                if lo < falsi < hi and it % 2 == 1:
                    t = falsi
        widths.append(hi - lo)
        w_t, s_t, size_t, pred = inner(t)
        h_t = s_t - t
        h_last = h_t
        if h_t == 0.0 or (exact_try and t == pred_used and abs(h_t) <= 0.25 * tol * t):
            # a root, or the predicted one to within a residual that moves Ψ by at most
            # r·tol/4 (|Ψ'(t)| = r|h|(s + t)/(2t²))
            best = (w_t, s_t, size_t)
            break
        exact_try = False
        if h_t > 0:
            lo, h_lo, w_lo, s_lo, size_lo = t, h_t, w_t, s_t, size_t
            if side == -1 and h_hi is not None:
                h_hi *= 0.5
            side = -1
        else:
            hi, h_hi = t, h_t
            best = (w_t, s_t, size_t)
            if side == 1:
                h_lo *= 0.5
            side = 1
    if best is None:
        if lo == 0.0:  # never below the root: evaluate the upper end after all
            w_hi, s_hi, size_hi, _ = inner(hi)
            return w_hi, s_hi, size_hi, floored
        return w_lo, s_lo, size_lo, floored
    if lo > 0.0 and s_lo > 0.0 and abs(s_lo - lo) < abs(best[1] - hi):
        return w_lo, s_lo, size_lo, floored
    w_best, s_best, size_best = best
    return w_best, s_best, size_best, floored


def cagrad_weights(
    G: Tensor,
    c: float = 0.4,
    *,
    max_iter: int = 200,
    tol: float = 1e-12,
    rescale: int = 1,
    inner_max_iter: int = 250,
    backend: Backend = "auto",
) -> Tensor:
    r"""CAGrad weights (Liu et al., NeurIPS 2021, "Conflict-Averse Gradient Descent").

    CAGrad's step is :math:`d^\star = \operatorname{argmax}_{\lVert d - g_0\rVert \le r}
    \min_i g_i^\top d` with :math:`g_0 = J^\top \mathbf 1/K` and :math:`r = c\lVert g_0\rVert`.
    With :math:`b = G\mathbf 1/K` (:math:`b_i = g_i^\top g_0`) and
    :math:`\lVert g_0\rVert^2 = \mathbf 1^\top G \mathbf 1/K^2` its dual is the convex

    .. math:: w^\star = \operatorname{argmin}_{w\in\Delta_K} F(w) = b^\top w + r\sqrt{w^\top G w},

    and :math:`d^\star = g_0 + (r/\lVert g_{w^\star}\rVert)\, g_{w^\star}`, divided by
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
    shifted gradients :math:`g_i + (t/r) g_0` (exact active set, on :math:`G` and :math:`b`
    themselves: the shifted gradients' Gramian carries a constant :math:`(t/r)^2\lVert
    g_0\rVert^2`, ~:math:`1/c^2` times :math:`G`, under whose rounding :math:`G` vanishes for
    small :math:`c`) and the optimal :math:`t` is the
    root of :math:`t = \lVert g_{w(t)}\rVert`, found by safeguarded regula falsi (Illinois) to
    relative ``tol``, with trial points predicted exactly on the current face (there
    :math:`w(t)` is affine in :math:`t`): a handful of inner solves instead of ~17, on both
    backends, the same bracketing stopping rule.

    Degenerate cases: :math:`g_0 = 0` or :math:`c = 0` give :math:`d = g_0`; so does
    :math:`c < 10^{-12}`, where :math:`d - g_0` (of norm :math:`r`) would be decided by
    differences of :math:`b` at :math:`r\lVert g_i\rVert`, near the rounding of :math:`b`
    computed from :math:`G`. A task without a gradient (:math:`G_{ii} = 0`) puts 0 in the hull:
    :math:`F` is 1-homogeneous in :math:`g_w`, so :math:`F^\star` is the minimum over the other
    tasks or 0, whichever is lower, and such a task's weight is :math:`1/K` (divided by the
    factor). If the optimum has :math:`g_{w^\star} = 0` (0 is in the convex hull and
    :math:`F^\star = 0`, always the case when it is and :math:`c \ge 1`; detected as
    :math:`\lVert g_{w^\star}\rVert \le 10^{-6} \sum_i w^\star_i \lVert g_i\rVert`, above the
    rounding level of a norm computed from :math:`G`, on the tasks with a gradient, at the root
    search's optimum or, where that ratio is below :math:`10^{-3}`, the search stopped at its
    floor near :math:`t = 0`, or its point's duality gap exceeds :math:`10^{-6}\max_i\lVert
    g_i\rVert(\lVert g_0\rVert + r)` (inner solves unresolved on gradient norms spanning
    ~1e15), at the hull's exact min-norm point; or, where some task has no gradient, as
    :math:`F \ge 0` at the others' optimum; each verdict is kept only where the projection
    below lies in the ball, to :math:`\sqrt{\varepsilon}` of ``G``'s dtype: with :math:`c < 1`
    it may not, and :math:`F^\star < 0` then), the best worst-case
    improvement is 0 and every maximiser lies in the dual cone :math:`\{d : Jd \ge 0\}`; the
    maximiser is then not unique in general, and we return the one nearest the centre
    :math:`g_0`: the projection of :math:`g_0` onto the dual cone (it lies in the ball), solved
    exactly as in :func:`dual_cone_weights`. E.g. :math:`J = [[2, 0], [-1, 0]]`, :math:`c = 1`
    gives :math:`d = 0`. (The official code amplifies rounding noise there by
    ``c/(‖g_w‖+1e-8)``; returning :math:`g_0` would conflict with a task.)

    Args:
        G: Gramian ``[K, K]``.
        c: Conflict-aversion radius :math:`c \ge 0` (official default for the function 0.5,
            experiments use 0.4).
        max_iter: Cap on root-finding iterations (exceeding it raises).
        tol: Relative tolerance on :math:`t`.
        rescale: 0, 1 or 2 as in the official code.
        inner_max_iter: ``max_iter`` of each inner min-norm solve.
        backend: ``"auto"`` (plain Python for ``K <= 12``), ``"python"`` or ``"torch"``.

    Returns:
        Weights of shape ``[K]`` (dtype/device of ``G``).

    Raises:
        SolverError: Invalid ``G`` or no convergence.
        ValueError: Invalid ``c``, ``rescale`` or keyword values.

    Example:
        >>> cagrad_weights(torch.eye(2), c=0.0)
        tensor([0.5000, 0.5000])
    """
    c = check_nonnegative("c", c)
    check_positive_int("max_iter", max_iter)
    check_positive_int("inner_max_iter", inner_max_iter)
    tol = check_nonnegative("tol", tol)
    if rescale not in (0, 1, 2) or isinstance(rescale, bool):
        raise ValueError(f"rescale: expected 0, 1 or 2, got {rescale!r}")
    factor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    if select_backend(backend, G, PYTHON_MAX_K) == "python":
        Gl = work_list(G, "cagrad_weights")
        K = len(Gl)
        m = 1.0 / K
        bl = [sum(row) * m for row in Gl]
        gg = sum(bl) * m
        r = c * math.sqrt(max(gg, 0.0))
        smax = math.sqrt(max(Gl[i][i] for i in range(K)))
        # c < 1e-12: the conflict-averse term is decided near b's rounding, d = g0 (docstring)
        if c < 1e-12 or r <= 0.0 or gg <= 1e-300 * max(smax * smax, 1e-300):
            return to_output([m / factor] * K, G)
        # tasks without a gradient are left out of the root search: they put 0 in the hull,
        # where w(t) -> that vertex takes ‖g_w‖ and Σ w_i‖g_i‖ to 0 together, and F* is the
        # others' optimum or 0 (1-homogeneity), the latter being the degenerate case
        live = [i for i in range(K) if Gl[i][i] > 0]
        if len(live) < K:
            Gv = [[Gl[i][k] for k in live] for i in live]
            bv = [bl[i] for i in live]
        else:
            Gv, bv = Gl, bl
        wv, s_l, size_l, floored = _root(_inner_py(Gv, bv, r, inner_max_iter), smax, max_iter, tol)
        w_l = [0.0] * K
        for i, v in zip(live, wv, strict=True):
            w_l[i] = v
        F_l = sum(map(mul, bv, wv)) + r * s_l  # F at the optimum over the live tasks
        # 0 in the hull, which the search approached only to its tolerance (or stopped short
        # of, at its floor): degenerate if the projection of g0 onto the dual cone lies in the
        # ball (F* = 0), else the search's
        near_zero = 1e-6 * size_l < s_l <= _SUSPECT_DEGENERATE * size_l
        gap = False  # see _DUALITY_GAP
        if s_l > 0.0:
            primal = min(
                sum(g * (m + (r / s_l) * v) for g, v in zip(row, w_l, strict=True)) for row in Gl
            )
            gap = F_l - primal > _DUALITY_GAP * smax * (math.sqrt(gg) + r)
        suspect = (near_zero or floored or gap) and _hull_holds_zero(Gv)
        if s_l <= 1e-6 * size_l or (len(live) < K and F_l >= 0.0) or suspect:
            try:
                u = _nnqp_py(Gl, bl, _PROJECTION_MAX_ITER, 1e-12, "cagrad_weights", consistent=True)
            except _UnboundedError:
                # as in dual_cone_weights: G is indefinite by its rounding, and the projection
                # is solved on the nearest PSD matrix
                Gl = nearest_psd(torch.tensor(Gl, dtype=F64), G.dtype, "cagrad_weights").tolist()
                bl = [sum(row) * m for row in Gl]
                u = _nnqp_py(Gl, bl, _PROJECTION_MAX_ITER, 1e-12, "cagrad_weights", consistent=True)
            # ‖Jᵀu‖ = ‖d − g0‖ for d = Jᵀ(1/K + u)
            square = sum(v * sum(map(mul, row, u)) for v, row in zip(u, Gl, strict=True))
            reach = math.sqrt(max(square, 0.0))
            # F* = 0 puts a maximiser, so the projection, in the ball: outside it, F* < 0
            # and the search's point is the answer (see _BALL)
            if reach <= r * (1.0 + _ball_rtol(G)) or s_l == 0.0:
                return to_output([(m + v) / factor for v in u], G)
        return to_output([(m + (r / s_l) * v) / factor for v in w_l], G)
    Gw = work_tensor(G, "cagrad_weights")
    K = Gw.shape[0]
    mean = torch.full((K,), 1.0 / K, dtype=F64)
    b = Gw @ mean
    gg = float(mean @ b)
    r = c * math.sqrt(max(gg, 0.0))
    smax = math.sqrt(float(Gw.diagonal().max()))
    if c < 1e-12 or r <= 0.0 or gg <= 1e-300 * max(smax * smax, 1e-300):
        return to_output(mean / factor, G)
    live_t = torch.nonzero(Gw.diagonal() > 0)[:, 0]  # as on the Python path
    nlive = int(live_t.numel())
    if nlive < K:
        Gv_t, bv_t = Gw[live_t][:, live_t], b[live_t]
    else:
        Gv_t, bv_t = Gw, b
    search = _root(_inner_torch(Gv_t, bv_t, r, inner_max_iter), smax, max_iter, tol)
    wv_t, s_t, size_t, floored_t = search
    if nlive < K:
        w_t = torch.zeros(K, dtype=F64)
        w_t[live_t] = wv_t
    else:
        w_t = wv_t
    F_t = float(bv_t @ wv_t) + r * s_t
    near_zero_t = 1e-6 * size_t < s_t <= _SUSPECT_DEGENERATE * size_t
    gap_t = False  # as on the Python path
    if s_t > 0.0:
        primal_t = float((Gw @ torch.add(mean, w_t, alpha=r / s_t)).min())
        gap_t = F_t - primal_t > _DUALITY_GAP * smax * (math.sqrt(gg) + r)
    suspect_t = (near_zero_t or floored_t or gap_t) and _hull_holds_zero(Gv_t)
    if s_t <= 1e-6 * size_t or (nlive < K and F_t >= 0.0) or suspect_t:  # as on the Python path
        try:
            u_t = _nnqp_torch(Gw, b, _PROJECTION_MAX_ITER, 1e-12, "cagrad_weights", True)
        except _UnboundedError:  # as on the Python path
            Gw = nearest_psd(Gw, G.dtype, "cagrad_weights")
            u_t = _nnqp_torch(Gw, Gw @ mean, _PROJECTION_MAX_ITER, 1e-12, "cagrad_weights", True)
        reach_t = math.sqrt(max(float(u_t @ Gw @ u_t), 0.0))
        if reach_t <= r * (1.0 + _ball_rtol(G)) or s_t == 0.0:
            return to_output((mean + u_t) / factor, G)
    return to_output((mean + (r / s_t) * w_t) / factor, G)
