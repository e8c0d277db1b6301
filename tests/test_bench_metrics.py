"""Δm% against hand-computed values, and the aggregation of runs into table rows."""

from __future__ import annotations

import math

import pytest

from taskbalance.bench.datasets import Task
from taskbalance.bench.harness import EpochRecord, RunResult, WeightRecorder
from taskbalance.bench.metrics import (
    SINGLE_TASK,
    csv_table,
    delta_m,
    markdown_table,
    mean_and_std,
    summarise,
)

ACCURACY = Task("a", "cross_entropy", "accuracy", True, 10, "classification", "")
ERROR = Task("b", "mse", "mae", False, 1, "regression", "")


def test_delta_m_mixed_directions_by_hand():
    # accuracy 0.90 vs 0.80: higher is better, +12.5% better -> -12.5
    # error 3.0 vs 2.0: lower is better, +50% worse -> +50
    assert delta_m([0.90, 3.0], [0.80, 2.0], [True, False]) == pytest.approx((-12.5 + 50) / 2)


def test_delta_m_three_metrics_by_hand():
    value = delta_m([0.5, 1.0, 4.0], [0.4, 2.0, 5.0], [True, False, False])
    # -(0.5-0.4)/0.4 = -25%; (1-2)/2 = -50%; (4-5)/5 = -20%  -> mean -31.666...
    assert value == pytest.approx(-95 / 3)


def test_delta_m_is_zero_for_the_baseline_itself():
    assert delta_m([0.7, 3.0], [0.7, 3.0], [True, False]) == 0.0


def test_delta_m_rejects_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        delta_m([1.0], [1.0, 2.0], [True])
    with pytest.raises(ValueError, match="is 0"):
        delta_m([1.0], [0.0], [True])


def test_mean_and_std():
    assert mean_and_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_and_std([5.0]) == (5.0, 0.0)
    mean, std = mean_and_std([])
    assert math.isnan(mean)
    assert math.isnan(std)


def _run(method, seed, test, single_task=None, failure=None):
    record = EpochRecord(epoch=1, seconds=0.5, train_losses=[0.0, 0.0], validation=test, test=test)
    return RunResult(
        benchmark="fake",
        method=method,
        seed=seed,
        task_names=["a", "b"],
        single_task=single_task,
        epochs=[record],
        failure=failure,
    )


def test_summarise_uses_seed_mean_baseline_and_ranks():
    runs = [
        _run(SINGLE_TASK, 0, [0.80, 9.9], single_task=0),
        _run(SINGLE_TASK, 0, [0.10, 2.0], single_task=1),
        _run(SINGLE_TASK, 1, [0.80, 9.9], single_task=0),
        _run(SINGLE_TASK, 1, [0.10, 2.0], single_task=1),
        _run("good", 0, [0.90, 3.0]),
        _run("good", 1, [0.90, 1.0]),
        _run("bad", 0, [0.40, 4.0]),
        _run("bad", 1, [0.40, 4.0]),
        _run("broken", 0, [math.nan, math.nan], failure="non-finite loss"),
    ]
    rows = summarise(runs, [ACCURACY, ERROR])
    by_name = {row.method: row for row in rows}
    assert rows[0].method == SINGLE_TASK
    assert by_name[SINGLE_TASK].delta_m_mean == pytest.approx(0.0)
    # seed 0: (-12.5 + 50)/2 = 18.75; seed 1: (-12.5 - 50)/2 = -31.25
    assert by_name["good"].delta_m_values == pytest.approx([18.75, -31.25])
    assert by_name["good"].delta_m_mean == pytest.approx(-6.25)
    assert by_name["good"].delta_m_std == pytest.approx(math.sqrt(2) * 25)
    assert by_name["bad"].delta_m_mean == pytest.approx((50 + 100) / 2)
    assert [row.rank for row in rows] == [None, 1, 2, None]
    assert by_name["broken"].failures == 1
    text = markdown_table(rows, [ACCURACY, ERROR])
    assert "| 1 | good |" in text
    assert "1 failed" in text
    assert csv_table(rows, [ACCURACY, ERROR]).splitlines()[0].startswith("rank,method,a_accuracy")


def test_summarise_without_baselines_has_no_delta_m():
    rows = summarise([_run("ew", 0, [0.5, 1.0])], [ACCURACY, ERROR])
    assert len(rows) == 1
    assert math.isnan(rows[0].delta_m_mean)
    assert rows[0].rank is None


def test_weight_recorder_is_bounded_and_spread():
    import torch

    recorder = WeightRecorder(capacity=8)
    for step in range(1000):
        recorder.record(step, torch.tensor([float(step), 1.0]))
    assert len(recorder.steps) <= 8
    assert recorder.steps[0] == 0
    assert recorder.steps[-1] >= 1000 - 2 * recorder.stride
    assert all(
        b - a == recorder.stride for a, b in zip(recorder.steps, recorder.steps[1:], strict=False)
    )
    assert [row[0] for row in recorder.rows] == [float(step) for step in recorder.steps]
