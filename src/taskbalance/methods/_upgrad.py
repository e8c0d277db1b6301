"""UPGrad and DualProj: projections onto the dual cone (Quinton & Rey, 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from taskbalance._registry import register
from taskbalance._solvers import dual_cone_weights
from taskbalance._validation import per_task_values
from taskbalance.methods._gradient_base import GradientBalancer


class _DualConeBalancer(GradientBalancer):
    """Shared set-up of UPGrad and DualProj: preference weights over the tasks."""

    preferences: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        pref: Sequence[float] | Tensor | None = None,
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
        self.register_buffer("preferences", torch.tensor(values, dtype=torch.float64))


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
    ``G w ≥ 0``: no task is made worse to first order.

    Defaults: uniform preferences; the dual-cone solver's regularisation follows torchjd.

    Departures: none; the QP is solved exactly in pure torch (torchjd uses quadprog).

    Args:
        num_tasks: K.
        pref: non-negative preference weights, one per task (default ``1/K`` each).
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``: see
            :class:`GradientBalancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.UPGrad(num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.eye(2))
        tensor([0.5000, 0.5000])
    """


    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        rows = torch.diag(self.preferences.to(gram.device))
        return dual_cone_weights(gram.double(), rows).sum(dim=0).to(torch.float32)


@register("dualproj")
class DualProj(_DualConeBalancer):
    """DualProj: project the preference-weighted average gradient onto the dual cone.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (the baseline
    aggregator of their §5): ``d = π(Jᵀp)`` with ``π`` the projection onto ``{v : Jv ≥ 0}``,
    so ``d = Jᵀ(p + u)``, ``u = argmin_{u ≥ 0} ½uᵀGu + uᵀGp``, and ``G(p + u) ≥ 0``.

    Defaults: uniform preferences ``p = 1/K``.

    Departures: none; the QP is solved exactly in pure torch.

    Args:
        num_tasks: K.
        pref: non-negative preference weights, one per task (default ``1/K`` each).
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``: see
            :class:`GradientBalancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.DualProj(num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.eye(2))
        tensor([0.5000, 0.5000])
    """


    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        preferences = self.preferences.to(gram.device)
        return dual_cone_weights(gram.double(), preferences).to(torch.float32)
