"""PNG plots of runs and comparisons (matplotlib, imported lazily, Agg backend).

Figures are drawn at a modest resolution so that each PNG stays well under 200 KB.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

from taskbalance.bench.datasets import Task, require_module
from taskbalance.bench.harness import RunResult
from taskbalance.bench.metrics import SINGLE_TASK, MethodSummary, metric_scale
from taskbalance.bench.toy import TOY_BOUNDS, ToyTrajectory, toy_objectives

DPI = 80
#: The toy figure has one contour panel per method: a lower resolution keeps it small.
TOY_DPI = 70
#: The weights figure has one panel per method (23 and counting): drawn smaller.
WEIGHTS_DPI = 64
#: Most points drawn per weight curve (the PNG's size grows with them).
MAX_CURVE_POINTS = 120


def _pyplot() -> ModuleType:
    matplotlib = require_module("matplotlib")
    matplotlib.use("Agg")
    return require_module("matplotlib.pyplot")


def _grid(count: int, columns: int) -> tuple[int, int]:
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def plot_weights_over_time(
    runs: Mapping[str, RunResult], task_names: Sequence[str], path: Path
) -> None:
    """One small panel per method: each task's weight against the training step.

    Args:
        runs: one run per method (e.g. seed 0), by method name.
        task_names: the task names, for the legend.
        path: the PNG to write.
    """
    plt = _pyplot()
    names = [name for name, run in runs.items() if run.weight_rows]
    if not names:
        return
    rows, columns = _grid(len(names), 5)
    figure, axes = plt.subplots(
        rows, columns, figsize=(2.6 * columns, 1.9 * rows), squeeze=False, sharex=True
    )
    for axis in axes.flat[len(names) :]:
        axis.set_visible(False)
    for axis, name in zip(axes.flat, names, strict=False):
        run = runs[name]
        stride = max(1, math.ceil(len(run.weight_steps) / MAX_CURVE_POINTS))
        steps = run.weight_steps[::stride]
        rows_drawn = run.weight_rows[::stride]
        for task_index, task_name in enumerate(task_names):
            axis.plot(
                steps,
                [row[task_index] for row in rows_drawn],
                linewidth=0.9,
                label=task_name,
            )
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6, loc="best")
    figure.supxlabel("step", fontsize=9)
    figure.supylabel("weight", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=WEIGHTS_DPI)
    plt.close(figure)


def plot_task_metrics(rows: Sequence[MethodSummary], tasks: Sequence[Task], path: Path) -> None:
    """Per-task test metric of every method: bars with ± one standard deviation over seeds.

    Args:
        rows: table rows from :func:`taskbalance.bench.metrics.summarise`.
        tasks: the benchmark's tasks.
        path: the PNG to write.
    """
    plt = _pyplot()
    plotted = [row for row in rows if not math.isnan(row.metric_means[0])]
    if not plotted:
        return
    grid_rows, columns = _grid(len(tasks), 4)
    height = max(2.5, 0.22 * len(plotted) + 0.8)
    figure, axes = plt.subplots(
        grid_rows, columns, figsize=(3.2 * columns, height * grid_rows), squeeze=False
    )
    for axis in axes.flat[len(tasks) :]:
        axis.set_visible(False)
    labels = [row.method for row in plotted]
    positions = list(range(len(plotted)))
    for task_index, (axis, task) in enumerate(zip(axes.flat, tasks, strict=False)):
        scale = metric_scale(task)
        means = [row.metric_means[task_index] * scale for row in plotted]
        errors = [row.metric_stds[task_index] * scale for row in plotted]
        colours = ["0.55" if row.method == SINGLE_TASK else "C0" for row in plotted]
        axis.barh(positions, means, xerr=errors, color=colours, error_kw={"linewidth": 0.8})
        axis.set_yticks(positions, labels if task_index % columns == 0 else [""] * len(labels))
        axis.invert_yaxis()
        axis.tick_params(labelsize=7)
        low, high = min(means), max(means)
        margin = max((high - low) * 0.6, abs(high) * 0.01, 1e-9)
        axis.set_xlim(max(0.0, low - margin) if low >= 0 else low - margin, high + margin)
        direction = "higher is better" if task.higher_is_better else "lower is better"
        axis.set_title(f"{task.name}: {task.metric} ({direction})", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def plot_delta_m_ranking(rows: Sequence[MethodSummary], path: Path) -> None:
    """Δm% of every ranked method, best (lowest) at the top, with ± one standard deviation.

    Args:
        rows: table rows from :func:`taskbalance.bench.metrics.summarise`.
        path: the PNG to write.
    """
    plt = _pyplot()
    ranked = sorted(
        (row for row in rows if not math.isnan(row.delta_m_mean)),
        key=lambda row: row.delta_m_mean,
    )
    if not ranked:
        return
    figure, axis = plt.subplots(figsize=(5.5, 0.25 * len(ranked) + 1.0))
    positions = list(range(len(ranked)))
    values = [row.delta_m_mean for row in ranked]
    colours = [
        "0.55" if row.method == SINGLE_TASK else ("C2" if row.delta_m_mean <= 0 else "C3")
        for row in ranked
    ]
    axis.barh(
        positions,
        values,
        xerr=[row.delta_m_std for row in ranked],
        color=colours,
        error_kw={"linewidth": 0.8},
    )
    axis.set_yticks(positions, [row.method for row in ranked])
    axis.invert_yaxis()
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("Δm% vs single-task (lower is better)", fontsize=9)
    axis.tick_params(labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def plot_training_curves(run: RunResult, tasks: Sequence[Task], path: Path) -> None:
    """Validation and test metric of each task after every epoch of one run.

    Args:
        run: the run.
        tasks: the benchmark's tasks.
        path: the PNG to write.
    """
    plt = _pyplot()
    if not run.epochs:
        return
    grid_rows, columns = _grid(len(tasks), 4)
    figure, axes = plt.subplots(
        grid_rows, columns, figsize=(3.0 * columns, 2.4 * grid_rows), squeeze=False
    )
    for axis in axes.flat[len(tasks) :]:
        axis.set_visible(False)
    epochs = [record.epoch for record in run.epochs]
    for task_index, (axis, task) in enumerate(zip(axes.flat, tasks, strict=False)):
        scale = metric_scale(task)
        for split in ("validation", "test"):
            values = [getattr(record, split)[task_index] * scale for record in run.epochs]
            axis.plot(epochs, values, marker=".", linewidth=1.0, label=split)
        axis.set_title(f"{task.name}: {task.metric}", fontsize=8)
        axis.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    figure.supxlabel("epoch", fontsize=9)
    figure.suptitle(f"{run.benchmark} — {run.method} (seed {run.seed})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


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
