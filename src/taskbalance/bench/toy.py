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

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import torch
from torch import Tensor

import taskbalance as tb
from taskbalance.bench.harness import (
    BALANCER_FAILURES,
    Method,
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


def run_toy_method(
    method: str,
    starts: Sequence[Sequence[float]] = TOY_STARTS,
    *,
    steps: int = TOY_STEPS,
    lr: float = TOY_LR,
    hyperparameters: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: ProgressBar | None = None,
) -> list[ToyTrajectory]:
    """Follow Adam on the balancer's objective from every start at once.

    Each start has its own balancer (a balancer is one K-task loop's state) and its own Adam
    state; only the landscape's arithmetic is shared, as one ``[S, 2]`` tensor. Per step this
    does what ``balancer(f + 21, kpis=..., features=x).backward()`` does per start, without
    a backward through the balancer's machinery:

    - a gradient method receives ``G = J Jᵀ`` of the two objectives' gradients at ``x`` (the
      features-mode Gramian, ``x`` being the features) through
      :meth:`~taskbalance.Balancer.compute_weights`, and ``x`` moves along ``Jᵀw`` — the
      gradient its objective gives ``x`` with either kind of heads;
    - any other method is called on the two loss values as leaves, and ``x`` moves along
      ``Jᵀ ∂objective/∂f``, which also gives learned balancer parameters their gradients.

    ``tests/test_bench_toy.py`` checks this against the per-start ``backward()`` path, which
    runs instead for the methods outside that scope (GradDrop's masked gradients, MoCo's
    parameters mode, with the point as its parameter).

    Args:
        method: a registered method name.
        starts: the starting points ``(x1, x2)``.
        steps: Adam steps.
        lr: Adam learning rate.
        hyperparameters: the method's hyperparameters (required ones default to the
            harness's example values; a method with a ``seed`` gets ``seed``).
        seed: seed of random methods.
        progress: advanced once per step of each start.

    Returns:
        One trajectory per start, in order.

    Raises:
        ValueError: unknown method, bad hyperparameters, or ``params`` given (the toy's only
            shared tensor is the point itself, passed as the features).
    """
    progress = progress or SilentProgress()
    arguments = dict(hyperparameters or {})
    if "params" in arguments:
        raise ValueError(
            f"hyperparameters: the toy runs gradient methods in features mode on the point "
            f"itself; got params={arguments['params']!r}"
        )
    for key, value in example_hyperparameters(method, 2).items():
        arguments.setdefault(key, value)
    if "seed" in tb.hyperparameters(method) and "seed" not in arguments:
        arguments["seed"] = seed
    if not _batchable(method):
        trajectories = []
        for start in starts:
            trajectories.append(_plain_trajectory(method, start, steps, lr, arguments, progress))
        return trajectories
    balancers = [tb.create(method, num_tasks=2, **arguments) for _ in starts]
    by_gram = type(balancers[0]).requires_gram
    points = torch.tensor([[float(x1), float(x2)] for x1, x2 in starts]).requires_grad_()
    groups: list[dict[str, Any]] = [{"params": [points], "lr": lr}]
    for balancer in balancers:
        balancer_parameters = list(balancer.parameters())
        if balancer_parameters:
            groups.append({"params": balancer_parameters, "lr": lr})
    # Adam is elementwise: one [S, 2] tensor moves each row exactly as S separate Adams would.
    optimiser = torch.optim.Adam(groups)
    history = [points.detach().clone()]
    objectives: list[Tensor] = []
    weights: list[Tensor] = []
    failures: list[str | None] = [None] * len(starts)
    stopped_at = [steps] * len(starts)
    for step in range(steps):
        # Before the balancers run: a loss-based balancer's own parameters get their gradients
        # from its call (a stopped start's stay None, so Adam leaves them alone).
        optimiser.zero_grad(set_to_none=True)
        values = toy_objectives(points)
        objectives.append(values.detach().clone())
        # KPI for DTP: 1 at the landscape's minimum (−20), falling off above it.
        kpis = torch.exp(-(values.detach() + 20.0) / 10.0).clamp(0.0, 1.0)
        jacobian = _task_gradients(values, points) if by_gram else None
        outer = torch.zeros_like(values)
        step_weights = torch.zeros_like(values)
        corrections = None if jacobian is None else torch.zeros_like(values)
        for index, balancer in enumerate(balancers):
            if failures[index] is not None:
                continue
            try:
                if jacobian is None:
                    outer[index] = _loss_based(balancer, values[index].detach(), kpis[index])
                else:
                    assert corrections is not None
                    outer[index], corrections[index] = _gradient_based(
                        balancer, values[index].detach(), kpis[index], jacobian[:, index]
                    )
                step_weights[index] = balancer.weights
            except BALANCER_FAILURES as error:
                failures[index] = f"step {step}: {type(error).__name__}: {error}"
                stopped_at[index] = step
        weights.append(step_weights)
        active = [failure is None for failure in failures]
        if not any(active):
            break
        (gradient,) = torch.autograd.grad(values, points, grad_outputs=outer)
        points.grad = gradient if corrections is None else gradient + corrections
        frozen = points.detach().clone()
        optimiser.step()
        with torch.no_grad():
            # A stopped start stays where it stopped (its Adam state no longer matters).
            mask = torch.tensor(active).unsqueeze(1)
            points.copy_(torch.where(mask, points, frozen))
        history.append(points.detach().clone())
        progress.update(sum(active))
    with torch.no_grad():
        objectives.append(toy_objectives(points.detach()))
    path = torch.stack(history)
    values_path = torch.stack(objectives)
    weights_path = torch.stack(weights) if weights else torch.empty(0, len(starts), 2)
    trajectories = []
    for index, start in enumerate(starts):
        # A start that stopped at step t keeps its points and objectives up to t, t weights.
        last = stopped_at[index]
        trajectories.append(
            ToyTrajectory(
                method=method,
                start=(float(start[0]), float(start[1])),
                points=path[: last + 1, index].clone(),
                objectives=values_path[: last + 1, index].clone(),
                weights=weights_path[:last, index].clone(),
                failure=failures[index],
            )
        )
    return trajectories


def run_toy(
    methods: Sequence[Method],
    *,
    steps: int = TOY_STEPS,
    jobs: int = 1,
    progress: ProgressBar | None = None,
    finished: Callable[[Method], None] | None = None,
) -> dict[str, list[ToyTrajectory]]:
    """Every method's trajectories from :data:`TOY_STARTS`, in one process or ``jobs``.

    Each method's trajectories are a function of the method and ``steps`` alone, so ``jobs``
    changes nothing but the time taken. Ctrl-C returns the methods finished so far.

    Args:
        methods: the methods (with their hyperparameters).
        steps: Adam steps per trajectory.
        jobs: worker processes (spawned, one torch thread each); 1 runs here.
        progress: advanced per step with ``jobs = 1``, per method otherwise.
        finished: called with each method as it finishes.

    Returns:
        ``{label: trajectories}`` in the order of ``methods`` (finished ones only).
    """
    progress = progress or SilentProgress()
    done: dict[str, list[ToyTrajectory]] = {}

    def finish(method: Method, trajectories: list[ToyTrajectory]) -> None:
        done[method.label] = trajectories
        if finished is not None:
            finished(method)

    try:
        if jobs <= 1:
            for method in methods:
                progress.set_postfix_str(method.label)
                finish(method, _toy_job(method, steps, progress))
        else:
            _run_toy_parallel(methods, steps, jobs, progress, finish)
    except KeyboardInterrupt:
        pass
    return {method.label: done[method.label] for method in methods if method.label in done}


def _toy_job(
    method: Method, steps: int, progress: ProgressBar | None = None
) -> list[ToyTrajectory]:
    return run_toy_method(
        method.name, steps=steps, hyperparameters=method.hyperparameters, progress=progress
    )


def _worker_setup() -> None:
    torch.set_num_threads(1)


def _run_toy_parallel(
    methods: Sequence[Method],
    steps: int,
    jobs: int,
    progress: ProgressBar,
    finish: Callable[[Method, list[ToyTrajectory]], None],
) -> None:
    executor = ProcessPoolExecutor(
        max_workers=jobs, mp_context=get_context("spawn"), initializer=_worker_setup
    )
    futures: dict[Future[list[ToyTrajectory]], Method] = {}
    try:
        for method in methods:
            futures[executor.submit(_toy_job, method, steps)] = method
        remaining = set(futures)
        while remaining:
            ready, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for future in ready:
                finish(futures[future], future.result())
                progress.update(steps * len(TOY_STARTS))
    except KeyboardInterrupt:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


def _batchable(method: str) -> bool:
    """Whether the batched path computes what a call would: a loss-based method, or a gradient
    method in features mode whose direction is ``Jᵀw`` from the Gramian (not GradDrop's
    masked gradients, nor a parameters-only method such as MoCo)."""
    cls = tb.method_class(method)
    if method_facts(cls).requires_params:
        return False
    if not cls.requires_gram:
        return True
    hooks = ("_prepare", "_objective", "_direction_from_rows")
    return all(getattr(cls, hook) is getattr(tb.GradientBalancer, hook) for hook in hooks)


def _plain_trajectory(
    method: str,
    start: Sequence[float],
    steps: int,
    lr: float,
    arguments: Mapping[str, Any],
    progress: ProgressBar,
) -> ToyTrajectory:
    """One start the plain way: ``balancer(f + 21, features=x).backward()`` and an Adam step."""
    arguments = dict(arguments)
    point = torch.nn.Parameter(torch.tensor([float(start[0]), float(start[1])]))
    if method_facts(tb.method_class(method)).requires_params:
        arguments.setdefault("params", [point])  # a parameters-only method (MoCo)
    balancer = tb.create(method, num_tasks=2, **arguments)
    groups: list[dict[str, Any]] = [{"params": [point], "lr": lr}]
    if list(balancer.parameters()):
        groups.append({"params": list(balancer.parameters()), "lr": lr})
    optimiser = torch.optim.Adam(groups)
    points, objectives, weights = [point.detach().clone()], [], []
    failure = None
    for step in range(steps):
        features = point.unsqueeze(0)
        values = toy_objectives(features[0])
        kpis = torch.exp(-(values.detach() + 20.0) / 10.0).clamp(0.0, 1.0)
        try:
            objective = balancer(values + TOY_LOSS_OFFSET, kpis=kpis, features=features)
        except BALANCER_FAILURES as error:
            failure = f"step {step}: {type(error).__name__}: {error}"
            break
        objectives.append(values.detach().clone())
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


def _task_gradients(values: Tensor, points: Tensor) -> Tensor:
    """``[2, S, 2]``: the gradient of objective k at start s (the rows of each start's J)."""
    # Each objective of start s depends on that start's point only, so the gradient of the
    # sum over starts is every start's own gradient, for both objectives in one batched call.
    (jacobian,) = torch.autograd.grad(
        values,
        points,
        grad_outputs=torch.eye(2).unsqueeze(1).expand(2, values.shape[0], 2),
        is_grads_batched=True,
        retain_graph=True,
    )
    return jacobian


def _loss_based(balancer: tb.Balancer, values: Tensor, kpis: Tensor) -> Tensor:
    """``∂objective/∂f`` of one start's step (its learned parameters get their gradients)."""
    leaves = (values + TOY_LOSS_OFFSET).requires_grad_()
    balancer(leaves, kpis=kpis).backward()
    assert leaves.grad is not None
    return leaves.grad


def _gradient_based(
    balancer: tb.Balancer, values: Tensor, kpis: Tensor, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """``(∂objective/∂f, extra gradient of x)`` of one start's step, as its call would give.

    The same arithmetic as a features-mode call on ``x``: the Gramian accumulated in the
    balancer's ``gram_dtype`` and symmetrised; ``Σ w_k f_k`` with weighted heads, and with
    unweighted heads ``Σ f_k`` plus ``⟨x, Jᵀ(w − 1)⟩`` (the heads' share, which on the toy
    lands on ``x`` too).
    """
    dtype = getattr(balancer, "gram_dtype", torch.float32)
    gram = torch.zeros(2, 2, dtype=dtype).addmm_(rows.to(dtype), rows.to(dtype).T)
    weights = balancer.compute_weights(
        values + TOY_LOSS_OFFSET, gram=(gram + gram.T) / 2, kpis=kpis
    ).to(values.dtype)
    if getattr(balancer, "heads", "weighted") == "weighted":
        return weights, torch.zeros_like(values)
    return torch.ones_like(values), torch.mv(rows.T, weights - 1)


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
