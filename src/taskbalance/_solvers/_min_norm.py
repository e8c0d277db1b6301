"""Min-norm point of the convex hull (MGDA): Wolfe's active-set method, both paths side by side.

Torch (eigendecomposition on singular faces) and plain Python (hand-written Cholesky, singular
faces handed to the torch face solve). The cycles also take a linear term ``2β bᵀw``: that is
CAGrad's inner problem, whose set-up lives in :mod:`._shifted_min_norm`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from taskbalance._solvers._common import (
    EPS,
    F64,
    SHIFTED_FLOOR,
    TINY,
    Backend,
    as_f64,
    cap_error,
    chol_py,
    chol_solve_py,
    corral_revisited,
    select_backend,
    to_output,
    work_list,
    work_tensor,
)
from taskbalance._validation import check_choice, check_nonnegative, check_positive_int

if TYPE_CHECKING:  # annotations only: that module builds on this one's cycles
    from taskbalance._solvers._shifted_min_norm import ShiftedPyParts, ShiftedTorchParts

__all__ = [
    "active_set_py",
    "active_set_torch",
    "min_norm_weights",
    "solve_min_norm",
]

#: Largest K solved on the plain-Python path by ``backend="auto"``. Measured inside the training
#: loop of ``benchmarks/overhead.py`` (one thread; MGDA's rule, Python / torch, µs): 369 / 426
#: at K = 24, 565 / 453 at K = 32.
PYTHON_MAX_K = 24
_SOLVER = "min_norm_weights(method='active_set')"
#: dw/dβ of a face's minimiser, evaluated only for the final face
Slope = Callable[[], Tensor]


# --------------------------------------------------------------------------------------------
# closed forms (shared by both paths)
# --------------------------------------------------------------------------------------------


def _special_case(diag: list[float], g12: float) -> list[float] | None:
    """The closed-form cases (``None`` if none applies); ``g12 = G[0, 1]`` is read for K = 2.

    ``G = 0``: uniform. A zero row has value 0: the weight is spread over the zero rows.
    ``K = 2``: Sener's Algorithm 1, ``γ = clamp((G22 − G12)/(G11 + G22 − 2G12), 0, 1)``, each
    weight from its own numerator, ``a = G22 − G12`` and ``c = G11 − G12``, over their sum:
    ``(a, c)/(a + c)``. As ``(γ, 1 − γ)`` a weight below ε cancelled to 0 (``g1 = (1e-3, 0)``,
    ``g2 = (−1e9, 1e12)``: 1e-18), and ``d = g1`` then conflicted with task 2 where the exact
    ``d`` conflicts with neither; over the separately rounded ``G11 + G22 − 2G12`` the two
    left the simplex where it is at rounding level (near-parallel gradients: ``(0.625, 0.5)``
    for two equal unit rows), as their sum does not.
    """
    K = len(diag)
    if max(diag) <= 0.0:
        return [1.0 / K] * K
    zeros = sum(1 for v in diag if v <= 0)
    if zeros:
        return [(1.0 if v <= 0 else 0.0) / zeros for v in diag]
    if K == 1:
        return [1.0]
    if K == 2:
        g11, g22 = diag
        first, second = g22 - g12, g11 - g12  # ‖g1 − g2‖² times each weight
        if first <= 0 and second <= 0:  # equal gradients (to rounding): every point is optimal
            return [0.5, 0.5]
        if first <= 0:
            return [0.0, 1.0]
        if second <= 0:
            return [1.0, 0.0]
        if not math.isfinite(first + second):  # both near the float's limit: halve first
            first, second = 0.5 * first, 0.5 * second
        total = first + second
        return [first / total, second / total]
    return None


# --------------------------------------------------------------------------------------------
# torch path
# --------------------------------------------------------------------------------------------


def _face_min_norm(Gs: Tensor, y_cur: Tensor) -> Tensor:
    """Minimiser of ``yᵀ Gs y`` subject to ``1ᵀ y = 1`` (no sign constraint), nearest ``y_cur``.

    Jacobi scaling ``y = D ỹ`` (``D = diag(Gs)^{-1/2}``) then, unless a Cholesky factorisation
    has well-bounded pivots, an eigendecomposition of the unit-diagonal block ``A``
    (:func:`_face_min_norm_eigh`).
    """
    y = _face_min_norm_chol(Gs)
    if y is not None:
        return y
    return _face_min_norm_eigh(Gs, y_cur, None)


def _face_min_norm_eigh(Gs: Tensor, y_cur: Tensor, lin: tuple[Tensor, float] | None) -> Tensor:
    """:func:`_face_min_norm` by an eigendecomposition of ``A = D Gs D`` (unit diagonal).

    Eigenvalues at the rounding level of ``eigh`` (``n eps λ_max``) are exact zeros. With
    ``c = D 1`` split into range/null components there are two candidates:
    ``ỹ = A⁺c / (cᵀA⁺c)`` (value ``1/(cᵀA⁺c)``) and, if ``c`` has a null component,
    ``ỹ = c_N / ‖c_N‖²`` (value 0). Both are feasible, so the one whose value ``ỹᵀAỹ``,
    evaluated directly on ``A``, is smaller is returned: a tiny but genuine eigenvalue (a nearly
    singular face, e.g. two almost anti-parallel gradients and a tiny third one) is never
    mistaken for an exact zero. A null component of ``c`` at eigh's rounding level (relative
    ``8 n eps``) is none: its huge ``ỹ`` usually has a large value on ``A``, but not on a face of
    identical vertices, where every point has one value. Flat directions (null space orthogonal
    to ``c``: affinely dependent vertices) keep ``y_cur``. With ``lin = (e, β)`` the candidates
    are ``ỹ = λA⁺c − βA⁺ẽ`` (``ẽ = De``, ``λ`` from ``cᵀỹ = 1``) and ``−βA⁺ẽ`` completed along
    ``c_N``, compared by ``ỹᵀAỹ + 2β ẽᵀỹ``.
    """
    n = Gs.shape[0]
    d = Gs.diagonal().clamp_min(TINY if lin is None else SHIFTED_FLOOR).rsqrt()
    A = d[:, None] * Gs * d[None, :]
    lam, V = torch.linalg.eigh(A)
    lam_max = float(lam[-1].clamp_min(1.0))
    null = lam <= 8.0 * n * EPS * lam_max
    # Without the linear term y matters only up to its sum: c = D1 and ỹ are taken over
    # max(D) (ỹ then times it), so cᵀA⁺c cannot overflow on a face whose diagonal spans over
    # 308 decades; the shifted problem keeps its scale (its β term is not homogeneous).
    scale = float(d.max()) if lin is None else 1.0
    cv = V.T @ (d / scale)
    cur = V.T @ (y_cur / d) * scale
    cur_n = torch.where(null, cur, torch.zeros_like(cur))
    cn = torch.where(null, cv, torch.zeros_like(cv))
    cn_norm2 = float(cn @ cn)
    inv = torch.where(null, torch.zeros_like(lam), 1.0 / torch.where(null, 1.0, lam))
    # the linear term in A's eigenbasis, and the range part of the λ-free candidate
    de = None if lin is None else d * lin[0]
    ev = None if de is None else V.T @ de
    beta = 0.0 if lin is None else lin[1]
    xr = None if ev is None else -beta * (inv * ev)
    candidates: list[Tensor] = []
    # A null component of c at eigh's rounding level (relative 8 n eps, as the eigenvalues
    # above) is none: c_N / ‖c_N‖² would then be rounding noise scaled up to any size, whose
    # value on A may still win (identical vertices: every point of the face has one value).
    if cn_norm2 > (8.0 * n * EPS) ** 2 * float(cv @ cv):
        # value-0 candidate; keep the current point's component in N ∩ c_N^⊥ (flat directions)
        if xr is None:
            candidates.append(V @ (cn / cn_norm2 + cur_n - (cur_n @ cn) / cn_norm2 * cn))
        else:
            along = (1.0 - float(cv @ xr)) / cn_norm2
            candidates.append(V @ (xr + cur_n + (along - (cur_n @ cn) / cn_norm2) * cn))
    z = inv * cv
    denom = float(cv @ z)
    if denom > 0.0:
        if ev is None:
            candidates.append(V @ (z / denom + cur_n))
        else:
            ze = inv * ev
            candidates.append(V @ ((1.0 + beta * float(cv @ ze)) / denom * z - beta * ze + cur_n))
    # a null component of c just above the rounding level gives a huge (even non-finite)
    # candidate: its value, evaluated on A, is then large or nan, and it is not preferred
    best: Tensor | None = None
    best_val = math.inf
    for yt in candidates:
        val = float(yt @ A @ yt)
        if de is not None:
            val += 2.0 * beta * float(de @ yt)
        if math.isfinite(val) and val < best_val and bool(torch.isfinite(yt).all()):
            best, best_val = yt, val
    if best is None:  # c = D1 = 0 cannot happen (d > 0); keep the current point
        return y_cur / y_cur.sum()
    y = d * best
    return y / y.sum() if lin is None else _on_plane(y)


def _face_min_norm_chol(Gs: Tensor) -> Tensor | None:
    """:func:`_face_min_norm` on a well-conditioned face (Cholesky pivots bounded away from 0):
    ``y ∝ G⁻¹1``, computed as ``D (DGD)⁻¹ D 1``; ``None`` on a (nearly) singular face."""
    d = Gs.diagonal().clamp_min(TINY).rsqrt()
    L, info = torch.linalg.cholesky_ex(d[:, None] * Gs * d[None, :])
    if int(info) != 0 or float(L.diagonal().min()) ** 2 <= 1e-8:
        return None
    # D/max(D) on both sides: y only up to its sum, and D² overflows on a face whose diagonal
    # spans over 308 decades (a gradient 1e-156 times another's)
    unit = d / d.max()
    y = unit * torch.cholesky_solve(unit[:, None], L)[:, 0]
    return y / y.sum()


def _face_shifted_chol(A: Tensor, R: Tensor, beta: float) -> tuple[Tensor | None, Slope | None]:
    """:func:`_face_min_norm` with ``lin = (e, β)`` on a well-conditioned face, from its
    Jacobi-scaled ``A = D Gs D`` and ``R = [D1, De]``: ``y = a (1 + βΣv)/Σa − βv`` (``a = Gs⁻¹1``,
    ``v = Gs⁻¹e``), affine in ``β`` with slope ``a Σv/Σa − v`` (returned unevaluated: only the
    final face's is used); not normalised, as it may lie far outside the face (see
    :func:`_on_plane`). ``(None, None)`` on a (nearly) singular face."""
    if A.shape[0] == 1:  # a vertex does not move with β
        return torch.ones(1, dtype=F64), lambda: torch.zeros(1, dtype=F64)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0 or float(L.diagonal().min()) ** 2 <= 1e-8:
        return None, None
    av = R[:, :1] * torch.cholesky_solve(R, L)
    sa, sv = av.sum(0).tolist()
    if not sa > 0.0:
        return None, None
    a, v = av.unbind(1)
    return a * ((1.0 + beta * sv) / sa) - beta * v, lambda: a * (sv / sa) - v


def _on_plane(y: Tensor) -> Tensor:
    """``y`` moved onto ``1ᵀy = 1`` along ``1``: with a linear term the face's minimiser may lie
    far outside the face (huge entries of both signs), where dividing by the computed sum, which
    is then rounding, could flip or blow up the point. (A step towards such a point is cut at
    the first weight to reach 0, long before that rounding shows; an accepted point, inside the
    face, is normalised by its sum.)"""
    return y - (y.sum() - 1.0) / y.shape[0]


def _noise(sq: Tensor, w: Tensor, K: int) -> tuple[Tensor, float]:
    # rounding level of the gap val - (Gw)_j = (w - e_j)ᵀ G w, i.e. of both val and (Gw)_j:
    # K eps (Σ_k sqrt(G_kk) |w - e_j|_k) (Σ_k sqrt(G_kk) w_k)
    m = float(sq @ w)
    return 4.0 * K * EPS * m * (sq + m), m


def active_set_torch(
    G: Tensor,
    max_iter: int,
    tol: float,
    start: list[float] | None = None,
    lin: tuple[ShiftedTorchParts, float] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Wolfe's min-norm-point active-set method on a float64 host Gramian (no zero rows).

    Starts from the corral ``{i : start_i > 0}`` at ``start`` when given (a warm start: the
    solution of a nearby problem), else top-down (every vertex in the corral, ``w`` uniform)
    when the face of all vertices is well conditioned and its solve keeps at least half of them
    positive (an interior or nearly interior optimum, typical of many roughly independent
    gradients: one or a few face solves instead of K), else bottom-up from the shortest vertex.
    Every start is a feasible point in the relative interior of its corral, from which Wolfe's
    minor and major cycles reach the same minimum.

    ``lin = (P, β)`` minimises ``wᵀGw + 2β bᵀw`` instead (:class:`ShiftedMinNorm`, whose
    β-free parts ``P`` holds; ``G`` is then unused), by the same cycles. Returns ``(w, w1)``
    with ``w1 = dw/dβ`` on the final face where its solve was well conditioned (0 at a vertex;
    ``None`` on a singular face, and without ``lin``).
    """
    K = G.shape[0]
    if lin is None:
        Gn = G / float(G.diagonal().max())
        diag = Gn.diagonal()
        sq = diag.sqrt()
    else:
        P, beta = lin
        Gn, diag, sq = P.Gn, P.diag, P.sq
    it = 1
    y: Tensor | None
    slope: Slope | None = None
    full: Tensor | None
    c_noise = 4.0 * K * EPS
    # the latest accepted face of the shifted problem and its slope (evaluated once, at the end)
    last: tuple[Tensor, Slope] | None = None

    def face(idx: Tensor, yc: Tensor) -> tuple[Tensor, Slope | None]:
        if lin is None:
            return _face_min_norm(Gn[idx][:, idx], yc), None
        M = P.AR[idx]
        ys, sl = _face_shifted_chol(M[:, idx], M[:, K:], beta)
        if ys is not None:
            return ys, sl
        return _face_min_norm_eigh(Gn[idx][:, idx], yc, (P.bn[idx], beta)), None

    def result(w: Tensor) -> tuple[Tensor, Tensor | None]:
        if last is None:
            return w, None
        w1 = torch.zeros(K, dtype=F64)
        w1[last[0]] = last[1]()
        return w, w1

    # A zero start (e.g. a zero previous answer) is no point of the simplex: start afresh.
    if start is not None and sum(start) > 0:
        S = [i for i in range(K) if start[i] > 0]
        w = torch.tensor(start, dtype=F64)
        w = w / w.sum()
        idx = torch.tensor(S, dtype=torch.long)
        y, slope = face(idx, w[idx])
        full = y
    else:
        w = torch.full((K,), 1.0 / K, dtype=F64)
        if lin is None:
            full = _face_min_norm_chol(Gn)
        else:
            full, slope = _face_shifted_chol(P.AR[:, :K], P.AR[:, K:], beta)
        y = full
        S = list(range(K))
    if full is None or (start is None and int((full > 0).sum()) * 2 < K):
        i0 = int(torch.argmin(diag if lin is None else diag + (2.0 * beta) * P.bn))
        S, y = [i0], None
        w = torch.zeros(K, dtype=F64)
        w[i0] = 1.0
        if lin is not None:  # a vertex does not move with β
            last = (torch.tensor([i0]), lambda: torch.zeros(1, dtype=F64))
    gap, thresh, j = float("inf"), 0.0, -1
    visited: set[frozenset[int]] = set()
    while True:
        if y is None:  # major cycle: the vertex that violates optimality most enters
            if len(S) >= K:
                break
            if corral_revisited(visited, S):
                break
            if lin is None:
                Gw = Gn @ w
                noise, _ = _noise(sq, w, K)
                val = float(w @ Gw)
                ref = val
            else:
                # the shifted problem's gap (Gs w)_j − wᵀGs w without its constant β²‖g0‖²;
                # its rounding level is _noise's plus that of the linear terms
                Gw = torch.addmv(P.bn, Gn, w, beta=beta)
                m, lb, eb = (P.rows @ w).tolist()
                lw = beta * lb
                noise = torch.add(sq * (c_noise * m), P.noise_b, alpha=beta) + c_noise * (
                    m * m + lw
                )
                val = float(w @ Gw)
                ref = val - beta * eb + lw
            slack = Gw - val + noise
            slack[S] = float("inf")
            j = int(torch.argmin(slack))
            gap = val - float(Gw[j])
            thresh = tol * ref + float(noise[j])
            if gap <= thresh:
                break
            S.append(j)
        while True:  # minor cycles
            idx = torch.tensor(S, dtype=torch.long)
            if y is None:
                it += 1
                if it > max_iter:
                    raise cap_error(_SOLVER, max_iter, gap, thresh)
                y, slope = face(idx, w[idx])
            if bool((y > 0).all()):
                w = torch.zeros(K, dtype=F64)
                w[idx] = y if lin is None else y / y.sum()
                last = None if slope is None else (idx, slope)
                y = None
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
                return result(w)
            new = (wS + theta * (y - wS)).clamp_min(0.0)
            new[block] = 0.0
            w = torch.zeros(K, dtype=F64)
            w[idx] = new
            S = [S[k] for k in range(len(S)) if new[k] > 0]
            w = w / w.sum()
            last = None
            y = None
    return result(w)


def _frank_wolfe(G: Tensor, max_iter: int, tol: float) -> Tensor:
    """Sener & Koltun's Frank-Wolfe with exact line search, best-pair initialisation."""
    K = G.shape[0]
    Gn = G / float(G.diagonal().max())
    diag = Gn.diagonal()
    # best pair: the K = 2 closed form for every pair at once
    gi = diag[:, None]
    gj = diag[None, :]
    den = gi + gj - 2.0 * Gn
    gamma = torch.where(den > 0, (gj - Gn) / torch.where(den > 0, den, 1.0), 0.5).clamp(0.0, 1.0)
    cost = gamma**2 * gi + (1 - gamma) ** 2 * gj + 2 * gamma * (1 - gamma) * Gn
    cost = cost + torch.eye(K, dtype=F64) * float("inf")
    a, b = divmod(int(torch.argmin(cost)), K)
    w = torch.zeros(K, dtype=F64)
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


# --------------------------------------------------------------------------------------------
# plain-Python path
# --------------------------------------------------------------------------------------------


def _face_min_norm_chol_py(Gn: list[list[float]], S: list[int]) -> list[float] | None:
    """:func:`_face_min_norm_chol` on the face ``S`` of ``Gn``."""
    d = [1.0 / math.sqrt(max(Gn[i][i], TINY)) for i in S]
    n = len(S)
    A = [[d[a] * Gn[S[a]][S[b]] * d[b] for b in range(n)] for a in range(n)]
    L = chol_py(A, 1e-8)
    if L is None:
        return None
    largest = max(d)
    unit = [v / largest for v in d]  # as the torch path: no D² overflow
    z = chol_solve_py(L, unit)
    y = [unit[a] * z[a] for a in range(n)]
    tot = sum(y)
    return [v / tot for v in y]


def _face_min_norm_py(Gn: list[list[float]], S: list[int], y_cur: list[float]) -> list[float]:
    """:func:`_face_min_norm` on the face ``S`` of ``Gn``."""
    y = _face_min_norm_chol_py(Gn, S)
    if y is None:  # (nearly) singular face: the exact eigendecomposition path
        Gs = [[Gn[i][k] for k in S] for i in S]
        return _face_min_norm(as_f64(Gs), as_f64(y_cur)).tolist()
    return y


def _face_shifted_py(
    Gn: list[list[float]],
    S: list[int],
    y_cur: list[float],
    bn: list[float],
    beta: float,
    eigh: bool = True,
) -> tuple[list[float] | None, list[float] | None]:
    """:func:`_face_shifted_chol` on the face ``S`` of ``Gn`` (``bn`` indexed as ``Gn``), the
    slope evaluated; a (nearly) singular face goes to :func:`_face_min_norm_eigh` (``eigh``) or
    gives ``(None, None)``."""
    n = len(S)
    if n == 1:  # a vertex does not move with β
        return [1.0], [0.0]
    # the shifted problem keeps its scale (no D/max(D)): a floor below 1e-300 would let D²
    # overflow there
    d = [1.0 / math.sqrt(max(Gn[i][i], SHIFTED_FLOOR)) for i in S]
    A = [[d[a] * Gn[S[a]][S[b]] * d[b] for b in range(n)] for a in range(n)]
    L = chol_py(A, 1e-8)
    if L is not None:
        za = chol_solve_py(L, d)
        zv = chol_solve_py(L, [d[a] * bn[S[a]] for a in range(n)])
        av = [d[a] * za[a] for a in range(n)]
        v = [d[a] * zv[a] for a in range(n)]
        sa, sv = sum(av), sum(v)
        if sa > 0.0:
            ca, cs = (1.0 + beta * sv) / sa, sv / sa
            y = [x * ca - beta * z for x, z in zip(av, v, strict=True)]
            return y, [x * cs - z for x, z in zip(av, v, strict=True)]
    if not eigh:
        return None, None
    Gs = [[Gn[i][k] for k in S] for i in S]
    lin = (as_f64([bn[i] for i in S]), beta)
    return _face_min_norm_eigh(as_f64(Gs), as_f64(y_cur), lin).tolist(), None


def active_set_py(
    G: list[list[float]],
    max_iter: int,
    tol: float,
    start: list[float] | None = None,
    lin: tuple[ShiftedPyParts, float] | None = None,
) -> tuple[list[float], list[float] | None]:
    """:func:`active_set_torch` in Python floats (same starts, iterates and stopping rule)."""
    K = len(G)
    if lin is None:
        scale = max(G[i][i] for i in range(K))
        Gn = [[v / scale for v in row] for row in G]
        diag = [Gn[i][i] for i in range(K)]
        sq = [math.sqrt(v) for v in diag]
        ell: list[float] = []
        labs: list[float] = []
    else:
        P, beta = lin
        Gn, diag, sq = P.Gn, P.diag, P.sq
        ell = [beta * v for v in P.bn]
        labs = [abs(v) for v in ell]
    it = 1
    y: list[float] | None
    y1: list[float] | None = None
    w1: list[float] | None = None  # dw/dβ on the latest accepted face of the shifted problem
    full: list[float] | None
    if start is not None and sum(start) > 0:
        S = [i for i in range(K) if start[i] > 0]
        tot = sum(start)
        w = [v / tot for v in start]
        if lin is None:
            y = _face_min_norm_py(Gn, S, [w[i] for i in S])
        else:
            y, y1 = _face_shifted_py(Gn, S, [w[i] for i in S], P.bn, beta)
            assert y is not None
        full = y
    else:
        w = [1.0 / K] * K
        S = list(range(K))
        if lin is None:
            full = _face_min_norm_chol_py(Gn, S)
        else:
            full, y1 = _face_shifted_py(Gn, S, w, P.bn, beta, eigh=False)
        y = full
    if full is None or (start is None and 2 * sum(1 for v in full if v > 0) < K):
        first = diag if lin is None else [v + 2.0 * e for v, e in zip(diag, ell, strict=True)]
        i0 = first.index(min(first))
        S, y = [i0], None
        w = [0.0] * K
        w[i0] = 1.0
        w1 = None if lin is None else [0.0] * K  # a vertex does not move with β
    gap, thresh, j = float("inf"), 0.0, -1
    noise_c = 4.0 * K * EPS
    inf = float("inf")
    visited: set[frozenset[int]] = set()
    while True:
        if y is None:
            if len(S) >= K or corral_revisited(visited, S):
                break
            Gw = [sum([row[k] * w[k] for k in S]) for row in Gn]
            val = sum(w[k] * Gw[k] for k in S)
            m = sum(sq[k] * w[k] for k in S)
            ref, lw = val, 0.0
            if lin is not None:
                # the shifted problem's gap (Gs w)_j − wᵀGs w without its constant β²‖g0‖²;
                # its rounding level is that of the quadratic terms plus the linear ones'
                lw = sum(labs[k] * w[k] for k in S)
                Gw = [v + e for v, e in zip(Gw, ell, strict=True)]
                ref = val + lw
                val = sum(w[k] * Gw[k] for k in S)
            inS = set(S)
            j, best = -1, inf
            for i in range(K):
                if i in inS:
                    continue
                slack = Gw[i] - val + noise_c * m * (sq[i] + m)
                if lin is not None:
                    slack += noise_c * (labs[i] + lw)
                if j < 0 or slack < best:
                    j, best = i, slack
            gap = val - Gw[j]
            thresh = tol * ref + noise_c * m * (sq[j] + m)
            if lin is not None:
                thresh += noise_c * (labs[j] + lw)
            if gap <= thresh:
                break
            S.append(j)
        while True:
            wS = [w[k] for k in S]
            if y is None:
                it += 1
                if it > max_iter:
                    raise cap_error(_SOLVER, max_iter, gap, thresh)
                if lin is None:
                    y = _face_min_norm_py(Gn, S, wS)
                else:
                    y, y1 = _face_shifted_py(Gn, S, wS, P.bn, beta)
                    assert y is not None
            if all(v > 0 for v in y):
                if lin is not None:  # the shifted problem's face solves are not normalised
                    tot = sum(y)
                    y = [v / tot for v in y]
                w = [0.0] * K
                for k, v in zip(S, y, strict=True):
                    w[k] = v
                if y1 is None:
                    w1 = None
                else:
                    w1 = [0.0] * K
                    for k, v in zip(S, y1, strict=True):
                        w1[k] = v
                y = None
                break
            ratios = [
                (ws / max(ws - yv, 1e-300) if ws > 0 else 0.0) if yv <= 0 else inf
                for ws, yv in zip(wS, y, strict=True)
            ]
            theta = min(ratios)
            block = ratios.index(theta)
            if S[block] == j and theta <= 0.0:
                return w, w1
            new = [max(ws + theta * (yv - ws), 0.0) for ws, yv in zip(wS, y, strict=True)]
            new[block] = 0.0
            w = [0.0] * K
            for k, v in zip(S, new, strict=True):
                w[k] = v
            S = [S[k] for k in range(len(S)) if new[k] > 0]
            tot = sum(w)
            w = [v / tot for v in w]
            w1 = None
            y = None
    return w, w1


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------


def solve_min_norm(
    G: Tensor | list[list[float]], max_iter: int, tol: float, start: list[float] | None = None
) -> Tensor | list[float]:
    """Exact min-norm weights of a validated working Gramian, on the path its type names
    (a float64 host tensor: torch; a list of Python floats: Python), optionally warm-started
    from simplex weights ``start`` (see :func:`active_set_torch`)."""
    if isinstance(G, Tensor):
        special = _special_case(G.diagonal().tolist(), float(G[0, 1]) if len(G) > 1 else 0.0)
        if special is not None:
            return torch.tensor(special, dtype=F64)
        return active_set_torch(G, max_iter, tol, start)[0]
    special = _special_case([G[i][i] for i in range(len(G))], G[0][1] if len(G) > 1 else 0.0)
    return special if special is not None else active_set_py(G, max_iter, tol, start)[0]


def min_norm_weights(
    G: Tensor,
    *,
    max_iter: int = 250,
    tol: float = 1e-10,
    method: str = "active_set",
    backend: Backend = "auto",
) -> Tensor:
    r"""MGDA weights: the minimum-norm point of the convex hull of the task gradients.

    Solves :math:`w^\star = \operatorname{argmin}_{w \in \Delta_K} w^\top G w` with
    :math:`\Delta_K = \{w \ge 0, \mathbf 1^\top w = 1\}` (Sener & Koltun, NeurIPS 2018). The
    optimality (KKT) conditions are :math:`(Gw)_i \ge w^\top G w` for all :math:`i`, with equality
    where :math:`w_i > 0`. The value :math:`w^\top G w = \lVert J^\top w\rVert^2` is unique even
    when :math:`w` is not (duplicated or affinely dependent gradients).

    * ``K = 1``: ``[1]``. ``K = 2``: closed form (Sener's Algorithm 1),
      :math:`\gamma = \operatorname{clamp}\big((G_{22} - G_{12}) / (G_{11} + G_{22} - 2G_{12}),
      0, 1\big)`, :math:`w = (\gamma, 1 - \gamma)` (``0.5`` if both gradients are equal),
      computed as :math:`(a, c) / (a + c)` with :math:`a = G_{22} - G_{12}`,
      :math:`c = G_{11} - G_{12}` (``1 − γ`` rounds a weight below ε to 0).
    * ``G = 0``: every simplex point is optimal; the uniform ``1/K`` is returned. Zero rows
      (:math:`G_{ii} = 0`) give value 0: the weight is spread uniformly over them.
    * ``method="active_set"`` (default): Wolfe's (1976) exact min-norm-point active-set method on
      Jacobi-scaled faces with an eigendecomposition, exact on singular faces. It stops when the
      Frank-Wolfe gap :math:`w^\top G w - \min_i (Gw)_i \le` ``tol`` :math:`\cdot w^\top G w` plus
      the rounding level of the gap, or when a major cycle meets a corral it met before (only
      rounding brings one back: a Gramian indefinite at its rounding level); each face solve
      counts as one iteration and reaching ``max_iter`` raises :class:`SolverError`. When the
      face of all K vertices keeps at least half of its weights positive the method starts from
      that face (top-down), so an interior optimum costs one face solve rather than K.
    * ``method="frank_wolfe"``: the paper's Frank-Wolfe with exact line search, started from the
      best pair. It stops when the duality gap is ``<= tol * wᵀGw`` or after ``max_iter``
      iterations. Reaching the cap is **not** an error: Frank-Wolfe converges sublinearly and the
      paper uses it as an approximate solver, so the current iterate is returned. (The official
      code's loop never incremented its counter; its line search also clamps at 0.999/0.001
      instead of the exact 1/0 used here.) Torch path only.

    Args:
        G: Gramian ``J Jᵀ`` of shape ``[K, K]`` (symmetric PSD, float32 or float64).
        max_iter: Iteration cap (face solves for ``active_set``, steps for ``frank_wolfe``).
        tol: Relative tolerance on the duality gap.
        method: ``"active_set"`` or ``"frank_wolfe"``.
        backend: ``"auto"`` (plain Python for ``K <= 24``, torch above), ``"python"`` or
            ``"torch"``; every backend gives the same answer to rounding.

    Returns:
        Weights of shape ``[K]`` on the simplex, dtype and device of ``G``.

    Raises:
        SolverError: Non-square or non-finite ``G``, or ``active_set`` hit ``max_iter``.
        ValueError: Invalid ``max_iter``, ``tol``, ``method`` or ``backend``.

    Example:
        >>> G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
        >>> min_norm_weights(G)
        tensor([0.5000, 0.5000])
    """
    check_positive_int("max_iter", max_iter)
    tol = check_nonnegative("tol", tol)
    check_choice("method", method, ("active_set", "frank_wolfe"))
    path = select_backend(backend, G, PYTHON_MAX_K if method == "active_set" else 0)
    if method == "frank_wolfe":
        if path == "python":
            raise ValueError(
                f"backend: expected 'auto' or 'torch' for method='frank_wolfe', got {backend!r}"
            )
        Gw = work_tensor(G, "min_norm_weights")
        special = _special_case(Gw.diagonal().tolist(), float(Gw[0, 1]) if len(Gw) > 1 else 0.0)
        if special is not None:
            return to_output(special, G)
        return to_output(_frank_wolfe(Gw, max_iter, tol), G)
    work = (
        work_list(G, "min_norm_weights") if path == "python" else work_tensor(G, "min_norm_weights")
    )
    return to_output(solve_min_norm(work, max_iter, tol), G)
