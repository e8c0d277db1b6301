"""Δm% against hand-computed values, and the aggregation of runs into table rows."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import warnings

import pytest
import torch

from taskbalance.bench import (
    Benchmark,
    NanMetricWarning,
    Task,
    TensorTaskDataset,
    TrainingDefaults,
    ZeroBaselineWarning,
    accuracy,
    mean_absolute_error,
)
from taskbalance.bench.compare import BenchmarkSource, run_comparison
from taskbalance.bench.harness import EpochRecord, RunResult, WeightRecorder
from taskbalance.bench.losses import cross_entropy, mse
from taskbalance.bench.metrics import SINGLE_TASK, delta_m, mean_and_std, summarise
from taskbalance.bench.report import csv_table, delta_m_notes, markdown_table, text_table
from taskbalance.bench.selection import (
    Selection,
    check_selection,
    parse_selection,
    selected_test,
)

_DATA = TensorTaskDataset(torch.zeros(4, 2), [torch.zeros(4, dtype=torch.long), torch.zeros(4)])
FAKE = Benchmark(
    "fake",
    (
        Task("a", cross_entropy, (accuracy(),), "classification"),
        Task("b", mse, (mean_absolute_error(),), "regression"),
    ),
    _DATA,
    _DATA,
    _DATA,
    model=lambda: (torch.nn.Identity(), [torch.nn.Identity(), torch.nn.Identity()]),
    defaults=TrainingDefaults(epochs=1, batch_size=2, lr=0.1),
)


def test_delta_m_mixed_directions_by_hand():
    # accuracy 0.90 vs 0.80: higher is better, +12.5% better -> -12.5
    # error 3.0 vs 2.0: lower is better, +50% worse -> +50
    assert delta_m([0.90, 3.0], [0.80, 2.0], [True, False]) == pytest.approx((-12.5 + 50) / 2)


def test_delta_m_three_metrics_by_hand():
    value = delta_m([0.5, 1.0, 4.0], [0.4, 2.0, 5.0], [True, False, False])
    # -(0.5-0.4)/0.4 = -25%; (1-2)/2 = -50%; (4-5)/5 = -20%  -> mean -31.666...
    assert value == pytest.approx(-95 / 3)


@pytest.mark.parametrize(
    ("value", "baseline", "higher", "better"),
    [(0.1, -0.2, True, True), (-0.5, -0.2, True, False), (-0.3, -0.2, False, True),
     (0.3, 0.2, True, True), (-0.1, -0.2, False, False)],
)  # fmt: skip
def test_delta_m_reads_better_as_negative_whatever_the_baselines_sign(
    value, baseline, higher, better
):
    """An R² or a log-likelihood can be negative: Δm% divides by |B|, so its sign still says
    which model is better, and its size is the change relative to the baseline's size."""
    result = delta_m([value], [baseline], [higher])
    assert (result < 0) == better
    assert abs(result) == pytest.approx(100 * abs(value - baseline) / abs(baseline))


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


def _run(method, seed, test, single_task=None, failure=None, validation=None, history=()):
    records = [
        EpochRecord(epoch=i + 1, seconds=0.5, train_losses=[0.0, 0.0], validation=v, test=t)
        for i, (v, t) in enumerate(history)
    ]
    records.append(
        EpochRecord(
            epoch=len(records) + 1,
            seconds=0.5,
            train_losses=[0.0, 0.0],
            validation=validation or test,
            test=test,
        )
    )
    return RunResult(
        benchmark="fake",
        method=method,
        seed=seed,
        task_names=["a", "b"],
        metric_names=["a/accuracy", "b/mae"],
        single_task=single_task,
        epochs=records,
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
    rows = summarise(runs, FAKE)
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
    text = markdown_table(rows, FAKE)
    assert "| 1 | good |" in text
    assert "1 failed" in text
    assert csv_table(rows, FAKE).splitlines()[0].startswith("rank,method,a/accuracy_mean")


def test_csv_sums_the_metrics_only_where_the_benchmark_names_that_sum():
    """An accuracy plus an error means nothing: FAKE names no sum, so the CSV has none; a
    benchmark whose metrics add up (``summary_name``) gets the per-seed sums' mean."""
    runs = [_run("ew", 0, [0.5, 1.0]), _run("ew", 1, [0.7, 2.0])]
    plain = csv_table(summarise(runs, FAKE), FAKE)
    assert "sum_of_metrics" not in plain
    summed = dataclasses.replace(FAKE, summary_name="Σ")
    (row,) = csv.DictReader(io.StringIO(csv_table(summarise(runs, summed), summed)))
    assert float(row["sum_of_metrics_mean"]) == pytest.approx((1.5 + 2.7) / 2)
    assert (row["method"], row["seeds"]) == ("ew", "2")  # the columns after it still line up


def test_summarise_without_baselines_has_no_delta_m():
    rows = summarise([_run("ew", 0, [0.5, 1.0])], FAKE)
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


def _baselines():
    return [
        _run(SINGLE_TASK, 0, [0.80, 9.9], single_task=0),
        _run(SINGLE_TASK, 0, [0.10, 2.0], single_task=1),
    ]


def test_selection_rules_pick_the_right_epoch():
    # Epoch 1: validation good, test 0.6/2.0; epoch 2 (last): validation bad, test 0.9/2.0.
    run = _run(
        "m",
        0,
        [0.9, 2.0],
        validation=[0.1, 9.0],
        history=[([0.8, 2.0], [0.6, 2.0])],
    )
    rows = summarise([*_baselines(), run], FAKE, Selection("last"))
    assert rows[1].metric_means == [0.9, 2.0]
    rows = summarise([*_baselines(), run], FAKE, parse_selection("best-val"))
    assert rows[1].metric_means == [0.6, 2.0]
    rows = summarise([*_baselines(), run], FAKE, parse_selection("mean-last-2"))
    assert rows[1].metric_means == pytest.approx([0.75, 2.0])


def test_parse_selection():
    assert parse_selection("mean-last-k") == Selection("mean-last", 3)
    assert str(parse_selection("mean-last-5")) == "mean-last-5"
    for bad in ["first", "mean-last-0", "mean-last-"]:
        with pytest.raises(ValueError, match="--select"):
            parse_selection(bad)


def test_rows_compare_with_equal_weights_per_seed():
    runs = [
        *_baselines(),
        _run(SINGLE_TASK, 1, [0.80, 9.9], single_task=0),
        _run(SINGLE_TASK, 1, [0.10, 2.0], single_task=1),
        _run(SINGLE_TASK, 2, [0.80, 9.9], single_task=0),
        _run(SINGLE_TASK, 2, [0.10, 2.0], single_task=1),
        _run("ew", 0, [0.80, 2.0]),
        _run("ew", 1, [0.80, 2.2]),
        _run("ew", 2, [0.80, 2.4]),
        _run("better", 0, [0.80, 1.0]),
        _run("better", 1, [0.80, 1.3]),
        _run("better", 2, [0.80, 1.4]),
    ]
    rows = {row.method: row for row in summarise(runs, FAKE)}
    comparison = rows["better"].versus_reference
    # Δm = 25·(b − 2) here: ew (0, 5, 10), better (−25, −17.5, −15); differences −25, −22.5, −25.
    assert comparison.wins == 3
    assert comparison.losses == 0
    assert comparison.mean_difference == pytest.approx(-72.5 / 3)
    assert comparison.t == pytest.approx(-29.0)
    # Student's t with 2 degrees of freedom has the closed form p = 1 − |t|/√(t² + 2).
    assert comparison.p_value == pytest.approx(1 - 29 / math.sqrt(29**2 + 2))
    assert comparison.verdict == "better"
    assert rows["ew"].versus_reference is None
    assert rows["better"].rank == 1
    assert rows["ew"].tied_with_best is False


# A zero single-task baseline: Δm% n/a everywhere, one warning, no abort.


def _single_task_runs(b_values):
    """Single-task models of seeds 0, 1, ...: task a at 0.8 accuracy, task b's MAE per seed."""
    return [
        run
        for seed, b in enumerate(b_values)
        for run in (
            _run(SINGLE_TASK, seed, [0.8, 9.9], single_task=0),
            _run(SINGLE_TASK, seed, [0.1, b], single_task=1),
        )
    ]


def test_zero_mean_baseline_names_each_seed_and_gives_na_everywhere():
    # The baseline is the mean over seeds: +0.5 and −0.5 average to exactly 0.
    runs = [
        *_single_task_runs([0.5, -0.5]),
        _run("ew", 0, [0.9, 1.0]),
        _run("ew", 1, [0.7, 2.0]),
        _run("better", 0, [0.9, 0.5]),
        _run("better", 1, [0.9, 0.5]),
    ]
    with pytest.warns(ZeroBaselineWarning) as record:
        rows = summarise(runs, FAKE)
    assert len(record) == 1
    message = str(record[0].message)
    assert "benchmark 'fake'" in message
    assert "b/mae is 0 (seed 0: 0.5, seed 1: -0.5)" in message
    assert "a/accuracy" not in message
    assert [row.rank for row in rows] == [None, None, None]
    assert all(math.isnan(row.delta_m_mean) and math.isnan(row.delta_m_std) for row in rows)
    assert delta_m_notes(rows) == [message]
    # The metric columns are unaffected.
    by_name = {row.method: row for row in rows}
    assert by_name["ew"].metric_means == pytest.approx([0.8, 1.5])
    assert by_name["better"].versus_reference.verdict == "n/a"
    text = text_table(rows, FAKE)
    assert "nan" not in text
    assert text.count("n/a") == 3 + 1  # Δm% of every row, and the verdict of "better"
    assert "| — | better |" in markdown_table(rows, FAKE)
    parsed = list(csv.DictReader(io.StringIO(csv_table(rows, FAKE))))
    assert [math.isnan(float(line["delta_m_percent_mean"])) for line in parsed] == [True] * 3
    assert [line["delta_m_note"] for line in parsed] == [message] * 3


def test_nonzero_baselines_have_no_note_and_no_warning():
    runs = [*_single_task_runs([1.0, 1.0]), _run("ew", 0, [0.8, 2.0]), _run("ew", 1, [0.8, 2.0])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = summarise(runs, FAKE)
    assert delta_m_notes(rows) == []
    assert rows[1].delta_m_mean == pytest.approx(50.0)
    assert rows[1].rank == 1
    assert "delta_m_note" in csv_table(rows, FAKE).splitlines()[0]


def test_a_nan_metric_at_one_seed_unranks_only_that_row():
    """A NaN metric (e.g. a macro-F1 with no classes) gives NaN, not a crash in the std."""
    runs = [
        *_single_task_runs([2.0, 2.0]),
        _run("ew", 0, [0.8, 2.0]),
        _run("ew", 1, [0.8, 3.0]),
        _run("odd", 0, [0.8, 1.0]),
        _run("odd", 1, [math.nan, 1.0]),
    ]
    with pytest.warns(NanMetricWarning, match=r"a/accuracy in 1 run\(s\): odd seed 1\)"):
        rows = {row.method: row for row in summarise(runs, FAKE)}
    odd = rows["odd"]
    assert math.isnan(odd.metric_means[0])
    assert math.isnan(odd.metric_stds[0])
    assert odd.metric_means[1] == 1.0
    assert odd.delta_m_by_seed[0] == pytest.approx(-25.0)
    assert math.isnan(odd.delta_m_by_seed[1])
    assert math.isnan(odd.delta_m_mean)
    assert odd.rank is None
    # The row whose Δm% the NaN leaves undefined says why; the others' notes stay empty.
    assert "a reported test metric is NaN (a/accuracy in 1 run(s): odd seed 1)" in odd.delta_m_note
    assert rows["ew"].delta_m_note == ""
    assert rows["ew"].rank == 1
    # The paired test uses the one seed both rows have a Δm% for: too few for a verdict.
    assert (odd.versus_reference.seeds, odd.versus_reference.wins) == (1, 1)
    assert odd.versus_reference.verdict == "n/a"


def test_delta_m_plot_lists_the_rows_it_leaves_out(tmp_path):
    pytest.importorskip("matplotlib")
    from taskbalance.bench import plots

    runs = [
        *_single_task_runs([2.0, 2.0]),
        _run("ew", 0, [0.8, 2.0]),
        _run("odd", 0, [math.nan, 1.0]),
    ]
    rows = summarise(runs, FAKE)
    assert plots.plot_delta_m_ranking(rows, tmp_path / "ranked.png")
    assert (tmp_path / "ranked.png").stat().st_size > 0
    with pytest.warns(ZeroBaselineWarning):
        unranked = summarise([*_single_task_runs([0.0, 0.0]), _run("ew", 0, [0.8, 2.0])], FAKE)
    assert not plots.plot_delta_m_ranking(unranked, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_the_caption_warns_that_two_seeds_rank_nothing():
    """With 2 seeds the paired t-test has 1 degree of freedom (a verdict needs t > 12.7):
    the caption says so; with 3 seeds or more it does not, and 1 seed has no test at all."""
    from taskbalance.bench.report import caption

    def text(seeds):
        return caption(FAKE, epochs=1, seeds=seeds, selection=Selection())

    assert "with 2 seeds the paired t-test has 1 degree of freedom" in text([0, 1])
    assert "t > 12.7" in text([0, 1])
    assert "degree of freedom" not in text([0, 1, 2])
    assert "with 1 seed there is no paired test" in text([0])
    # The threshold the note quotes: the two-sided 5% point of Student's t with 1 dof.
    scipy_stats = pytest.importorskip("scipy.stats")
    assert scipy_stats.t.ppf(0.975, 1) == pytest.approx(12.706, abs=1e-3)


def test_train_reports_the_last_epochs_mean_weights_beside_the_last_steps():
    """Two epochs of 4 steps: the last epoch is steps 4–7, whose weights average to (0.5, 0.5)
    while the last step alone reads (1, 0) (a task without labels there, or one RLW draw)."""
    import dataclasses

    from taskbalance.bench.cli import _last_epoch_mean_weights

    run = _run("rlw", 0, [0.9, 0.1], history=[([0.9, 0.1], [0.9, 0.1])])
    rows = [[0.9, 0.1]] * 4 + [[0.0, 1.0], [0.5, 0.5], [0.5, 0.5], [1.0, 0.0]]
    run = dataclasses.replace(run, weight_steps=list(range(8)), weight_rows=rows)
    assert run.final_weights == [1.0, 0.0]
    assert _last_epoch_mean_weights(run) == [0.5, 0.5]
    assert _last_epoch_mean_weights(dataclasses.replace(run, weight_rows=[], weight_steps=[])) == []


def test_one_seed_marks_no_row_as_tied_with_the_best():
    """With one seed there is no paired test: every other row read "≈" (a new user's find)."""
    runs = [*_single_task_runs([2.0, 2.0]), _run("ew", 0, [0.8, 2.0]), _run("odd", 0, [0.7, 3.0])]
    rows = {row.method: row for row in summarise(runs, FAKE)}
    ranked = sorted((row for row in rows.values() if row.rank), key=lambda row: row.rank)
    assert ranked[0].tied_with_best
    assert not ranked[1].tied_with_best


def _epochs(validations, tests):
    records = [
        EpochRecord(epoch=i + 1, seconds=0.5, train_losses=[0.0, 0.0], validation=v, test=t)
        for i, (v, t) in enumerate(zip(validations, tests, strict=True))
    ]
    return RunResult(
        benchmark="f1s",
        method="m",
        seed=0,
        task_names=["a", "b"],
        metric_names=["a/f1", "b/f1"],
        epochs=records,
    )


def test_best_val_mean_is_famos_rule_where_best_val_differs():
    """FAMO's CelebA trainer keeps the epoch of highest mean validation F1 (first at a tie);
    best-val's relative change weighs each metric by 1/baseline and picks another epoch."""
    run = _epochs(
        validations=[[0.90, 0.12], [0.95, 0.10], [0.95, 0.10]],  # means 0.51, 0.525, 0.525
        tests=[[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]],
    )
    both_higher = [True, True]
    assert selected_test(run, parse_selection("best-val-mean"), both_higher) == [0.2, 0.2]
    assert selected_test(run, parse_selection("best-val"), both_higher, [0.9, 0.1]) == [0.1, 0.1]
    # a single-task model is judged on its own metric only; lower-is-better metrics: lowest
    assert selected_test(run, Selection("best-val-mean"), both_higher, used=slice(1, 2)) == [
        0.1,
        0.1,
    ]
    assert selected_test(run, Selection("best-val-mean"), [False, False]) == [0.1, 0.1]
    assert "best mean validation metric" in parse_selection("best-val-mean").describe()


def test_best_val_mean_refuses_mixed_directions_before_training(tmp_path):
    with pytest.raises(ValueError, match="best-val-mean: the mean of metrics"):
        check_selection(Selection("best-val-mean"), FAKE.directions)
    check_selection(Selection("best-val"), FAKE.directions)  # scored per metric: accepted
    with pytest.raises(ValueError, match="best-val-mean: the mean of metrics"):
        run_comparison(
            BenchmarkSource("fake"),
            ["ew"],
            seeds=[0],
            out=tmp_path,
            selection=Selection("best-val-mean"),
            benchmark=FAKE,
        )
    assert not (tmp_path / "runs").exists()  # refused before any run was planned


def test_pareto_plot_lists_a_point_with_an_infinite_metric(tmp_path, monkeypatch):
    """A diverged run's infinite mean cannot be drawn: it is named under the axes, as the
    far outliers are, instead of vanishing from the figure."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from taskbalance.bench import plots

    runs = [
        *_single_task_runs([0.9, 0.5]),
        _run("ew", 0, [0.8, 0.6]),
        _run("uw", 0, [0.85, 0.55]),
        _run("blown", 0, [0.7, math.inf]),
    ]
    rows = summarise(runs, FAKE)
    notes: list[str] = []
    real_text = Figure.text
    monkeypatch.setattr(
        Figure,
        "text",
        lambda self, x, y, s, *a, **k: notes.append(s) or real_text(self, x, y, s, *a, **k),
    )
    assert plots.plot_pareto(rows, FAKE, tmp_path / "pareto.png")
    assert any("blown (0.7, inf)" in note for note in notes)
