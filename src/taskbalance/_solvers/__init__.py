"""Pure-torch solvers for Gramian-based multi-task weightings.

Every solver works on the ``K x K`` Gramian ``G = J Jᵀ`` of the task gradients (rows of ``J``)
and returns task weights ``w`` such that the combined direction is ``d = Jᵀ w``.

**The rule.** A method's formula lives with its method (``taskbalance.methods._<name>``);
reusable numerical kernels — an optimisation problem that has a name outside any one paper, or
that two methods share — live here, one module per problem:

* :mod:`._min_norm` — min-norm point of the convex hull (MGDA), by Wolfe's active-set cycles,
  which also take a linear term;
* :mod:`._shifted_min_norm` — CAGrad's inner problem (the min-norm point of the shifted
  gradients) for many shifts on one Gramian, on those cycles;
* :mod:`._simplex` — the Euclidean projection onto the simplex (MoCo);
* :mod:`._dual_cone` — the non-negative QP and the projection onto the dual cone of the task
  gradients (UPGrad, DualProj; CAGrad's degenerate case);
* :mod:`._barrier` — damped Newton on a barrier potential (Nash-MTL, FairGrad);
* :mod:`._cagrad` — CAGrad's one-dimensional root search over min-norm solves;
* :mod:`._spectral` — eigendecomposition and pseudo-inverse of small matrices with the
  arithmetic on the host (the plain-Python paths of ConFIG, Aligned-MTL and IMTL-G, whose
  formulas live with those methods);
* :mod:`._common` — errors, argument checks, the working Gramian, and :func:`select_backend`,
  the one place that picks a path.

Each problem has a torch path and a plain-Python path (for small K every torch call on a
K x K tensor costs microseconds of dispatch, far more than its arithmetic), side by side in its
module, chosen by the ``backend="auto" | "python" | "torch"`` argument of every public solver
(as ``foreach=`` / ``fused=`` in ``torch.optim``). Both paths reach the same answer to rounding
and are tested against each other and against independent references.

Numerical conventions shared by all solvers:

* The Gramian is validated (square, finite; otherwise :class:`SolverError`), symmetrised and
  copied to the host in ``float64``. The result is returned with the dtype and device of ``G``.
* Results are detached: the weights are treated as constants w.r.t. ``G`` (as in torchjd).
* Iteration caps and tolerances are keyword arguments. An exact solver that does not converge
  within its cap raises :class:`SolverError` naming the solver, the iterations and the residual.
  There is never a silent fallback to another method.
* Linear algebra on faces uses Jacobi (unit-diagonal) scaling and a symmetric eigendecomposition,
  which keeps badly scaled Gramians (task gradient norms spanning many orders of magnitude)
  accurate and handles singular (rank-deficient, duplicated-row) faces exactly.
"""

from taskbalance._solvers._barrier import fairgrad_weights, nash_weights
from taskbalance._solvers._cagrad import cagrad_weights
from taskbalance._solvers._common import Backend, SolverError, select_backend
from taskbalance._solvers._dual_cone import ActiveSets, dual_cone_weights, nonneg_qp
from taskbalance._solvers._min_norm import min_norm_weights
from taskbalance._solvers._simplex import project_simplex, project_simplex_py

__all__ = [
    "ActiveSets",
    "Backend",
    "SolverError",
    "cagrad_weights",
    "dual_cone_weights",
    "fairgrad_weights",
    "min_norm_weights",
    "nash_weights",
    "nonneg_qp",
    "project_simplex",
    "project_simplex_py",
    "select_backend",
]
