"""UPGrad and DualProj: projections onto the dual cone (Quinton & Rey, 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._registry import register
from taskbalance._solvers import ActiveSets, dual_cone_weights
from taskbalance._validation import check_nonnegative, per_task_values
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import GradientBalancer


class _DualConeBalancer(GradientBalancer):
    """Shared set-up of UPGrad and DualProj: preferences and the optional regularisation."""

    normalization_refused = None
    per_group_refused = None

    # The exact projection (the default) never conflicts with a task; with norm_eps/reg_eps
    # > 0 (torchjd's regularisation) it may.
    claimed_properties = frozenset(
        {"non_conflicting", "permutation_invariant", "scale_equivariant"}
    )
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"pref": [0.2, 0.3, 0.5]},
        {"norm_eps": 0.1, "reg_eps": 0.1},
        {"normalization": "l2"},
        {"normalization": "loss+"},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"pref": [1.0, -1.0, 1.0]}, ValueError, r"pref\[1\] = -1.0: expected"),
        ({"pref": [0.0, 0.0, 0.0]}, ValueError, r"pref: expected at least one preference > 0"),
        ({"reg_eps": -1.0}, ValueError, r"reg_eps"),
    )

    preferences: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        pref: Sequence[float] | Tensor | None = None,
        norm_eps: float = 0.0,
        reg_eps: float = 0.0,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        if pref is None:
            values = [1.0 / self.num_tasks] * self.num_tasks
        else:
            values = per_task_values("pref", pref, self.num_tasks)
            for i, value in enumerate(values):
                if value < 0:
                    raise ValueError(f"pref[{i}] = {value}: expected a preference >= 0")
            if sum(values) <= 0:
                raise ValueError(
                    f"pref: expected at least one preference > 0, got {values} (the "
                    "direction would be 0 at every step)"
                )
        self.norm_eps = check_nonnegative("norm_eps", norm_eps)
        self.reg_eps = check_nonnegative("reg_eps", reg_eps)
        self.register_buffer("preferences", torch.tensor(values, dtype=torch.float64))
        # Where the solver starts: the last step's active sets (a start only, not state: the
        # weights do not depend on it).
        self._active_sets = ActiveSets()

    def _project(self, gram: Tensor, prefs: Tensor, *, sum_rows: bool = False) -> Tensor:
        # The solver works in float64 whatever the Gramian's dtype and returns that dtype: the
        # weights of a float64 Gramian are never rounded to float32.
        return dual_cone_weights(
            gram,
            prefs,
            norm_eps=self.norm_eps,
            reg_eps=self.reg_eps,
            sum_rows=sum_rows,
            # each parameter group has its own problems: one start would serve them all badly
            start=self._active_sets if self._group_sizes is None else None,
        )


@register("upgrad")
class UPGrad(_DualConeBalancer):
    """UPGrad: project each task gradient onto the dual cone, then average.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024. The dual cone of
    the task gradients is ``{v : Jv ≥ 0}``: the directions that increase no task loss. Each
    ``g_i`` is projected onto it and the projections are combined with preferences ``p``
    (uniform ``1/K`` by default):

    ``d = Σ_i p_i·π(g_i)``,  ``π(g_i) = Jᵀ(e_i + u_i)``,
    ``u_i = argmin_{u ≥ 0} ½uᵀGu + uᵀG e_i``

    (the dual of the projection QP), so ``d = Jᵀw`` with ``w = Σ_i p_i (e_i + u_i)``, and
    ``G w ≥ 0``: with the defaults, no task is made worse to first order (to rounding, on any
    Gramian, singular ones included). The K projections share the Gramian and are solved
    together.

    Defaults: uniform preferences; the exact projection (``norm_eps = reg_eps = 0``).

    Large weights are the formula's, not rounding's: when no direction but 0 conflicts with no
    task, ``d = 0`` and ``w`` is some ``w ≥ p`` with ``Jᵀw = 0``, which may have to be large:
    for ``J = [[0, 1], [1e-6, −4e-3], [−2, 0]]`` every such ``w`` has ``w_2 ≥ 6.7e5`` (the third
    task's projection alone needs it). With ``heads="weighted"`` the heads' gradients are scaled
    by these weights; with the default (unweighted) heads nothing is.

    Departures: torchjd solves the QPs with quadprog on ``G/tr(G) + reg_eps·I`` (zero in place
    of ``G/tr(G)`` when ``tr(G) < norm_eps``) with ``norm_eps = reg_eps = 1e-4``; its direction
    can then conflict with a task (the guarantee holds for the regularised Gramian only).
    ``norm_eps=1e-4, reg_eps=1e-4`` reproduces torchjd; the QP is solved exactly in pure torch
    either way.

    Args:
        num_tasks: K.
        pref: non-negative preference weights, one per task (default ``1/K`` each).
        norm_eps: Gramians with trace below this are treated as zero (torchjd: 1e-4).
        reg_eps: ridge added to the trace-normalised Gramian (torchjd: 1e-4).
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``,
            ``group_aggregation``, ``reuse_rows``: see :class:`GradientBalancer`; the loop options
            ``accumulation_steps``, ``on_nonfinite``: see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.UPGrad(num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.eye(2))
        tensor([0.5000, 0.5000])
    """

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        return self._project(gram, torch.diag(self.preferences), sum_rows=True)


@register("dualproj")
class DualProj(_DualConeBalancer):
    """DualProj: project the preference-weighted average gradient onto the dual cone.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (the baseline
    aggregator of their §5): ``d = π(Jᵀp)`` with ``π`` the projection onto ``{v : Jv ≥ 0}``,
    so ``d = Jᵀ(p + u)``, ``u = argmin_{u ≥ 0} ½uᵀGu + uᵀGp``, and ``G(p + u) ≥ 0``: with the
    defaults, no task is made worse to first order.

    Defaults: uniform preferences ``p = 1/K``; the exact projection (``norm_eps = reg_eps = 0``).

    Large weights where only ``d = 0`` conflicts with no task: as :class:`UPGrad`'s (the same
    ``J`` needs ``w_2 ≥ 6.7e5`` here).

    Departures: as :class:`UPGrad`, torchjd regularises the Gramian (``norm_eps = reg_eps =
    1e-4``, which these arguments reproduce); the QP is solved exactly in pure torch.

    Args:
        num_tasks: K.
        pref: non-negative preference weights, one per task (default ``1/K`` each).
        norm_eps: Gramians with trace below this are treated as zero (torchjd: 1e-4).
        reg_eps: ridge added to the trace-normalised Gramian (torchjd: 1e-4).
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``,
            ``group_aggregation``, ``reuse_rows``: see :class:`GradientBalancer`; the loop options
            ``accumulation_steps``, ``on_nonfinite``: see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.DualProj(num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.eye(2))
        tensor([0.5000, 0.5000])
    """

    # On the shared test trajectories the mean gradient already lies in the dual cone, where
    # the regularisation changes nothing: only the preferences are a visible example.
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"pref": [0.2, 0.3, 0.5]},
        {"normalization": "l2"},
        {"normalization": "loss"},
    )

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        return self._project(gram, self.preferences)
