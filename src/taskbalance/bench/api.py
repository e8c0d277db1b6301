"""The public benchmark API: tasks, metrics, data, model and training defaults.

Design (stable; the bundled benchmarks and any user's benchmark are built on it alike)::

    Benchmark(
        name, tasks=(Task, ...),
        train=Dataset, validation=Dataset, test=Dataset,   # each item: (input, targets)
        model=factory,          # () -> new (trunk, [head, ...])  or a new module returning
                                #       (features, [output, ...] or {task name: output})
        defaults=TrainingDefaults(epochs, batch_size, lr, balancer_lr, optimizer, ...),
        description="", settings={...},   # data seed, split sizes...: pinned in the metadata
    )
    Task(name, loss, metrics=(Metric, ...), kind="regression" | "classification", kpi=None)

- **Items** of a data set are ``(input, targets)`` where ``targets`` is a sequence with one
  target per task (in task order) or a mapping from task name to target; the default collate
  of a :class:`~torch.utils.data.DataLoader` batches both. Data sets are read through a
  ``DataLoader`` (batch size, workers and pin memory from :class:`TrainingDefaults`), so data
  need not fit in memory.
- **A loss** is any callable ``(output, target) -> 0-d tensor`` (e.g. from
  :mod:`taskbalance.losses`), averaged over the batch, or None for a batch in which the task
  has no labels (partially labelled data): the harness then passes ``present=`` to the
  balancer, which gives the task weight 0 for that step (see :class:`Task`). Metrics receive
  every batch's ``(output, target)``: a metric on partially labelled data must itself leave
  out the unlabelled samples.
- **A metric** is accumulated over a whole split, never averaged per batch: a :class:`Metric`
  has ``names`` and ``higher_is_better`` (one entry per number it reports) and ``reset()``,
  ``update(output, target)``, ``compute() -> sequence of floats``. :func:`mean_metric` wraps a
  per-example function (exact split mean: sum over examples / count); :func:`split_metric`
  concatenates the split and calls a function once. Several numbers from one accumulator
  (a confusion matrix giving mIoU and pixel accuracy) are one Metric with several names.
- **KPI** (for DTP): ``kpi(output, target, loss) -> float in [0, 1]`` on a batch; helpers
  :func:`classification_kpi`, :func:`binary_kpi` and, for regression, :func:`regression_kpi`.
- **kind** is what uncertainty weighting is told (``"classification"`` or ``"regression"``).
- **Registration**: :func:`register_benchmark` (name → factory); a factory takes keyword
  arguments among ``small``, ``data_seed``, ``data_root`` and ``model`` (only those it declares
  are passed; ``model`` only when given, for benchmarks that offer several models) and returns
  a :class:`Benchmark`. :func:`load_benchmark` builds by name, by
  ``path/to/file.py:function`` or by ``package.module:function``.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from taskbalance import losses
    >>> from taskbalance.bench import Benchmark, Task, TrainingDefaults, mean_metric
    >>> x, y = torch.randn(8, 3), torch.randn(8)
    >>> data = TensorDataset(x, y)
    >>> task = Task("y", lambda out, t: losses.squared_error(out.squeeze(1), t),
    ...             metrics=(mean_metric("mae", lambda out, t: (out.squeeze(1) - t).abs(),
    ...                                  higher_is_better=False),))
    >>> bench = Benchmark("tiny", (task,), data, data, data,
    ...                   model=lambda: (torch.nn.Linear(3, 4), [torch.nn.Linear(4, 1)]),
    ...                   defaults=TrainingDefaults(epochs=1, batch_size=4, lr=1e-2))
    >>> bench.metric_names
    ['y/mae']
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import site
import sys
import sysconfig
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

TaskKind = Literal["classification", "regression"]
#: ``(output, target) -> 0-d tensor``, or None for a batch without the task's labels.
LossFunction = Callable[[Tensor, Tensor], Tensor | None]
KPIFunction = Callable[[Tensor, Tensor, Tensor], float]

BENCH_EXTRA_HINT = "pip install 'taskbalance[bench]'"


class MissingExtraError(ImportError):
    """An optional dependency of the benchmark suite (the ``[bench]`` extra) is missing."""


class BenchmarkError(ValueError):
    """A benchmark that cannot be loaded or is malformed (names what and why)."""


class SplitError(BenchmarkError, TypeError):
    """A data split of the wrong type: a :class:`BenchmarkError` (the command line prints it
    on one line) and a ``TypeError``."""


def require_module(module_name: str) -> ModuleType:
    """Import an optional dependency of the benchmark suite, or explain how to install it.

    Args:
        module_name: the module to import, e.g. ``"sklearn.datasets"``.

    Returns:
        The imported module.

    Raises:
        MissingExtraError: the module is not installed.
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        top_level = module_name.split(".")[0]
        raise MissingExtraError(
            f"the benchmarks need {top_level!r}, which is not installed: {BENCH_EXTRA_HINT}"
        ) from error


# ---------------------------------------------------------------------------------------------
# Metrics.


class Metric(ABC):
    """A metric accumulated over a whole split; reports one or several numbers.

    Subclasses set ``names`` and ``higher_is_better`` (same length) and implement the three
    methods. The harness calls ``reset()``, then ``update`` once per batch, then ``compute``.

    Example:
        >>> import torch
        >>> metric = mean_metric("err", lambda out, t: (out - t).abs(), higher_is_better=False)
        >>> metric.reset(); metric.update(torch.tensor([1.0, 3.0]), torch.zeros(2))
        >>> metric.update(torch.tensor([5.0]), torch.zeros(1)); metric.compute()
        [3.0]
    """

    names: tuple[str, ...]
    higher_is_better: tuple[bool, ...]

    @abstractmethod
    def reset(self) -> None:
        """Forget everything accumulated."""

    @abstractmethod
    def update(self, output: Tensor, target: Tensor) -> None:
        """Accumulate one batch of the head's outputs and the task's targets."""

    @abstractmethod
    def compute(self) -> Sequence[float]:
        """The numbers over everything accumulated since the last reset, one per name."""


class MeanMetric(Metric):
    """The mean over every example of the split of a per-example value.

    Args:
        name: the metric's name.
        function: ``(output, target) -> Tensor`` of per-example values (any shape; every
            element counts as one example).
        higher_is_better: the direction.
    """

    def __init__(
        self, name: str, function: Callable[[Tensor, Tensor], Tensor], higher_is_better: bool
    ) -> None:
        self.names = (name,)
        self.higher_is_better = (bool(higher_is_better),)
        self.function = function
        self.total = 0.0
        self.count = 0

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.total = 0.0
        self.count = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        """Add the batch's per-example values."""
        values = torch.as_tensor(self.function(output, target)).detach()
        self.total += float(values.double().sum())
        self.count += values.numel()

    def compute(self) -> list[float]:
        """The mean over the split (NaN when nothing was accumulated)."""
        return [self.total / self.count if self.count else math.nan]


class SplitMetric(Metric):
    """A function of the whole split's outputs and targets, concatenated.

    Exact for any metric (medians, F1, AUC) at the price of holding the split's outputs.

    Args:
        name: the metric's name.
        function: ``(outputs, targets) -> float`` on the concatenated split.
        higher_is_better: the direction.
    """

    def __init__(
        self, name: str, function: Callable[[Tensor, Tensor], float], higher_is_better: bool
    ) -> None:
        self.names = (name,)
        self.higher_is_better = (bool(higher_is_better),)
        self.function = function
        self.outputs: list[Tensor] = []
        self.targets: list[Tensor] = []

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.outputs, self.targets = [], []

    def update(self, output: Tensor, target: Tensor) -> None:
        """Keep the batch."""
        self.outputs.append(output.detach().cpu())
        self.targets.append(target.detach().cpu())

    def compute(self) -> list[float]:
        """The function on the concatenated split."""
        if not self.outputs:
            return [math.nan]
        return [float(self.function(torch.cat(self.outputs), torch.cat(self.targets)))]


def mean_metric(
    name: str, function: Callable[[Tensor, Tensor], Tensor], *, higher_is_better: bool
) -> MeanMetric:
    """A :class:`MeanMetric`: the split mean of ``function``'s per-example values."""
    return MeanMetric(name, function, higher_is_better)


def split_metric(
    name: str, function: Callable[[Tensor, Tensor], float], *, higher_is_better: bool
) -> SplitMetric:
    """A :class:`SplitMetric`: ``function`` on the whole split's outputs and targets."""
    return SplitMetric(name, function, higher_is_better)


def _class_correct(output: Tensor, target: Tensor) -> Tensor:
    return (output.argmax(dim=1) == target).float()


def _binary_correct(output: Tensor, target: Tensor) -> Tensor:
    return ((output.reshape(target.shape) > 0).float() == target).float()


def accuracy() -> MeanMetric:
    """Accuracy of ``[N, C]`` logits against class indices (higher is better)."""
    return MeanMetric("accuracy", _class_correct, True)


def binary_accuracy() -> MeanMetric:
    """Accuracy of logits (positive means class 1) against 0/1 labels (higher is better)."""
    return MeanMetric("accuracy", _binary_correct, True)


def _absolute_error(output: Tensor, target: Tensor) -> Tensor:
    return (output.reshape(target.shape) - target).abs()


def _squared_error(output: Tensor, target: Tensor) -> Tensor:
    return (output.reshape(target.shape) - target) ** 2


def mean_absolute_error() -> MeanMetric:
    """Mean absolute error over every element of the split (lower is better)."""
    return MeanMetric("mae", _absolute_error, False)


def mean_squared_error(name: str = "mse", scale: float = 1.0) -> MeanMetric:
    """Mean squared error over every element of the split, divided by ``scale``.

    Args:
        name: the metric's name.
        scale: divides the error (e.g. the target variance, for a normalised error).
    """
    if not scale > 0:
        raise ValueError(f"scale: expected a positive float, got {scale!r}")
    return MeanMetric(name, lambda output, target: _squared_error(output, target) / scale, False)


# ---------------------------------------------------------------------------------------------
# KPIs (DTP).


def classification_kpi(output: Tensor, target: Tensor, loss: Tensor) -> float:
    """The batch accuracy of ``[N, C]`` logits, a KPI in [0, 1]."""
    return float(_class_correct(output, target).mean())


def binary_kpi(output: Tensor, target: Tensor, loss: Tensor) -> float:
    """The batch accuracy of binary logits, a KPI in [0, 1]."""
    return float(_binary_correct(output, target).mean())


def regression_kpi(reference_loss: float) -> KPIFunction:
    """A KPI in [0, 1] for a regression task: ``exp(−loss / reference_loss)``.

    It is 1 for a perfect fit and ``e^{−1}`` for a model as good as the reference, e.g. the
    loss of predicting the training mean (:func:`reference_loss`).

    Args:
        reference_loss: a positive loss value that sets the scale.

    Returns:
        ``kpi(output, target, loss) -> float``.

    Example:
        >>> import torch
        >>> kpi = regression_kpi(2.0)
        >>> round(kpi(None, None, torch.tensor(2.0)), 4)
        0.3679
    """
    if not (isinstance(reference_loss, (int, float)) and reference_loss > 0):
        raise ValueError(f"reference_loss: expected a positive float, got {reference_loss!r}")

    def kpi(output: Tensor, target: Tensor, loss: Tensor) -> float:
        return math.exp(-float(loss.detach()) / reference_loss)

    return kpi


def reference_loss(target: Tensor) -> float:
    """The MSE of predicting the mean of ``target`` over its first dimension (averaged)."""
    return max(float(target.double().var(dim=0, unbiased=False).mean()), 1e-12)


# ---------------------------------------------------------------------------------------------
# Tasks, defaults, benchmarks.


@dataclass(frozen=True)
class Task:
    """One task: its loss, its metrics, its kind and (for DTP) its KPI.

    Partially labelled data: ``loss`` may return None for a batch in which the task has no
    labels (say, no image of the batch carries this attribute). The harness
    (:func:`~taskbalance.bench.harness.train_run`) then calls the balancer with ``present=``
    marking the task absent: weight 0, no gradient, its statistics not updated; the task's
    ``kpi`` is not called for that batch; its mean training loss averages over the batches
    where it had labels; a single-task model of that task skips the batch (no optimiser step);
    a batch without labels for any task trains nothing. In a batch where only some samples
    have labels, the loss itself averages over those samples. A return value that is neither
    None nor a 0-d tensor is an error naming the task. Metrics receive every batch's
    ``(output, target)`` as they are: a metric on partially labelled data must itself leave
    out the unlabelled samples.

    Args:
        name: short task name (unique in the benchmark).
        loss: ``(output, target) -> 0-d tensor``, the batch mean, or None for a batch without
            this task's labels.
        metrics: one or more :class:`Metric`, accumulated over a split.
        kind: ``"classification"`` or ``"regression"`` (what uncertainty weighting is told).
        kpi: ``(output, target, loss) -> float in [0, 1]`` on a batch, for methods that read
            KPIs (DTP); None when the task has none (such methods are then refused). Called
            only for batches where ``loss`` returned a tensor.
        description: one line for ``taskbalance list``.
    """

    name: str
    loss: LossFunction
    metrics: tuple[Metric, ...]
    kind: TaskKind = "regression"
    kpi: KPIFunction | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Task.name: expected a non-empty str, got {self.name!r}")
        if not callable(self.loss):
            raise TypeError(f"Task {self.name!r}: loss: expected a callable, got {self.loss!r}")
        metrics = self.metrics
        if isinstance(metrics, Metric):
            metrics = (metrics,)
        object.__setattr__(self, "metrics", tuple(metrics))
        if not self.metrics:
            raise ValueError(f"Task {self.name!r}: metrics: expected at least one Metric")
        for metric in self.metrics:
            if not isinstance(metric, Metric):
                raise TypeError(
                    f"Task {self.name!r}: metrics: expected Metric instances (see mean_metric), "
                    f"got {metric!r}"
                )
            if len(metric.names) != len(metric.higher_is_better) or not metric.names:
                raise ValueError(
                    f"Task {self.name!r}: metric {metric!r} has {len(metric.names)} names and "
                    f"{len(metric.higher_is_better)} directions; expected the same number >= 1"
                )
        if self.kind not in ("classification", "regression"):
            raise ValueError(
                f"Task {self.name!r}: kind: expected 'classification' or 'regression', "
                f"got {self.kind!r}"
            )
        if self.kpi is not None and not callable(self.kpi):
            raise TypeError(f"Task {self.name!r}: kpi: expected a callable, got {self.kpi!r}")

    @property
    def metric_names(self) -> list[str]:
        """The names of every number the task's metrics report, in order."""
        return [name for metric in self.metrics for name in metric.names]

    @property
    def directions(self) -> list[bool]:
        """``higher_is_better`` of every reported number, in order."""
        return [higher for metric in self.metrics for higher in metric.higher_is_better]


Optimizer = Literal["adam", "adamw", "sgd"]
Schedule = Literal["cosine", "constant", "step"]


@dataclass(frozen=True)
class TrainingDefaults:
    """Training budget, optimiser and data loading of a benchmark.

    Args:
        epochs: passes over the training split.
        batch_size: examples per step (the global batch under DDP).
        lr: learning rate of the model.
        balancer_lr: Adam learning rate of a balancer's own parameters (UW, IMTL-L).
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        weight_decay: the optimiser's weight decay.
        momentum: SGD's momentum.
        schedule: ``"cosine"`` (to zero over the run, per step), ``"constant"`` or ``"step"``
            (× ``gamma`` every ``step_epochs`` epochs, as MTAN's StepLR).
        step_epochs: epochs between decays of the ``"step"`` schedule.
        gamma: decay factor of the ``"step"`` schedule.
        grad_clip: clip the model's gradient norm to this value; None: no clipping.
        eval_batch_size: batch size of evaluation; None: ``batch_size``.
        num_workers: ``DataLoader`` worker processes.
        pin_memory: ``DataLoader`` pin memory (for a CUDA device).
        drop_last: leave out each epoch's last, smaller training batch (as ``DataLoader``'s
            ``drop_last``): a ``BatchNorm1d`` cannot train on a batch of one example.
    """

    epochs: int
    batch_size: int
    lr: float
    balancer_lr: float = 2e-2
    optimizer: Optimizer = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Schedule = "cosine"
    step_epochs: int = 100
    gamma: float = 0.5
    grad_clip: float | None = None
    eval_batch_size: int | None = None
    num_workers: int = 0
    pin_memory: bool = False
    drop_last: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.drop_last, bool):
            raise TypeError(f"TrainingDefaults.drop_last: expected a bool, got {self.drop_last!r}")
        for key in ("epochs", "batch_size", "step_epochs"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainingDefaults.{key}: expected an int >= 1, got {value!r}")
        for key in ("lr", "balancer_lr"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"TrainingDefaults.{key}: expected a float > 0, got {value!r}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(
                f"TrainingDefaults.optimizer: expected 'adam', 'adamw' or 'sgd', "
                f"got {self.optimizer!r}"
            )
        if self.schedule not in ("cosine", "constant", "step"):
            raise ValueError(
                f"TrainingDefaults.schedule: expected 'cosine', 'constant' or 'step', "
                f"got {self.schedule!r}"
            )


ModelFactory = Callable[[], Any]


@dataclass(frozen=True)
class Benchmark:
    """A built benchmark: tasks, three data sets, a model factory and training defaults.

    Args:
        name: the benchmark's name.
        tasks: the tasks, in head order.
        train: training data set; items ``(input, targets)``.
        validation: validation data set (model selection).
        test: test data set (the reported numbers).
        model: factory of a freshly initialised model (the harness seeds torch first), new
            modules at every call (one handing out modules it returned before is refused):
            returns ``(trunk, heads)`` (a module and one module per task; the heads read the
            trunk's output) or a module whose ``forward(input)`` returns
            ``(features, outputs)``, the outputs a list in task order or a dict keyed by task
            name. A module without a single shared feature
            tensor (MTAN) returns None as ``features`` and names the submodule of its shared
            parameters (``shared_submodule``, see :mod:`taskbalance.bench.models`).
        defaults: training budget and optimiser settings.
        description: one line.
        settings: what fixes the data (data seed, split sizes, generator parameters), written
            to the run's metadata and part of a stored run's key (a run is resumed only while
            they are unchanged): plain values (numbers, text, lists, dicts).
        noise_variances: the true noise variances σ_k² when known (``noisy-regression``).
        summary_name: name of the sum of all metric values, when that sum is the benchmark's
            headline number (``gradnorm-toy``), else None.
    """

    name: str
    tasks: tuple[Task, ...]
    train: Dataset[Any]
    validation: Dataset[Any]
    test: Dataset[Any]
    model: ModelFactory
    defaults: TrainingDefaults
    description: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    noise_variances: tuple[float, ...] | None = None
    summary_name: str | None = None
    # The parameters of every model built so far, by id (weakly: a finished run's model is
    # freed): a factory that hands out the same modules again is refused.
    _built: dict[int, weakref.ref[Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        tasks = tuple(self.tasks)
        object.__setattr__(self, "tasks", tasks)
        if not tasks:
            raise ValueError(f"Benchmark {self.name!r}: tasks: expected at least one Task")
        for task in tasks:
            if not isinstance(task, Task):
                raise TypeError(
                    f"Benchmark {self.name!r}: tasks: expected Task instances, got {task!r}"
                )
        owners: dict[int, str] = {}
        for task in tasks:
            for metric in task.metrics:
                other = owners.setdefault(id(metric), task.name)
                if other != task.name or sum(m is metric for m in task.metrics) > 1:
                    # One accumulator updated by two tasks would mix their outputs.
                    raise ValueError(
                        f"Benchmark {self.name!r}: one Metric instance is used twice (tasks "
                        f"{other!r} and {task.name!r}); give each task its own instances"
                    )
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"Benchmark {self.name!r}: task names must differ, got {names}")
        for split in ("train", "validation", "test"):
            self._check_split(split, getattr(self, split))
        if not callable(self.model):
            raise TypeError(f"Benchmark {self.name!r}: model: expected a factory (a callable)")
        if not isinstance(self.defaults, TrainingDefaults):
            raise TypeError(
                f"Benchmark {self.name!r}: defaults: expected TrainingDefaults, "
                f"got {type(self.defaults).__name__}"
            )

    def _check_split(self, split: str, data: object) -> None:
        """A map-style data set with a length. Its items are checked batch by batch when
        read (:func:`~taskbalance.bench.harness.train_run`): reading one here would open a
        lazily opened file in this process, which DataLoader workers then cannot pickle."""
        where = f"Benchmark {self.name!r}: {split}"
        if not isinstance(data, Dataset):
            raise SplitError(
                f"{where}: expected a torch.utils.data.Dataset, got {type(data).__name__}"
            )
        if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
            # The harness shuffles, slices batches across DDP ranks and counts steps per epoch
            raise SplitError(
                f"{where}: {type(data).__name__} has no len(); expected a map-style Dataset "
                "(__getitem__ and __len__): streamed (IterableDataset) splits are not supported"
            )

    def __getstate__(self) -> dict[str, Any]:
        # The record of built models holds weak references, which do not pickle; a copy
        # (pickled, or copy.copy) starts its own.
        state = dict(self.__dict__)
        state["_built"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)

    @property
    def num_tasks(self) -> int:
        """K, the number of tasks."""
        return len(self.tasks)

    @property
    def metric_names(self) -> list[str]:
        """``task/metric`` for every reported number, in order (the columns of Δm%)."""
        return [f"{task.name}/{name}" for task in self.tasks for name in task.metric_names]

    @property
    def directions(self) -> list[bool]:
        """``higher_is_better`` of every reported number, in order."""
        return [higher for task in self.tasks for higher in task.directions]

    def metric_slices(self) -> list[slice]:
        """The positions of each task's numbers among :attr:`metric_names`."""
        slices, start = [], 0
        for task in self.tasks:
            count = len(task.metric_names)
            slices.append(slice(start, start + count))
            start += count
        return slices

    def build_model(self) -> nn.Module:
        """A fresh model whose ``forward`` returns ``(features, outputs)``.

        Raises:
            BenchmarkError: the factory returned something else, or a parameter of a model
                it built before.
        """
        from taskbalance.bench.models import MultiTaskModel

        built = self.model()
        if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
            trunk, heads = built
            if not hasattr(heads, "__iter__"):  # one head module (not a ModuleList)
                raise BenchmarkError(
                    f"benchmark {self.name!r}: the model factory returned "
                    f"{type(heads).__name__} as the heads; expected a list of "
                    f"{self.num_tasks} nn.Module heads, one per task"
                )
            heads = list(heads)
            if len(heads) != self.num_tasks or not all(isinstance(h, nn.Module) for h in heads):
                raise BenchmarkError(
                    f"benchmark {self.name!r}: the model factory returned {len(heads)} head(s); "
                    f"expected {self.num_tasks} nn.Module heads, one per task"
                )
            model: nn.Module = MultiTaskModel(trunk, heads)
        elif isinstance(built, nn.Module):
            model = built
        else:
            raise BenchmarkError(
                f"benchmark {self.name!r}: the model factory returned {type(built).__name__}; "
                "expected (trunk, [head, ...]) or an nn.Module returning (features, outputs)"
            )
        self._check_fresh(model)
        return model

    def _check_fresh(self, model: nn.Module) -> None:
        """Refuse a model sharing a parameter with one built before; then remember its own."""
        for name, parameter in model.named_parameters():
            earlier = self._built.get(id(parameter))
            if earlier is not None and earlier() is parameter:
                raise BenchmarkError(
                    f"benchmark {self.name!r}: the model factory returned parameter {name!r} "
                    "of a model it built before; it must build new modules at every call "
                    "(each run would otherwise go on training the previous run's model), "
                    "e.g. def make_model(): return nn.Sequential(...), [nn.Linear(...), ...]"
                )
        for key in [key for key, ref in self._built.items() if ref() is None]:
            del self._built[key]
        for parameter in model.parameters():
            self._built[id(parameter)] = weakref.ref(parameter)


# ---------------------------------------------------------------------------------------------
# Registration and loading.

FACTORY_KEYWORDS = ("small", "data_seed", "data_root", "model")


@dataclass(frozen=True)
class BenchmarkEntry:
    """A registered benchmark.

    Args:
        name: registry name.
        factory: keyword arguments among :data:`FACTORY_KEYWORDS` → Benchmark.
        description: one line for ``taskbalance list``.
        tasks: a one-line summary per task (name, loss, metrics) for ``taskbalance list``.
        needs_data_root: True for benchmarks read from the user's files (``--data-root``).
    """

    name: str
    factory: Callable[..., Benchmark]
    description: str
    tasks: tuple[str, ...] = ()
    needs_data_root: bool = False


_BENCHMARKS: dict[str, BenchmarkEntry] = {}


def register_benchmark(
    name: str,
    factory: Callable[..., Benchmark],
    *,
    description: str,
    tasks: Sequence[str] = (),
    needs_data_root: bool = False,
) -> None:
    """Register a benchmark factory under ``name`` (for ``--bench name``).

    Args:
        name: registry name (no ``:``).
        factory: returns a :class:`Benchmark`; takes keyword arguments among ``small``,
            ``data_seed``, ``data_root`` and ``model`` (only those it declares are passed).
        description: one line.
        tasks: a one-line summary per task, shown by ``taskbalance list``.
        needs_data_root: the benchmark reads the user's files from ``--data-root``.

    Raises:
        ValueError: the name is taken by another factory or contains ``:``.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"name: expected a non-empty str without ':', got {name!r}")
    existing = _BENCHMARKS.get(name)
    if existing is not None and existing.factory is not factory:
        raise ValueError(f"name: benchmark {name!r} is already registered")
    _BENCHMARKS[name] = BenchmarkEntry(name, factory, description, tuple(tasks), needs_data_root)


def _ensure_bundled() -> tuple[str, ...]:
    # The bundled benchmarks register themselves when their modules are imported.
    return tuple(importlib.import_module("taskbalance.bench.bundled").BUNDLED_MODULES)


def benchmark_names() -> list[str]:
    """Names of every registered benchmark: the bundled ones in their fixed order, then the
    others in registration order."""
    bundled = _ensure_bundled()
    names = list(_BENCHMARKS)

    def position(name: str) -> tuple[int, int]:
        module = getattr(_BENCHMARKS[name].factory, "__module__", "")
        index = bundled.index(module) if module in bundled else len(bundled)
        return index, names.index(name)

    return sorted(names, key=position)


def benchmark_entry(name: str) -> BenchmarkEntry:
    """The registered entry of ``name``; a BenchmarkError lists the valid names otherwise."""
    _ensure_bundled()
    if name not in _BENCHMARKS:
        raise BenchmarkError(
            f"unknown benchmark {name!r}; expected one of {benchmark_names()} "
            "or path/to/file.py:function or package.module:function"
        )
    return _BENCHMARKS[name]


#: Where the standard library and installed packages live: their files change with their
#: versions, not with the user's edits, and are left out of a run's code.
_INSTALLED_ROOTS = tuple(
    {
        Path(root).resolve()
        for root in [
            *(sysconfig.get_paths().get(name) for name in ("stdlib", "platstdlib", "purelib")),
            sysconfig.get_paths().get("platlib"),
            # Debian's dist-packages too; not the prefix itself, which Windows lists (a venv
            # made in the project folder would hold the user's benchmark files)
            *(root for root in site.getsitepackages() if Path(root).name.endswith("-packages")),
            site.getusersitepackages(),  # pip install --user
        ]
        if root
    }
)


def _names_a_file(source: str) -> bool:
    """Whether the part of a spec before ``:`` is a file path rather than a module name."""
    return source.endswith(".py") or "/" in source or "\\" in source


def factory_source_file(spec: str) -> Path | None:
    """The file ``spec`` names (for a registered name, the module defining its factory), found
    without running it: a factory that file only imports from elsewhere is not followed (see
    :func:`benchmark_code_files`, which follows it once the benchmark is loaded).

    None for a module that has no source file. Raises :class:`BenchmarkError` as
    :func:`resolve_factory` does for an unknown registered name.
    """
    if ":" not in spec:
        found = inspect.getsourcefile(benchmark_entry(spec).factory)
        return None if found is None else Path(found)
    source = spec.rpartition(":")[0]
    if _names_a_file(source):
        return Path(source)
    module_spec = importlib.util.find_spec(source)
    if module_spec is None or module_spec.origin is None:
        return None
    origin = Path(module_spec.origin)
    return origin if origin.is_file() else None


def benchmark_code_files(spec: str, benchmark: Benchmark, model: nn.Module) -> list[Path]:
    """The source files of the code a run of ``benchmark`` (loaded from ``spec``) executes.

    The file ``spec`` names, and the files defining its factory, the model factory, every
    module class of ``model``, the data sets' classes (and those of the data sets a
    ``Subset`` or ``ConcatDataset`` wraps), each task's loss, KPI and metrics (with
    the callables a metric holds, such as :func:`mean_metric`'s function), wherever they were
    imported from: a loss a benchmark file imports from a module beside it, or a factory it
    re-exports, is found in its own file. Files of the standard library and of installed
    packages are left out (their versions change them, not the user), and so is code reached
    only through further calls (a helper function a loss calls, a data set's transform
    defined in another module). Call it after :func:`load_benchmark` (a file spec's module is
    then loaded and is not run again).

    Returns:
        The files, sorted and without repeats.
    """
    objects: list[object] = [_loaded_factory(spec), benchmark.model]
    for split in (benchmark.train, benchmark.validation, benchmark.test):
        objects += _data_set_classes(split)
    objects += [type(module) for module in model.modules()]
    for task in benchmark.tasks:
        objects += [task.loss, task.kpi]
        for metric in task.metrics:
            objects.append(type(metric))
            objects += [value for value in vars(metric).values() if callable(value)]
    files = {path for path in map(_defining_file, objects) if path is not None}
    named = factory_source_file(spec)
    if named is not None and named.is_file():
        files.add(named.resolve())
    return sorted(files)


def _data_set_classes(data: object) -> list[type]:
    """The classes of a data set and of the data sets it wraps (``Subset.dataset``,
    ``ConcatDataset.datasets``, as ``random_split`` returns them), depth first."""
    classes = [type(data)]
    inner = getattr(data, "datasets", None)
    wrapped = list(inner) if isinstance(inner, Sequence) else []
    single = getattr(data, "dataset", None)
    if isinstance(single, Dataset):
        wrapped.append(single)
    for dataset in wrapped:
        if isinstance(dataset, Dataset) and dataset is not data:
            classes += _data_set_classes(dataset)
    return classes


def _loaded_factory(spec: str) -> object:
    """The factory ``spec`` names, taken from the module :func:`resolve_factory` loaded."""
    if ":" not in spec:
        return benchmark_entry(spec).factory
    source, _, function_name = spec.rpartition(":")
    if _names_a_file(source):
        module = sys.modules.get(_user_module_name(Path(source)))
    else:
        module = sys.modules.get(source)
    return None if module is None else getattr(module, function_name, None)


def _defining_file(value: object) -> Path | None:
    """The user source file defining ``value`` (a function, class or callable object), or None
    for a built-in, the standard library and installed packages."""
    while isinstance(value, functools.partial):
        value = value.func
    value = getattr(value, "__func__", value)  # a bound method: its function
    if value is None:
        return None
    if not (inspect.isfunction(value) or inspect.isclass(value)):
        value = type(value)  # a callable object: its class's file
    try:
        found = inspect.getsourcefile(value)
    except (TypeError, OSError):  # built-in (no file), or defined in __main__ without one
        return None
    if found is None:
        return None
    path = Path(found).resolve()
    installed = any(path.is_relative_to(root) for root in _INSTALLED_ROOTS)
    return None if installed or not path.is_file() else path


def resolve_factory(spec: str) -> Callable[..., Benchmark]:
    """The benchmark factory named by ``spec``.

    Args:
        spec: a registered name, ``path/to/file.py:function`` or ``package.module:function``.

    Returns:
        The factory.

    Raises:
        BenchmarkError: missing file, module or function, or not a callable.
    """
    if ":" not in spec:
        return benchmark_entry(spec).factory
    source, _, function_name = spec.rpartition(":")
    if not source or not function_name:
        raise BenchmarkError(f"--bench {spec!r}: expected FILE.py:FUNCTION or module:function")
    module: ModuleType
    if _names_a_file(source):
        path = Path(source)
        if not path.is_file():
            raise BenchmarkError(f"--bench {spec!r}: no such file {str(path)!r}")
        # As `python FILE.py` does: the modules beside the file import by their plain names
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module_name = _user_module_name(path)
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise BenchmarkError(f"--bench {spec!r}: cannot import {str(path)!r} as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(source)
        except ModuleNotFoundError as error:
            parts = source.split(".")
            if error.name not in {".".join(parts[:end]) for end in range(1, len(parts) + 1)}:
                # The module was found; something it imports was not
                raise BenchmarkError(f"--bench {spec!r}: importing {source!r}: {error}") from None
            file = Path(*parts).with_suffix(".py")
            hint = f"; for the file {str(file)!r}, write {file}:{function_name}"
            raise BenchmarkError(
                f"--bench {spec!r}: no module {source!r} ({error})"
                + (hint if file.is_file() else "")
            ) from None
    factory = getattr(module, function_name, None)
    if factory is None:
        public = sorted(name for name in vars(module) if not name.startswith("_"))
        raise BenchmarkError(
            f"--bench {spec!r}: {source!r} has no function {function_name!r}; it defines {public}"
        )
    if not callable(factory):
        raise BenchmarkError(f"--bench {spec!r}: {function_name!r} is not callable")
    return factory


def _user_module_name(path: Path) -> str:
    """The module name a benchmark file is loaded under: named by a digest of the path, not
    hash() (str hashes differ between processes, and the name shows in the reprs a stored
    run's key compares)."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return f"taskbalance_user_bench_{digest}"


def load_benchmark(
    spec: str,
    *,
    small: bool = False,
    data_seed: int = 0,
    data_root: str | None = None,
    model: str | None = None,
) -> Benchmark:
    """Build a benchmark by registered name, ``file.py:function`` or ``module:function``.

    Args:
        spec: what to build.
        small: small splits, for smoke tests (passed when the factory accepts it).
        data_seed: seed of splits and generated data (passed when accepted).
        data_root: directory of the user's data files (passed when accepted).
        model: which of the benchmark's models (``"segnet"`` or ``"mtan"`` for ``nyuv2``,
            ``cityscapes`` and ``scenes``); None: the benchmark's default.

    Returns:
        The benchmark.

    Raises:
        BenchmarkError: unknown name, missing file or function, a factory returning something
            other than a :class:`Benchmark`, ``data_root`` or ``model`` given to a factory
            without it, or an ``OSError`` raised by the factory (missing data files). A factory
            that finds a malformed data directory or an unknown model should raise
            :class:`BenchmarkError` itself.
    """
    factory = resolve_factory(spec)
    offered: dict[str, Any] = {"small": small, "data_seed": data_seed, "data_root": data_root}
    if model is not None:
        offered["model"] = model
    parameters: Mapping[str, inspect.Parameter]
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    positional = [
        key
        for key in offered
        if key in parameters and parameters[key].kind is inspect.Parameter.POSITIONAL_ONLY
    ]
    if positional:
        raise BenchmarkError(
            f"--bench {spec!r}: the factory's {positional} are positional-only; the harness "
            "passes them by name, so make them ordinary (keyword) parameters"
        )
    accepted = {key: value for key, value in offered.items() if takes_all or key in parameters}
    unmet = [
        name
        for name, parameter in parameters.items()
        if name not in accepted
        and parameter.default is inspect.Parameter.empty
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    if "model" in unmet:
        raise BenchmarkError(
            f"--model: benchmark {spec!r} requires a model name (its factory's model has no "
            "default); pass --model NAME (model= in Python)"
        )
    if unmet:
        raise BenchmarkError(
            f"--bench {spec!r}: the factory requires {unmet}, which the harness cannot give: "
            "it passes only small, data_seed, data_root and model, by name, to a factory that "
            "declares them; give the others defaults"
        )
    # A non-default value the factory would never see: refused, as --data-root is below
    if small and "small" not in accepted:
        raise BenchmarkError(
            f"--small: benchmark {spec!r} has no small variant (its factory "
            "takes no small argument)"
        )
    if data_seed != 0 and "data_seed" not in accepted:
        raise BenchmarkError(
            f"--data-seed {data_seed}: benchmark {spec!r} takes no data seed (its factory has "
            "no data_seed argument), so every seed would give the same data"
        )
    if data_root is not None and "data_root" not in accepted:
        raise BenchmarkError(f"--data-root: benchmark {spec!r} does not read a data directory")
    required = (
        "data_root" in parameters and parameters["data_root"].default is inspect.Parameter.empty
    )
    if data_root is None and required:
        raise BenchmarkError(
            f"--data-root: benchmark {spec!r} reads a data directory (its factory's data_root "
            "has no default); pass --data-root DIR (data_root= in Python)"
        )
    if model is not None and "model" not in accepted:
        raise BenchmarkError(
            f"--model {model}: benchmark {spec!r} has a single model (its factory takes no "
            "model argument); --model is for nyuv2, cityscapes and scenes"
        )
    try:
        built = factory(**accepted)
    except OSError as error:
        # Missing or unreadable data files are the user's to fix: one line, not a traceback.
        raise BenchmarkError(f"--bench {spec!r}: {error}") from error
    if not isinstance(built, Benchmark):
        raise BenchmarkError(
            f"--bench {spec!r}: the factory returned {type(built).__name__}; expected a "
            "taskbalance.bench.Benchmark"
        )
    return built
