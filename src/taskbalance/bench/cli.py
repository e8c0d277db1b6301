"""The ``taskbalance`` command line: list, train, compare and toy.

Errors a user can fix (unknown benchmark or method, a bad ``--set`` value, an output directory
that cannot be written, a missing optional dependency) are printed to stderr as one line and
exit with code 2, before any training starts. Ctrl-C during training writes the results
finished so far and exits with code 130.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import taskbalance as tb
from taskbalance.bench.datasets import (
    Benchmark,
    MissingExtraError,
    Task,
    benchmark_info,
    benchmark_names,
    load_benchmark,
)
from taskbalance.bench.harness import (
    RunResult,
    TrainConfig,
    balancer_arguments,
    method_kind,
    progress_bar,
    train_run,
)

#: The benchmark ``taskbalance compare`` runs when none is named.
DEFAULT_COMPARE_BENCHMARK = "multidigits"
#: Seeds of the default comparison (chosen so that it finishes within 5 minutes on 2 CPU cores).
DEFAULT_COMPARE_SEEDS = 5
#: Steps of ``train --bench toy-2d`` per "epoch".
TOY_STEPS_PER_EPOCH = 250
#: Exit code after Ctrl-C (128 + SIGINT).
INTERRUPTED_EXIT_CODE = 130
USAGE_ERROR_EXIT_CODE = 2


class CommandError(Exception):
    """A mistake in the command line: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Argument checks.


def check_benchmark(name: str) -> str:
    """Return ``name`` if it is a bundled benchmark, else raise a CommandError listing them."""
    try:
        benchmark_info(name)
    except ValueError as error:
        raise CommandError(str(error)) from None
    return name


def check_methods(names: Sequence[str]) -> list[str]:
    """Return the method names if all are registered, else a CommandError listing them."""
    valid = tb.available()
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise CommandError(f"unknown method(s) {unknown}; expected some of {valid}")
    return list(names)


def parse_method_list(text: str) -> list[str]:
    """``"all"`` or a comma-separated list of method names."""
    if text.strip() == "all":
        return tb.available()
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise CommandError("--methods: expected 'all' or a comma-separated list of methods")
    return check_methods(names)


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _convert_scalar(text: str, example: object) -> object:
    """Convert ``text`` to the type of ``example`` (None: int, then float, then text)."""
    text = text.strip()
    if isinstance(example, bool):
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(text)
    if isinstance(example, int):
        return int(text)
    if isinstance(example, float):
        return float(text)
    if isinstance(example, str):
        return text
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    if text.lower() in {"none", "null"}:
        return None
    return text


def _type_description(example: object) -> str:
    if isinstance(example, (list, tuple)):
        inner = _type_description(example[0]) if example else "float"
        return f"a comma-separated list of {inner}"
    if example is inspect.Parameter.empty:
        return "a float or a comma-separated list of floats"
    if example is None:
        return "a number or text"
    return type(example).__name__


def convert_setting(key: str, text: str, default: object) -> object:
    """Convert one ``--set key=value`` to the type of the hyperparameter's default.

    Lists are comma-separated; a required hyperparameter without a default (``fixed``'s
    ``weights``) takes floats.

    Args:
        key: the hyperparameter.
        text: the value as typed.
        default: the hyperparameter's default from :func:`taskbalance.hyperparameters`.

    Returns:
        The converted value.

    Raises:
        CommandError: the value does not convert; the message names the key and the type.
    """
    try:
        if default is inspect.Parameter.empty:
            values = [float(part) for part in text.split(",")]
            return values if len(values) > 1 else values[0]
        if isinstance(default, (list, tuple)):
            element = default[0] if default else 0.0
            return [_convert_scalar(part, element) for part in text.split(",")]
        if "," in text:
            return [_convert_scalar(part, default) for part in text.split(",")]
        return _convert_scalar(text, default)
    except ValueError:
        message = f"--set {key}={text!r}: expected {_type_description(default)}"
        if default is not inspect.Parameter.empty:
            message += f" (the type of its default {default!r})"
        raise CommandError(message) from None


def parse_settings(method: str, assignments: Sequence[str]) -> dict[str, Any]:
    """Turn ``--set key=value`` arguments into the method's hyperparameters.

    Args:
        method: a registered method name.
        assignments: the ``key=value`` strings.

    Returns:
        The hyperparameters, converted to the types of their defaults.

    Raises:
        CommandError: malformed assignment, unknown key or a value of the wrong type.
    """
    defaults = tb.hyperparameters(method)
    settings: dict[str, Any] = {}
    for assignment in assignments:
        key, separator, text = assignment.partition("=")
        key = key.strip()
        if not separator or not key:
            raise CommandError(f"--set {assignment!r}: expected key=value")
        if key not in defaults:
            raise CommandError(
                f"--set {key}: {method} has no hyperparameter {key!r}; "
                f"expected one of {sorted(defaults) or 'none'}"
            )
        settings[key] = convert_setting(key, text, defaults[key])
    return settings


def prepare_output_directory(path: Path) -> Path:
    """Create ``path`` and check that a file can be written there, before any training.

    Args:
        path: the output directory.

    Returns:
        The directory.

    Raises:
        CommandError: the directory cannot be created or written.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise CommandError(f"cannot write to output directory {str(path)!r}: {reason}") from None
    return path


def _check_balancer(method: str, benchmark: Benchmark, settings: dict[str, Any]) -> None:
    """Create the balancer once so that a bad hyperparameter fails before training."""
    try:
        tb.create(
            method,
            num_tasks=benchmark.num_tasks,
            **balancer_arguments(method, benchmark, settings, seed=0),
        )
    except (TypeError, ValueError) as error:
        raise CommandError(f"{method}: {error}") from None


# ---------------------------------------------------------------------------------------------
# Writing results.


def write_metrics_csv(runs: Sequence[RunResult], path: Path) -> None:
    """Per-epoch metrics of runs: one row per (run, epoch, split, task).

    Columns: method, seed, single_task, epoch, seconds, split (train/validation/test), task,
    quantity (``loss`` for train, else the metric name), value.
    """
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "method",
                "seed",
                "single_task",
                "epoch",
                "seconds",
                "split",
                "task",
                "quantity",
                "value",
            ]
        )
        for run in runs:
            single = "" if run.single_task is None else run.task_names[run.single_task]
            for record in run.epochs:
                for split, values in (
                    ("train", record.train_losses),
                    ("validation", record.validation),
                    ("test", record.test),
                ):
                    for task_name, value in zip(run.task_names, values, strict=True):
                        quantity = "loss" if split == "train" else "metric"
                        writer.writerow(
                            [
                                run.method,
                                run.seed,
                                single,
                                record.epoch,
                                f"{record.seconds:.4f}",
                                split,
                                task_name,
                                quantity,
                                value,
                            ]
                        )


def write_weights_csv(runs: Sequence[RunResult], path: Path) -> None:
    """The recorded weights of runs: method, seed, step, then one column per task."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        task_names = runs[0].task_names if runs else []
        writer.writerow(["method", "seed", "step", *(f"w_{name}" for name in task_names)])
        for run in runs:
            for step, row in zip(run.weight_steps, run.weight_rows, strict=True):
                writer.writerow([run.method, run.seed, step, *row])


def write_runs_csv(runs: Sequence[RunResult], path: Path) -> None:
    """One row per finished run: final test metrics, seconds per epoch, status."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        task_names = runs[0].task_names if runs else []
        writer.writerow(
            [
                "method",
                "seed",
                "single_task",
                *(f"test_{name}" for name in task_names),
                "seconds_per_epoch",
                "epochs",
                "status",
            ]
        )
        for run in runs:
            status = "interrupted" if run.interrupted else (run.failure or "ok")
            single = "" if run.single_task is None else run.task_names[run.single_task]
            writer.writerow(
                [
                    run.method,
                    run.seed,
                    single,
                    *run.final_test,
                    run.seconds_per_epoch,
                    len(run.epochs),
                    status,
                ]
            )


def _format_metric(value: float, metric: str) -> str:
    if math.isnan(value):
        return "—"
    if metric == "accuracy":
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


# ---------------------------------------------------------------------------------------------
# Commands.


def command_list(arguments: argparse.Namespace) -> int:
    """``taskbalance list``: methods and benchmarks."""
    methods = tb.available()
    print(f"Methods ({len(methods)}):")
    for name in methods:
        print(f"  {name:<12} {method_kind(name)}-based")
    print()
    print("Benchmarks:")
    for name in benchmark_names():
        info = benchmark_info(name)
        print(f"  {name}: {info.description}")
        for task in info.tasks:
            print(
                f"      {task.name:<8} loss {task.loss:<21} metric {task.metric} "
                f"({task.direction} is better)"
            )
    return 0


def _progress_enabled(arguments: argparse.Namespace) -> bool:
    return not arguments.quiet


def _log(arguments: argparse.Namespace, message: str) -> None:
    if not arguments.quiet:
        print(message, file=sys.stderr, flush=True)


def command_train(arguments: argparse.Namespace) -> int:
    """``taskbalance train``: one run; per-task test metrics, final weights, files."""
    bench = check_benchmark(arguments.bench)
    method = check_methods([arguments.method])[0]
    settings = parse_settings(method, arguments.set or [])
    if arguments.epochs is not None and arguments.epochs < 1:
        raise CommandError(f"--epochs: expected an int >= 1, got {arguments.epochs}")
    out = Path(arguments.out or f"runs/train-{bench}-{method}-seed{arguments.seed}")
    prepare_output_directory(out)
    if bench == "toy-2d":
        return _train_toy(arguments, method, settings, out)

    benchmark = load_benchmark(bench, small=arguments.small)
    _check_balancer(method, benchmark, settings)
    config = TrainConfig(seed=arguments.seed, epochs=arguments.epochs)
    epochs = config.epochs or benchmark.defaults.epochs
    steps = epochs * math.ceil(len(benchmark.train) / benchmark.defaults.batch_size)
    bar = progress_bar(steps, f"{bench}/{method}", _progress_enabled(arguments))
    try:
        run = train_run(benchmark, method, hyperparameters=settings, config=config, progress=bar)
    finally:
        bar.close()

    print(
        f"{bench} / {method} / seed {run.seed}: {len(run.epochs)} epoch(s), "
        f"{run.seconds_per_epoch:.3f} s per epoch"
    )
    if run.failure:
        print(f"training stopped: {run.failure}")
    if run.epochs:
        print("test metrics:")
        for task, value in zip(benchmark.tasks, run.epochs[-1].test, strict=True):
            print(
                f"  {task.name:<10} {task.metric:<16} {_format_metric(value, task.metric):>10}"
                f"  ({task.direction} is better)"
            )
        if benchmark.summary_name:
            print(f"  {benchmark.summary_name} = {sum(run.epochs[-1].test):.4g}")
    weights = ", ".join(
        f"{name}={value:.4g}"
        for name, value in zip(run.task_names, run.final_weights, strict=False)
    )
    print(f"final weights: {weights}")
    if run.learned_variances is not None and benchmark.noise_variances is not None:
        _print_variance_recovery(benchmark.tasks, benchmark.noise_variances, run.learned_variances)

    write_metrics_csv([run], out / "metrics.csv")
    write_weights_csv([run], out / "weights.csv")
    from taskbalance.bench.plots import plot_training_curves, plot_weights_over_time

    plot_training_curves(run, benchmark.tasks, out / "curves.png")
    plot_weights_over_time({method: run}, run.task_names, out / "weights.png")
    print(f"wrote {out / 'metrics.csv'}, {out / 'weights.csv'}, curves.png and weights.png")
    if run.interrupted:
        print("interrupted: wrote the epochs finished so far", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return 0


#: Relative error within which uncertainty weighting counts as having recovered σ².
VARIANCE_TOLERANCE = 0.05


def _print_variance_recovery(
    tasks: Sequence[Task], true_variances: Sequence[float], learned_variances: Sequence[float]
) -> None:
    print("uncertainty weighting: learned σ² = exp(s_k) vs the true noise variance σ_k²")
    print(f"  {'task':<6} {'true σ²':>10} {'learned σ²':>11} {'rel. error':>11}")
    errors = []
    for task, true_value, learned in zip(tasks, true_variances, learned_variances, strict=True):
        error = (learned - true_value) / true_value
        errors.append(abs(error))
        print(f"  {task.name:<6} {true_value:>10.4g} {learned:>11.4g} {100 * error:>10.2f}%")
    verdict = "yes" if max(errors) <= VARIANCE_TOLERANCE else "no"
    print(
        f"  recovered within {100 * VARIANCE_TOLERANCE:.0f}%: {verdict} "
        f"(largest error {100 * max(errors):.2f}%)"
    )


def _train_toy(
    arguments: argparse.Namespace, method: str, settings: dict[str, Any], out: Path
) -> int:
    from taskbalance.bench.toy import TOY_STARTS, TOY_STEPS, run_toy_trajectory

    if arguments.epochs is not None:
        steps = arguments.epochs * TOY_STEPS_PER_EPOCH
    else:
        steps = 50 if arguments.small else TOY_STEPS
    arguments_for_check = {"weights": [1.0, 1.0]} if method == "fixed" else {}
    arguments_for_check.update(settings)
    try:
        tb.create(method, num_tasks=2, **arguments_for_check)
    except (TypeError, ValueError) as error:
        raise CommandError(f"{method}: {error}") from None
    trajectories = []
    bar = progress_bar(steps * len(TOY_STARTS), f"toy-2d/{method}", _progress_enabled(arguments))
    try:
        for start in TOY_STARTS:
            trajectories.append(
                run_toy_trajectory(
                    method,
                    start,
                    steps=steps,
                    hyperparameters=settings,
                    seed=arguments.seed,
                    progress=bar,
                )
            )
    except KeyboardInterrupt:
        print("interrupted: writing the trajectories finished so far", file=sys.stderr)
    finally:
        bar.close()
    _write_toy_outputs({method: trajectories}, out)
    return 0 if len(trajectories) == len(TOY_STARTS) else INTERRUPTED_EXIT_CODE


def _write_toy_outputs(trajectories: dict[str, list[Any]], out: Path) -> None:
    from taskbalance.bench.plots import plot_toy_trajectories
    from taskbalance.bench.toy import distance_to_front, pareto_front

    front_points, front_values = pareto_front()
    print(f"{'method':<12} {'start':>14} {'end':>16} {'f1':>8} {'f2':>8} {'to front':>9}")
    with (out / "toy-2d.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "method",
                "start_x1",
                "start_x2",
                "end_x1",
                "end_x2",
                "f1",
                "f2",
                "distance_to_pareto_front",
                "failure",
            ]
        )
        for method, paths in trajectories.items():
            for path in paths:
                end = path.points[-1].tolist()
                values = path.objectives[-1].tolist()
                distance = distance_to_front(path.objectives[-1], front_values)
                writer.writerow([method, *path.start, *end, *values, distance, path.failure or ""])
                print(
                    f"{method:<12} {path.start!s:>14} "
                    f"({end[0]:6.2f}, {end[1]:6.2f}) {values[0]:8.3f} {values[1]:8.3f} "
                    f"{distance:9.3f}" + (f"  stopped at {path.failure}" if path.failure else "")
                )
    if len(trajectories) == 1:
        _write_trajectory_steps(trajectories, "weights", ["w_f1", "w_f2"], out / "weights.csv")
        _write_trajectory_steps(trajectories, "objectives", ["f1", "f2"], out / "metrics.csv")
    plot_toy_trajectories(trajectories, front_points.tolist(), out / "toy-2d.png")
    print(f"wrote {out / 'toy-2d.png'} and {out / 'toy-2d.csv'}")


def _write_trajectory_steps(
    trajectories: Mapping[str, Sequence[Any]], attribute: str, columns: list[str], path: Path
) -> None:
    """One row per (method, start, step) with the trajectory's ``attribute`` at that step."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "start", "step", *columns])
        for method, paths in trajectories.items():
            for trajectory in paths:
                for step, row in enumerate(getattr(trajectory, attribute).tolist()):
                    writer.writerow([method, str(trajectory.start), step, *row])


def command_toy(arguments: argparse.Namespace) -> int:
    """``taskbalance toy``: every method's trajectories on the toy-2d landscape, as a PNG."""
    from taskbalance.bench.toy import TOY_STARTS, TOY_STEPS, run_toy_trajectory

    methods = parse_method_list(arguments.methods)
    steps = arguments.steps if arguments.steps is not None else TOY_STEPS
    if steps < 1:
        raise CommandError(f"--steps: expected an int >= 1, got {steps}")
    out = prepare_output_directory(Path(arguments.out))
    require_plotting()
    trajectories: dict[str, list[Any]] = {}
    bar = progress_bar(
        steps * len(TOY_STARTS) * len(methods), "toy-2d", _progress_enabled(arguments)
    )
    try:
        for method in methods:
            paths = [
                run_toy_trajectory(method, start, steps=steps, progress=bar) for start in TOY_STARTS
            ]
            trajectories[method] = paths
    except KeyboardInterrupt:
        print("interrupted: writing the methods finished so far", file=sys.stderr)
    finally:
        bar.close()
    _write_toy_outputs(trajectories, out)
    return 0 if len(trajectories) == len(methods) else INTERRUPTED_EXIT_CODE


def require_plotting() -> None:
    """Fail early, before training, when matplotlib is missing."""
    from taskbalance.bench.datasets import require_module

    require_module("matplotlib")


def command_compare(arguments: argparse.Namespace) -> int:
    """``taskbalance compare``: every method and the single-task baselines over seeds."""
    started = time.perf_counter()
    bench = check_benchmark(arguments.bench)
    if bench == "toy-2d":
        raise CommandError("toy-2d has no single-task baselines or Δm%; run `taskbalance toy`")
    methods = parse_method_list(arguments.methods)
    if arguments.seeds < 1:
        raise CommandError(f"--seeds: expected an int >= 1, got {arguments.seeds}")
    if arguments.epochs is not None and arguments.epochs < 1:
        raise CommandError(f"--epochs: expected an int >= 1, got {arguments.epochs}")
    out = prepare_output_directory(Path(arguments.out or f"runs/compare-{bench}"))
    require_plotting()
    benchmark = load_benchmark(bench, small=arguments.small)
    for method in methods:
        _check_balancer(method, benchmark, {})

    seeds = list(range(arguments.seeds))
    epochs = arguments.epochs or benchmark.defaults.epochs
    jobs: list[tuple[str | None, int | None, int]] = [
        (None, task_index, seed) for seed in seeds for task_index in range(benchmark.num_tasks)
    ]
    jobs += [(method, None, seed) for method in methods for seed in seeds]
    steps_per_run = epochs * math.ceil(len(benchmark.train) / benchmark.defaults.batch_size)
    bar = progress_bar(steps_per_run * len(jobs), f"compare {bench}", _progress_enabled(arguments))
    runs: list[RunResult] = []
    interrupted = False
    try:
        for position, (method, task_index, seed) in enumerate(jobs, start=1):
            label = method or f"single-task[{benchmark.tasks[task_index or 0].name}]"
            bar.set_postfix_str(f"{label} seed {seed}")
            run = train_run(
                benchmark,
                method,
                single_task=task_index,
                config=TrainConfig(seed=seed, epochs=arguments.epochs),
                progress=bar,
            )
            if run.interrupted:
                interrupted = True
                break
            runs.append(run)
            status = f" ({run.failure})" if run.failure else ""
            if not sys.stderr.isatty():
                _log(
                    arguments,
                    f"[{position}/{len(jobs)}] {label} seed {seed}: "
                    f"{run.seconds_per_epoch:.3f} s/epoch{status}",
                )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()

    _write_comparison(runs, benchmark, out, epochs)
    for run in runs:
        if run.failure:
            print(f"failed: {run.method} seed {run.seed}: {run.failure}")
    elapsed = time.perf_counter() - started
    print(f"\n{len(runs)} run(s) in {elapsed:.1f} s; results in {out}")
    if interrupted:
        print("interrupted: wrote the runs finished so far", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return 0


def _write_comparison(runs: list[RunResult], benchmark: Benchmark, out: Path, epochs: int) -> None:
    from taskbalance.bench.metrics import csv_table, markdown_table, summarise, text_table
    from taskbalance.bench.plots import (
        plot_delta_m_ranking,
        plot_task_metrics,
        plot_weights_over_time,
    )

    rows = summarise(runs, benchmark.tasks)
    print(text_table(rows, benchmark.tasks, benchmark.summary_name))
    seeds = sorted({run.seed for run in runs})
    header = (
        f"Benchmark `{benchmark.name}`: test metrics after {epochs} epochs, mean ± std over "
        f"{len(seeds)} seed(s); Δm% against single-task models trained by the same harness "
        "with the same budget (lower is better).\n\n"
    )
    (out / "comparison.md").write_text(
        header + markdown_table(rows, benchmark.tasks, benchmark.summary_name)
    )
    (out / "comparison.csv").write_text(csv_table(rows, benchmark.tasks))
    write_runs_csv(runs, out / "runs.csv")
    write_metrics_csv(runs, out / "metrics.csv")
    method_runs = [run for run in runs if run.single_task is None]
    write_weights_csv(method_runs, out / "weights.csv")
    first_seed = {}
    for run in method_runs:
        first_seed.setdefault(run.method, run)
    plot_weights_over_time(first_seed, [task.name for task in benchmark.tasks], out / "weights.png")
    plot_task_metrics(rows, benchmark.tasks, out / "task_metrics.png")
    plot_delta_m_ranking(rows, out / "delta_m.png")


# ---------------------------------------------------------------------------------------------
# Parser and entry point.


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``taskbalance`` command."""
    parser = argparse.ArgumentParser(
        prog="taskbalance",
        description="Multi-task loss balancing: bundled benchmarks, training and comparison.",
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    common.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: small models)"
    )

    listing = subcommands.add_parser("list", help="methods and benchmarks")
    listing.set_defaults(handler=command_list)

    train = subcommands.add_parser("train", parents=[common], help="one run")
    train.add_argument("--bench", required=True, help="benchmark name (see `taskbalance list`)")
    train.add_argument("--method", required=True, help="method name (see `taskbalance list`)")
    train.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    train.add_argument("--epochs", type=int, default=None, help="default: the benchmark's")
    train.add_argument("--out", default=None, help="output directory")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="method hyperparameter (repeatable); lists are comma-separated",
    )
    train.add_argument("--small", action="store_true", help="small data, for smoke tests")
    train.set_defaults(handler=command_train)

    compare = subcommands.add_parser(
        "compare", parents=[common], help="every method and the single-task baselines"
    )
    compare.add_argument("--bench", default=DEFAULT_COMPARE_BENCHMARK)
    compare.add_argument("--methods", default="all", help="'all' or m1,m2,... (default all)")
    compare.add_argument(
        "--seeds", type=int, default=DEFAULT_COMPARE_SEEDS, help="number of seeds, 0..N-1"
    )
    compare.add_argument("--epochs", type=int, default=None, help="default: the benchmark's")
    compare.add_argument("--out", default=None, help="output directory")
    compare.add_argument("--small", action="store_true", help="small data, for smoke tests")
    compare.set_defaults(handler=command_compare)

    toy = subcommands.add_parser("toy", parents=[common], help="toy-2d trajectories as a PNG")
    toy.add_argument("--methods", default="all", help="'all' or m1,m2,... (default all)")
    toy.add_argument("--steps", type=int, default=None, help="Adam steps per trajectory")
    toy.add_argument("--out", default="runs/toy-2d", help="output directory")
    toy.set_defaults(handler=command_toy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``taskbalance`` command line.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 for a usage error, 130 after Ctrl-C.
    """
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR_EXIT_CODE
    threads = getattr(arguments, "threads", None)
    try:
        if threads is not None:
            if threads < 1:
                raise CommandError(f"--threads: expected an int >= 1, got {threads}")
            torch.set_num_threads(threads)
        return int(arguments.handler(arguments))
    except (CommandError, MissingExtraError) as error:
        print(f"taskbalance: error: {error}", file=sys.stderr)
        return USAGE_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("taskbalance: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
