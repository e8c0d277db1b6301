"""Your own benchmark on the public API, compared with `taskbalance compare --bench`.

Run the comparison from the command line:

    taskbalance compare --bench examples/custom_benchmark.py:make_benchmark \
        --methods ew,uw,mgda --seeds 2

or this file directly (`python examples/custom_benchmark.py`), which trains two methods with
the same harness from Python and prints their metrics.

What a benchmark needs (see `taskbalance.bench.api`):

- tasks: a name, a loss `(output, target) -> 0-d tensor`, metrics accumulated over a whole
  split (with a direction), a kind for uncertainty weighting, and a KPI for DTP;
- three `torch.utils.data.Dataset`s whose items are `(input, targets)`; `targets` may be a
  tuple in task order or, as here, a dict keyed by task name. Nothing needs to fit in memory:
  the harness reads them through a `DataLoader`;
- a model factory returning the shared trunk and one head per task;
- training defaults (epochs, batch size, optimiser, learning rates).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from taskbalance import losses
from taskbalance.bench import (
    Benchmark,
    Method,
    Task,
    TrainConfig,
    TrainingDefaults,
    accuracy,
    classification_kpi,
    mean_metric,
    regression_kpi,
    split_metric,
    train_run,
)

INPUT_SIZE = 8
NUM_CLASSES = 3


class SensorData(Dataset[tuple[Tensor, dict[str, Tensor]]]):
    """Synthetic sensor readings, generated one item at a time from a seed.

    Two tasks share the input: ``level`` (a smooth function of the readings, plus noise) and
    ``state`` (which of three regions the readings fall in). Item ``i`` is generated from
    ``seed`` and ``i`` alone, as a file-backed data set would read file ``i``.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        # Fixed "physics" shared by every split: drawn from seed 0 only.
        physics = torch.Generator().manual_seed(0)
        self.direction = torch.randn(INPUT_SIZE, generator=physics)
        self.centres = torch.randn(NUM_CLASSES, INPUT_SIZE, generator=physics)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x = torch.randn(INPUT_SIZE, generator=rng)
        level = torch.sin(x @ self.direction / 2) + 0.1 * torch.randn((), generator=rng)
        state = torch.cdist(x[None], self.centres).argmin()
        return x, {"level": level, "state": state}


def level_loss(output: Tensor, target: Tensor) -> Tensor:
    """Huber loss of the level head (``[N, 1]``) against ``[N]`` targets."""
    return losses.huber_loss(output.squeeze(1), target, delta=1.0)


def absolute_error(output: Tensor, target: Tensor) -> Tensor:
    """Per-example absolute error: the harness averages it over the whole split."""
    return (output.squeeze(1) - target).abs()


def r_squared(outputs: Tensor, targets: Tensor) -> float:
    """Coefficient of determination over the whole split (not a mean of batch values)."""
    residual = ((outputs.squeeze(1) - targets) ** 2).sum()
    total = ((targets - targets.mean()) ** 2).sum()
    return float(1.0 - residual / total)


def macro_f1(outputs: Tensor, targets: Tensor) -> float:
    """Macro-averaged F1 over the whole split."""
    predictions = outputs.argmax(dim=1)
    scores = []
    for label in range(NUM_CLASSES):
        true_positive = float(((predictions == label) & (targets == label)).sum())
        predicted = float((predictions == label).sum())
        actual = float((targets == label).sum())
        if predicted + actual == 0:
            continue
        scores.append(2 * true_positive / (predicted + actual))
    return sum(scores) / len(scores) if scores else math.nan


def make_model() -> tuple[nn.Module, list[nn.Module]]:
    """The shared trunk and one head per task, in task order."""
    trunk = nn.Sequential(nn.Linear(INPUT_SIZE, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    return trunk, [nn.Linear(64, 1), nn.Linear(64, NUM_CLASSES)]


def make_benchmark(small: bool = False, data_seed: int = 0) -> Benchmark:
    """The benchmark `taskbalance compare --bench examples/custom_benchmark.py:make_benchmark`
    builds.

    Args:
        small: fewer examples (the command line's ``--small``).
        data_seed: seed of the data (``--data-seed``).

    Returns:
        The benchmark.
    """
    sizes = (256, 128, 128) if small else (2000, 500, 500)
    train, validation, test = (
        SensorData(size, seed=3 * data_seed + offset) for offset, size in enumerate(sizes)
    )
    # The loss of predicting the mean level (its variance, ~0.5) sets the regression KPI scale.
    tasks = (
        Task(
            "level",
            level_loss,
            metrics=(
                mean_metric("mae", absolute_error, higher_is_better=False),
                split_metric("r2", r_squared, higher_is_better=True),
            ),
            kind="regression",
            kpi=regression_kpi(0.25),
            description="smooth function of the readings (Huber loss)",
        ),
        Task(
            "state",
            lambda output, target: losses.cross_entropy(output, target),
            metrics=(accuracy(), split_metric("macro_f1", macro_f1, higher_is_better=True)),
            kind="classification",
            kpi=classification_kpi,
            description="region of the readings (cross-entropy)",
        ),
    )
    return Benchmark(
        name="sensors",
        tasks=tasks,
        train=train,
        validation=validation,
        test=test,
        model=make_model,
        defaults=TrainingDefaults(epochs=8, batch_size=64, lr=3e-3, balancer_lr=2e-2),
        description="synthetic sensor readings: a regression and a classification task",
        settings={"data_seed": data_seed, "sizes": list(sizes)},
    )


def main() -> None:
    """Train equal weights and uncertainty weighting once each and print their metrics."""
    torch.set_num_threads(1)
    benchmark = make_benchmark()
    for method in (Method("ew"), Method("uw")):
        run = train_run(benchmark, method, config=TrainConfig(seed=0, epochs=3))
        values = ", ".join(
            f"{name}={value:.3f}"
            for name, value in zip(benchmark.metric_names, run.final_test, strict=True)
        )
        print(f"{method.label}: {values}")


if __name__ == "__main__":
    main()
