"""toy-2d: the batched trajectories against the plain per-start ``backward()`` loop."""

from __future__ import annotations

import csv

import pytest
import torch

import taskbalance as tb
from taskbalance.bench import toy
from taskbalance.bench.harness import Method, example_hyperparameters
from taskbalance.bench.toy import TOY_LOSS_OFFSET, TOY_STARTS, run_toy, run_toy_method
from taskbalance.methods._facts import method_facts

STEPS = 25


def reference_trajectory(method, start, steps, hyperparameters=None):
    """One start the plain way: the balancer called on ``f(x) + 21`` with ``features=x``,
    one ``backward()``, one Adam step (what ``taskbalance toy`` did before batching)."""
    arguments = {**example_hyperparameters(method, 2), **(hyperparameters or {})}
    if "seed" in tb.hyperparameters(method):
        arguments.setdefault("seed", 0)
    point = torch.nn.Parameter(torch.tensor([float(start[0]), float(start[1])]))
    if method_facts(tb.method_class(method)).requires_params:
        arguments["params"] = [point]
    balancer = tb.create(method, num_tasks=2, **arguments)
    groups = [{"params": [point], "lr": toy.TOY_LR}]
    if list(balancer.parameters()):
        groups.append({"params": list(balancer.parameters()), "lr": toy.TOY_LR})
    optimiser = torch.optim.Adam(groups)
    points, weights = [point.detach().clone()], []
    for _ in range(steps):
        features = point.unsqueeze(0)
        values = toy.toy_objectives(features[0])
        kpis = torch.exp(-(values.detach() + 20.0) / 10.0).clamp(0.0, 1.0)
        objective = balancer(values + TOY_LOSS_OFFSET, kpis=kpis, features=features)
        weights.append(balancer.weights)
        optimiser.zero_grad()
        objective.backward()
        optimiser.step()
        points.append(point.detach().clone())
    return torch.stack(points), torch.stack(weights)


@pytest.mark.parametrize("method", tb.available())
def test_batched_starts_follow_the_per_start_backward_path(method):
    found = run_toy_method(method, steps=STEPS)
    assert [trajectory.start for trajectory in found] == list(TOY_STARTS)
    for trajectory, start in zip(found, TOY_STARTS, strict=True):
        points, weights = reference_trajectory(method, start, STEPS)
        assert trajectory.failure is None
        # Same arithmetic in the same order: equal up to rounding (bitwise on x86 CPUs).
        torch.testing.assert_close(trajectory.points, points, rtol=0, atol=1e-5)
        torch.testing.assert_close(trajectory.weights, weights, rtol=0, atol=1e-5)
        expected = toy.toy_objectives(points)
        torch.testing.assert_close(trajectory.objectives, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("method", "hyperparameters"),
    [("mgda", {"update_every": 3}), ("pcgrad", {"heads": "weighted"}), ("uw", {"init": 0.5})],
)
def test_variants_follow_the_per_start_path(method, hyperparameters):
    found = run_toy_method(method, steps=STEPS, hyperparameters=hyperparameters)
    for trajectory, start in zip(found, TOY_STARTS, strict=True):
        points, _ = reference_trajectory(method, start, STEPS, hyperparameters)
        torch.testing.assert_close(trajectory.points, points, rtol=0, atol=1e-5)


def test_a_failing_start_stops_alone(monkeypatch):
    real = toy._gradient_based
    seen = []

    def fail_second_start_at_step_3(balancer, values, kpis, rows):
        if balancer not in seen:
            seen.append(balancer)
        if len(seen) > 1 and balancer is seen[1] and int(balancer.num_calls) == 3:
            raise tb.SolverError("no solution")
        return real(balancer, values, kpis, rows)

    monkeypatch.setattr(toy, "_gradient_based", fail_second_start_at_step_3)
    found = run_toy_method("mgda", steps=8)
    stopped = found[1]
    assert stopped.failure == "step 3: SolverError: no solution"
    assert stopped.points.shape == (4, 2)
    assert stopped.weights.shape == (3, 2)
    assert stopped.objectives.shape == (4, 2)
    points, _ = reference_trajectory("mgda", TOY_STARTS[1], 3)
    torch.testing.assert_close(stopped.points, points, rtol=0, atol=1e-5)
    torch.testing.assert_close(stopped.objectives[-1], toy.toy_objectives(points[-1]))
    for index in (0, 2, 3, 4):
        assert found[index].failure is None
        assert found[index].points.shape == (9, 2)
        points, _ = reference_trajectory("mgda", TOY_STARTS[index], 8)
        torch.testing.assert_close(found[index].points, points, rtol=0, atol=1e-5)


def test_params_is_refused():
    with pytest.raises(ValueError, match="hyperparameters: the toy runs gradient methods"):
        run_toy_method("mgda", steps=2, hyperparameters={"params": "trunk"})


@pytest.mark.slow
def test_jobs_give_the_same_trajectories():
    methods = [Method("ew"), Method("mgda", {"update_every": 2}), Method("uw")]
    alone = run_toy(methods, steps=10)
    parallel = run_toy(methods, steps=10, jobs=2)
    assert list(parallel) == ["ew", "mgda[update_every=2]", "uw"]
    for label, trajectories in alone.items():
        for one, other in zip(trajectories, parallel[label], strict=True):
            assert torch.equal(one.points, other.points)
            assert torch.equal(one.weights, other.weights)


def test_cli_toy_writes_the_figure_and_table(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    from taskbalance.bench import cli

    argv = ["toy", "--methods", "ew,mgda", "--steps", "5", "--quiet", "--jobs", "1"]
    argv += ["--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote" in out
    assert (tmp_path / "toy-2d.png").exists()
    with (tmp_path / "toy-2d.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["ew"] * 5 + ["mgda"] * 5
    assert cli.main([*argv[:-4], "--jobs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--jobs" in capsys.readouterr().err
