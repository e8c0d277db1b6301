"""A plain training loop over any :class:`~taskbalance.bench.Benchmark` with any balancer.

This is library code, not a framework: :func:`train_run` is one ordinary loop (forward, K task
losses, the balancer's objective, one backward, one optimiser step) that records what a
comparison needs. The same loop trains the single-task baselines (one model per task, trained on
that task alone with loss weight 1, same budget). It never branches on a method's name: what a
method needs comes from its hyperparameters (``kinds``, ``seed``, ``params``), its class
(``requires_kpis``, ``requires_gram``) and, for required hyperparameters with no default, an
example value (the class attribute ``required_hyperparameters``).

Features or parameters: gradient methods run in features mode on the features the model returns,
unless ``params`` names a submodule. A model with no single shared feature tensor (MTAN) returns
None as its features and names its shared submodule
(:func:`~taskbalance.bench.models.shared_submodule_name`): every gradient method then runs in
parameters mode over exactly that submodule's parameters (``params=None``, features mode, is
refused with a ValueError), and the diagnostics' Gramians are taken with respect to the same.

Determinism: the model is initialised after ``torch.manual_seed(seed)`` and batches are drawn
from a generator seeded with ``seed``, so a run is a function of (benchmark, method, hyper-
parameters, seed, thread count). Under the same seed every method and every single-task model
starts from the same initial weights.

Distributed: when ``torch.distributed`` is initialised, the model is wrapped in
``DistributedDataParallel`` and every rank takes its slice of the same global batch (the batch
size is the global one), so N processes see exactly the batches one process would (and, with
every label present, train alike; with partial labels a task labelled on c of the N ranks
reaches the model with c/N of its ranks' mean gradient, as DDP averages over all ranks).

Partially labelled data: a task's loss returns None for a batch without its labels. The
balancer is then called with ``present=`` (only then: a run where every loss is a tensor calls
it as it always did), the absent entry of the losses is an exact zero that reaches every
parameter with a zero gradient, the task's KPI is not read (methods that read KPIs get
:data:`ABSENT_TASK_KPI`), its mean training loss averages over the batches that had its
labels, and no diagnostics are recorded at that step. A batch without labels for the trained
tasks (any task; a single-task model's own) trains nothing, and still counts as a step for the
schedule and the step numbers. Under DDP every such decision is taken from all ranks' labels
together, the same on every rank.
"""

from __future__ import annotations

import math
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

import taskbalance as tb
from taskbalance._absent import zero_through
from taskbalance._distributed import all_reduce_sum, is_distributed
from taskbalance.bench.api import Benchmark, BenchmarkError, Task, TrainingDefaults
from taskbalance.bench.data import collate
from taskbalance.bench.models import shared_submodule_name, unwrapped
from taskbalance.methods._facts import method_facts

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
    # Public (torch.linalg re-exports torch._C._LinAlgError) but left out of its __all__.
    torch.linalg.LinAlgError,  # type: ignore[attr-defined]
    ArithmeticError,
)

#: Steps whose weights are kept before the recorder starts thinning its history.
DEFAULT_WEIGHT_CAPACITY = 2048

#: Gradient-conflict diagnostics recorded per run when no interval is given.
DEFAULT_DIAGNOSTIC_POINTS = 50

#: The KPI passed for a task without labels in a batch, to methods that read KPIs (DTP): any
#: value in [0, 1] (which the balancer checks) does, since the balancer ignores an absent
#: task's KPI (DTP's average for the task keeps its value, or starts at its first present
#: call).
ABSENT_TASK_KPI = 1.0


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
    """A tqdm bar on stderr (when ``enabled`` and stderr is a terminal), or a silent one."""
    if not enabled or not sys.stderr.isatty():
        return SilentProgress()
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type information
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


@dataclass(frozen=True)
class Method:
    """A method and its hyperparameters, as one row of a comparison.

    Args:
        name: registry name (``tb.available()``).
        hyperparameters: keyword hyperparameters; ``params`` may be the name of a submodule of
            the model (``"trunk"``), meaning parameters mode on that submodule.
        label: the row's name; default ``name`` or ``name[key=value,...]``.

    Example:
        >>> Method("nash_mtl", {"update_every": 5}).label
        'nash_mtl[update_every=5]'
    """

    name: str
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hyperparameters", dict(self.hyperparameters))
        if not self.label:
            object.__setattr__(self, "label", method_label(self.name, self.hyperparameters))


def method_label(name: str, hyperparameters: Mapping[str, Any]) -> str:
    """``name`` or ``name[key=value,...]`` with the values as Python literals."""
    if not hyperparameters:
        return name
    parts = ",".join(f"{key}={_literal(value)}" for key, value in hyperparameters.items())
    return f"{name}[{parts}]"


def _literal(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, str):
        return value
    return repr(value)


@dataclass
class TrainConfig:
    """Settings of one run; None takes the benchmark's default.

    Args:
        seed: training seed (model initialisation, batch order, random methods).
        epochs: passes over the training split.
        batch_size: examples per step (the global batch under DDP).
        lr: learning rate of the model.
        balancer_lr: Adam learning rate of the balancer's parameters.
        weight_capacity: most weight rows kept by the :class:`WeightRecorder`.
        diagnostics_every: record the task-gradient Gramian w.r.t. the shared features (the
            shared parameters for a model without them, MTAN) every this many steps; None:
            about :data:`DEFAULT_DIAGNOSTIC_POINTS` times per run; 0: off.
        device: where the model trains (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    """

    seed: int = 0
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    balancer_lr: float | None = None
    weight_capacity: int = DEFAULT_WEIGHT_CAPACITY
    diagnostics_every: int | None = None
    device: str = "cpu"

    def resolved(self, defaults: TrainingDefaults) -> dict[str, Any]:
        """Every setting that changes the run, defaults filled in (for metadata and resume)."""
        settings = asdict(defaults)
        for key in ("epochs", "batch_size", "lr", "balancer_lr"):
            value = getattr(self, key)
            if value is not None:
                settings[key] = value
        settings["seed"] = self.seed
        settings["diagnostics_every"] = self.diagnostics_every
        return settings


@dataclass
class EpochRecord:
    """What one epoch produced.

    Args:
        epoch: 1-based epoch number.
        seconds: wall time of the epoch's training steps (evaluation excluded).
        train_losses: mean training loss of each task over the epoch.
        validation: every metric number (``Benchmark.metric_names``) on the validation split.
        test: every metric number on the test split.
    """

    epoch: int
    seconds: float
    train_losses: list[float]
    validation: list[float]
    test: list[float]


@dataclass
class RunResult:
    """Everything one run recorded (JSON round-trips through :meth:`to_dict`).

    Args:
        benchmark: benchmark name.
        method: the row label (``Method.label``), or ``"single-task"``.
        seed: training seed.
        task_names: names of the tasks, in order.
        metric_names: ``task/metric`` of every metric number, in order.
        method_name: registry name of the method, or ``"single-task"``.
        hyperparameters: the hyperparameters the balancer was created with (as text for
            values that are not plain literals).
        single_task: index of the only trained task for a single-task model, else None.
        epochs: one record per finished epoch.
        weight_steps: steps whose weights were kept.
        weight_rows: the kept ``[K]`` weights, one row per kept step.
        diagnostic_steps: steps at which the task-gradient Gramian was recorded.
        diagnostic_grams: the recorded ``K×K`` Gramians (w.r.t. the shared features, or the
            shared parameters for a model without a single shared feature tensor, MTAN).
        learned_variances: ``e^{s_k}`` of uncertainty weighting at the end, else None.
        interrupted: True when Ctrl-C stopped the run early.
        failure: why training stopped (e.g. a non-finite loss), else None.
    """

    benchmark: str
    method: str
    seed: int
    task_names: list[str]
    metric_names: list[str] = field(default_factory=list)
    method_name: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    single_task: int | None = None
    epochs: list[EpochRecord] = field(default_factory=list)
    weight_steps: list[int] = field(default_factory=list)
    weight_rows: list[list[float]] = field(default_factory=list)
    diagnostic_steps: list[int] = field(default_factory=list)
    diagnostic_grams: list[list[list[float]]] = field(default_factory=list)
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
            return [math.nan] * len(self.metric_names)
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dictionary (NaN stays a float)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResult:
        """The inverse of :meth:`to_dict`."""
        known = {item.name for item in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["epochs"] = [EpochRecord(**record) for record in values.get("epochs", [])]
        return cls(**values)


def example_hyperparameters(name: str, num_tasks: int) -> dict[str, Any]:
    """Values of the required hyperparameters (no default) of ``name`` for K tasks: what the
    method class declares in ``required_hyperparameters`` (values that work for any K)."""
    return dict(method_facts(tb.method_class(name)).required_hyperparameters)


def default_params(name: str, model: nn.Module | None = None) -> str | None:
    """The submodule a method runs on in parameters mode when its ``params`` is not given.

    A parameters-only method (MoCo) runs on the model's shared submodule (``trunk`` unless the
    model names another); every gradient method does on a model that names a shared submodule
    because it has no single shared feature tensor (MTAN).

    Args:
        name: the method's registry name.
        model: the run's model; None: a model that returns its shared features.

    Returns:
        The submodule's name, or None (features mode, or a loss-based method).

    Example:
        >>> default_params("mgda") is None, default_params("moco"), default_params("ew")
        (True, 'trunk', None)
    """
    cls = tb.method_class(name)
    if not cls.requires_gram:
        return None
    shared = None if model is None else shared_submodule_name(model)
    if method_facts(cls).requires_params:
        return shared or "trunk"
    return shared


def _refuse_features_mode(method: Method, model: nn.Module) -> None:
    """A gradient method asked for features mode (``params=None``) on a model without them."""
    shared = shared_submodule_name(model)
    if (
        shared is None
        or not tb.method_class(method.name).requires_gram
        or "params" not in method.hyperparameters
        or method.hyperparameters["params"] is not None
    ):
        return
    raise ValueError(
        f"params=None asks {method.name} for features mode, but the model "
        f"({type(unwrapped(model)).__name__}) has no single shared feature tensor: each task "
        "reads the shared network at several levels, and those maps are computed from one another. "
        "Gradient methods run on it in parameters mode over its shared parameters: leave "
        f"params out (the default, the submodule {shared!r}) or pass params={shared}"
    )


def balancer_arguments(
    method: Method, benchmark: Benchmark, seed: int, model: nn.Module | None = None
) -> dict[str, Any]:
    """The keyword arguments the harness creates a balancer with.

    The method's hyperparameters win. Then, by what the method accepts: example values for
    required hyperparameters without one, ``params`` from :func:`default_params`, ``kinds``
    from the tasks, ``seed`` from the run. A ``params`` given as a submodule name becomes that
    submodule's parameters (parameters mode).

    Args:
        method: the method and its hyperparameters.
        benchmark: the benchmark (K and the task kinds).
        seed: the run's seed.
        model: the run's model, to resolve ``params="submodule"`` and the model's shared
            submodule; None leaves the names.

    Returns:
        The keyword arguments for :func:`taskbalance.create`.

    Raises:
        ValueError: ``params`` names no submodule of the model, or is None (features mode) for
            a gradient method on a model without a single shared feature tensor (MTAN).
    """
    accepted = tb.hyperparameters(method.name)
    arguments = dict(method.hyperparameters)
    for key, value in example_hyperparameters(method.name, benchmark.num_tasks).items():
        arguments.setdefault(key, value)
    if model is not None:
        _refuse_features_mode(method, model)
    default = default_params(method.name, model)
    if default is not None:
        arguments.setdefault("params", default)
    if "kinds" in accepted:
        arguments.setdefault("kinds", [task.kind for task in benchmark.tasks])
    if "seed" in accepted:
        arguments.setdefault("seed", seed)
    params = arguments.get("params")
    if isinstance(params, str) and model is not None:
        arguments["params"] = list(submodule(model, params).parameters())
    return arguments


def submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that lists the valid names."""
    core = unwrapped(model)
    try:
        return core.get_submodule(name)
    except AttributeError:
        names = [child for child, _ in core.named_children()]
        raise ValueError(
            f"params: the model has no submodule {name!r}; expected one of {names} "
            "(or a dotted path below them)"
        ) from None


def check_method(method: Method, benchmark: Benchmark) -> None:
    """Create the balancer once (on a fresh model) so a bad setting fails before training.

    Raises:
        ValueError: unknown method, bad hyperparameter, KPI method on tasks without a KPI.
        TypeError: unknown hyperparameter.
    """
    cls = tb.method_class(method.name)
    if cls.requires_kpis:
        missing = [task.name for task in benchmark.tasks if task.kpi is None]
        if missing:
            raise ValueError(f"{method.label}: reads KPIs, but task(s) {missing} have no kpi")
    model = benchmark.build_model()
    try:
        tb.create(
            method.name,
            num_tasks=benchmark.num_tasks,
            **balancer_arguments(method, benchmark, seed=0, model=model),
        )
    except (TypeError, ValueError) as error:
        # Which of the listed methods (and its settings) the message is about
        if str(error).startswith(method.label):
            raise
        raise type(error)(f"{method.label}: {error}") from None


class GlobalBatchSampler(Sampler[list[int]]):
    """Seeded shuffled batches of a global size; each rank yields its slice of each batch.

    Every rank draws the same permutation (same generator, same seed), so N ranks together
    see exactly the batches one process sees; the slices are ``tensor_split`` of the batch.

    Args:
        size: number of examples.
        batch_size: global batch size.
        seed: seed of the permutations (one drawn per epoch).
        rank: this process's rank.
        world_size: number of processes.
        drop_last: leave out the last batch when it is smaller.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.size = size
        self.batch_size = batch_size
        self.rng = torch.Generator().manual_seed(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return batch_count(self.size, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=self.rng)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start : start + self.batch_size]
            if batch.numel() < self.world_size:
                continue
            yield batch.tensor_split(self.world_size)[self.rank].tolist()


def _in_task_order(values: Any, benchmark: Benchmark, what: str) -> list[Any]:
    """``values`` as a list in task order: a list or tuple of one per task, or a dict keyed
    by task name; anything else is an error naming ``what`` and the forms expected."""
    names = [task.name for task in benchmark.tasks]
    if isinstance(values, Mapping):
        missing = [name for name in names if name not in values]
        if missing:
            raise BenchmarkError(f"{what} have no key(s) {missing}; got keys {list(values)}")
        return [values[name] for name in names]
    if not isinstance(values, (tuple, list)) or len(values) != len(names):
        size = len(values) if isinstance(values, (tuple, list)) else type(values).__name__
        raise BenchmarkError(
            f"{what} are {size}; expected a list of {len(names)} (or a tuple: one per task "
            f"{names}, in task order) or a dict keyed by task name"
        )
    return list(values)


def _unpack(batch: Any, benchmark: Benchmark, split: str) -> tuple[Any, list[Any]]:
    """A collated batch's inputs and its targets in task order, or an error naming the form
    expected: items ``(input, targets)``, ``targets`` a tuple in task order or a dict keyed
    by task name (one task: its target alone)."""
    where = f"benchmark {benchmark.name!r}: {split}"
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        size = len(batch) if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise BenchmarkError(
            f"{where}: an item is {size}; expected (input, targets), targets a tuple in task "
            "order or a dict keyed by task name"
        )
    inputs, targets = batch
    if benchmark.num_tasks == 1 and not isinstance(targets, (tuple, list, Mapping)):
        return inputs, [targets]  # one task's target alone (a tensor, once collated)
    return inputs, _in_task_order(targets, benchmark, f"{where}: the targets")


def _forward(model: nn.Module, inputs: Any, benchmark: Benchmark) -> tuple[Any, list[Any]]:
    """The model's ``(features, [output per task])``; outputs keyed by task name are put in
    task order. Anything else is refused here: unpacked as it came, a dict's keys would reach
    the losses as their outputs."""
    result = model(inputs)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise BenchmarkError(
            f"benchmark {benchmark.name!r}: the model's forward returned "
            f"{type(result).__name__}; expected (features, outputs), outputs a list with one "
            "output per task in task order or a dict keyed by task name"
        )
    features, outputs = result
    return features, _in_task_order(
        outputs, benchmark, f"benchmark {benchmark.name!r}: the model's outputs"
    )


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def _loader(data: Dataset[Any], defaults: TrainingDefaults, **options: Any) -> DataLoader[Any]:
    return DataLoader(
        data,
        collate_fn=collate,
        num_workers=defaults.num_workers,
        pin_memory=defaults.pin_memory,
        **options,
    )


@torch.no_grad()
def evaluate(
    benchmark: Benchmark,
    model: nn.Module,
    data: Dataset[Any],
    device: str | torch.device = "cpu",
    defaults: TrainingDefaults | None = None,
) -> list[float]:
    """Every metric number (``benchmark.metric_names``) accumulated over a whole split.

    Args:
        benchmark: the benchmark.
        model: the model (put in eval mode for the duration).
        data: the split.
        device: where the model is.
        defaults: the run's resolved settings (its batch sizes under the command line's
            overrides); None: the benchmark's own.

    Returns:
        The numbers, in ``benchmark.metric_names`` order.
    """
    defaults = defaults or benchmark.defaults
    loader = _loader(data, defaults, batch_size=defaults.eval_batch_size or defaults.batch_size)
    was_training = model.training
    model.eval()
    for task in benchmark.tasks:
        for metric in task.metrics:
            metric.reset()
    target_device = torch.device(device)
    for batch in loader:
        inputs, targets = _unpack(batch, benchmark, "evaluation")
        _, outputs = _forward(model, _to_device(inputs, target_device), benchmark)
        targets = _to_device(targets, target_device)
        for task, output, target in zip(benchmark.tasks, outputs, targets, strict=True):
            for metric in task.metrics:
                metric.update(output, target)
    model.train(was_training)
    values: list[float] = []
    for task in benchmark.tasks:
        for metric in task.metrics:
            computed = [float(value) for value in metric.compute()]
            if len(computed) != len(metric.names):
                raise ValueError(
                    f"task {task.name!r}: metric {metric.names} returned {len(computed)} values"
                )
            values += computed
    return values


def _schedule(defaults: TrainingDefaults, steps_per_epoch: int, total_steps: int) -> Any:
    def factor(step: int) -> float:
        if defaults.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
        if defaults.schedule == "step":
            return defaults.gamma ** ((step // steps_per_epoch) // defaults.step_epochs)
        return 1.0

    return factor


def _model_optimiser(
    parameters: list[nn.Parameter], defaults: TrainingDefaults, lr: float
) -> torch.optim.Optimizer:
    if defaults.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=lr, momentum=defaults.momentum, weight_decay=defaults.weight_decay
        )
    if defaults.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=defaults.weight_decay)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=defaults.weight_decay)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def batch_count(size: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one pass over ``size`` examples (the last one smaller unless dropped)."""
    return size // batch_size if drop_last else math.ceil(size / batch_size)


def steps_per_epoch(benchmark: Benchmark, batch_size: int | None = None) -> int:
    """Optimiser steps in one epoch of the training split.

    Raises:
        BenchmarkError: ``drop_last`` with fewer training examples than one batch.
    """
    # Benchmark checks that every split is a sized map-style dataset.
    size = len(benchmark.train)  # type: ignore[arg-type]
    batch_size = batch_size or benchmark.defaults.batch_size
    steps = batch_count(size, batch_size, benchmark.defaults.drop_last)
    if steps == 0:
        raise BenchmarkError(
            f"benchmark {benchmark.name!r}: drop_last with {size} training examples and "
            f"batch_size {batch_size} leaves no batch; lower the batch size"
        )
    return steps


def train_run(
    benchmark: Benchmark,
    method: Method | str | None,
    *,
    single_task: int | None = None,
    config: TrainConfig | None = None,
    progress: ProgressBar | None = None,
) -> RunResult:
    """Train the benchmark's model once and record per-epoch metrics, weights and diagnostics.

    Args:
        benchmark: a built benchmark.
        method: a :class:`Method` (or a registry name), or None for a single-task model.
        single_task: the task a single-task model trains on (required when ``method`` is None).
        config: seed and budget; None takes the benchmark's defaults with seed 0.
        progress: advanced once per step; None shows nothing.

    Returns:
        The run's record. Ctrl-C during training returns the epochs finished so far with
        ``interrupted=True``; a non-finite loss of a task with labels stops the run with
        ``failure`` set. A task whose loss returns None for a batch (no labels there) is
        marked absent for that step (see the module docstring).

    Raises:
        ValueError: unknown method or bad hyperparameters (before any training).
        BenchmarkError: a task's loss returned something other than a 0-d tensor or None.
    """
    if isinstance(method, str):
        method = Method(method)
    config = config or TrainConfig()
    progress = progress or SilentProgress()
    settings = config.resolved(benchmark.defaults)
    defaults = TrainingDefaults(
        **{key: settings[key] for key in (item.name for item in fields(TrainingDefaults))}
    )
    num_tasks = benchmark.num_tasks
    if method is None and (single_task is None or not 0 <= single_task < num_tasks):
        raise ValueError(
            f"single_task: expected a task index in [0, {num_tasks}), got {single_task!r}"
        )
    device = torch.device(config.device)
    rank, world_size = _distributed()

    torch.manual_seed(config.seed)
    model = benchmark.build_model().to(device)
    balancer = None
    arguments: dict[str, Any] = {}
    if method is not None:
        arguments = balancer_arguments(method, benchmark, config.seed, model)
        balancer = tb.create(method.name, num_tasks=num_tasks, **arguments).to(device)
    shown_arguments = dict(method.hyperparameters) if method is not None else {}
    default = None if method is None else default_params(method.name, model)
    if default is not None:
        # Recorded by name, as a user's params=trunk is, not as a list of tensors.
        shown_arguments.setdefault("params", default)
    for key, value in arguments.items():
        shown_arguments.setdefault(key, value)
    result = RunResult(
        benchmark=benchmark.name,
        method=method.label if method is not None else "single-task",
        method_name=method.name if method is not None else "single-task",
        seed=config.seed,
        task_names=[task.name for task in benchmark.tasks],
        metric_names=benchmark.metric_names,
        hyperparameters={key: _plain(value) for key, value in shown_arguments.items()},
        single_task=single_task if method is None else None,
    )

    training_model: nn.Module = model
    if world_size > 1:
        training_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    per_epoch = steps_per_epoch(benchmark, defaults.batch_size)
    total_steps = max(defaults.epochs * per_epoch, 1)
    factor = _schedule(defaults, per_epoch, total_steps)
    optimisers = [_model_optimiser(list(model.parameters()), defaults, defaults.lr)]
    balancer_parameters = list(balancer.parameters()) if balancer is not None else []
    if balancer_parameters:
        optimisers.append(
            torch.optim.Adam(
                balancer_parameters, lr=defaults.balancer_lr, betas=BALANCER_ADAM_BETAS
            )
        )
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimisers]
    sampler = GlobalBatchSampler(
        len(benchmark.train),  # type: ignore[arg-type]  # a sized split (see steps_per_epoch)
        defaults.batch_size,
        config.seed,
        rank,
        world_size,
        drop_last=defaults.drop_last,
    )
    loader = _loader(benchmark.train, defaults, batch_sampler=sampler)
    needs_kpis = balancer is not None and type(balancer).requires_kpis
    diagnostics_every = config.diagnostics_every
    if diagnostics_every is None:
        diagnostics_every = max(1, total_steps // DEFAULT_DIAGNOSTIC_POINTS)
    record_diagnostics = balancer is not None and num_tasks >= 2 and diagnostics_every > 0
    shared_name = shared_submodule_name(model)
    shared_parameters = (
        None if shared_name is None else list(submodule(model, shared_name).parameters())
    )
    recorder = WeightRecorder(config.weight_capacity)
    # What the exact zero of an absent task's loss reaches (found once, not at every step).
    zero_leaves = _zero_gradient_leaves(model)
    # The tasks whose labels let a step train: a single-task model's own, else any task.
    trained_tasks = (
        [single_task] if balancer is None and single_task is not None else list(range(num_tasks))
    )

    step = 0
    try:
        for epoch in range(1, defaults.epochs + 1):
            loss_sums = torch.zeros(num_tasks, device=device)
            batches = 0
            # Per task, the batches in which it had labels (its loss was not None).
            labelled = [0] * num_tasks
            started = time.perf_counter()
            training_model.train()
            for batch in loader:
                inputs, targets = _unpack(batch, benchmark, "train")
                inputs = _to_device(inputs, device)
                targets = _to_device(targets, device)
                features, outputs = _forward(training_model, inputs, benchmark)
                task_losses = [
                    _task_loss(benchmark, task, output, target)
                    for task, output, target in zip(benchmark.tasks, outputs, targets, strict=True)
                ]
                present = [loss is not None for loss in task_losses]
                all_present = all(present)
                if all_present:
                    # Every task labelled: the loop as it always was, bit for bit.
                    losses = torch.stack(task_losses)  # type: ignore[arg-type]  # no None here
                else:
                    losses = _with_absent_filled(task_losses, zero_leaves, device)
                # A single-task model trains on its own task's loss only: another task's
                # non-finite loss does not stop it.
                checked = [here and k in trained_tasks for k, here in enumerate(present)]
                finite, ranks_with = _checked_on_every_rank(losses, present, checked)
                if not finite:
                    result.failure = _nonfinite_failure(benchmark, step, losses, present, checked)
                    break
                # Same on every rank (reduced): a rank that skipped a collective (the Gramian's,
                # the balancer's, DDP's backward) would leave the others waiting in it.
                trains = any(ranks_with[k] > 0 for k in trained_tasks)
                labelled_everywhere = all(count == world_size for count in ranks_with)
                if record_diagnostics and step % diagnostics_every == 0 and labelled_everywhere:
                    # Measured here for gradient methods too, not read from the balancer: its
                    # log_dict() has cosines only (no norms), from its last refresh
                    # (update_every), in its gram_dtype, over all ranks under DDP, and w.r.t.
                    # the parameters in parameters mode. ~50 Gramians per run cost little. A
                    # model without shared features (MTAN) is measured on its shared parameters.
                    # tb.gramian takes no present=: a step where some task has no labels on
                    # some rank records no Gramian (an absent task has no gradient to measure).
                    wrt = features if features is not None else shared_parameters
                    if wrt is None:
                        raise BenchmarkError(
                            f"benchmark {benchmark.name!r}: the model returned None as its "
                            "features but names no shared_submodule (the submodule holding "
                            "exactly its shared parameters), so the task gradients cannot be "
                            "measured; return the shared features or set shared_submodule"
                        )
                    gram = tb.gramian(losses, wrt, dtype=torch.float64)
                    result.diagnostic_steps.append(step)
                    result.diagnostic_grams.append(gram.cpu().tolist())
                objective: Tensor | None = None
                if not trains:
                    # No labels for the trained task(s) on any rank: no balancer call (it refuses
                    # a step without any task) and no backward or optimiser step. A
                    # single-task model whose task is absent skips the batch the same way.
                    pass
                elif balancer is None:
                    assert single_task is not None  # checked before training: one or other
                    own = task_losses[single_task]
                    if own is None:
                        # Under DDP a rank without the task backs its zero fill (it is
                        # present on another rank).
                        objective = losses[single_task]
                    elif world_size > 1:
                        # DDP waits for every parameter's gradient, the other heads' too
                        objective = own + _exact_zero(zero_leaves, own, device)
                    else:
                        # Its own loss alone, not the stack's entry: the stack's backward
                        # runs every task's graph with a zero gradient, and 0·NaN from
                        # another task's NaN loss would reach the shared parameters.
                        objective = own
                else:
                    kpis = None
                    if needs_kpis:
                        kpis = [
                            # check_method refused a KPI method on a task without a kpi.
                            task.kpi(output, target, loss)  # type: ignore[misc]
                            if here
                            # No labels, no KPI: a value in [0, 1] that the balancer ignores.
                            else ABSENT_TASK_KPI
                            for task, output, target, loss, here in zip(
                                benchmark.tasks, outputs, targets, losses, present, strict=True
                            )
                        ]
                    try:
                        if all_present:
                            objective = balancer(losses, kpis=kpis, features=features)
                        else:
                            objective = balancer(
                                losses, present=present, kpis=kpis, features=features
                            )
                    except BALANCER_FAILURES as error:
                        result.failure = f"step {step}: {type(error).__name__}: {error}"
                        break
                    recorder.record(step, balancer.weights)
                if objective is not None:
                    for optimiser in optimisers:
                        optimiser.zero_grad(set_to_none=True)
                    objective.backward()
                    if defaults.grad_clip is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), defaults.grad_clip)
                    for optimiser in optimisers:
                        optimiser.step()
                # A skipped batch still counts as a step: the schedule, the step numbers of
                # the weights and diagnostics, and the progress bar follow the batches, the
                # same for every method and single-task model on the same data.
                _step_schedulers(schedulers, stepped=objective is not None)
                if all_present:
                    loss_sums += losses.detach()
                else:
                    mask = torch.tensor(present, device=losses.device)
                    loss_sums += torch.where(mask, losses.detach(), 0)
                labelled = [count + here for count, here in zip(labelled, present, strict=True)]
                batches += 1
                step += 1
                progress.update(1)
            if result.failure is not None:
                break
            if balancer is not None:
                balancer.end_epoch()
            seconds = time.perf_counter() - started
            if world_size > 1:
                # Each rank averaged its slice of every batch; report the global mean (per task
                # over the rank slices that had its labels).
                torch.distributed.all_reduce(loss_sums)
                loss_sums /= world_size
                labelled = [
                    round(count)
                    for count in all_reduce_sum(
                        torch.tensor(labelled, dtype=torch.float64, device=device)
                    ).tolist()
                ]
            result.epochs.append(
                EpochRecord(
                    epoch=epoch,
                    seconds=seconds,
                    train_losses=_mean_train_losses(loss_sums, labelled, batches, world_size),
                    validation=evaluate(benchmark, model, benchmark.validation, device, defaults),
                    test=evaluate(benchmark, model, benchmark.test, device, defaults),
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


def _plain(value: Any) -> Any:
    """A JSON-compatible form of a hyperparameter value (text for anything else).

    The text leaves out memory addresses (``<function f at 0x7f…>``): a stored run's key is
    compared with this text in another process, where every address differs.
    """
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(item, nn.Parameter) for item in value):
            return f"{len(value)} parameter tensors"
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return without_addresses(str(value))


def without_addresses(text: str) -> str:
    """``text`` without the `` at 0x…`` of default reprs."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _task_loss(benchmark: Benchmark, task: Task, output: Any, target: Any) -> Tensor | None:
    """``task.loss`` on a batch: a 0-d tensor, or None for a batch without the task's labels.

    Raises:
        BenchmarkError: the loss returned anything else (naming the task and the value).
    """
    value: object = task.loss(output, target)
    if value is None or (isinstance(value, Tensor) and value.dim() == 0):
        return value
    if isinstance(value, Tensor):
        shown = f"a tensor of shape {tuple(value.shape)}"
    else:
        text = repr(value)
        shown = f"{text if len(text) <= 80 else text[:77] + '...'} ({type(value).__name__})"
    raise BenchmarkError(
        f"benchmark {benchmark.name!r}: task {task.name!r}: its loss returned {shown}; expected "
        "a 0-d tensor (the batch mean, in the graph), or None for a batch without this "
        "task's labels"
    )


def _with_absent_filled(
    task_losses: list[Tensor | None], leaves: Sequence[tuple[Tensor, bool]], device: torch.device
) -> Tensor:
    """The ``[K]`` losses, each absent task's entry (None) an exact zero from
    :func:`_exact_zero`: it reaches every parameter, with a zero gradient, whatever weight the
    balancer gives it (0 for an absent task). A constant would leave the absent task's head
    out of the backward: under DDP that head's gradient would never be ready (DDP raises at
    the next step), and a rank without any task's labels would give the balancer losses that
    do not require grad, which it refuses. So the head gets the zero gradient that
    ``present=`` gives a user's own finite absent loss (an optimiser with momentum moves on
    it, as on any zero gradient).
    """
    given = [loss for loss in task_losses if loss is not None]
    zero = _exact_zero(leaves, given[0] if given else None, device)
    return torch.stack([zero if loss is None else loss for loss in task_losses])


def _zero_gradient_leaves(model: nn.Module) -> list[tuple[Tensor, bool]]:
    """The model's trainable parameters, each with whether its gradient is sparse (a table an
    ``nn.Embedding(sparse=True)`` reads, whose zero gradient must stay sparse)."""
    sparse_tables = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse
    }
    return [
        (parameter, id(parameter) in sparse_tables)
        for parameter in model.parameters()
        if parameter.requires_grad and parameter.numel() > 0
    ]


def _exact_zero(
    leaves: Sequence[tuple[Tensor, bool]], like: Tensor | None, device: torch.device
) -> Tensor:
    """``Σ 0·p`` over ``leaves`` (:func:`_zero_gradient_leaves`): exactly 0, in the graph of
    every parameter, on ``like``'s device and in its dtype (float32 on ``device`` without)."""
    zero = zero_through(leaves, device if like is None else like.device)
    return zero if like is None else zero.to(like.dtype)


def _nonfinite_failure(
    benchmark: Benchmark,
    step: int,
    losses: Tensor,
    present: Sequence[bool],
    checked: Sequence[bool],
) -> str:
    """A run's failure message for a non-finite loss: the losses (None where absent), the
    tasks whose loss is not finite on this rank, and what a NaN usually means."""
    values = losses.tolist()
    shown = [value if here else None for value, here in zip(values, present, strict=True)]
    bad = [k for k, value in enumerate(values) if checked[k] and not math.isfinite(value)]
    if not bad:  # this rank's checked losses are finite: another rank's were not
        return f"non-finite loss at step {step} on another rank (this rank's: {shown})"
    names = ", ".join(f"{benchmark.tasks[k].name!r} = {values[k]}" for k in bad)
    message = f"non-finite loss at step {step}: {names} (losses: {shown})"
    if any(math.isnan(values[k]) for k in bad):
        message += (
            "; a mean over a batch without that task's labels is NaN: its loss should "
            "return None there (see 'Tasks without labels in some batches' in the docs)"
        )
    return message


def _checked_on_every_rank(
    losses: Tensor, present: Sequence[bool], checked: Sequence[bool] | None = None
) -> tuple[bool, list[int]]:
    """Whether every rank's ``checked`` losses (default: the present ones) are finite, and on
    how many ranks each task is present (one all-reduce under DDP).

    Every rank takes the same decisions from these (stop the run, skip a step without labels,
    skip the diagnostics): a rank that decided alone would wait in the next collective (DDP's
    backward, the balancer's, the Gramian's) until the timeout.
    """
    finite = torch.isfinite(losses.detach())
    checked = present if checked is None else checked
    if not all(checked):
        finite = finite | ~torch.tensor(list(checked), device=finite.device)
    if not is_distributed():
        return bool(finite.all()), [int(here) for here in present]
    flags = torch.cat(
        [
            (~finite).any().to(torch.float32).reshape(1),
            torch.tensor([float(here) for here in present], device=finite.device),
        ]
    )
    reduced = all_reduce_sum(flags).tolist()
    return reduced[0] == 0.0, [round(count) for count in reduced[1:]]


def _step_schedulers(schedulers: Sequence[Any], *, stepped: bool) -> None:
    """Advance the learning-rate schedules by one batch, whether the optimisers stepped or not
    (a batch without labels for the trained tasks)."""
    if stepped:
        for scheduler in schedulers:
            scheduler.step()
        return
    with warnings.catch_warnings():
        # Torch warns when a schedule advances before the first optimiser step; here that is
        # a first batch without labels, and the schedule is meant to follow the batches.
        warnings.filterwarnings(
            "ignore",
            message=r"Detected call of `lr_scheduler\.step\(\)` before",
            category=UserWarning,
        )
        for scheduler in schedulers:
            scheduler.step()


def _mean_train_losses(
    sums: Tensor, labelled: Sequence[int], batches: int, world_size: int
) -> list[float]:
    """Each task's mean training loss over the epoch's batches in which it had labels.

    Args:
        sums: per task, the sum of its batch losses (under DDP: summed over the ranks and
            divided by the number of ranks).
        labelled: per task, the batches (under DDP: rank slices) in which it had labels.
        batches: the epoch's batches (the same on every rank).
        world_size: the number of ranks.

    Returns:
        The means; NaN for a task without labels in any batch of the epoch.
    """
    if all(count == batches * world_size for count in labelled):
        # Every task labelled in every batch: the mean as it always was, bit for bit.
        return (sums / max(batches, 1)).tolist()
    return [
        total * world_size / count if count else math.nan
        for total, count in zip(sums.tolist(), labelled, strict=True)
    ]
