"""The benchmark suite: bundled data sets, a plain training harness, Δm% and plots.

Importing this package needs only torch; scikit-learn (the digits images) and matplotlib (the
plots) are imported when a benchmark is built or a plot is drawn, and a missing one raises
:class:`MissingExtraError` saying ``pip install 'taskbalance[bench]'``.

Example:
    >>> from taskbalance.bench import benchmark_names
    >>> benchmark_names()
    ['multidigits', 'digits-mixed', 'gradnorm-toy', 'noisy-regression', 'toy-2d']
"""

from taskbalance.bench.datasets import (
    Benchmark,
    MissingExtraError,
    Split,
    Task,
    benchmark_info,
    benchmark_names,
    load_benchmark,
)
from taskbalance.bench.harness import RunResult, TrainConfig, WeightRecorder, train_run
from taskbalance.bench.metrics import delta_m, summarise

__all__ = [
    "Benchmark",
    "MissingExtraError",
    "RunResult",
    "Split",
    "Task",
    "TrainConfig",
    "WeightRecorder",
    "benchmark_info",
    "benchmark_names",
    "delta_m",
    "load_benchmark",
    "summarise",
    "train_run",
]
