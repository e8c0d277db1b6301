"""The benchmark suite: a public API for your own benchmarks, bundled ones, a harness, Δm%.

A benchmark is tasks (a loss, metrics accumulated over a split, a kind, an optional KPI), three
``torch.utils.data.Dataset`` splits yielding ``(input, targets)``, a model factory returning the
shared trunk and the task heads, and training defaults; see :mod:`taskbalance.bench.api` and
``examples/custom_benchmark.py``. ``taskbalance compare --bench FILE.py:FUNCTION`` runs one.

Importing this package needs only torch; scikit-learn (the digits images) and matplotlib (the
plots) are imported when a benchmark is built or a plot is drawn, and a missing one raises
:class:`MissingExtraError` saying ``pip install 'taskbalance[bench]'``.

Example:
    >>> from taskbalance.bench import benchmark_names
    >>> benchmark_names()[:4]
    ['multidigits', 'digits-mixed', 'gradnorm-toy', 'noisy-regression']
"""

from taskbalance.bench.api import (
    Benchmark,
    BenchmarkEntry,
    BenchmarkError,
    MeanMetric,
    Metric,
    MissingExtraError,
    SplitError,
    SplitMetric,
    Task,
    TrainingDefaults,
    accuracy,
    benchmark_entry,
    benchmark_names,
    binary_accuracy,
    binary_kpi,
    classification_kpi,
    load_benchmark,
    mean_absolute_error,
    mean_metric,
    mean_squared_error,
    reference_loss,
    register_benchmark,
    regression_kpi,
    split_metric,
)
from taskbalance.bench.data import TensorTaskDataset
from taskbalance.bench.harness import (
    Method,
    RunResult,
    TrainConfig,
    WeightRecorder,
    evaluate,
    train_run,
)
from taskbalance.bench.metrics import NanMetricWarning, ZeroBaselineWarning, delta_m, summarise
from taskbalance.bench.models import MultiTaskModel

__all__ = [
    "Benchmark",
    "BenchmarkEntry",
    "BenchmarkError",
    "MeanMetric",
    "Method",
    "Metric",
    "MissingExtraError",
    "MultiTaskModel",
    "NanMetricWarning",
    "RunResult",
    "SplitError",
    "SplitMetric",
    "Task",
    "TensorTaskDataset",
    "TrainConfig",
    "TrainingDefaults",
    "WeightRecorder",
    "ZeroBaselineWarning",
    "accuracy",
    "benchmark_entry",
    "benchmark_names",
    "binary_accuracy",
    "binary_kpi",
    "classification_kpi",
    "delta_m",
    "evaluate",
    "load_benchmark",
    "mean_absolute_error",
    "mean_metric",
    "mean_squared_error",
    "reference_loss",
    "register_benchmark",
    "regression_kpi",
    "split_metric",
    "summarise",
    "train_run",
]
