"""``toy-2d``: two conflicting objectives on a 2-D plane, as in the CAGrad and Nash-MTL papers.

The landscape is the one of the CAGrad paper's toy (Liu et al., NeurIPS 2021, Fig. 1; reused by
Nash-MTL, ICML 2022): for ``x = (x1, x2)``,

- where ``x2 > 0`` (weight ``c1 = max(tanh(x2/2), 0)``) each objective is a log-barrier valley,
  ``f1 = log max(|½(−x1 − 7) − tanh(−x2)|, 5e−6) + 6`` and
  ``f2 = log max(|½(−x1 + 3) + tanh(−x2) + 2|, 5e−6) + 6``;
- where ``x2 < 0`` (weight ``c2 = max(tanh(−x2/2), 0)``) each is a shallow bowl,
  ``f1 = ((−x1 + 7)² + 0.1·(−x2 − 8)²)/10 − 20`` and ``f2 = ((−x1 − 7)² + 0.1·(−x2 − 8)²)/10 − 20``.

Every method starts from the papers' five points and follows Adam on the balancer's objective.
The objectives reach −20, so the balancer receives ``f + 21`` (positive, which the log-based
methods GLS, SI and FAMO need); the shift changes no gradient. Gradient methods get the point
itself as the ``features``, so their Gramian is the exact one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import taskbalance as tb
from taskbalance.bench.harness import (
    BALANCER_FAILURES,
    ProgressBar,
    SilentProgress,
    example_hyperparameters,
)
from taskbalance.methods._facts import method_facts

#: The starting points of the CAGrad/Nash-MTL toy figures.
TOY_STARTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (-8.5, -5.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)
#: Added to both objectives before the balancer sees them, so that they are positive.
TOY_LOSS_OFFSET = 21.0
#: Default number of Adam steps and learning rate of every trajectory.
TOY_STEPS = 1000
TOY_LR = 0.02
#: Plotting and Pareto-front window.
TOY_BOUNDS = (-10.0, 10.0)
_LOWER = 5e-6


def toy_objectives(point: Tensor) -> Tensor:
    """The two objectives at ``point``.

    Args:
        point: ``[..., 2]`` coordinates ``(x1, x2)``.

    Returns:
        ``[..., 2]`` values ``(f1, f2)``.
    """
    x1, x2 = point[..., 0], point[..., 1]
    valley_1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), _LOWER).log() + 6
    valley_2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), _LOWER).log() + 6
    upper = torch.clamp(torch.tanh(x2 * 0.5), 0)
    bowl_1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    bowl_2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    lower = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    return torch.stack([valley_1 * upper + bowl_1 * lower, valley_2 * upper + bowl_2 * lower], -1)


@dataclass
class ToyTrajectory:
    """One method's path from one starting point.

    Args:
        method: method name.
        start: the starting point.
        points: ``[steps + 1, 2]`` positions.
        objectives: ``[steps + 1, 2]`` values of ``(f1, f2)`` (unshifted).
        weights: ``[steps, 2]`` balancer weights of each step.
        failure: why the trajectory stopped early (the balancer raised), else None.
    """

    method: str
    start: tuple[float, float]
    points: Tensor
    objectives: Tensor
    weights: Tensor
    failure: str | None = None


def run_toy_trajectory(
    method: str,
    start: Sequence[float],
    *,
    steps: int = TOY_STEPS,
    lr: float = TOY_LR,
    hyperparameters: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: ProgressBar | None = None,
) -> ToyTrajectory:
    """Follow Adam on the balancer's objective from ``start``.

    Args:
        method: a registered method name.
        start: the starting point ``(x1, x2)``.
        steps: Adam steps.
        lr: Adam learning rate.
        hyperparameters: the method's hyperparameters (required ones default to the
            harness's example values; a method with a ``seed`` gets ``seed``).
        seed: seed of random methods.
        progress: advanced once per step.

    Returns:
        The trajectory.
    """
    progress = progress or SilentProgress()
    arguments = dict(hyperparameters or {})
    for key, value in example_hyperparameters(method, 2).items():
        arguments.setdefault(key, value)
    if "seed" in tb.hyperparameters(method) and "seed" not in arguments:
        arguments["seed"] = seed
    point = torch.nn.Parameter(torch.tensor([float(start[0]), float(start[1])]))
    if method_facts(tb.method_class(method)).requires_params:
        arguments.setdefault("params", [point])  # a parameters-only method (MoCo)
    balancer = tb.create(method, num_tasks=2, **arguments)
    groups: list[dict[str, Any]] = [{"params": [point], "lr": lr}]
    balancer_parameters = list(balancer.parameters())
    if balancer_parameters:
        groups.append({"params": balancer_parameters, "lr": lr})
    optimiser = torch.optim.Adam(groups)
    points = [point.detach().clone()]
    objectives = []
    weights = []
    failure = None
    for step in range(steps):
        features = point.unsqueeze(0)
        values = toy_objectives(features[0])
        objectives.append(values.detach().clone())
        # KPI for DTP: 1 at the landscape's minimum (−20), falling off above it.
        kpis = torch.exp(-(values.detach() + 20.0) / 10.0).clamp(0.0, 1.0)
        try:
            objective = balancer(values + TOY_LOSS_OFFSET, kpis=kpis, features=features)
        except BALANCER_FAILURES as error:
            failure = f"step {step}: {type(error).__name__}: {error}"
            objectives.pop()
            break
        weights.append(balancer.weights)
        optimiser.zero_grad(set_to_none=True)
        objective.backward()
        optimiser.step()
        points.append(point.detach().clone())
        progress.update(1)
    with torch.no_grad():
        objectives.append(toy_objectives(point.detach()))
    return ToyTrajectory(
        method=method,
        start=(float(start[0]), float(start[1])),
        points=torch.stack(points),
        objectives=torch.stack(objectives),
        weights=torch.stack(weights) if weights else torch.empty(0, 2),
        failure=failure,
    )


def pareto_front(resolution: int = 400) -> tuple[Tensor, Tensor]:
    """The Pareto set and front of the landscape inside :data:`TOY_BOUNDS`, on a grid.

    A grid point is kept when no other grid point is at least as good on both objectives and
    better on one.

    Args:
        resolution: grid points per axis.

    Returns:
        ``(points, objectives)``: ``[P, 2]`` Pareto-optimal points and their ``(f1, f2)``,
        sorted by ``f1``.
    """
    axis = torch.linspace(*TOY_BOUNDS, resolution, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    values = toy_objectives(grid)
    order = torch.argsort(values[:, 0])
    best_second = torch.cummin(values[order, 1], dim=0).values
    # Non-dominated along the f1 order: f2 strictly below every earlier point's f2.
    previous_best = torch.cat([torch.tensor([torch.inf], dtype=values.dtype), best_second[:-1]])
    keep = order[values[order, 1] < previous_best]
    return grid[keep].float(), values[keep].float()


def distance_to_front(objectives: Tensor, front: Tensor) -> float:
    """Euclidean distance in objective space from ``(f1, f2)`` to the nearest front point."""
    return float(torch.cdist(objectives.reshape(1, 2).float(), front).min())
