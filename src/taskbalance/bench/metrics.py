"""Δm% (Maninis et al., CVPR 2019) and the aggregation of runs into a comparison table.

``Δm = (1/M)·Σ_m (−1)^{δ_m}·(M_method,m − M_single,m)/M_single,m·100`` over all M metrics, with
``δ_m = 1`` where higher is better: a method that is better than the single-task baselines on
every metric has a negative Δm, and lower Δm is better.

Aggregation: the single-task baseline of each metric is its mean over seeds (each seed's
single-task model for that task, trained by the same harness with the same budget). Each seed
of a method gives one Δm against that baseline, and the table reports the mean ± sample
standard deviation over seeds, for Δm and for every metric. The ``single-task`` row itself is
scored the same way, so its Δm spread shows the seed noise.

A baseline of exactly 0 (e.g. an error count that the single-task model drives to zero on tiny
data) leaves Δm% undefined, since it divides by the baseline. A comparison is not aborted for
that: every row's Δm% is NaN (``n/a`` in the tables, unranked, left out of the Δm% plot), each
row's :attr:`MethodSummary.delta_m_note` says which metric was 0, and :func:`summarise` emits
one :class:`ZeroBaselineWarning` naming the benchmark, the metric and each seed's baseline.
A NaN metric (a failed metric, an empty class, a metric that averaged over unlabelled
samples) likewise gives a NaN mean, std and Δm%: :func:`summarise` then emits one
:class:`NanMetricWarning` naming each such metric and the runs where it is NaN, and the rows
whose Δm% it leaves undefined carry that sentence as their note.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from taskbalance.bench.api import Benchmark
from taskbalance.bench.harness import RunResult
from taskbalance.bench.selection import Selection, selected_test
from taskbalance.bench.stats import PairedComparison, paired_comparison
from taskbalance.metrics import delta_m as delta_m  # re-exported: the one Δm% formula

SINGLE_TASK = "single-task"
#: The row every method is compared with, seed by seed.
REFERENCE_METHOD = "ew"


class ZeroBaselineWarning(UserWarning):
    """A single-task baseline metric is exactly 0, so Δm% (which divides by it) is undefined."""


class NanMetricWarning(UserWarning):
    """A reported test metric is NaN in some run, so Δm% is undefined where it enters."""


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN for none or any NaN).

    Args:
        values: the numbers, e.g. one per seed.

    Returns:
        ``(mean, std)``.

    Example:
        >>> mean_and_std([1.0, 3.0])[0], mean_and_std([1.0, float("nan")])
        (2.0, (nan, nan))
    """
    # statistics.stdev cannot take a NaN (it converts to exact fractions): a NaN seed makes
    # the whole column undefined rather than being dropped, which would hide it.
    if not values or any(math.isnan(value) for value in values):
        return math.nan, math.nan
    if len(values) == 1:
        return float(values[0]), 0.0
    return float(statistics.fmean(values)), float(statistics.stdev(values))


@dataclass
class MethodSummary:
    """One row of the comparison table.

    Args:
        method: method label, or ``"single-task"``.
        metric_means: mean over seeds of each metric number (selected by the rule).
        metric_stds: sample standard deviation over seeds of each metric number.
        delta_m_mean: mean over seeds of Δm% (NaN without baselines).
        delta_m_std: sample standard deviation over seeds of Δm%.
        seconds_per_epoch: mean training wall time per epoch.
        seeds: number of seeds aggregated.
        failures: runs that stopped early (non-finite loss, solver error); not aggregated.
        rank: 1 for the lowest Δm% among the methods; None for the single-task row or no Δm.
        summary_mean: mean over seeds of the sum of the metric numbers (when meaningful).
        summary_std: its sample standard deviation.
        delta_m_by_seed: ``{seed: Δm%}``.
        versus_reference: paired comparison with the reference method (equal weights).
        tied_with_best: the paired test cannot tell this row from rank 1 (p ≥ 0.05); False
            where there is no test (fewer than 2 seeds shared with rank 1).
        delta_m_note: why Δm% is undefined (a zero single-task baseline, or a NaN metric),
            else ``""``.
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
    delta_m_by_seed: dict[int, float] = field(default_factory=dict)
    versus_reference: PairedComparison | None = None
    tied_with_best: bool = False
    delta_m_note: str = ""

    @property
    def delta_m_values(self) -> list[float]:
        """Δm% of each seed, in seed order."""
        return [self.delta_m_by_seed[seed] for seed in sorted(self.delta_m_by_seed)]


def _single_task_vectors(
    runs: Sequence[RunResult],
    slices: Sequence[slice],
    pick: Callable[[RunResult], list[float]],
) -> dict[int, list[float]]:
    """Per seed, the baseline vector: task k's metric numbers from that seed's model k.

    Only seeds whose K single-task models all completed are returned.
    """
    by_seed: dict[int, dict[int, list[float]]] = {}
    for run in runs:
        if run.single_task is not None and run.completed:
            values = pick(run)[slices[run.single_task]]
            by_seed.setdefault(run.seed, {})[run.single_task] = values
    return {
        seed: [value for k in range(len(slices)) for value in tasks[k]]
        for seed, tasks in sorted(by_seed.items())
        if len(tasks) == len(slices)
    }


def _column_means(vectors: Sequence[Sequence[float]]) -> list[float]:
    return [statistics.fmean(column) for column in zip(*vectors, strict=True)]


def zero_baseline_note(
    benchmark: Benchmark, per_seed: Mapping[int, Sequence[float]], baseline: Sequence[float]
) -> str:
    """The sentence saying which baseline metrics are 0 (and so Δm% undefined), or ``""``.

    Args:
        benchmark: the benchmark (its name and metric names).
        per_seed: ``{seed: baseline vector}`` of the single-task models.
        baseline: their mean over seeds, the baseline Δm% divides by.

    Returns:
        One sentence naming the benchmark, each zero metric and its value at every seed.
    """
    names = benchmark.metric_names
    zero = [index for index, value in enumerate(baseline) if value == 0]
    if not zero:
        return ""

    def by_seed(index: int) -> str:
        return ", ".join(f"seed {seed}: {vector[index]:g}" for seed, vector in per_seed.items())

    metrics = "; ".join(f"{names[index]} is 0 ({by_seed(index)})" for index in zero)
    return (
        f"benchmark {benchmark.name!r}: the single-task baseline of {metrics}, and Δm% divides "
        "by it: Δm% is n/a in every row, and no row is ranked or plotted by Δm%"
    )


def nan_metric_note(benchmark: Benchmark, vectors: Mapping[str, Sequence[float]]) -> str:
    """The sentence naming the reported metrics that are NaN, and in which runs, or ``""``.

    Args:
        benchmark: the benchmark (its name and metric names).
        vectors: ``{run label: reported test metrics}`` (a single-task baseline's own task's
            numbers in place, NaN elsewhere is not passed here).

    Returns:
        One sentence naming the benchmark, each NaN metric and up to three of its runs.
    """
    names = benchmark.metric_names
    runs_of: dict[int, list[str]] = {}
    for label, vector in vectors.items():
        for index, value in enumerate(vector):
            if math.isnan(value):
                runs_of.setdefault(index, []).append(label)
    if not runs_of:
        return ""

    def listed(labels: list[str]) -> str:
        shown = ", ".join(labels[:3])
        return f"{len(labels)} run(s): {shown}{', ...' if len(labels) > 3 else ''}"

    metrics = "; ".join(f"{names[index]} in {listed(runs_of[index])}" for index in sorted(runs_of))
    return (
        f"benchmark {benchmark.name!r}: a reported test metric is NaN ({metrics}), and Δm% "
        "is n/a wherever it enters (every row, for a single-task baseline's). A metric must "
        "leave out the samples without labels (partially labelled data) and must not divide "
        "by an empty count"
    )


def reported_test_metrics(
    runs: Sequence[RunResult], benchmark: Benchmark, selection: Selection
) -> Callable[[RunResult], list[float]]:
    """The test metrics each run reports under ``selection``, as the table takes them.

    ``best-val`` judges a run's epochs against the single-task models' last validation
    numbers (mean over seeds), a single-task model on its own task's numbers only.
    """
    slices = benchmark.metric_slices()
    validation_reference = None
    last_validation = _single_task_vectors(runs, slices, lambda run: run.epochs[-1].validation)
    if last_validation:
        validation_reference = _column_means(list(last_validation.values()))

    def pick(run: RunResult) -> list[float]:
        used = slices[run.single_task] if run.single_task is not None else None
        return selected_test(run, selection, benchmark.directions, validation_reference, used)

    return pick


def summarise(
    runs: Sequence[RunResult],
    benchmark: Benchmark,
    selection: Selection | None = None,
    reference_method: str = REFERENCE_METHOD,
) -> list[MethodSummary]:
    """Aggregate finished runs into table rows: the single-task row first, then by rank.

    Interrupted runs are left out; failed runs are counted but not aggregated. Each method row
    carries its paired per-seed comparison with ``reference_method`` and whether the paired
    test can tell it from the best row.

    Args:
        runs: the runs of one benchmark (several methods and seeds, and single-task models).
        benchmark: the benchmark (metric directions and the tasks' metric positions).
        selection: the model-selection rule (default: last epoch).
        reference_method: the row every method is compared with, per seed.

    Returns:
        One :class:`MethodSummary` per method label (and one for the single-task models).
    """
    selection = selection or Selection()
    directions = benchmark.directions
    slices = benchmark.metric_slices()
    pick = reported_test_metrics(runs, benchmark, selection)
    per_seed_baselines = _single_task_vectors(runs, slices, pick)
    baseline = _column_means(list(per_seed_baselines.values())) if per_seed_baselines else None
    note = "" if baseline is None else zero_baseline_note(benchmark, per_seed_baselines, baseline)
    if note:
        warnings.warn(note, ZeroBaselineWarning, stacklevel=2)

    picked = {
        f"{run.method} seed {run.seed}": pick(run)
        for run in runs
        if run.single_task is None and run.completed
    }
    single_task_labels = {f"{SINGLE_TASK} seed {seed}": v for seed, v in per_seed_baselines.items()}
    nan_note = nan_metric_note(benchmark, {**single_task_labels, **picked})
    if nan_note:
        warnings.warn(nan_note, NanMetricWarning, stacklevel=2)

    rows: list[MethodSummary] = []
    if per_seed_baselines:
        single_runs = [run for run in runs if run.single_task is not None and run.completed]
        rows.append(
            _summary_row(
                SINGLE_TASK,
                per_seed_baselines,
                baseline,
                directions,
                seconds=statistics.fmean(run.seconds_per_epoch for run in single_runs),
                failures=0,
                note=note,
                nan_note=nan_note,
            )
        )
    labels: list[str] = []
    for run in runs:
        if run.single_task is None and run.method not in labels:
            labels.append(run.method)
    method_rows = []
    for label in labels:
        method_runs = [run for run in runs if run.method == label and run.single_task is None]
        finished = [run for run in method_runs if run.completed]
        failures = sum(run.failure is not None for run in method_runs)
        if not finished and not failures:
            continue
        seconds = (
            statistics.fmean(run.seconds_per_epoch for run in finished) if finished else math.nan
        )
        method_rows.append(
            _summary_row(
                label,
                {run.seed: pick(run) for run in finished},
                baseline,
                directions,
                seconds=seconds,
                failures=failures,
                note=note,
                nan_note=nan_note,
            )
        )
    ranked = sorted(
        method_rows,
        key=lambda row: (math.isnan(row.delta_m_mean), row.delta_m_mean, row.method),
    )
    for position, row in enumerate(ranked, start=1):
        row.rank = None if math.isnan(row.delta_m_mean) else position
    reference = next((row for row in ranked if row.method == reference_method), None)
    best = ranked[0] if ranked and ranked[0].rank is not None else None
    for row in ranked:
        if reference is not None and row is not reference:
            row.versus_reference = paired_comparison(row.delta_m_by_seed, reference.delta_m_by_seed)
        if best is not None and row.rank is not None:
            versus_best = paired_comparison(row.delta_m_by_seed, best.delta_m_by_seed)
            # n/a (fewer than 2 paired seeds) is no test at all: no "≈" (the caption says so)
            row.tied_with_best = row is best or versus_best.verdict == "tie"
    return rows + ranked


def _summary_row(
    method: str,
    vectors_by_seed: dict[int, list[float]],
    baseline: list[float] | None,
    directions: list[bool],
    *,
    seconds: float,
    failures: int,
    note: str,
    nan_note: str = "",
) -> MethodSummary:
    vectors = list(vectors_by_seed.values())
    count = len(directions)
    columns = [[vector[m] for vector in vectors] for m in range(count)]
    statistics_per_metric = [mean_and_std(column) for column in columns]
    deltas = (
        {
            seed: delta_m(vector, baseline, directions, on_zero_baseline="nan")
            for seed, vector in vectors_by_seed.items()
        }
        if baseline is not None
        else {}
    )
    delta_mean, delta_std = mean_and_std(list(deltas.values()))
    if not note and deltas and math.isnan(delta_mean):
        note = nan_note  # Δm% of finished runs undefined: a NaN metric, named there
    summary_mean, summary_std = mean_and_std([sum(vector) for vector in vectors])
    return MethodSummary(
        method=method,
        metric_means=[mean for mean, _ in statistics_per_metric],
        metric_stds=[std for _, std in statistics_per_metric],
        delta_m_mean=delta_mean,
        delta_m_std=delta_std,
        seconds_per_epoch=seconds,
        seeds=len(vectors),
        failures=failures,
        summary_mean=summary_mean,
        summary_std=summary_std,
        delta_m_by_seed=deltas,
        delta_m_note=note,
    )
