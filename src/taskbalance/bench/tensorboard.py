"""TensorBoard output of one training run (``taskbalance train --tensorboard DIR``).

What a run recorded, as scalars a TensorBoard user expects to find:

- ``weights/<task>``: the balancer's weight of each task at every kept step (x axis: step);
- ``train_loss/<task>``: each task's mean training loss per epoch (x axis: epoch);
- ``validation/<task>/<metric>`` and ``test/<task>/<metric>``: every metric per epoch;
- ``gradients/cos/<i>_<j>`` and ``gradients/conflict_fraction``: the task-gradient cosines
  (with respect to the shared features) at every recorded diagnostic step.

TensorBoard's writer comes from the ``tensorboard`` package (the ``[tensorboard]`` extra,
``pip install 'taskbalance[tensorboard]'``), which taskbalance does not require otherwise.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import taskbalance as tb
from taskbalance.bench.api import Benchmark, MissingExtraError
from taskbalance.bench.harness import RunResult


def require_tensorboard() -> None:
    """Raise :class:`MissingExtraError` unless the tensorboard package is installed: checked
    before a run starts, so that a missing package does not cost the run."""
    if importlib.util.find_spec("tensorboard") is None:
        raise MissingExtraError(
            "--tensorboard: the 'tensorboard' package is not installed: "
            "pip install 'taskbalance[tensorboard]'"
        )


def write_run(run: RunResult, benchmark: Benchmark, directory: Path) -> Path:
    """Write ``run`` as TensorBoard scalars under ``directory``; returns the directory.

    Example:
        >>> from taskbalance.bench.tensorboard import write_run  # doctest: +SKIP
        >>> write_run(run, benchmark, Path("runs/tb"))  # doctest: +SKIP
    """
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    directory.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(directory))
    try:
        for step, row in zip(run.weight_steps, run.weight_rows, strict=True):
            for task, weight in zip(run.task_names, row, strict=True):
                writer.add_scalar(f"weights/{task}", float(weight), step)
        for record in run.epochs:
            for task, loss in zip(run.task_names, record.train_losses, strict=True):
                writer.add_scalar(f"train_loss/{task}", float(loss), record.epoch)
            for split, values in (("validation", record.validation), ("test", record.test)):
                for name, value in zip(benchmark.metric_names, values, strict=True):
                    writer.add_scalar(f"{split}/{name}", float(value), record.epoch)
        for step, gram in zip(run.diagnostic_steps, run.diagnostic_grams, strict=True):
            diagnostics = tb.gradient_diagnostics(torch.tensor(gram, dtype=torch.float64))
            count = diagnostics.cosines.shape[0]
            for i in range(count):
                for j in range(i + 1, count):
                    cosine = float(diagnostics.cosines[i, j])
                    writer.add_scalar(f"gradients/cos/{i}_{j}", cosine, step)
            writer.add_scalar("gradients/conflict_fraction", diagnostics.conflict_fraction, step)
    finally:
        writer.close()
    return directory
