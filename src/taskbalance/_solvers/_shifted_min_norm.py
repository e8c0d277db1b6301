"""CAGrad's inner problem: the min-norm point of the shifted gradients ``g_i + βJᵀp``.

:class:`ShiftedMinNorm` prepares what does not depend on ``β`` once and solves for any number
of ``β`` with :mod:`._min_norm`'s active-set cycles, which take the linear term ``2β bᵀw``
(the closed form at K ≤ 2 is here).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from taskbalance._solvers._common import EPS, F64, SHIFTED_FLOOR
from taskbalance._solvers._min_norm import active_set_py, active_set_torch

__all__ = ["ShiftedMinNorm", "ShiftedPyParts", "ShiftedTorchParts"]


class ShiftedTorchParts(NamedTuple):
    """:class:`ShiftedMinNorm`'s β-free parts on the torch path (``G`` scaled to a unit largest
    diagonal entry, as :func:`active_set_torch` scales it)."""

    Gn: Tensor
    diag: Tensor
    sq: Tensor
    bn: Tensor
    AR: Tensor  # [D Gn D | D1 | D bn]: every face's Jacobi-scaled block and right-hand sides
    rows: Tensor  # [√diag, |bn|, bn]: sizes of the terms, and bnᵀw, in one product
    noise_b: Tensor  # 4 K eps |bn|: the rounding level of the linear terms (per unit β)


class ShiftedPyParts(NamedTuple):
    """:class:`ShiftedMinNorm`'s β-free parts on the Python path."""

    Gn: list[list[float]]
    diag: list[float]
    sq: list[float]
    bn: list[float]


class ShiftedMinNorm:
    r"""Exact :math:`\operatorname{argmin}_{w\in\Delta} w^\top G w + 2\beta\, b^\top w` for one
    validated working Gramian without zero rows and ``b = Gp`` for some ``p``, for any number of
    ``β`` (:meth:`solve`): the min-norm point of the shifted gradients
    :math:`g_i + \beta J^\top p`, CAGrad's inner problem, by :func:`active_set_torch`'s cycles
    on ``G`` and ``b`` themselves, on the path the type of ``G`` names.

    The shifted gradients' Gramian :math:`G + \beta(b\mathbf 1^\top + \mathbf 1 b^\top) +
    \beta^2 p^\top G p\, \mathbf 1\mathbf 1^\top` has the same minimiser, but its constant
    swamps :math:`G` once :math:`\beta^2 p^\top G p \gtrsim \lVert G\rVert/\varepsilon`: the
    faces' curvature is then below its rounding, and a solve on it keeps its start. The
    β-free parts (``G`` scaled, every face's Jacobi-scaled block) are computed once, here.
    """

    def __init__(self, G: Tensor | list[list[float]], b: Tensor | list[float]) -> None:
        K = len(G)
        self.K = K
        self._tensor = isinstance(G, Tensor)
        self._torch: ShiftedTorchParts | None = None
        self._py: ShiftedPyParts | None = None
        if K <= 2:  # closed form
            Gl = G.tolist() if isinstance(G, Tensor) else G
            bl = b.tolist() if isinstance(b, Tensor) else b
            self._G2, self._b2 = Gl, bl
        elif isinstance(G, Tensor):
            assert isinstance(b, Tensor)
            scale = float(G.diagonal().max())
            Gn, bn = G / scale, b / scale
            diag = Gn.diagonal()
            sq = diag.sqrt()
            d = diag.clamp_min(SHIFTED_FLOOR).rsqrt()
            AR = torch.cat([d[:, None] * Gn * d[None, :], d[:, None], (d * bn)[:, None]], 1)
            babs = bn.abs()
            rows = torch.stack([sq, babs, bn])
            self._torch = ShiftedTorchParts(Gn, diag, sq, bn, AR, rows, (4.0 * K * EPS) * babs)
        else:
            assert not isinstance(b, Tensor)
            scale = max(G[i][i] for i in range(K))
            Gl = [[v / scale for v in row] for row in G]
            diag_l = [Gl[i][i] for i in range(K)]
            sq_l = [math.sqrt(v) for v in diag_l]
            self._py = ShiftedPyParts(Gl, diag_l, sq_l, [v / scale for v in b])

    def solve(
        self, beta: float, max_iter: int, tol: float, start: list[float] | None = None
    ) -> tuple[Tensor | list[float], Tensor | list[float] | None]:
        """``(w, w1)`` at ``β``, warm started from simplex weights ``start``; ``w1 = dw/dβ`` on
        the final face (affine in ``β`` there; 0 at a vertex), ``None`` where that face was
        singular."""
        if self.K <= 2:
            if self.K == 1:
                w_s, w1_s = [1.0], [0.0]
            else:
                w_s, w1_s = _two_shifted(self._G2, self._b2, beta)
            if self._tensor:
                return torch.tensor(w_s, dtype=F64), torch.tensor(w1_s, dtype=F64)
            return w_s, w1_s
        if self._torch is not None:
            P = self._torch
            return active_set_torch(P.Gn, max_iter, tol, start, (P, beta))
        assert self._py is not None
        return active_set_py(self._py.Gn, max_iter, tol, start, (self._py, beta))


def _two_shifted(
    G: list[list[float]], b: list[float], beta: float
) -> tuple[list[float], list[float]]:
    """:class:`ShiftedMinNorm` for K = 2 in closed form (Sener's Algorithm 1 on the
    shifted Gramian, its constant cancelled): ``γ = clamp((G22 − G12 + β(b2 − b1))/‖g1 −
    g2‖², 0, 1)``, each weight from its own numerator over their sum, as in
    :func:`._min_norm._special_case` (not ``1 − γ``, which cancels where it is below ε, nor
    over a separately rounded ``‖g1 − g2‖²``, which leaves the simplex where that is at
    rounding level)."""
    first, second = G[1][1] - G[0][1], G[0][0] - G[0][1]  # ‖g1 − g2‖² times each weight at β = 0
    den = first + second
    if not den > 0.0:  # identical rows (then b1 = b2): every point is optimal
        return [0.5, 0.5], [0.0, 0.0]
    shift = beta * (b[1] - b[0])
    first, second = first + shift, second - shift
    if first <= 0.0:  # a vertex, which does not move with β
        return [0.0, 1.0], [0.0, 0.0]
    if second <= 0.0:
        return [1.0, 0.0], [0.0, 0.0]
    if not math.isfinite(first + second):  # both near the float's limit: halve first
        first, second = 0.5 * first, 0.5 * second
    total = first + second
    slope = (b[1] - b[0]) / total
    return [first / total, second / total], [slope, -slope]
