"""What every solver shares: errors, argument checks, the working Gramian, the backend choice.

The one dispatch point between the two paths of every problem is :func:`select_backend`.
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
from torch import Tensor

from taskbalance._validation import check_choice

__all__ = [
    "EPS",
    "F64",
    "SHIFTED_FLOOR",
    "TINY",
    "Backend",
    "SolverError",
    "as_f64",
    "cap_error",
    "chol_py",
    "chol_solve_py",
    "corral_revisited",
    "nearest_psd",
    "psd_rounding",
    "select_backend",
    "to_output",
    "work_list",
    "work_tensor",
]

F64 = torch.float64
EPS = torch.finfo(torch.float64).eps
#: The smallest positive float64 (a subnormal): the floor that keeps a Jacobi scaling
#: ``1/√G_ii`` finite without changing any positive diagonal, however small (a floor of
#: 1e-300 rescaled a 1e-311 diagonal wrongly, and the face solves failed).
TINY = math.ulp(0.0)
#: The diagonal floor of the shifted (CAGrad) face solves, which keep their scale: there
#: ``D²`` must stay finite, so the floor stays above 1e-308.
SHIFTED_FLOOR = 1e-300

#: ``"auto"`` picks the plain-Python path up to a per-problem K and torch above it; ``"python"``
#: and ``"torch"`` force one path (as ``foreach=`` / ``fused=`` do in ``torch.optim``).
Backend = Literal["auto", "python", "torch"]
Path = Literal["python", "torch"]


class SolverError(RuntimeError):
    """Raised when a solver gets invalid numerical input or does not converge within its cap."""


def cap_error(solver: str, max_iter: int, residual: float, threshold: float) -> SolverError:
    """The error of an exact active-set method that reached its iteration cap."""
    return SolverError(
        f"{solver}: no convergence within max_iter={max_iter} iterations "
        f"(KKT residual {residual:.3e} > {threshold:.3e})"
    )


def select_backend(backend: str, G: object, python_max_k: int) -> Path:
    """The one place that decides between the plain-Python and the torch path.

    For small K every torch call on a K x K tensor costs microseconds of dispatch, far more than
    its arithmetic, so ``"auto"`` runs the plain-Python path up to ``python_max_k`` (each
    problem's crossover, measured on one CPU thread) and torch above it. Both paths solve the
    same problem exactly to the same optimality test (and, except the batched dual-cone solve,
    by the same iterates); a singular face met on the Python path is handed to the torch
    path's eigendecomposition, so degenerate inputs are treated identically.
    """
    check_choice("backend", backend, ("auto", "python", "torch"))
    if backend != "auto":
        return cast(Path, backend)
    small = isinstance(G, Tensor) and G.ndim == 2 and G.shape[0] <= python_max_k
    return "python" if small else "torch"


def _check_matrix(G: object, solver: str) -> Tensor:
    if not isinstance(G, Tensor):
        raise SolverError(f"{solver}: G must be a torch.Tensor, got {type(G).__name__}")
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise SolverError(f"{solver}: G must be a square K x K matrix, got shape {tuple(G.shape)}")
    if G.shape[0] == 0:
        raise SolverError(f"{solver}: G must have at least one row (K >= 1), got K = 0")
    if G.is_complex() or not G.is_floating_point():
        raise SolverError(f"{solver}: G must be a real floating point tensor, got {G.dtype}")
    return G


def work_tensor(G: object, solver: str) -> Tensor:
    """Validates ``G``; returns a symmetric float64 host copy with exact zero rows.

    ``K`` is small (1..64), so one device-to-host copy is far cheaper than launching dozens of
    tiny kernels, and the active-set / Newton loops need scalar decisions anyway. The checks
    share one host transfer: inside a training step each call on a K x K tensor costs several
    times its isolated time.
    """
    Gw = _check_matrix(G, solver).detach().to(device="cpu", dtype=F64)
    # amax propagates nan, and is inf exactly when an entry is
    peak, lowest = torch.stack([Gw.abs().amax(), Gw.diagonal().amin()]).tolist()
    if not math.isfinite(peak):
        raise SolverError(f"{solver}: G contains non-finite values (nan or inf)")
    if lowest < 0:
        raise SolverError(f"{solver}: G has a negative diagonal entry, so it is not PSD")
    Gw = torch.add(Gw, Gw.T).mul_(0.5)
    if lowest == 0:
        # a PSD matrix with G_ii = 0 has a zero row: other entries there are rounding/underflow
        live = (Gw.diagonal() > 0).to(F64)
        Gw = Gw * live[:, None] * live[None, :]
    return Gw


def work_list(G: object, solver: str) -> list[list[float]]:
    """:func:`work_tensor` as a list of Python floats (same checks, same messages)."""
    rows: list[list[float]] = _check_matrix(G, solver).tolist()
    isfinite = math.isfinite
    for row in rows:
        if not all(map(isfinite, row)):
            raise SolverError(f"{solver}: G contains non-finite values (nan or inf)")
    K = len(rows)
    A = [[0.5 * (rows[i][j] + rows[j][i]) for j in range(K)] for i in range(K)]
    if any(A[i][i] < 0 for i in range(K)):
        raise SolverError(f"{solver}: G has a negative diagonal entry, so it is not PSD")
    for i in range(K):
        if not A[i][i] > 0:  # a PSD matrix with G_ii = 0 has a zero row
            for j in range(K):
                A[i][j] = 0.0
                A[j][i] = 0.0
    return A


def to_output(x: Tensor | list[float] | list[list[float]], like: Tensor) -> Tensor:
    """The result with the dtype and device of the solver's input (results are detached)."""
    if isinstance(x, Tensor):
        return x.to(device=like.device, dtype=like.dtype)
    return torch.tensor(x, dtype=like.dtype, device=like.device)


def as_f64(x: list[float] | list[list[float]]) -> Tensor:
    return torch.tensor(x, dtype=F64)


def chol_py(A: list[list[float]], min_pivot2: float) -> list[list[float]] | None:
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


def chol_solve_py(L: list[list[float]], b: list[float]) -> list[float]:
    """Solves ``L Lᵀ x = b`` by forward and back substitution."""
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


def corral_revisited(visited: set[frozenset[int]], corral: list[int]) -> bool:
    """Whether a major cycle of an active-set method meets ``corral`` again, recording it
    otherwise.

    An active-set method (Wolfe's min-norm point, Lawson-Hanson) lowers its objective strictly
    from one major cycle to the next, so in exact arithmetic no corral (free set) comes back;
    one that does has come back through rounding (a Gramian indefinite at its rounding level,
    e.g. the float32 Gramian of collinear gradients, on which the faces' solves cycle), and its
    point, the minimum on its face, is as low as the solve can resolve: the solve ends there
    instead of cycling up to ``max_iter``. The empty free set (the non-negative QP's start,
    ``u = 0``) never counts as met again: ending there would return no projection at all, so
    a cycle through it alone runs to ``max_iter`` and raises.
    """
    if not corral:
        return False
    key = frozenset(corral)
    if key in visited:
        return True
    visited.add(key)
    return False


def psd_rounding(dtype: torch.dtype, largest: float, size: int) -> float:
    """How far below 0 an eigenvalue (or entry) of a ``size``×``size`` PSD matrix stored in
    ``dtype`` may fall by rounding: ``√ε·λ_max`` (a Gramian accumulated over many coordinates
    rounds well above ``ε``), plus ``size`` smallest normals for subnormal entries (float16)."""
    info = torch.finfo(dtype)
    return math.sqrt(info.eps) * max(largest, 0.0) + size * info.smallest_normal


def nearest_psd(Gw: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """``Gw`` with its negative eigenvalues set to 0, where they are within rounding of a
    PSD matrix stored in ``dtype`` (:func:`psd_rounding`); a more negative eigenvalue is
    refused (not a Gramian). The zero rows of ``Gw`` (tasks without a gradient)
    stay exactly 0: only the others are rebuilt. ``name`` names the caller in the refusal."""
    diagonal = Gw.diagonal()
    live = (diagonal > 0).nonzero().flatten()
    rounding = psd_rounding(dtype, float(diagonal.max()), diagonal.numel())
    if float(diagonal.min()) < -rounding:
        raise SolverError(
            f"{name}: G is not positive semi-definite (a diagonal entry, a squared norm, is "
            f"{float(diagonal.min()):.3e}): a Gramian J Jᵀ is, to rounding"
        )
    # A row whose squared norm G_ii is 0 has only zero inner products (Cauchy-Schwarz).
    on_diagonal = torch.eye(len(Gw), dtype=torch.bool, device=Gw.device)
    off_diagonal = Gw.masked_fill(on_diagonal, 0.0)[diagonal <= 0]
    if off_diagonal.numel() and float(off_diagonal.abs().max()) > rounding:
        raise SolverError(
            f"{name}: G is not positive semi-definite (a row with a zero diagonal entry has an "
            f"off-diagonal entry of {float(off_diagonal.abs().max()):.3e}): a Gramian J Jᵀ "
            "is, to rounding"
        )
    if not live.numel():
        return torch.zeros_like(Gw)
    eigenvalues, vectors = torch.linalg.eigh(Gw[live][:, live])
    lowest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    if lowest < -psd_rounding(dtype, largest, len(live)):
        raise SolverError(
            f"{name}: G is not positive semi-definite (smallest eigenvalue "
            f"{lowest:.3e}, largest {largest:.3e}): a Gramian J Jᵀ is, to rounding"
        )
    block = (vectors * eigenvalues.clamp_min(0.0)) @ vectors.T
    repaired = torch.zeros_like(Gw)
    repaired[live.unsqueeze(1), live] = 0.5 * (block + block.T)
    return repaired
