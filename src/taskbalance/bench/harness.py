"""A plain training loop over a bundled benchmark with any balancer.

This is library code, not a framework: :func:`train_run` is one ordinary loop (forward, K task
losses, the balancer's objective, one backward, one optimiser step) that records what a
comparison needs. The same loop trains the single-task baselines (one model per task, trained on
that task alone with loss weight 1, same budget).

Determinism: the model is initialised after ``torch.manual_seed(seed)`` and batches are drawn
from a generator seeded with ``seed``, so a run is a function of (benchmark, method, hyper-
parameters, seed). Under the same seed every method and every single-task model starts from the
same initial weights.

Optimiser: Adam on the model (and, in its own parameter group, on the balancer's learnable
parameters such as UW's log-variances), with the learning rate decayed to zero by a cosine over
the whole run.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

import taskbalance as tb
from taskbalance.bench.datasets import Benchmark, Split
from taskbalance.bench.models import MultiTaskModel

#: Adam betas of the balancer's own parameters (UW's and IMTL-L's log-scales). Their first
#: gradients can be 10⁴× their later ones (a loss in the hundreds against ``e^{s} = 1``); with
#: Adam's usual β₂ = 0.999 that memory stalls ``s`` for thousands of steps, with 0.99 for ~100.
BALANCER_ADAM_BETAS = (0.9, 0.9)

#: What a balancer call may raise mid-run on bad numbers: a rejected loss or non-finite task
#: gradients (ValueError), a solver that did not converge (``SolverError``), a singular linear
#: system, or an arithmetic error. The run stops and records the message as its ``failure``; the
#: comparison reports it. Anything else (out of memory, a bug) propagates.
BALANCER_FAILURES: tuple[type[Exception], ...] = (
    ValueError,
    tb.SolverError,
    torch.linalg.LinAlgError,
    ArithmeticError,
)

#: Steps whose weights are kept before the recorder starts thinning its history.
DEFAULT_WEIGHT_CAPACITY = 2048


class ProgressBar(Protocol):
    """What the loop needs from a progress bar (a ``tqdm`` instance fits)."""

    def update(self, n: int = 1) -> object:
        """Advance by ``n`` steps."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> object:
        """Show a short status after the bar."""

    def close(self) -> object:
        """Finish the bar."""


class SilentProgress:
    """A progress bar that shows nothing."""

    def update(self, n: int = 1) -> None:
        """Do nothing."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


def progress_bar(total: int, description: str, enabled: bool) -> ProgressBar:
    """A tqdm bar on stderr, or a silent one.

    The bar is shown only when ``enabled`` and stderr is a terminal; without tqdm installed the
    bar is silent.

    Args:
        total: number of steps.
        description: label in front of the bar.
        enabled: False for ``--quiet``.

    Returns:
        Something with ``update``, ``set_postfix_str`` and ``close``.
    """
    if not enabled or not sys.stderr.isatty():
        return SilentProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return SilentProgress()
    return tqdm(total=total, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True)


class WeightRecorder:
    """Keeps the weights of every step up to a capacity, then thins the history.

    When the history is full, every other entry is dropped and the recording stride doubles, so
    at most ``capacity`` rows are ever held and they stay evenly spread over the whole run.

    Args:
        capacity: the most rows kept (≥ 2).
    """

    def __init__(self, capacity: int = DEFAULT_WEIGHT_CAPACITY) -> None:
        if capacity < 2:
            raise ValueError(f"capacity: expected an int >= 2, got {capacity!r}")
        self.capacity = capacity
        self.stride = 1
        self.steps: list[int] = []
        self.rows: list[list[float]] = []

    def record(self, step: int, weights: Tensor) -> None:
        """Record the weights of ``step`` when it falls on the current stride.

        Args:
            step: the 0-based step index (called with consecutive steps).
            weights: the ``[K]`` weights of that step.
        """
        if step % self.stride != 0:
            return
        if len(self.steps) >= self.capacity:
            self.steps = self.steps[::2]
            self.rows = self.rows[::2]
            self.stride *= 2
            if step % self.stride != 0:
                return
        self.steps.append(step)
        self.rows.append([float(value) for value in weights.tolist()])


@dataclass
class TrainConfig:
    """Settings of one run; None takes the benchmark's default.

    Args:
        seed: training seed (model initialisation, batch order, random methods).
        epochs: passes over the training split.
        batch_size: examples per step.
        lr: Adam learning rate of the model.
        balancer_lr: Adam learning rate of the balancer's parameters.
        weight_capacity: most weight rows kept by the :class:`WeightRecorder`.
    """

    seed: int = 0
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    balancer_lr: float | None = None
    weight_capacity: int = DEFAULT_WEIGHT_CAPACITY


@dataclass
class EpochRecord:
    """What one epoch produced.

    Args:
        epoch: 1-based epoch number.
        seconds: wall time of the epoch's training steps (evaluation excluded).
        train_losses: mean training loss of each task over the epoch.
        validation: each task's metric on the validation split after the epoch.
        test: each task's metric on the test split after the epoch.
    """

    epoch: int
    seconds: float
    train_losses: list[float]
    validation: list[float]
    test: list[float]


@dataclass
class RunResult:
    """Everything one run recorded.

    Args:
        benchmark: benchmark name.
        method: method name, or ``"single-task"`` for a single-task model.
        seed: training seed.
        task_names: names of the tasks, in order.
        hyperparameters: the hyperparameters the balancer was created with.
        single_task: index of the only trained task for a single-task model, else None.
        epochs: one record per finished epoch.
        weight_steps: steps whose weights were kept.
        weight_rows: the kept ``[K]`` weights, one row per kept step.
        learned_variances: ``e^{s_k}`` of uncertainty weighting at the end, else None.
        interrupted: True when Ctrl-C stopped the run early.
        failure: why training stopped (e.g. a non-finite loss), else None.
    """

    benchmark: str
    method: str
    seed: int
    task_names: list[str]
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    single_task: int | None = None
    epochs: list[EpochRecord] = field(default_factory=list)
    weight_steps: list[int] = field(default_factory=list)
    weight_rows: list[list[float]] = field(default_factory=list)
    learned_variances: list[float] | None = None
    interrupted: bool = False
    failure: str | None = None

    @property
    def completed(self) -> bool:
        """True when the run trained for its whole budget without failing."""
        return not self.interrupted and self.failure is None and bool(self.epochs)

    @property
    def final_test(self) -> list[float]:
        """Test metrics after the last epoch (NaN when the run failed or has no epoch)."""
        if self.failure is not None or not self.epochs:
            return [math.nan] * len(self.task_names)
        return list(self.epochs[-1].test)

    @property
    def final_weights(self) -> list[float]:
        """The last recorded weights (empty for a single-task model)."""
        return list(self.weight_rows[-1]) if self.weight_rows else []

    @property
    def seconds_per_epoch(self) -> float:
        """Mean training wall time per epoch."""
        if not self.epochs:
            return math.nan
        return sum(record.seconds for record in self.epochs) / len(self.epochs)


def method_kind(method: str) -> str:
    """``"gradient"`` for methods that need the Gramian, ``"loss"`` otherwise."""
    return "gradient" if tb.method_class(method).requires_gram else "loss"


def balancer_arguments(
    method: str, benchmark: Benchmark, hyperparameters: Mapping[str, Any], seed: int
) -> dict[str, Any]:
    """The keyword arguments the harness creates a balancer with.

    The user's hyperparameters win; the harness fills in what a benchmark implies: ``fixed``
    gets unit weights, ``uw`` gets each task's kind (classification or regression), and a
    method with a ``seed`` hyperparameter gets the run's seed.

    Args:
        method: registry name.
        benchmark: the benchmark (for K and the task kinds).
        hyperparameters: the user's settings.
        seed: the run's seed.

    Returns:
        The keyword arguments for :func:`taskbalance.create`.
    """
    accepted = tb.hyperparameters(method)
    arguments = dict(hyperparameters)
    if method == "fixed" and "weights" not in arguments:
        arguments["weights"] = [1.0] * benchmark.num_tasks
    if method == "uw" and "kinds" not in arguments:
        arguments["kinds"] = [task.kind for task in benchmark.tasks]
    if "seed" in accepted and "seed" not in arguments:
        arguments["seed"] = seed
    return arguments


def _task_losses(
    benchmark: Benchmark, outputs: Sequence[Tensor], targets: Sequence[Tensor]
) -> Tensor:
    return torch.stack(
        [
            task.loss_value(output, target)
            for task, output, target in zip(benchmark.tasks, outputs, targets, strict=True)
        ]
    )


@torch.no_grad()
def _split_losses(benchmark: Benchmark, model: MultiTaskModel, split: Split) -> list[float]:
    """Each task's loss against the split's evaluation targets."""
    _, outputs = model(split.inputs)
    return [
        float(task.loss_value(output, target))
        for task, output, target in zip(
            benchmark.tasks, outputs, split.evaluation_targets, strict=True
        )
    ]


@torch.no_grad()
def evaluate(
    benchmark: Benchmark,
    model: MultiTaskModel,
    split: Split,
    initial_losses: Sequence[float] | None = None,
) -> list[float]:
    """Each task's metric on a whole split.

    Args:
        benchmark: the benchmark.
        model: the model (put in eval mode for the duration).
        split: the split to score.
        initial_losses: ``L_i(0)`` on this split, for normalised-loss metrics.

    Returns:
        One metric value per task.
    """
    was_training = model.training
    model.eval()
    _, outputs = model(split.inputs)
    model.train(was_training)
    references = initial_losses or [1.0] * benchmark.num_tasks
    return [
        task.metric_value(output, target, reference)
        for task, output, target, reference in zip(
            benchmark.tasks, outputs, split.evaluation_targets, references, strict=True
        )
    ]


def train_run(
    benchmark: Benchmark,
    method: str | None,
    *,
    hyperparameters: Mapping[str, Any] | None = None,
    single_task: int | None = None,
    config: TrainConfig | None = None,
    progress: ProgressBar | None = None,
) -> RunResult:
    """Train the benchmark's default model once and record per-epoch metrics and weights.

    Args:
        benchmark: a built benchmark.
        method: a registered method name, or None for a single-task model.
        hyperparameters: the method's hyperparameters (see :func:`balancer_arguments`).
        single_task: the task a single-task model trains on (required when ``method`` is None).
        config: seed and budget; None takes the benchmark's defaults with seed 0.
        progress: advanced once per step; None shows nothing.

    Returns:
        The run's record. Ctrl-C during training returns the epochs finished so far with
        ``interrupted=True``; a non-finite loss stops the run with ``failure`` set.

    Raises:
        ValueError: unknown method or bad hyperparameters (before any training).
    """
    config = config or TrainConfig()
    progress = progress or SilentProgress()
    defaults = benchmark.defaults
    epochs = config.epochs if config.epochs is not None else defaults.epochs
    batch_size = config.batch_size or defaults.batch_size
    lr = config.lr if config.lr is not None else defaults.lr
    balancer_lr = config.balancer_lr if config.balancer_lr is not None else defaults.balancer_lr
    if method is None and (single_task is None or not 0 <= single_task < benchmark.num_tasks):
        raise ValueError(
            f"single_task: expected a task index in [0, {benchmark.num_tasks}), got {single_task!r}"
        )

    torch.manual_seed(config.seed)
    model = benchmark.build_model()
    balancer = None
    arguments: dict[str, Any] = {}
    if method is not None:
        arguments = balancer_arguments(method, benchmark, hyperparameters or {}, config.seed)
        balancer = tb.create(method, num_tasks=benchmark.num_tasks, **arguments)
    result = RunResult(
        benchmark=benchmark.name,
        method=method or "single-task",
        seed=config.seed,
        task_names=[task.name for task in benchmark.tasks],
        hyperparameters=arguments,
        single_task=single_task if method is None else None,
    )

    groups: list[dict[str, Any]] = [{"params": list(model.parameters()), "lr": lr}]
    balancer_parameters = list(balancer.parameters()) if balancer is not None else []
    if balancer_parameters:
        groups.append(
            {"params": balancer_parameters, "lr": balancer_lr, "betas": BALANCER_ADAM_BETAS}
        )
    optimiser = torch.optim.Adam(groups)
    train_split = benchmark.train
    steps_per_epoch = math.ceil(len(train_split) / batch_size)
    total_steps = max(epochs * steps_per_epoch, 1)

    def cosine_factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, cosine_factor)
    batch_generator = torch.Generator().manual_seed(config.seed)
    needs_kpis = balancer is not None and type(balancer).requires_kpis
    recorder = WeightRecorder(config.weight_capacity)
    initial_validation = _split_losses(benchmark, model, benchmark.validation)
    initial_test = _split_losses(benchmark, model, benchmark.test)

    step = 0
    try:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(train_split), generator=batch_generator)
            loss_sums = torch.zeros(benchmark.num_tasks)
            started = time.perf_counter()
            model.train()
            for start in range(0, len(train_split), batch_size):
                batch = order[start : start + batch_size]
                inputs = train_split.inputs[batch]
                targets = [target[batch] for target in train_split.targets]
                features, outputs = model(inputs)
                losses = _task_losses(benchmark, outputs, targets)
                if not bool(torch.isfinite(losses).all()):
                    result.failure = f"non-finite loss at step {step}: {losses.tolist()}"
                    break
                if balancer is None:
                    objective = losses[single_task]
                else:
                    kpis = None
                    if needs_kpis:
                        kpis = [
                            task.kpi(output, target, loss)
                            for task, output, target, loss in zip(
                                benchmark.tasks, outputs, targets, losses, strict=True
                            )
                        ]
                    try:
                        objective = balancer(losses, kpis=kpis, features=features)
                    except BALANCER_FAILURES as error:
                        result.failure = f"step {step}: {type(error).__name__}: {error}"
                        break
                    recorder.record(step, balancer.weights)
                optimiser.zero_grad(set_to_none=True)
                objective.backward()
                optimiser.step()
                scheduler.step()
                loss_sums += losses.detach()
                step += 1
                progress.update(1)
            if result.failure is not None:
                break
            if balancer is not None:
                balancer.end_epoch()
            seconds = time.perf_counter() - started
            validation = evaluate(benchmark, model, benchmark.validation, initial_validation)
            test = evaluate(benchmark, model, benchmark.test, initial_test)
            result.epochs.append(
                EpochRecord(
                    epoch=epoch,
                    seconds=seconds,
                    train_losses=(loss_sums / steps_per_epoch).tolist(),
                    validation=validation,
                    test=test,
                )
            )
    except KeyboardInterrupt:
        result.interrupted = True
    result.weight_steps = recorder.steps
    result.weight_rows = recorder.rows
    variances = getattr(balancer, "variances", None)
    if isinstance(variances, Tensor):
        result.learned_variances = [float(value) for value in variances.tolist()]
    return result
