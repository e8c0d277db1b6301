"""PNG plots of runs and comparisons (matplotlib, imported lazily, Agg backend).

Every figure has a title naming the benchmark, the seeds and the epochs; fonts are at least
8 pt at the saved resolution, and figures with one panel per method (25 and counting) wrap
into a grid with one shared legend.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import torch

import taskbalance as tb
from taskbalance.bench.api import Benchmark, require_module
from taskbalance.bench.harness import RunResult
from taskbalance.bench.metrics import REFERENCE_METHOD, SINGLE_TASK, MethodSummary
from taskbalance.bench.toy import TOY_BOUNDS, ToyTrajectory, toy_objectives

DPI = 90
#: The toy figure has one contour panel per method: a lower resolution keeps it small.
TOY_DPI = 70
#: Most points drawn per curve (the PNG's size grows with them).
MAX_CURVE_POINTS = 80
#: The weights figure has one panel per method (25 and counting): past a few panels it is
#: drawn a little smaller, which keeps the full comparison's PNG small.
WEIGHTS_DPI = 64
#: Up to this many panels the weights figure has larger panels, at :data:`DPI`.
FEW_PANELS = 4
#: Line styles of the tasks' curves, after their colours: equal weights (``ew``) draw the
#: same line K times, which dashes of different lengths keep apart.
TASK_LINESTYLES = ("-", (0, (6, 3)), (0, (2, 2)), (0, (6, 2, 1, 2)))
#: Columns of the per-method grids.
GRID_COLUMNS = 5
#: Time bins of the conflicts heatmap.
CONFLICT_BINS = 20


def _pyplot() -> ModuleType:
    matplotlib = require_module("matplotlib")
    matplotlib.use("Agg")
    return require_module("matplotlib.pyplot")


def _grid(count: int, columns: int) -> tuple[int, int]:
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def window_means(
    steps: Sequence[int], rows: Sequence[Sequence[float]], points: int
) -> tuple[list[float], list[list[float]]]:
    """At most ``points`` points: the mean step and mean row of each window of consecutive
    entries (all of equal length but the last), or the entries themselves when they fit.

    Example:
        >>> window_means([0, 1, 2, 3, 4], [[1.0], [0.0], [1.0], [1.0], [0.5]], 3)
        ([0.5, 2.5, 4.0], [[0.5], [1.0], [0.5]])
    """
    size = max(1, math.ceil(len(steps) / points))
    if size == 1:
        return [float(step) for step in steps], [list(row) for row in rows]
    mean_steps, mean_rows = [], []
    for start in range(0, len(steps), size):
        window = rows[start : start + size]
        mean_steps.append(statistics.fmean(steps[start : start + size]))
        mean_rows.append([statistics.fmean(column) for column in zip(*window, strict=True)])
    return mean_steps, mean_rows


def plot_weights_over_time(
    runs: Mapping[str, RunResult], task_names: Sequence[str], path: Path, title: str = ""
) -> bool:
    """One panel per method: each task's weight against the training step, shared legend.

    Past :data:`MAX_CURVE_POINTS` recorded steps, each point is the mean over a window of
    consecutive steps (see :func:`window_means`), so every step counts: a weight that drops to
    0 at the steps without a task's labels, or that jumps at random (RLW), shows as its mean
    rather than as every n-th step.

    Args:
        runs: one run per method (e.g. seed 0), by label.
        task_names: the task names, for the legend.
        path: the PNG to write.
        title: the figure's title.

    Returns:
        True when a file was written (some run recorded weights).
    """
    plt = _pyplot()
    names = [name for name, run in runs.items() if run.weight_rows]
    if not names:
        return False
    rows, columns = _grid(len(names), GRID_COLUMNS)
    few = len(names) <= FEW_PANELS
    width, height = (4.2, 2.8) if few else (2.9, 2.0)
    figure, axes = plt.subplots(
        rows, columns, figsize=(width * columns, height * rows + 0.9), squeeze=False, sharex=True
    )
    for axis in axes.flat[len(names) :]:
        axis.set_visible(False)
    lines = []
    for axis, name in zip(axes.flat, names, strict=False):
        run = runs[name]
        steps, drawn = window_means(run.weight_steps, run.weight_rows, MAX_CURVE_POINTS)
        lines = [
            axis.plot(
                steps,
                [row[k] for row in drawn],
                linewidth=1.1,
                color=f"C{k % 10}",
                linestyle=TASK_LINESTYLES[k % len(TASK_LINESTYLES)],
            )[0]
            for k in range(len(task_names))
        ]
        axis.set_title(name, fontsize=10)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
    figure.legend(
        lines,
        list(task_names),
        loc="upper center",
        ncol=min(len(task_names), 8),
        fontsize=9,
        bbox_to_anchor=(0.5, 1.0 - 0.3 / (height * rows + 0.9)),
        frameon=False,
    )
    figure.supxlabel("training step", fontsize=10)
    figure.supylabel("task weight", fontsize=10)
    figure.suptitle(title or "task weights during training", fontsize=11, y=0.995)
    figure.tight_layout(rect=(0, 0, 1, 1.0 - 0.6 / (height * rows + 0.9)))
    figure.savefig(path, dpi=DPI if few else WEIGHTS_DPI)
    plt.close(figure)
    return True


def plot_task_metrics(
    rows: Sequence[MethodSummary], benchmark: Benchmark, path: Path, title: str = ""
) -> bool:
    """Every metric number of every method: its mean over seeds, ± one standard deviation.

    Points, not bars: each axis spans the values and their spreads, which are often close
    together far from 0, and a bar's length from a cut-off axis would exaggerate them.
    """
    plt = _pyplot()
    plotted = [row for row in rows if not math.isnan(row.metric_means[0])]
    if not plotted:
        return False
    names = benchmark.metric_names
    grid_rows, columns = _grid(len(names), 4)
    height = max(2.8, 0.24 * len(plotted) + 1.0)
    figure, axes = plt.subplots(
        grid_rows, columns, figsize=(3.6 * columns, height * grid_rows + 0.5), squeeze=False
    )
    for axis in axes.flat[len(names) :]:
        axis.set_visible(False)
    labels = [row.method for row in plotted]
    positions = list(range(len(plotted)))
    for index, (axis, name, higher) in enumerate(
        zip(axes.flat, names, benchmark.directions, strict=False)
    ):
        ends: list[float] = []
        for position, row in zip(positions, plotted, strict=True):
            mean, spread = row.metric_means[index], row.metric_stds[index]
            spread = 0.0 if math.isnan(spread) else spread  # one seed: no spread
            colour = "0.45" if row.method == SINGLE_TASK else "C0"
            axis.errorbar(
                mean, position, xerr=spread, fmt="o", color=colour, markersize=4,
                elinewidth=1.0, capsize=2,
            )  # fmt: skip
            if not math.isnan(mean):
                ends += [mean - spread, mean + spread]
        axis.set_yticks(positions, labels if index % columns == 0 else [""] * len(labels))
        axis.set_ylim(len(plotted) - 0.5, -0.5)  # first row on top
        axis.grid(axis="x", linewidth=0.4, alpha=0.5)
        axis.tick_params(labelsize=8)
        if ends:  # a metric NaN in every row (e.g. empty classes) leaves the axis to matplotlib
            low, high = min(ends), max(ends)
            margin = max((high - low) * 0.08, abs(high) * 0.005, 1e-9)
            axis.set_xlim(low - margin, high + margin)
        axis.set_title(f"{name} ({'higher' if higher else 'lower'} is better)", fontsize=9)
    figure.suptitle(title or benchmark.name, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return True


def plot_delta_m_ranking(rows: Sequence[MethodSummary], path: Path, title: str = "") -> bool:
    """Δm% of every ranked method, best at the top, ± one standard deviation over seeds.

    Bars the paired test cannot tell from the best one are hatched and labelled ``≈ best``;
    the single-task row (grey) shows the seed noise of the baseline itself. Rows without a
    Δm% (every run failed, a NaN metric) are listed under the axes, each with its reason.

    Returns:
        True when a file was written (some row has a Δm%; a zero single-task baseline leaves
        none, and the table's caption says why).
    """
    plt = _pyplot()
    ranked = sorted(
        (row for row in rows if not math.isnan(row.delta_m_mean)),
        key=lambda row: row.delta_m_mean,
    )
    if not ranked:
        return False
    left_out = [row for row in rows if math.isnan(row.delta_m_mean)]
    figure, axis = plt.subplots(figsize=(7.0, 0.3 * len(ranked) + 1.4))
    positions = list(range(len(ranked)))
    colours = [
        "0.6" if row.method == SINGLE_TASK else ("C2" if row.delta_m_mean <= 0 else "C3")
        for row in ranked
    ]
    bars = axis.barh(
        positions,
        [row.delta_m_mean for row in ranked],
        xerr=[row.delta_m_std for row in ranked],
        color=colours,
        error_kw={"linewidth": 0.9, "capsize": 2},
    )
    labels = []
    for bar, row in zip(bars, ranked, strict=True):
        tied = row.tied_with_best and row.rank is not None
        if tied:
            bar.set_hatch("///")
            bar.set_edgecolor("black")
        labels.append(f"{row.method}  ≈ best" if tied and row.rank != 1 else row.method)
    axis.set_yticks(positions, labels)
    axis.invert_yaxis()
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("Δm% vs single-task (lower is better); hatched: tied with the best", fontsize=9)
    axis.tick_params(labelsize=9)
    axis.grid(axis="x", alpha=0.3)
    axis.set_title(title or "Δm% ranking", fontsize=11)
    if left_out:
        reasons = [row.delta_m_note or _no_delta_reason(row) for row in left_out]
        note = "not shown (no Δm%): " + "; ".join(
            f"{row.method} ({reason})" for row, reason in zip(left_out, reasons, strict=True)
        )
        figure.text(0.01, 0.01, note, fontsize=8, wrap=True)
    figure.tight_layout(rect=(0, 0.06 if left_out else 0, 1, 1))
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return True


def _no_delta_reason(row: MethodSummary) -> str:
    if not row.seeds:
        return "every run failed"
    if any(math.isnan(value) for value in row.metric_means):
        return "a metric is NaN"
    return "Δm% is NaN"


def _inlier_range(values: Sequence[float]) -> tuple[float, float]:
    """Values within 3 interquartile ranges of the middle half (outliers would squash the rest)."""
    ordered = sorted(values)
    q1 = ordered[len(ordered) // 4]
    q3 = ordered[(3 * len(ordered)) // 4]
    spread = max(q3 - q1, 1e-3 * max(abs(q3), 1e-12))
    return q1 - 3 * spread, q3 + 3 * spread


def plot_pareto(
    rows: Sequence[MethodSummary], benchmark: Benchmark, path: Path, title: str = ""
) -> bool:
    """For 2-task benchmarks: each method's first metric of task 1 against that of task 2.

    Points are means over seeds with ± one standard deviation. The non-dominated methods are
    joined by a line (the empirical Pareto front) and labelled, with equal weights and the
    single-task models (grey, always shown); far outliers are listed under the axes instead of
    squashing the rest.

    Returns:
        True when a file was written (the benchmark has exactly two tasks).
    """
    if benchmark.num_tasks != 2:
        return False
    plt = _pyplot()
    first, second = (piece.start for piece in benchmark.metric_slices())
    names, directions = benchmark.metric_names, benchmark.directions
    points = [
        (row, row.metric_means[first], row.metric_means[second])
        for row in rows
        if math.isfinite(row.metric_means[first]) and math.isfinite(row.metric_means[second])
    ]
    # An infinite mean (a diverged run) cannot be drawn: listed under the axes, as outliers are
    unplottable = [
        (row, row.metric_means[first], row.metric_means[second])
        for row in rows
        if any(math.isinf(row.metric_means[index]) for index in (first, second))
    ]
    if not points:
        return False
    x_low, x_high = _inlier_range([x for _, x, _ in points])
    y_low, y_high = _inlier_range([y for _, _, y in points])
    shown = [
        p
        for p in points
        if p[0].method == SINGLE_TASK or (x_low <= p[1] <= x_high and y_low <= p[2] <= y_high)
    ]
    hidden = [p for p in points if p not in shown] + unplottable
    sign_x = 1.0 if directions[first] else -1.0
    sign_y = 1.0 if directions[second] else -1.0
    methods = [(row, x, y) for row, x, y in points if row.method != SINGLE_TASK]
    front = {
        row.method
        for row, x, y in methods
        if not any(
            sign_x * (x2 - x) >= 0 and sign_y * (y2 - y) >= 0 and (x2, y2) != (x, y)
            for _, x2, y2 in methods
        )
    }
    figure, axis = plt.subplots(figsize=(7.0, 5.5))
    for row, x, y in shown:
        on_front = row.method in front
        colour = "0.55" if row.method == SINGLE_TASK else ("C1" if on_front else "C0")
        axis.errorbar(
            x,
            y,
            xerr=row.metric_stds[first],
            yerr=row.metric_stds[second],
            fmt="o",
            color=colour,
            markersize=4,
            linewidth=0.8,
        )
    labelled = [
        (row.method, x, y)
        for row, x, y in shown
        if row.method in front or row.method in (SINGLE_TASK, REFERENCE_METHOD)
    ]
    (x_low, x_high), (y_low, y_high) = axis.get_xlim(), axis.get_ylim()
    placed: list[tuple[float, float, float]] = []  # each label's left, bottom, right
    for method, x, y in sorted(labelled, key=lambda item: (-item[2], item[1])):
        where = ((x - x_low) / (x_high - x_low), (y - y_low) / (y_high - y_low))
        offset = _free_label_offset(method, where, placed)
        axis.annotate(method, (x, y), fontsize=9, xytext=offset, textcoords="offset points")
    line = sorted((x, y) for row, x, y in shown if row.method in front)
    if len(line) > 1:
        axis.plot(*zip(*line, strict=True), color="C1", linewidth=1.0, label="non-dominated")
        axis.legend(fontsize=9)
    arrow = {True: "higher is better", False: "lower is better"}
    axis.set_xlabel(f"{names[first]} ({arrow[directions[first]]})", fontsize=10)
    axis.set_ylabel(f"{names[second]} ({arrow[directions[second]]})", fontsize=10)
    axis.tick_params(labelsize=9)
    axis.grid(alpha=0.3)
    axis.set_title(title or f"{benchmark.name}: task trade-off", fontsize=11)
    if hidden:
        note = "not shown (far outside): " + ", ".join(
            f"{row.method} ({x:.4g}, {y:.4g})" for row, x, y in hidden
        )
        figure.text(0.01, 0.01, note, fontsize=8)
    figure.tight_layout(rect=(0, 0.03 if hidden else 0, 1, 1))
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return True


#: The Pareto axes' size in inches (the 7 × 5.5 in figure less its labels), and a 9 pt
#: label's character width and line height in inches: enough to keep labels apart.
_PARETO_AXES = (6.0, 4.6)
_LABEL_CHAR, _LABEL_LINE = 0.07, 0.16


def _free_label_offset(
    text: str, where: tuple[float, float], placed: list[tuple[float, float, float]]
) -> tuple[int, int]:
    """An offset in points for a label at ``where`` (axes fraction): above-right of the point
    unless a label placed before would overlap it there, then below-right, further down, or
    higher up; ``placed`` (left, bottom, right in axes fraction) gets the chosen box."""
    width = _LABEL_CHAR * len(text) / _PARETO_AXES[0]
    height = _LABEL_LINE / _PARETO_AXES[1]
    for offset in ((4, 4), (4, -12), (4, -24), (4, 16)):
        left = where[0] + offset[0] / 72 / _PARETO_AXES[0]
        bottom = where[1] + offset[1] / 72 / _PARETO_AXES[1]
        if all(
            left >= right or left + width <= other_left or abs(bottom - other_bottom) >= height
            for other_left, other_bottom, right in placed
        ):
            placed.append((left, bottom, left + width))
            return offset
    return (4, 4)  # crowded all round: the default place


def plot_training_curves(run: RunResult, path: Path) -> bool:
    """Validation and test value of every metric number after every epoch of one run."""
    plt = _pyplot()
    if not run.epochs:
        return False
    names = run.metric_names
    grid_rows, columns = _grid(len(names), 4)
    figure, axes = plt.subplots(
        grid_rows, columns, figsize=(3.2 * columns, 2.6 * grid_rows + 0.4), squeeze=False
    )
    for axis in axes.flat[len(names) :]:
        axis.set_visible(False)
    epochs = [record.epoch for record in run.epochs]
    for index, (axis, name) in enumerate(zip(axes.flat, names, strict=False)):
        for split in ("validation", "test"):
            values = [getattr(record, split)[index] for record in run.epochs]
            axis.plot(epochs, values, marker=".", linewidth=1.0, label=split)
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=8)
    axes.flat[0].legend(fontsize=8)
    figure.supxlabel("epoch", fontsize=10)
    figure.suptitle(f"{run.benchmark} — {run.method} (seed {run.seed})", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return True


def _mean_cosines(runs: Sequence[RunResult]) -> torch.Tensor | None:
    matrices = [
        tb.gradient_diagnostics(torch.tensor(gram, dtype=torch.float64)).cosines
        for run in runs
        for gram in run.diagnostic_grams
    ]
    return torch.stack(matrices).mean(dim=0) if matrices else None


def _conflict_profile(runs: Sequence[RunResult], bins: int) -> list[float]:
    """Mean fraction of conflicting pairs in each of ``bins`` equal parts of training."""
    sums, counts = [0.0] * bins, [0] * bins
    for run in runs:
        if not run.diagnostic_steps:
            continue
        last = max(run.diagnostic_steps) + 1
        for step, gram in zip(run.diagnostic_steps, run.diagnostic_grams, strict=True):
            position = min(bins - 1, step * bins // last)
            found = tb.gradient_diagnostics(torch.tensor(gram, dtype=torch.float64))
            sums[position] += found.conflict_fraction
            counts[position] += 1
    return [total / count if count else math.nan for total, count in zip(sums, counts, strict=True)]


def plot_gradient_cosines(
    runs_by_method: Mapping[str, Sequence[RunResult]],
    task_names: Sequence[str],
    path: Path,
    title: str = "",
) -> bool:
    """One K×K heatmap per method: task-gradient cosines, mean over training and seeds."""
    plt = _pyplot()
    matrices = {
        label: matrix
        for label, runs in runs_by_method.items()
        if (matrix := _mean_cosines(runs)) is not None
    }
    if not matrices:
        return False
    rows, columns = _grid(len(matrices), GRID_COLUMNS)
    size = 2.2 if len(task_names) <= 4 else 3.0
    figure, axes = plt.subplots(
        rows, columns, figsize=(size * columns + 1.0, size * rows + 0.6), squeeze=False
    )
    for axis in axes.flat[len(matrices) :]:
        axis.set_visible(False)
    image = None
    ticks = list(range(len(task_names)))
    for index, (axis, (label, matrix)) in enumerate(zip(axes.flat, matrices.items(), strict=False)):
        image = axis.imshow(matrix.numpy(), vmin=-1, vmax=1, cmap="RdBu")
        axis.set_title(label, fontsize=9)
        axis.set_xticks(ticks, list(task_names), fontsize=7, rotation=90)
        # Task names on the first column only: beside the others they run into the panel left
        row_labels = list(task_names) if index % columns == 0 else [""] * len(task_names)
        axis.set_yticks(ticks, row_labels, fontsize=7)
        if len(task_names) <= 4:
            for i in ticks:
                for j in ticks:
                    text = f"{float(matrix[i, j]):.2f}"
                    text = "0.00" if text == "-0.00" else text  # a rounded tiny negative
                    axis.text(j, i, text, ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="cosine")
    figure.suptitle(
        title or "task-gradient cosines w.r.t. the shared features (mean over training)",
        fontsize=11,
    )
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return True


def plot_conflicts(
    runs_by_method: Mapping[str, Sequence[RunResult]], path: Path, title: str = ""
) -> bool:
    """Fraction of conflicting task pairs (negative cosine) over training, one row per method.

    A heatmap (methods × training progress, mean over seeds) stays readable for 25 methods.
    """
    plt = _pyplot()
    recorded = max(
        (len(run.diagnostic_steps) for r in runs_by_method.values() for run in r), default=0
    )
    bins = max(1, min(CONFLICT_BINS, recorded))
    profiles = {
        label: _conflict_profile(runs, bins)
        for label, runs in runs_by_method.items()
        if any(run.diagnostic_steps for run in runs)
    }
    if not profiles:
        return False
    figure, axis = plt.subplots(figsize=(7.5, 0.3 * len(profiles) + 1.6))
    image = axis.imshow(
        [profiles[label] for label in profiles],
        vmin=0,
        vmax=1,
        cmap="magma_r",
        aspect="auto",
        extent=(0, 100, len(profiles) - 0.5, -0.5),
    )
    axis.set_yticks(list(range(len(profiles))), list(profiles), fontsize=9)
    axis.set_xlabel("training progress (%)", fontsize=10)
    axis.tick_params(labelsize=9)
    figure.colorbar(image, ax=axis, label="fraction of conflicting pairs")
    axis.set_title(title or "gradient conflicts during training", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return True


def plot_toy_trajectories(
    trajectories: Mapping[str, Sequence[ToyTrajectory]],
    pareto_points: Sequence[Sequence[float]],
    path: Path,
) -> None:
    """One panel per method: its trajectories from every start over the landscape.

    The background shows the mean of the two objectives; the Pareto set is drawn in black.

    Args:
        trajectories: the trajectories of each method, by method name.
        pareto_points: ``[P, 2]`` points of the Pareto set.
        path: the PNG to write.
    """
    import torch

    plt = _pyplot()
    names = list(trajectories)
    if not names:
        return
    axis_values = torch.linspace(*TOY_BOUNDS, 80)
    grid_x, grid_y = torch.meshgrid(axis_values, axis_values, indexing="xy")
    mean_objective = toy_objectives(torch.stack([grid_x, grid_y], dim=-1)).mean(dim=-1)
    rows, columns = _grid(len(names), 5)
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.4 * rows), squeeze=False)
    for axis in axes.flat[len(names) :]:
        axis.set_visible(False)
    front_x = [point[0] for point in pareto_points]
    front_y = [point[1] for point in pareto_points]
    for axis, name in zip(axes.flat, names, strict=False):
        axis.contourf(
            grid_x.numpy(), grid_y.numpy(), mean_objective.numpy(), levels=10, cmap="Greys_r"
        )
        axis.plot(front_x, front_y, color="black", linewidth=2.5)
        for index, trajectory in enumerate(trajectories[name]):
            points = trajectory.points
            colour = f"C{index}"
            axis.plot(points[:, 0].numpy(), points[:, 1].numpy(), color=colour, linewidth=1.2)
            axis.plot(*trajectory.start, marker="o", markersize=3, color=colour)
            axis.plot(
                float(points[-1, 0]), float(points[-1, 1]), marker="*", markersize=6, color=colour
            )
        axis.set_xlim(*TOY_BOUNDS)
        axis.set_ylim(*TOY_BOUNDS)
        axis.set_title(name, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("toy-2d: trajectories (o start, * end), Pareto set in black", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=TOY_DPI)
    plt.close(figure)
