"""Δm% (Maninis et al., CVPR 2019) and the aggregation of runs into a comparison table.

``Δm = (1/M)·Σ_m (−1)^{δ_m}·(M_method,m − M_single,m)/M_single,m·100`` over all M metrics, with
``δ_m = 1`` where higher is better: a method that is better than the single-task baselines on
every metric has a negative Δm, and lower Δm is better.

Aggregation: the single-task baseline of each metric is its mean over seeds (each seed's
single-task model for that task, trained by the same harness with the same budget). Each seed
of a method gives one Δm against that baseline, and the table reports the mean ± sample
standard deviation over seeds, for Δm and for every metric. The ``single-task`` row itself is
scored the same way, so its Δm spread shows the seed noise.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from taskbalance.bench.datasets import Task
from taskbalance.bench.harness import RunResult

SINGLE_TASK = "single-task"


def delta_m(
    method_metrics: Sequence[float],
    single_task_metrics: Sequence[float],
    higher_is_better: Sequence[bool],
) -> float:
    """Δm% of one method against the single-task baselines (lower is better).

    Args:
        method_metrics: the method's value of each metric.
        single_task_metrics: the single-task baseline of each metric (non-zero).
        higher_is_better: each metric's direction (δ_m = 1 when True).

    Returns:
        ``(1/M)·Σ_m (−1)^{δ_m}·(M_method,m − M_single,m)/M_single,m·100``; NaN when any input is.

    Raises:
        ValueError: the three sequences differ in length, are empty, or a baseline is zero.

    Example:
        >>> round(delta_m([0.9, 2.0], [1.0, 1.0], [True, False]), 6)  # (+10% + 100%) / 2
        55.0
    """
    count = len(method_metrics)
    if count == 0 or len(single_task_metrics) != count or len(higher_is_better) != count:
        raise ValueError(
            "delta_m: expected three non-empty sequences of equal length, got lengths "
            f"{count}, {len(single_task_metrics)}, {len(higher_is_better)}"
        )
    total = 0.0
    for index, (value, baseline, higher) in enumerate(
        zip(method_metrics, single_task_metrics, higher_is_better, strict=True)
    ):
        if baseline == 0:
            raise ValueError(f"delta_m: single-task metric {index} is 0; Δm% divides by it")
        sign = -1.0 if higher else 1.0
        total += sign * (value - baseline) / baseline
    return 100.0 * total / count


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN for none).

    Args:
        values: the numbers, e.g. one per seed.

    Returns:
        ``(mean, std)``.
    """
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return float(values[0]), 0.0
    return float(statistics.fmean(values)), float(statistics.stdev(values))


@dataclass
class MethodSummary:
    """One row of the comparison table.

    Args:
        method: method name, or ``"single-task"``.
        metric_means: mean over seeds of each task's test metric.
        metric_stds: sample standard deviation over seeds of each task's test metric.
        delta_m_mean: mean over seeds of Δm% (NaN without baselines).
        delta_m_std: sample standard deviation over seeds of Δm%.
        seconds_per_epoch: mean training wall time per epoch.
        seeds: number of seeds aggregated.
        failures: runs that stopped early (non-finite loss, solver error); not aggregated.
        rank: 1 for the lowest Δm% among the methods; None for the single-task row or no Δm.
        summary_mean: mean over seeds of the sum of the per-task metrics (when meaningful).
        summary_std: its sample standard deviation.
    """

    method: str
    metric_means: list[float]
    metric_stds: list[float]
    delta_m_mean: float
    delta_m_std: float
    seconds_per_epoch: float
    seeds: int
    failures: int = 0
    rank: int | None = None
    summary_mean: float = math.nan
    summary_std: float = math.nan
    delta_m_values: list[float] = field(default_factory=list)


def single_task_baselines(runs: Sequence[RunResult], num_tasks: int) -> dict[int, list[float]]:
    """Each seed's single-task metrics: ``{seed: [metric of task k from model k, ...]}``.

    Only seeds whose K single-task models all completed are returned.

    Args:
        runs: any runs; single-task runs are picked out.
        num_tasks: K.

    Returns:
        The per-seed baseline vectors.
    """
    by_seed: dict[int, dict[int, float]] = {}
    for run in runs:
        if run.single_task is not None and run.completed:
            by_seed.setdefault(run.seed, {})[run.single_task] = run.final_test[run.single_task]
    return {
        seed: [tasks[k] for k in range(num_tasks)]
        for seed, tasks in sorted(by_seed.items())
        if len(tasks) == num_tasks
    }


def summarise(runs: Sequence[RunResult], tasks: Sequence[Task]) -> list[MethodSummary]:
    """Aggregate finished runs into table rows: the single-task row first, then by rank.

    Interrupted runs are left out; failed runs are counted but not aggregated.

    Args:
        runs: the runs of one benchmark (several methods and seeds, and single-task models).
        tasks: the benchmark's tasks.

    Returns:
        One :class:`MethodSummary` per method (and one for the single-task models).
    """
    directions = [task.higher_is_better for task in tasks]
    num_tasks = len(tasks)
    per_seed_baselines = single_task_baselines(runs, num_tasks)
    baseline: list[float] | None = None
    if per_seed_baselines:
        vectors = list(per_seed_baselines.values())
        baseline = [statistics.fmean(vector[k] for vector in vectors) for k in range(num_tasks)]

    rows: list[MethodSummary] = []
    if per_seed_baselines:
        single_runs = [run for run in runs if run.single_task is not None and run.completed]
        rows.append(
            _summary_row(
                SINGLE_TASK,
                list(per_seed_baselines.values()),
                baseline,
                directions,
                seconds=statistics.fmean(run.seconds_per_epoch for run in single_runs),
                failures=0,
            )
        )
    methods: list[str] = []
    for run in runs:
        if run.single_task is None and run.method not in methods:
            methods.append(run.method)
    method_rows = []
    for method in methods:
        method_runs = [run for run in runs if run.method == method and run.single_task is None]
        finished = [run for run in method_runs if run.completed]
        failures = sum(run.failure is not None for run in method_runs)
        if not finished and not failures:
            continue
        seconds = (
            statistics.fmean(run.seconds_per_epoch for run in finished) if finished else math.nan
        )
        method_rows.append(
            _summary_row(
                method,
                [run.final_test for run in finished],
                baseline,
                directions,
                seconds=seconds,
                failures=failures,
            )
        )
    ranked = sorted(
        method_rows,
        key=lambda row: (math.isnan(row.delta_m_mean), row.delta_m_mean, row.method),
    )
    for position, row in enumerate(ranked, start=1):
        row.rank = None if math.isnan(row.delta_m_mean) else position
    return rows + ranked


def _summary_row(
    method: str,
    metric_vectors: list[list[float]],
    baseline: list[float] | None,
    directions: list[bool],
    *,
    seconds: float,
    failures: int,
) -> MethodSummary:
    num_tasks = len(directions)
    columns = [[vector[k] for vector in metric_vectors] for k in range(num_tasks)]
    statistics_per_task = [mean_and_std(column) for column in columns]
    deltas = (
        [delta_m(vector, baseline, directions) for vector in metric_vectors]
        if baseline is not None
        else []
    )
    delta_mean, delta_std = mean_and_std(deltas)
    summary_mean, summary_std = mean_and_std([sum(vector) for vector in metric_vectors])
    return MethodSummary(
        method=method,
        metric_means=[mean for mean, _ in statistics_per_task],
        metric_stds=[std for _, std in statistics_per_task],
        delta_m_mean=delta_mean,
        delta_m_std=delta_std,
        seconds_per_epoch=seconds,
        seeds=len(metric_vectors),
        failures=failures,
        summary_mean=summary_mean,
        summary_std=summary_std,
        delta_m_values=deltas,
    )


# ---------------------------------------------------------------------------------------------
# Formatting.


def metric_scale(task: Task) -> float:
    """Display factor of a task's metric: accuracies are shown in percent."""
    return 100.0 if task.metric == "accuracy" else 1.0


def metric_header(task: Task) -> str:
    """Column header of a task's metric, with its direction arrow."""
    arrow = "↑" if task.higher_is_better else "↓"
    unit = " %" if task.metric == "accuracy" else ""
    return f"{task.name} {task.metric}{unit} {arrow}"


def _decimals(value: float) -> int:
    magnitude = abs(value)
    if magnitude >= 100:
        return 1
    if magnitude >= 1:
        return 2
    return 4


def _number(value: float, decimals: int | None = None) -> str:
    if math.isnan(value):
        return "—"
    places = _decimals(value) if decimals is None else decimals
    return f"{value:.{places}f}"


def _mean_std_text(mean: float, std: float, decimals: int | None = None) -> str:
    """``mean ± std`` with both numbers to the precision the mean's magnitude calls for."""
    if math.isnan(mean):
        return "—"
    places = _decimals(mean) if decimals is None else decimals
    return f"{_number(mean, places)} ± {_number(std, places)}"


def table_columns(tasks: Sequence[Task], summary_name: str | None) -> list[str]:
    """Headers of the comparison table."""
    headers = ["rank", "method", *(metric_header(task) for task in tasks)]
    if summary_name:
        headers.append(f"{summary_name} ↓")
    return [*headers, "Δm% ↓", "s/epoch", "seeds"]


def table_cells(
    rows: Sequence[MethodSummary], tasks: Sequence[Task], summary_name: str | None
) -> list[list[str]]:
    """The comparison table as text cells, one list per row (no header)."""
    cells = []
    for row in rows:
        line = [str(row.rank) if row.rank is not None else "—", row.method]
        for task, mean, std in zip(tasks, row.metric_means, row.metric_stds, strict=True):
            scale = metric_scale(task)
            line.append(_mean_std_text(mean * scale, std * scale))
        if summary_name:
            line.append(_mean_std_text(row.summary_mean, row.summary_std))
        delta_text = _mean_std_text(round(row.delta_m_mean, 2) + 0.0, row.delta_m_std, decimals=2)
        if row.failures:
            delta_text += f" ({row.failures} failed)"
        line += [delta_text, _number(row.seconds_per_epoch, 3), str(row.seeds)]
        cells.append(line)
    return cells


def markdown_table(
    rows: Sequence[MethodSummary], tasks: Sequence[Task], summary_name: str | None = None
) -> str:
    """The comparison table in GitHub Markdown.

    Args:
        rows: from :func:`summarise`.
        tasks: the benchmark's tasks.
        summary_name: header of the per-run sum of metrics, when the benchmark has one.

    Returns:
        The table, ending with a newline.
    """
    headers = table_columns(tasks, summary_name)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in table_cells(rows, tasks, summary_name)]
    return "\n".join(lines) + "\n"


def text_table(
    rows: Sequence[MethodSummary], tasks: Sequence[Task], summary_name: str | None = None
) -> str:
    """The comparison table aligned in plain text for the terminal."""
    headers = table_columns(tasks, summary_name)
    body = table_cells(rows, tasks, summary_name)
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *body]
    )


def csv_table(rows: Sequence[MethodSummary], tasks: Sequence[Task]) -> str:
    """The comparison table as CSV with raw numbers (accuracies as fractions).

    Args:
        rows: from :func:`summarise`.
        tasks: the benchmark's tasks.

    Returns:
        CSV text with a header line.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["rank", "method"]
    for task in tasks:
        header += [f"{task.name}_{task.metric}_mean", f"{task.name}_{task.metric}_std"]
    header += [
        "sum_of_metrics_mean",
        "sum_of_metrics_std",
        "delta_m_percent_mean",
        "delta_m_percent_std",
        "seconds_per_epoch",
        "seeds",
        "failed_runs",
    ]
    writer.writerow(header)
    for row in rows:
        line: list[object] = ["" if row.rank is None else row.rank, row.method]
        for mean, std in zip(row.metric_means, row.metric_stds, strict=True):
            line += [mean, std]
        line += [
            row.summary_mean,
            row.summary_std,
            row.delta_m_mean,
            row.delta_m_std,
            row.seconds_per_epoch,
            row.seeds,
            row.failures,
        ]
        writer.writerow(line)
    return buffer.getvalue()
