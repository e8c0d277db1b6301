"""A zero single-task baseline leaves Δm% undefined: the comparison reports it, never aborts.

The end-to-end tests run a real (tiny) ``taskbalance compare`` on a benchmark built with the
public ``taskbalance.bench`` API, whose ``reg/saturated`` metric (the share of predictions
beyond ±10⁶) is exactly 0 for every model, the single-task ones included.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from taskbalance.bench import (
    Benchmark,
    Task,
    TensorTaskDataset,
    TrainingDefaults,
    ZeroBaselineWarning,
    accuracy,
    mean_absolute_error,
    mean_metric,
)
from taskbalance.bench.harness import EpochRecord, RunResult
from taskbalance.bench.losses import cross_entropy, mse
from taskbalance.bench.metrics import SINGLE_TASK, summarise
from taskbalance.bench.report import csv_table, delta_m_notes, markdown_table, text_table

ZERO_METRIC = "reg/saturated"


def _saturated(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per example: the share of its predictions beyond ±10⁶ (0 for any sane model)."""
    return (output.abs() > 1e6).float().reshape(output.shape[0], -1).mean(dim=1)


def make_zero_benchmark(small: bool = False, data_seed: int = 0) -> Benchmark:
    """Two tiny tasks; the regression task reports a metric that is always exactly 0."""
    generator = torch.Generator().manual_seed(data_seed)

    def split(size: int) -> TensorTaskDataset:
        x = torch.randn(size, 4, generator=generator)
        return TensorTaskDataset(x, [(x[:, 0] > 0).long(), x[:, 1:2].clone()])

    saturated = mean_metric("saturated", _saturated, higher_is_better=False)
    tasks = (
        Task("cls", cross_entropy, (accuracy(),), "classification"),
        Task("reg", mse, (mean_absolute_error(), saturated), "regression"),
    )
    return Benchmark(
        "zero-demo",
        tasks,
        split(32),
        split(16),
        split(16),
        model=lambda: (
            torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()),
            [torch.nn.Linear(8, 2), torch.nn.Linear(8, 1)],
        ),
        defaults=TrainingDefaults(epochs=1, batch_size=16, lr=0.01),
    )


SPEC = f"{Path(__file__).resolve()}:make_zero_benchmark"


def test_compare_cli_reports_na_delta_m_instead_of_aborting(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from taskbalance.bench import cli

    argv = ["compare", "--bench", SPEC, "--methods", "ew,uw", "--seeds", "2"]
    code = cli.main([*argv, "--out", str(tmp_path), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warning = next(line for line in captured.err.splitlines() if "warning" in line)
    for part in ("'zero-demo'", f"{ZERO_METRIC} is 0", "seed 0: 0", "seed 1: 0", "Δm%"):
        assert part in warning
    assert "Traceback" not in captured.err
    # The terminal table: every row present, Δm% n/a, no rank, no verdict.
    table = captured.out[captured.out.index("rank") :].splitlines()
    rows = {line.split()[1]: line.split() for line in table[1:] if line.startswith("—")}
    assert set(rows) == {SINGLE_TASK, "ew", "uw"}
    assert all("n/a" in cells for cells in rows.values())
    assert f"Note: benchmark 'zero-demo': the single-task baseline of {ZERO_METRIC}" in captured.out

    with (tmp_path / "comparison.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert [record["method"] for record in records] == [SINGLE_TASK, "ew", "uw"]
    for record in records:
        assert record["rank"] == ""
        assert math.isnan(float(record["delta_m_percent_mean"]))
        assert ZERO_METRIC in record["delta_m_note"]
        assert float(record[f"{ZERO_METRIC}_mean"]) == 0.0
    uw = records[2]
    assert (uw["wins_vs_ew"], uw["losses_vs_ew"], uw["verdict_vs_ew"]) == ("0", "0", "n/a")
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| — | uw |" in markdown
    assert "| n/a |" in markdown
    assert "Note: benchmark 'zero-demo'" in markdown
    notes = json.loads((tmp_path / "metadata.json").read_text())["delta_m_notes"]
    assert len(notes) == 1
    assert ZERO_METRIC in notes[0]
    # No Δm% ranking plot; the plots of the metrics themselves are still drawn.
    assert not (tmp_path / "delta_m.png").exists()
    assert (tmp_path / "task_metrics.png").is_file()
    assert (tmp_path / "pareto.png").is_file()


def test_run_comparison_warns_once_and_leaves_every_row_unranked(tmp_path):
    from taskbalance.bench.compare import BenchmarkSource, run_comparison
    from taskbalance.bench.harness import Method

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comparison = run_comparison(
            BenchmarkSource(SPEC), [Method("ew"), Method("dwa")], seeds=[0, 1], out=tmp_path
        )
    zero = [w for w in caught if issubclass(w.category, ZeroBaselineWarning)]
    assert len(zero) == 1
    assert str(zero[0].message) == comparison.rows[0].delta_m_note
    assert [row.method for row in comparison.rows] == [SINGLE_TASK, "dwa", "ew"]
    for row in comparison.rows:
        assert row.rank is None
        assert math.isnan(row.delta_m_mean)
        assert all(math.isnan(value) for value in row.delta_m_values)
        assert row.seeds == 2
        assert not row.tied_with_best
    versus = comparison.rows[1].versus_reference
    assert versus is not None
    assert (versus.seeds, versus.wins, versus.losses, versus.verdict) == (0, 0, 0, "n/a")


# ---------------------------------------------------------------------------------------------
# The same on hand-made runs: exact numbers, no training.

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


def _run(method, seed, test, single_task=None):
    record = EpochRecord(epoch=1, seconds=0.5, train_losses=[0.0, 0.0], validation=test, test=test)
    return RunResult(
        benchmark="fake",
        method=method,
        seed=seed,
        task_names=["a", "b"],
        metric_names=["a/accuracy", "b/mae"],
        single_task=single_task,
        epochs=[record],
    )


def _baselines(b_values):
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
        *_baselines([0.5, -0.5]),
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
    runs = [*_baselines([1.0, 1.0]), _run("ew", 0, [0.8, 2.0]), _run("ew", 1, [0.8, 2.0])]
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
        *_baselines([2.0, 2.0]),
        _run("ew", 0, [0.8, 2.0]),
        _run("ew", 1, [0.8, 3.0]),
        _run("odd", 0, [0.8, 1.0]),
        _run("odd", 1, [math.nan, 1.0]),
    ]
    rows = {row.method: row for row in summarise(runs, FAKE)}
    odd = rows["odd"]
    assert math.isnan(odd.metric_means[0])
    assert math.isnan(odd.metric_stds[0])
    assert odd.metric_means[1] == 1.0
    assert odd.delta_m_by_seed[0] == pytest.approx(-25.0)
    assert math.isnan(odd.delta_m_by_seed[1])
    assert math.isnan(odd.delta_m_mean)
    assert odd.rank is None
    assert odd.delta_m_note == ""
    assert rows["ew"].rank == 1
    # The paired test uses the one seed both rows have a Δm% for: too few for a verdict.
    assert (odd.versus_reference.seeds, odd.versus_reference.wins) == (1, 1)
    assert odd.versus_reference.verdict == "n/a"


def test_delta_m_plot_lists_the_rows_it_leaves_out(tmp_path):
    pytest.importorskip("matplotlib")
    from taskbalance.bench import plots

    runs = [
        *_baselines([2.0, 2.0]),
        _run("ew", 0, [0.8, 2.0]),
        _run("odd", 0, [math.nan, 1.0]),
    ]
    rows = summarise(runs, FAKE)
    assert plots.plot_delta_m_ranking(rows, tmp_path / "ranked.png")
    assert (tmp_path / "ranked.png").stat().st_size > 0
    with pytest.warns(ZeroBaselineWarning):
        unranked = summarise([*_baselines([0.0, 0.0]), _run("ew", 0, [0.8, 2.0])], FAKE)
    assert not plots.plot_delta_m_ranking(unranked, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
