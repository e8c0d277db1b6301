"""The ``taskbalance`` command line: list, train, compare and toy (parse → call → print).

The work is library code: :func:`taskbalance.bench.compare.run_comparison`,
:mod:`taskbalance.bench.report`, :func:`taskbalance.bench.train_run`. Errors a user can fix
(unknown benchmark or method, a bad ``--set`` value, a benchmark file or function that does not
exist, an output directory that cannot be written, a missing optional dependency) are printed
to stderr as one line and exit with code 2, before any training starts. Ctrl-C during training
writes the results finished so far and exits with code 130.

``--bench`` takes a registered name, ``path/to/file.py:function`` or ``package.module:function``
(a function returning a :class:`taskbalance.bench.Benchmark`). ``--set key=value`` values are
Python literals (see :mod:`taskbalance.bench.variants`).
"""

from __future__ import annotations

import argparse
import csv
import os
import select
import statistics
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import taskbalance as tb
from taskbalance.bench import report
from taskbalance.bench.api import (
    Benchmark,
    BenchmarkError,
    MissingExtraError,
    benchmark_entry,
    benchmark_names,
    load_benchmark,
    require_module,
)
from taskbalance.bench.compare import BenchmarkSource, run_comparison
from taskbalance.bench.harness import (
    Method,
    RunResult,
    TrainConfig,
    check_method,
    example_hyperparameters,
    progress_bar,
    steps_per_epoch,
    train_run,
)
from taskbalance.bench.metrics import NanMetricWarning, ZeroBaselineWarning
from taskbalance.bench.selection import (
    Selection,
    check_selection,
    counted,
    parse_selection,
)
from taskbalance.bench.tensorboard import require_tensorboard, write_run
from taskbalance.bench.variants import parse_methods
from taskbalance.methods._facts import method_facts

#: The benchmark ``taskbalance compare`` runs when none is named.
DEFAULT_COMPARE_BENCHMARK = "multidigits"
#: Seeds of the default comparison (chosen so that it finishes within 5 minutes on 2 CPU cores).
DEFAULT_COMPARE_SEEDS = 5
#: The toy landscapes: not benchmarks (no data, no single-task baselines); `taskbalance toy`.
TOYS = ("toy-2d",)
#: Steps of ``train --bench toy-2d`` per "epoch".
TOY_STEPS_PER_EPOCH = 250
#: Exit code after Ctrl-C (128 + SIGINT).
INTERRUPTED_EXIT_CODE = 130
#: As the shell reports a process ended by SIGPIPE (the reader of stdout went away).
BROKEN_PIPE_EXIT_CODE = 141
USAGE_ERROR_EXIT_CODE = 2
#: A run that stopped (a non-finite loss, a solver that failed), or every run of a comparison.
FAILED_RUNS_EXIT_CODE = 1
#: Relative error within which uncertainty weighting counts as having recovered σ².
VARIANCE_TOLERANCE = 0.05


class CommandError(Exception):
    """A mistake in the command line: printed as one line, exit code 2."""


def prepare_output_directory(path: Path) -> Path:
    """Create ``path`` and check that a file can be written there, before any training.

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


def _positive(option: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise CommandError(f"{option}: expected an int >= 1, got {value}")


def _check_device(device: str) -> None:
    try:
        torch.device(device)
    except RuntimeError:
        raise CommandError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: no CUDA device is available")


def _check_run_options(arguments: argparse.Namespace) -> None:
    """The options ``train`` and ``compare`` share, checked before anything is written."""
    _positive("--epochs", arguments.epochs)
    every = arguments.diagnostics_every
    if every is not None and every < 0:
        raise CommandError(f"--diagnostics-every: expected an int >= 0 (0: off), got {every}")


def _log(arguments: argparse.Namespace, message: str) -> None:
    if not arguments.quiet:
        print(message, file=sys.stderr, flush=True)


def _parsed_methods(text: str, assignments: Sequence[str], option: str) -> list[Method]:
    """:func:`parse_methods`, its errors naming ``option`` (``--set`` ones name themselves)."""
    try:
        return parse_methods(text, assignments)
    except ValueError as error:
        message = str(error)
        named = message if message.startswith("--") else f"{option}: {message}"
        raise CommandError(named) from None


def _benchmark(arguments: argparse.Namespace) -> Benchmark:
    return load_benchmark(
        arguments.bench,
        small=arguments.small,
        data_seed=arguments.data_seed,
        data_root=arguments.data_root,
        model=arguments.model,
    )


def _config(arguments: argparse.Namespace, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        seed=seed,
        epochs=arguments.epochs,
        batch_size=arguments.batch_size,
        diagnostics_every=arguments.diagnostics_every,
        device=arguments.device,
    )


def _slug(text: str) -> str:
    return "".join(
        character if character.isalnum() or character in "-_." else "_" for character in text
    )


# ---------------------------------------------------------------------------------------------
# list


def command_list(arguments: argparse.Namespace) -> int:
    """``taskbalance list``: methods, benchmarks and toys."""
    methods = tb.available()
    print(f"Methods ({len(methods)}):")
    for name in methods:
        kind = "gradient" if tb.method_class(name).requires_gram else "loss"
        print(f"  {name:<12} {kind}-based")
    print()
    print("Benchmarks (--bench NAME, or --bench FILE.py:FUNCTION for your own):")
    for name in benchmark_names():
        entry = benchmark_entry(name)
        suffix = "  [needs --data-root]" if entry.needs_data_root else ""
        print(f"  {name}: {entry.description}{suffix}")
        for line in entry.tasks:
            print(f"      {line}")
    print()
    print("Toy landscapes (taskbalance toy):")
    print("  toy-2d: two conflicting objectives on a 2-D plane (CAGrad/Nash-MTL toy)")
    print()
    print("Metric arrows: ↑ higher is better, ↓ lower is better.")
    return 0


# ---------------------------------------------------------------------------------------------
# train


def _distributed_setup(device: str) -> bool:
    """Initialise the process group under torchrun; True when this is a multi-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return True


def command_train(arguments: argparse.Namespace) -> int:
    """``taskbalance train``: one run; per-task test metrics, final weights, files."""
    methods = _parsed_methods(arguments.method, arguments.set or [], "--method")
    if len(methods) != 1:
        raise CommandError(f"--method: expected one method, got {arguments.method!r}")
    method = methods[0]
    _check_run_options(arguments)
    slug = _slug(f"{arguments.bench}-{method.label}")
    out = Path(arguments.out or f"runs/train-{slug}-seed{arguments.seed}")
    if arguments.bench in TOYS:
        prepare_output_directory(out)
        return _train_toy(arguments, method, out)
    if arguments.tensorboard is not None:
        require_tensorboard()
    _check_device(arguments.device)
    distributed = _distributed_setup(arguments.device)
    rank = torch.distributed.get_rank() if distributed else 0
    if distributed and arguments.device == "cuda":
        arguments.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        if rank == 0:
            prepare_output_directory(out)
        benchmark = _benchmark(arguments)
        try:
            check_method(method, benchmark)
        except (TypeError, ValueError) as error:
            raise CommandError(f"{method.label}: {error}") from None
        config = _config(arguments, arguments.seed)
        steps = (arguments.epochs or benchmark.defaults.epochs) * steps_per_epoch(
            benchmark, arguments.batch_size
        )
        bar = progress_bar(
            steps, f"{benchmark.name}/{method.label}", rank == 0 and not arguments.quiet
        )
        try:
            run = train_run(benchmark, method, config=config, progress=bar)
        finally:
            bar.close()
        if rank == 0:
            _report_train(benchmark, method, run, out, config)
            if arguments.tensorboard is not None:
                written = write_run(run, benchmark, Path(arguments.tensorboard))
                print(f"wrote TensorBoard scalars to {written} (tensorboard --logdir {written})")
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if run.interrupted:
        print("interrupted: wrote the epochs finished so far", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return FAILED_RUNS_EXIT_CODE if run.failure else 0


def _report_train(
    benchmark: Benchmark, method: Method, run: Any, out: Path, config: TrainConfig
) -> None:
    from taskbalance.bench import plots

    epochs = counted(len(run.epochs), "epoch")
    print(
        f"{benchmark.name} / {method.label} / seed {run.seed}: {epochs}, "
        f"{run.seconds_per_epoch:.3f} s per epoch"
    )
    if run.failure:
        print(f"training stopped: {run.failure}")
    if run.epochs:
        print("test metrics (last epoch):")
        for name, higher, value in zip(
            benchmark.metric_names, benchmark.directions, run.epochs[-1].test, strict=True
        ):
            print(f"  {name:<24} {value:>12.6g}  ({'higher' if higher else 'lower'} is better)")
        if benchmark.summary_name:
            print(f"  {benchmark.summary_name} = {sum(run.epochs[-1].test):.4g}")
    weights = ", ".join(
        f"{name}={value:.4g}"
        for name, value in zip(run.task_names, run.final_weights, strict=False)
    )
    print(f"final weights (the last step's): {weights}")
    last_epoch = _last_epoch_mean_weights(run)
    if last_epoch:
        means = ", ".join(
            f"{name}={value:.4g}" for name, value in zip(run.task_names, last_epoch, strict=False)
        )
        # One step's weights are one draw of a random or noisy rule (RLW, FAMO), and 0 for a
        # task without labels in that batch: the epoch's mean is what the run applied.
        print(f"mean weights over the last epoch: {means}")
    if run.learned_variances is not None and benchmark.noise_variances is not None:
        _print_variance_recovery(run.task_names, benchmark.noise_variances, run.learned_variances)
    files = [
        out / "metrics.csv",
        out / "weights.csv",
        out / "diagnostics.csv",
        out / "metadata.json",
    ]
    report.write_metrics_csv([run], files[0])
    report.write_weights_csv([run], files[1])
    report.write_diagnostics_csv([run], files[2])
    report.write_json(
        report.run_metadata(
            benchmark, [method], config=config, seeds=[run.seed], selection=Selection()
        ),
        files[3],
    )
    for name, draw in (
        ("curves.png", lambda p: plots.plot_training_curves(run, p)),
        (
            "weights.png",
            lambda p: plots.plot_weights_over_time(
                {method.label: run}, run.task_names, p, f"{benchmark.name}: task weights"
            ),
        ),
        ("conflicts.png", lambda p: plots.plot_conflicts({method.label: [run]}, p)),
    ):
        if draw(out / name):
            files.append(out / name)
    print("wrote " + ", ".join(str(path) for path in files))


def _last_epoch_mean_weights(run: RunResult) -> list[float]:
    """Each task's mean recorded weight over the last epoch's steps (empty without weights)."""
    if not run.weight_rows or not run.epochs:
        return []
    per_epoch = (run.weight_steps[-1] + 1) / len(run.epochs)
    first = run.weight_steps[-1] + 1 - per_epoch
    recorded = zip(run.weight_steps, run.weight_rows, strict=True)
    rows = [row for step, row in recorded if step >= first]
    return [statistics.fmean(column) for column in zip(*rows, strict=True)]


def _print_variance_recovery(
    task_names: Sequence[str], true_variances: Sequence[float], learned_variances: Sequence[float]
) -> None:
    print("uncertainty weighting: learned σ² = exp(s_k) vs the true noise variance σ_k²")
    print(f"  {'task':<6} {'true σ²':>10} {'learned σ²':>11} {'rel. error':>11}")
    errors = []
    for name, true_value, learned in zip(
        task_names, true_variances, learned_variances, strict=True
    ):
        error = (learned - true_value) / true_value
        errors.append(abs(error))
        print(f"  {name:<6} {true_value:>10.4g} {learned:>11.4g} {100 * error:>10.2f}%")
    verdict = "yes" if max(errors) <= VARIANCE_TOLERANCE else "no"
    print(
        f"  recovered within {100 * VARIANCE_TOLERANCE:.0f}%: {verdict} "
        f"(largest error {100 * max(errors):.2f}%)"
    )


# ---------------------------------------------------------------------------------------------
# toy


def _toy_parameter(name: str) -> dict[str, Any]:
    """A stand-in for the toy's point, for a parameters-only method (MoCo)."""
    if method_facts(tb.method_class(name)).requires_params:
        return {"params": [torch.nn.Parameter(torch.zeros(2))]}
    return {}


def _check_toy_method(method: Method) -> None:
    """Refuse bad hyperparameters before any trajectory runs."""
    try:
        tb.create(
            method.name,
            num_tasks=2,
            **{**example_hyperparameters(method.name, 2), **method.hyperparameters},
            **_toy_parameter(method.name),
        )
    except (TypeError, ValueError) as error:
        raise CommandError(f"{method.label}: {error}") from None


def _train_toy(arguments: argparse.Namespace, method: Method, out: Path) -> int:
    from taskbalance.bench.toy import TOY_STARTS, TOY_STEPS, run_toy_method

    if arguments.epochs is not None:
        steps = arguments.epochs * TOY_STEPS_PER_EPOCH
    else:
        steps = 50 if arguments.small else TOY_STEPS
    _check_toy_method(method)
    bar = progress_bar(steps * len(TOY_STARTS), f"toy-2d/{method.label}", not arguments.quiet)
    try:
        trajectories = run_toy_method(
            method.name,
            steps=steps,
            hyperparameters=method.hyperparameters,
            seed=arguments.seed,
            progress=bar,
        )
    except KeyboardInterrupt:
        print("interrupted: no trajectory written", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    finally:
        bar.close()
    _write_toy_outputs({method.label: trajectories}, out)
    return 0


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
    written = [out / "toy-2d.csv"]
    if len(trajectories) == 1:
        _write_trajectory_steps(trajectories, "weights", ["w_f1", "w_f2"], out / "weights.csv")
        _write_trajectory_steps(trajectories, "objectives", ["f1", "f2"], out / "metrics.csv")
        written += [out / "weights.csv", out / "metrics.csv"]
    plot_toy_trajectories(trajectories, front_points.tolist(), out / "toy-2d.png")
    written.append(out / "toy-2d.png")
    print("wrote " + ", ".join(str(path) for path in written))


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
    from taskbalance.bench.toy import TOY_STARTS, TOY_STEPS, run_toy

    methods = _parsed_methods(arguments.methods, [], "--methods")
    steps = arguments.steps if arguments.steps is not None else TOY_STEPS
    _positive("--steps", steps)
    _positive("--jobs", arguments.jobs)
    for method in methods:
        _check_toy_method(method)
    out = prepare_output_directory(Path(arguments.out))
    require_module("matplotlib")
    bar = progress_bar(steps * len(TOY_STARTS) * len(methods), "toy-2d", not arguments.quiet)
    count = 0

    def finished(method: Method) -> None:
        nonlocal count
        count += 1
        if not sys.stderr.isatty():
            _log(arguments, f"[{count}/{len(methods)}] {method.label}")

    try:
        trajectories = run_toy(
            methods, steps=steps, jobs=arguments.jobs, progress=bar, finished=finished
        )
    finally:
        bar.close()
    if len(trajectories) < len(methods):
        print("interrupted: writing the methods finished so far", file=sys.stderr)
    _write_toy_outputs(trajectories, out)
    return 0 if len(trajectories) == len(methods) else INTERRUPTED_EXIT_CODE


# ---------------------------------------------------------------------------------------------
# compare


def command_compare(arguments: argparse.Namespace) -> int:
    """``taskbalance compare``: every method and the single-task baselines over seeds."""
    if arguments.bench in TOYS:
        raise CommandError(
            f"{arguments.bench} has no single-task baselines or Δm%; run `taskbalance toy`"
        )
    methods = _parsed_methods(arguments.methods, arguments.set or [], "--methods")
    try:
        selection = parse_selection(arguments.select)
    except ValueError as error:
        raise CommandError(str(error)) from None
    _check_run_options(arguments)
    _positive("--seeds", arguments.seeds)
    _positive("--jobs", arguments.jobs)
    _check_device(arguments.device)
    source = BenchmarkSource(
        arguments.bench, arguments.small, arguments.data_seed, arguments.data_root, arguments.model
    )
    benchmark = _benchmark(arguments)
    epochs = arguments.epochs or benchmark.defaults.epochs
    if selection.rule == "mean-last" and selection.k > epochs:
        raise CommandError(
            f"--select {arguments.select}: averages the last {selection.k} epochs, but each "
            f"run trains {counted(epochs, 'epoch')}; expected K <= {epochs}"
        )
    try:
        check_selection(selection, benchmark.directions)
    except ValueError as error:
        raise CommandError(f"{error} (benchmark {benchmark.name!r})") from None
    out = prepare_output_directory(Path(arguments.out or f"runs/compare-{_slug(benchmark.name)}"))
    require_module("matplotlib")
    seeds = list(range(arguments.seeds))
    config = _config(arguments)
    planned_runs = len(seeds) * (benchmark.num_tasks + len(methods))
    per_run = epochs * steps_per_epoch(benchmark, arguments.batch_size)
    total = planned_runs * (per_run if arguments.jobs == 1 else 1)
    bar = progress_bar(total, f"compare {benchmark.name}", not arguments.quiet)
    threads = arguments.threads
    try:
        with warnings.catch_warnings():
            # Printed below as one plain line, after the table it explains.
            warnings.simplefilter("ignore", ZeroBaselineWarning)
            warnings.simplefilter("ignore", NanMetricWarning)
            comparison = run_comparison(
                source,
                methods,
                seeds=seeds,
                out=out,
                config=config,
                selection=selection,
                jobs=arguments.jobs,
                threads=max(threads, arguments.jobs),
                fresh=arguments.fresh,
                benchmark=benchmark,
                progress=bar,
                log=None if sys.stderr.isatty() else (lambda line: _log(arguments, line)),
            )
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from None
    finally:
        bar.close()

    notes = report.delta_m_notes(comparison.rows)
    everything = [*notes, *report.reference_notes(comparison.rows)]
    print(
        report.caption(benchmark, epochs=epochs, seeds=seeds, selection=selection, notes=everything)
    )
    print()
    print(report.text_table(comparison.rows, benchmark))
    for note in notes:
        print(f"taskbalance: warning: {note}", file=sys.stderr)
    files = report.write_comparison(
        benchmark,
        comparison.runs,
        comparison.rows,
        methods,
        out,
        config=config,
        seeds=seeds,
        selection=selection,
        extra={
            "command": ["taskbalance", *sys.argv[1:]],
            "jobs": arguments.jobs,
            "threads_per_run": max(1, threads // arguments.jobs) if arguments.jobs > 1 else threads,
            "device": arguments.device,
        },
    )
    for run in comparison.runs:
        if run.failure:
            model = (
                f"single-task {benchmark.tasks[run.single_task].name}"
                if run.single_task is not None
                else run.method
            )
            print(f"failed: {model} seed {run.seed}: {run.failure}")
    resumed = f" ({comparison.resumed} resumed)" if comparison.resumed else ""
    print(f"\n{len(comparison.runs)} run(s){resumed} in {comparison.seconds:.1f} s")
    print("wrote:")
    for path in files:
        print(f"  {path}")
    print(f"  {out / 'runs'}/*.json (one per run; rerun the same command to resume)")
    if comparison.interrupted:
        print("interrupted: wrote the runs finished so far; rerun to resume", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    method_runs = [run for run in comparison.runs if run.single_task is None]
    if method_runs and all(run.failure for run in method_runs):
        # A table without a method is no result: a script running it should see it failed.
        print("taskbalance: error: every method's run failed (see above)", file=sys.stderr)
        return FAILED_RUNS_EXIT_CODE
    return 0


# ---------------------------------------------------------------------------------------------
# Parser and entry point.


def _add_benchmark_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--bench",
        required=default is None,
        default=default,
        help="benchmark: a name from `taskbalance list`, FILE.py:FUNCTION or module:function",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: the benchmark's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the benchmark's")
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: runs/compare-BENCHMARK or runs/train-...-seedN, "
        "under the current directory)",
    )
    parser.add_argument("--small", action="store_true", help="small data, for smoke tests")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the data and splits")
    parser.add_argument("--data-root", default=None, help="directory of your data files")
    parser.add_argument(
        "--model",
        default=None,
        help="the model, for benchmarks that offer several: nyuv2, cityscapes (default mtan, "
        "MTAN's attention network, as the published tables) and scenes (default segnet, the "
        "split SegNet): segnet or mtan",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--diagnostics-every",
        type=int,
        default=None,
        help="record task-gradient cosines every N steps (default: ~50 times per run; 0: off)",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="method hyperparameter, a Python literal (repeatable); e.g. update_every=5, "
        "weights=[1,2], gram_dtype=torch.float64, params=trunk (parameters mode on a submodule)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``taskbalance`` command."""
    parser = argparse.ArgumentParser(
        prog="taskbalance",
        description="Multi-task loss balancing: benchmarks, training and comparison.",
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    common.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: small models)"
    )

    listing = subcommands.add_parser("list", help="methods and benchmarks")
    listing.set_defaults(handler=command_list)

    train = subcommands.add_parser(
        "train", parents=[common], help="one run (under torchrun: DDP over the processes)"
    )
    _add_benchmark_options(train, None)
    train.add_argument(
        "--method", required=True, help="method name, optionally with variants: mgda[params=trunk]"
    )
    train.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    train.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="also write the run's weights, losses, metrics and gradient cosines as TensorBoard "
        "scalars to DIR (needs the tensorboard package)",
    )
    train.set_defaults(handler=command_train)

    compare = subcommands.add_parser(
        "compare", parents=[common], help="every method and the single-task baselines"
    )
    _add_benchmark_options(compare, DEFAULT_COMPARE_BENCHMARK)
    compare.add_argument(
        "--methods",
        default="all",
        help="'all' or m1,m2[key=value,...],... (default all); e.g. ew,nash_mtl[update_every=5]",
    )
    compare.add_argument(
        "--seeds", type=int, default=DEFAULT_COMPARE_SEEDS, help="number of seeds, 0..N-1"
    )
    compare.add_argument(
        "--select",
        default="last",
        help="model selection: last (default), best-val, best-val-mean or mean-last-K",
    )
    compare.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
    compare.add_argument(
        "--fresh", action="store_true", help="discard finished runs of an earlier invocation"
    )
    compare.set_defaults(handler=command_compare)

    toy = subcommands.add_parser("toy", parents=[common], help="toy-2d trajectories as a PNG")
    toy.add_argument("--methods", default="all", help="'all' or m1,m2,... (default all)")
    toy.add_argument("--steps", type=int, default=None, help="Adam steps per trajectory")
    toy.add_argument("--out", default="runs/toy-2d", help="output directory")
    toy.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes, one method each at a time (default: 2 where 2 CPUs exist; "
        "the trajectories are the same for any N)",
    )
    toy.set_defaults(handler=command_toy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``taskbalance`` command line.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 for a usage error, 130 after Ctrl-C, 141 when the
        reader of the output went away (``taskbalance list | head``).
    """
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR_EXIT_CODE
    threads = getattr(arguments, "threads", None)
    try:
        if threads is not None:
            _positive("--threads", threads)
            torch.set_num_threads(threads)
        code = int(arguments.handler(arguments))
        sys.stdout.flush()  # a reader that went away raises here, not at the exit's flush
        return code
    except (CommandError, MissingExtraError, BenchmarkError) as error:
        print(f"taskbalance: error: {error}", file=sys.stderr)
        return USAGE_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("taskbalance: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe (a worker's): not the reader of our output going away
        # as the shell reports SIGPIPE; stdout points at /dev/null so that the interpreter's
        # final flush at exit does not raise again (the recipe of Python's signal docs)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE_EXIT_CODE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end was closed (poll reports an error on it)."""
    try:
        poller = select.poll()
    except AttributeError:  # pragma: no cover  # no poll() (Windows): cannot tell
        return True
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a notebook's stream: not a pipe
        return False
    poller.register(descriptor, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


if __name__ == "__main__":
    sys.exit(main())
