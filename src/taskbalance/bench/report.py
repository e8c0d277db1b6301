"""What a comparison writes: tables (terminal, Markdown, CSV), per-run CSVs and the metadata.

Every table says what it is: the benchmark, epochs, seeds, the model-selection rule, each
metric with its direction, and for each method the paired per-seed comparison with equal
weights (wins / losses, the paired t-test's p-value and whether the Δm% difference exceeds
seed noise). A Δm% left undefined by a zero single-task baseline shows as ``n/a`` (empty in the
CSV's rank, ``nan`` in its numbers) and the caption, the CSV's ``delta_m_note`` column and
``metadata.json``'s ``delta_m_notes`` say which metric was 0.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import taskbalance as tb
from taskbalance.bench.api import Benchmark
from taskbalance.bench.harness import (
    Method,
    RunResult,
    TrainConfig,
    _plain,
    default_params,
    example_hyperparameters,
    without_addresses,
)
from taskbalance.bench.metrics import REFERENCE_METHOD, MethodSummary, reported_test_metrics
from taskbalance.bench.selection import Selection, counted
from taskbalance.bench.stats import ALPHA


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


def delta_m_notes(rows: Sequence[MethodSummary]) -> list[str]:
    """The distinct reasons some rows have no Δm% (a zero single-task baseline), in row order."""
    return list(dict.fromkeys(row.delta_m_note for row in rows if row.delta_m_note))


def reference_notes(rows: Sequence[MethodSummary]) -> list[str]:
    """A note when the comparison has no ``ew`` row, which the ``vs ew`` columns need."""
    if any(row.method == REFERENCE_METHOD for row in rows):
        return []
    return [
        f"{REFERENCE_METHOD} was not among the methods, so the vs {REFERENCE_METHOD} columns "
        f"are empty: add {REFERENCE_METHOD} to --methods to test each method against it"
    ]


def metric_header(name: str, higher_is_better: bool) -> str:
    """Column header of a metric number, with its direction arrow."""
    return f"{name} {'↑' if higher_is_better else '↓'}"


def table_columns(benchmark: Benchmark) -> list[str]:
    """Headers of the comparison table."""
    headers = ["rank", "method"]
    headers += [
        metric_header(name, higher)
        for name, higher in zip(benchmark.metric_names, benchmark.directions, strict=True)
    ]
    if benchmark.summary_name:
        headers.append(f"{benchmark.summary_name} ↓")
    return [
        *headers,
        "Δm% ↓",
        f"vs {REFERENCE_METHOD} W/L",
        f"vs {REFERENCE_METHOD} p",
        f"vs {REFERENCE_METHOD}",
        "s/epoch",
        "seeds",
    ]


def table_cells(rows: Sequence[MethodSummary], benchmark: Benchmark) -> list[list[str]]:
    """The comparison table as text cells, one list per row (no header).

    The rank of a row the paired test cannot tell from rank 1 carries ``≈``.
    """
    cells = []
    for row in rows:
        rank = "—" if row.rank is None else str(row.rank)
        if row.rank is not None and row.rank > 1 and row.tied_with_best:
            rank += " ≈"
        line = [rank, row.method]
        line += [
            _mean_std_text(mean, std)
            for mean, std in zip(row.metric_means, row.metric_stds, strict=True)
        ]
        if benchmark.summary_name:
            line.append(_mean_std_text(row.summary_mean, row.summary_std))
        if row.delta_m_note:
            delta_text = "n/a"
        else:
            rounded = round(row.delta_m_mean, 2) + 0.0  # + 0.0: no "-0.00"
            delta_text = _mean_std_text(rounded, row.delta_m_std, decimals=2)
        if row.failures:
            delta_text += f" ({row.failures} failed)"
        line.append(delta_text)
        comparison = row.versus_reference
        if comparison is None:
            line += ["—", "—", "reference" if row.method == REFERENCE_METHOD else "—"]
        elif comparison.seeds == 0:
            line += ["—", "—", comparison.verdict]
        else:
            p_text = "—" if math.isnan(comparison.p_value) else f"{comparison.p_value:.3f}"
            line += [f"{comparison.wins}/{comparison.losses}", p_text, comparison.verdict]
        line += [_number(row.seconds_per_epoch, 3), str(row.seeds)]
        cells.append(line)
    return cells


def caption(
    benchmark: Benchmark,
    *,
    epochs: int,
    seeds: Sequence[int],
    selection: Selection,
    markdown: bool = False,
    notes: Sequence[str] = (),
) -> str:
    """What the table is: benchmark, budget, seeds, selection rule, metrics and directions.

    ``notes`` (e.g. :func:`delta_m_notes`) are added as a last line each, ``Note: ...``.
    """
    name = f"`{benchmark.name}`" if markdown else benchmark.name
    seed_text = f"{len(seeds)} seed(s) ({', '.join(str(seed) for seed in seeds)})"
    metrics = "; ".join(
        f"{metric} ({'higher' if higher else 'lower'} is better)"
        for metric, higher in zip(benchmark.metric_names, benchmark.directions, strict=True)
    )
    return (
        f"Benchmark {name}: {counted(epochs, 'epoch')}, mean ± std over {seed_text}; "
        f"selection: {selection} ({selection.describe()}).\n"
        f"Metrics: {metrics}.\n"
        "Δm%: mean relative change of every metric against single-task models trained by the "
        "same harness with the same budget (lower is better). "
        f"vs {REFERENCE_METHOD}: per seed, is the method's Δm% lower (W) or higher (L) than "
        f"{REFERENCE_METHOD}'s; p: paired t-test over seeds; better/worse when p < {ALPHA}, "
        "else tie (within seed noise). ≈: rank not distinguishable from rank 1."
    ) + "".join(f"\nNote: {note}." for note in [*_few_seeds_notes(seeds), *notes])


def _few_seeds_notes(seeds: Sequence[int]) -> list[str]:
    """A note where too few seeds leave the paired test without power, or without a verdict."""
    if len(seeds) >= 3:
        return []
    if len(seeds) == 2:
        return [
            "with 2 seeds the paired t-test has 1 degree of freedom: a difference reads as "
            "better or worse only where the two seeds' differences agree to within ~16% of "
            "their mean (t > 12.7), so most rows read as ties, and ≈ best, whatever their "
            "Δm%; rank methods with 5 seeds (the default)"
        ]
    return ["with 1 seed there is no paired test: every verdict is n/a"]


def markdown_table(rows: Sequence[MethodSummary], benchmark: Benchmark) -> str:
    """The comparison table in GitHub Markdown, ending with a newline."""
    headers = table_columns(benchmark)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in table_cells(rows, benchmark)]
    return "\n".join(lines) + "\n"


def text_table(rows: Sequence[MethodSummary], benchmark: Benchmark) -> str:
    """The comparison table aligned in plain text for the terminal."""
    headers = table_columns(benchmark)
    body = table_cells(rows, benchmark)
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *body]
    )


def csv_table(rows: Sequence[MethodSummary], benchmark: Benchmark) -> str:
    """The comparison table as CSV with raw numbers, one column pair per metric number.

    The sum of the metric numbers (``sum_of_metrics_*``) is written only for a benchmark that
    names it (``summary_name``), as the text table shows it: elsewhere it adds metrics of
    opposite directions (an mIoU to a depth error) and means nothing.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["rank", "method"]
    for name in benchmark.metric_names:
        header += [f"{name}_mean", f"{name}_std"]
    if benchmark.summary_name:
        header += ["sum_of_metrics_mean", "sum_of_metrics_std"]
    header += [
        "delta_m_percent_mean",
        "delta_m_percent_std",
        f"wins_vs_{REFERENCE_METHOD}",
        f"losses_vs_{REFERENCE_METHOD}",
        f"mean_delta_m_difference_vs_{REFERENCE_METHOD}",
        f"p_value_vs_{REFERENCE_METHOD}",
        f"verdict_vs_{REFERENCE_METHOD}",
        "tied_with_best",
        "seconds_per_epoch",
        "seeds",
        "failed_runs",
        "delta_m_note",
    ]
    writer.writerow(header)
    for row in rows:
        line: list[object] = ["" if row.rank is None else row.rank, row.method]
        for mean, std in zip(row.metric_means, row.metric_stds, strict=True):
            line += [mean, std]
        comparison = row.versus_reference
        if benchmark.summary_name:
            line += [row.summary_mean, row.summary_std]
        line += [row.delta_m_mean, row.delta_m_std]
        if comparison is None:
            line += ["", "", "", "", ""]
        else:
            line += [
                comparison.wins,
                comparison.losses,
                comparison.mean_difference,
                comparison.p_value,
                comparison.verdict,
            ]
        line += [row.tied_with_best, row.seconds_per_epoch, row.seeds, row.failures]
        line.append(row.delta_m_note)
        writer.writerow(line)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Per-run files.


def _single_name(run: RunResult) -> str:
    return "" if run.single_task is None else run.task_names[run.single_task]


def write_metrics_csv(runs: Sequence[RunResult], path: Path) -> None:
    """Per-epoch numbers of runs: one row per (run, epoch, split, quantity).

    Columns: method, seed, single_task, epoch, seconds, split (train/validation/test), name
    (``task`` for train losses, ``task/metric`` otherwise), value.
    """
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["method", "seed", "single_task", "epoch", "seconds", "split", "name", "value"]
        )
        for run in runs:
            for record in run.epochs:
                for split, names, values in (
                    ("train", [f"{task}/loss" for task in run.task_names], record.train_losses),
                    ("validation", run.metric_names, record.validation),
                    ("test", run.metric_names, record.test),
                ):
                    for name, value in zip(names, values, strict=True):
                        writer.writerow(
                            [
                                run.method,
                                run.seed,
                                _single_name(run),
                                record.epoch,
                                f"{record.seconds:.4f}",
                                split,
                                name,
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


def write_runs_csv(
    runs: Sequence[RunResult], path: Path, benchmark: Benchmark, selection: Selection
) -> None:
    """One row per run: the test metrics the table took from it (under ``selection``, named
    in the ``selection`` column; ``metrics.csv`` has every epoch's), seconds per epoch, status.
    """
    pick = reported_test_metrics(runs, benchmark, selection)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        metric_names = runs[0].metric_names if runs else []
        writer.writerow(
            [
                "method",
                "seed",
                "single_task",
                *(f"test_{name}" for name in metric_names),
                "selection",
                "seconds_per_epoch",
                "epochs",
                "status",
            ]
        )
        for run in runs:
            status = "interrupted" if run.interrupted else (run.failure or "ok")
            writer.writerow(
                [
                    run.method,
                    run.seed,
                    _single_name(run),
                    *pick(run),
                    str(selection),
                    run.seconds_per_epoch,
                    len(run.epochs),
                    status,
                ]
            )


def write_diagnostics_csv(runs: Sequence[RunResult], path: Path) -> None:
    """Gradient-conflict diagnostics of runs, one row per (run, step, task pair).

    Columns: method, seed, step, task_i, task_j, cosine (of the two task gradients w.r.t. the
    shared features), norm_i, norm_j, norm_ratio (``norm_i / norm_j``).
    """
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "method",
                "seed",
                "step",
                "task_i",
                "task_j",
                "cosine",
                "norm_i",
                "norm_j",
                "norm_ratio",
            ]
        )
        for run in runs:
            names = run.task_names
            for step, gram in zip(run.diagnostic_steps, run.diagnostic_grams, strict=True):
                found = tb.gradient_diagnostics(torch.tensor(gram, dtype=torch.float64))
                norms = found.norms.tolist()
                cosines = found.cosines.tolist()
                for i in range(len(names)):
                    for j in range(i + 1, len(names)):
                        ratio = norms[i] / norms[j] if norms[j] > 0 else math.nan
                        writer.writerow(
                            [
                                run.method,
                                run.seed,
                                step,
                                names[i],
                                names[j],
                                cosines[i][j],
                                norms[i],
                                norms[j],
                                ratio,
                            ]
                        )


# ---------------------------------------------------------------------------------------------
# Metadata.


def method_metadata(
    method: Method, benchmark: Benchmark, model: nn.Module | None = None
) -> dict[str, Any]:
    """Every hyperparameter of a method as it runs (defaults included), its mode and heads.

    ``model`` (the benchmark's) fixes the default ``params`` of a model without a single shared
    feature tensor (MTAN: parameters mode over ``trunk``); None takes features mode.
    """
    values = dict(tb.hyperparameters(method.name))
    values.update(example_hyperparameters(method.name, benchmark.num_tasks))
    if "kinds" in values:
        values["kinds"] = [task.kind for task in benchmark.tasks]
    default = default_params(method.name, model)
    if default is not None:
        values["params"] = default
    values.update(method.hyperparameters)
    cls = tb.method_class(method.name)
    params = values.get("params")
    if not cls.requires_gram:
        mode = "loss-based (no gradients)"
    elif params is None:
        mode = "features (Gramian w.r.t. the trunk's output)"
    else:
        mode = f"parameters of {params!r}"
    plain = {
        key: _plain(value) for key, value in values.items() if value is not inspect.Parameter.empty
    }
    heads = values.get("heads")
    if heads is None:
        heads = getattr(cls, "default_heads", None) if cls.requires_gram else "weighted (Σ w_k L_k)"
    return {
        "label": method.label,
        "name": method.name,
        "hyperparameters": plain,
        "mode": mode,
        "heads": _plain(heads),
        "seeded": "seed" in values,
    }


def benchmark_metadata(benchmark: Benchmark, model: nn.Module) -> dict[str, Any]:
    """The benchmark's data, tasks and model, as ``metadata.json`` pins them (a finished run
    is resumed only while these are unchanged): ``{"benchmark": ..., "model": ...}``."""
    return {
        "benchmark": {
            "name": benchmark.name,
            "description": benchmark.description,
            "settings": _plain(dict(benchmark.settings)),
            "sizes": {
                split: len(getattr(benchmark, split)) for split in ("train", "validation", "test")
            },
            "tasks": [
                {
                    "name": task.name,
                    "kind": task.kind,
                    "loss": getattr(task.loss, "__qualname__", None)
                    or without_addresses(repr(task.loss)),
                    "metrics": [
                        {"name": name, "higher_is_better": higher}
                        for name, higher in zip(task.metric_names, task.directions, strict=True)
                    ],
                    "kpi": task.kpi is not None,
                }
                for task in benchmark.tasks
            ],
        },
        "model": {
            "architecture": str(model),
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
        },
    }


def training_metadata(benchmark: Benchmark, config: TrainConfig) -> dict[str, Any]:
    """The training settings every run shares: the benchmark's defaults under ``config``'s
    overrides (the seed left out: each run has its own)."""
    resolved = config.resolved(benchmark.defaults)
    return _plain({key: value for key, value in resolved.items() if key != "seed"})


def run_metadata(
    benchmark: Benchmark,
    methods: Sequence[Method],
    *,
    config: TrainConfig,
    seeds: Sequence[int],
    selection: Selection,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that changes a result: data, model, optimiser, schedule, budget, methods.

    Args:
        benchmark: the benchmark.
        methods: the compared methods.
        config: the training overrides (epochs, batch size, learning rates, diagnostics).
        seeds: the training seeds.
        selection: the model-selection rule.
        extra: anything else to pin (the command line, jobs, threads, device).

    Returns:
        A JSON-compatible dictionary.
    """
    torch.manual_seed(0)
    model = benchmark.build_model()
    return {
        **benchmark_metadata(benchmark, model),
        "training": training_metadata(benchmark, config),
        "seeds": list(seeds),
        "selection": str(selection),
        "methods": [method_metadata(method, benchmark, model) for method in methods],
        "versions": {
            "taskbalance": tb.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        **({} if extra is None else {key: _plain(value) for key, value in extra.items()}),
    }


def write_json(data: Mapping[str, Any], path: Path) -> None:
    """Write ``data`` as indented JSON (NaN allowed)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def comparison_title(benchmark: Benchmark, epochs: int, seeds: Sequence[int]) -> str:
    """``benchmark — N epochs, S seeds``, the title of every comparison plot."""
    return f"{benchmark.name} — {counted(epochs, 'epoch')}, {len(seeds)} seed(s)"


def write_comparison(
    benchmark: Benchmark,
    runs: Sequence[RunResult],
    rows: Sequence[MethodSummary],
    methods: Sequence[Method],
    out: Path,
    *,
    config: TrainConfig,
    seeds: Sequence[int],
    selection: Selection,
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write a comparison's tables, per-run CSVs, metadata and plots.

    Args:
        benchmark: the benchmark.
        runs: the finished runs.
        rows: the summary rows of those runs.
        methods: the compared methods.
        out: the output directory.
        config: the training overrides.
        seeds: the seeds.
        selection: the model-selection rule.
        extra: more to pin in the metadata (command line, jobs, threads).

    Returns:
        The files written, in the order a reader wants them.
    """
    from taskbalance.bench import plots

    epochs = config.epochs or benchmark.defaults.epochs
    written: list[Path] = []

    def target(name: str) -> Path:
        path = out / name
        written.append(path)
        return path

    notes = delta_m_notes(rows)
    header = caption(
        benchmark,
        epochs=epochs,
        seeds=seeds,
        selection=selection,
        markdown=True,
        notes=[*notes, *reference_notes(rows)],
    )
    target("comparison.md").write_text(header + "\n\n" + markdown_table(rows, benchmark))
    target("comparison.csv").write_text(csv_table(rows, benchmark))
    metadata = run_metadata(
        benchmark, methods, config=config, seeds=seeds, selection=selection, extra=extra
    )
    write_json({**metadata, "delta_m_notes": notes}, target("metadata.json"))
    write_runs_csv(runs, target("runs.csv"), benchmark, selection)
    write_metrics_csv(runs, target("metrics.csv"))
    method_runs = [run for run in runs if run.single_task is None]
    write_weights_csv(method_runs, target("weights.csv"))
    write_diagnostics_csv(method_runs, target("diagnostics.csv"))
    title = comparison_title(benchmark, epochs, seeds)
    first_seed: dict[str, RunResult] = {}
    by_method: dict[str, list[RunResult]] = {}
    for run in method_runs:
        first_seed.setdefault(run.method, run)
        by_method.setdefault(run.method, []).append(run)
    task_names = [task.name for task in benchmark.tasks]
    drawn = [
        ("delta_m.png", lambda p: plots.plot_delta_m_ranking(rows, p, f"Δm% ranking: {title}")),
        ("task_metrics.png", lambda p: plots.plot_task_metrics(rows, benchmark, p, title)),
        ("pareto.png", lambda p: plots.plot_pareto(rows, benchmark, p, f"trade-off: {title}")),
        (
            "weights.png",
            lambda p: plots.plot_weights_over_time(
                first_seed, task_names, p, f"task weights (seed {seeds[0]}): {title}"
            ),
        ),
        (
            "cosines.png",
            lambda p: plots.plot_gradient_cosines(
                by_method, task_names, p, f"task-gradient cosines: {title}"
            ),
        ),
        (
            "conflicts.png",
            lambda p: plots.plot_conflicts(by_method, p, f"gradient conflicts: {title}"),
        ),
    ]
    for name, draw in drawn:
        if draw(out / name):
            written.append(out / name)
    return written
