"""A zero single-task baseline leaves Δm% undefined: the comparison reports it, never aborts.

The exact numbers, on hand-made runs, are checked in ``test_bench_metrics.py``.

The end-to-end tests run a real (tiny) ``taskbalance compare`` on a benchmark built with the
public ``taskbalance.bench`` API, whose ``reg/saturated`` metric (the share of predictions
beyond ±10⁶) is exactly 0 for every model, the single-task ones included.
"""

from __future__ import annotations

import csv
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
from taskbalance.bench.losses import cross_entropy, mse
from taskbalance.bench.metrics import SINGLE_TASK

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
