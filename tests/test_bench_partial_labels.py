"""The harness on partially labelled data: a task's loss returns None for a batch without its
labels, and the balancer is told with ``present=``."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import taskbalance
from conftest import gloo_group, run_ranks
from taskbalance.bench import (
    Benchmark,
    BenchmarkError,
    Task,
    TensorTaskDataset,
    TrainConfig,
    TrainingDefaults,
    mean_metric,
    regression_kpi,
    train_run,
)

SIZE, BATCH = 24, 3
STEPS = SIZE // BATCH


class MaskedLoss:
    """Squared error over the labelled samples (target not NaN); None when the batch has
    none. Keeps every value it returned, in call order (one call per training batch)."""

    def __init__(self) -> None:
        self.returned: list[torch.Tensor | None] = []

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        labelled = ~target.isnan()
        if not bool(labelled.any()):
            self.returned.append(None)
            return None
        loss = ((output.squeeze(1) - target)[labelled] ** 2).mean()
        self.returned.append(loss.detach().clone())
        return loss

    @property
    def present(self) -> list[bool]:
        return [value is not None for value in self.returned]


def _masked_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Metrics see every sample: leaving out the unlabelled ones is the metric's job.
    return (output.squeeze(1) - target).abs()[~target.isnan()]


class Models:
    """The model factory; remembers each model's parameters and their initial values, and
    with ``snapshots`` the parameters before each forward of the trunk."""

    def __init__(self, snapshots: bool = False) -> None:
        self.parameters: list[list[nn.Parameter]] = []
        self.initial: list[list[torch.Tensor]] = []
        self.snapshots: list[torch.Tensor] | None = [] if snapshots else None

    def flat(self) -> torch.Tensor:
        """The last model's parameters, as one vector."""
        return torch.cat([p.detach().flatten() for p in self.parameters[-1]]).clone()

    def _remember(self, *_: object) -> None:
        assert self.snapshots is not None
        self.snapshots.append(self.flat())

    def __call__(self) -> tuple[nn.Module, list[nn.Module]]:
        trunk = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
        heads = [nn.Linear(8, 1), nn.Linear(8, 1)]
        parameters = [*trunk.parameters(), *(p for head in heads for p in head.parameters())]
        self.parameters.append(parameters)
        self.initial.append([p.detach().clone() for p in parameters])
        if self.snapshots is not None:
            trunk.register_forward_pre_hook(self._remember)
        return trunk, heads


def _benchmark(
    first_labelled: int = SIZE,
    second_labelled: int = SIZE // 4,
    *,
    second_loss: Any = None,
    epochs: int = 1,
    models: Models | None = None,
) -> Benchmark:
    """Two regression tasks on 24 examples, batches of 3. Task "first" has labels on the
    examples ``[0, first_labelled)``, task "second" on ``[SIZE - second_labelled, SIZE)``;
    the others carry NaN, and a batch with none of a task's labels makes its loss None."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(SIZE, 3, generator=generator)
    index = torch.arange(SIZE)
    first = torch.where(index < first_labelled, inputs[:, 0], math.nan)
    second = torch.where(index >= SIZE - second_labelled, inputs.sum(dim=1), math.nan)
    data = TensorTaskDataset(inputs, [first, second])
    tasks = tuple(
        Task(
            name,
            loss,
            (mean_metric("mae", _masked_error, higher_is_better=False),),
            kpi=regression_kpi(1.0),
        )
        for name, loss in (("first", MaskedLoss()), ("second", second_loss or MaskedLoss()))
    )
    return Benchmark(
        "partial",
        tasks,
        data,
        data,
        data,
        model=models or Models(),
        defaults=TrainingDefaults(epochs=epochs, batch_size=BATCH, lr=1e-2),
    )


@pytest.fixture
def balancer_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every call of a balancer the harness creates: its losses and keyword arguments."""
    calls: list[dict[str, Any]] = []
    create = taskbalance.create

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append({"losses": args[0].detach().clone(), **kwargs})

    def spied_create(name: str, **arguments: Any) -> taskbalance.Balancer:
        balancer = create(name, **arguments)
        balancer.register_forward_pre_hook(record, with_kwargs=True)
        return balancer

    monkeypatch.setattr(taskbalance, "create", spied_create)
    return calls


def _loss(benchmark: Benchmark, task: int) -> MaskedLoss:
    loss = benchmark.tasks[task].loss
    assert isinstance(loss, MaskedLoss)
    return loss


@pytest.mark.parametrize("method", ["mgda", "uw"])
def test_a_gradient_and_a_loss_based_method_train_with_absent_labels(method, balancer_calls):
    benchmark = _benchmark(epochs=2)
    run = train_run(benchmark, method, config=TrainConfig(seed=0, diagnostics_every=0))
    second = _loss(benchmark, 1).present
    assert len(second) == 2 * STEPS
    assert 0 < sum(second) < len(second)  # both kinds of batch
    assert run.completed
    assert all(math.isfinite(value) for value in run.final_test)
    for record in run.epochs:
        assert all(math.isfinite(value) for value in record.train_losses)
    assert all(math.isfinite(w) for row in run.weight_rows for w in row)


@pytest.mark.parametrize("method", ["mgda", "uw"])
def test_the_balancer_is_told_which_task_is_absent(method, balancer_calls):
    benchmark = _benchmark()
    run = train_run(benchmark, method, config=TrainConfig(seed=0, diagnostics_every=0))
    second = _loss(benchmark, 1).present
    assert len(balancer_calls) == STEPS == len(second)
    assert run.weight_steps == list(range(STEPS))
    for step, (call, labelled) in enumerate(zip(balancer_calls, second, strict=True)):
        if labelled:
            assert "present" not in call, step
        else:
            assert call["present"] == [True, False], step
            assert run.weight_rows[step][1] == 0.0, step
            assert call["losses"][1].item() == 0.0, step  # the absent entry: an exact zero
        if method == "uw":  # UW's weights are positive for a present task (MGDA's may be 0)
            assert (run.weight_rows[step][1] > 0) == labelled, step


def test_the_mean_training_loss_counts_only_the_batches_with_labels():
    benchmark = _benchmark(epochs=2)
    run = train_run(benchmark, "ew", config=TrainConfig(seed=0, diagnostics_every=0))
    for task in range(2):
        returned = _loss(benchmark, task).returned
        for epoch, record in enumerate(run.epochs):
            values = returned[epoch * STEPS : (epoch + 1) * STEPS]
            labelled = [float(value) for value in values if value is not None]
            expected = sum(labelled) / len(labelled)
            assert record.train_losses[task] == pytest.approx(expected, rel=1e-6), (task, epoch)
            if len(labelled) < STEPS:  # dividing by every batch would give another number
                assert record.train_losses[task] != pytest.approx(sum(labelled) / STEPS)
    assert any(value is None for value in _loss(benchmark, 1).returned)


def test_an_epoch_without_any_label_of_a_task_reports_nan_for_it():
    benchmark = _benchmark(second_labelled=0)
    run = train_run(benchmark, "ew", config=TrainConfig(seed=0, diagnostics_every=0))
    assert run.completed
    first, second = run.epochs[0].train_losses
    assert math.isfinite(first)
    assert math.isnan(second)


def test_a_single_task_model_skips_every_batch_without_its_labels():
    models = Models()
    benchmark = _benchmark(second_labelled=0, models=models)
    with warnings.catch_warnings():
        # The schedule advances on the skipped first batch without torch's warning about it.
        warnings.simplefilter("error", UserWarning)
        run = train_run(benchmark, None, single_task=1, config=TrainConfig(seed=0))
    assert run.completed
    assert _loss(benchmark, 1).present == [False] * STEPS
    for parameter, initial in zip(models.parameters[0], models.initial[0], strict=True):
        assert torch.equal(parameter.detach(), initial)
    # The same model trained on its other, labelled task moves: the check above can fail.
    train_run(benchmark, None, single_task=0, config=TrainConfig(seed=0))
    assert not all(
        torch.equal(parameter.detach(), initial)
        for parameter, initial in zip(models.parameters[1], models.initial[1], strict=True)
    )


def test_a_single_task_model_steps_exactly_on_the_batches_with_its_labels():
    models = Models(snapshots=True)
    benchmark = _benchmark(models=models)
    run = train_run(benchmark, None, single_task=1, config=TrainConfig(seed=0))
    assert run.completed
    second = _loss(benchmark, 1).present
    # The trunk's pre-hook also runs during evaluation (after the epoch): the first STEPS
    # snapshots are the parameters before each training batch.
    assert models.snapshots is not None
    before = [*models.snapshots[:STEPS], models.flat()]
    changed = [not torch.equal(before[i], before[i + 1]) for i in range(STEPS)]
    assert changed == second
    assert 0 < sum(second) < STEPS


def test_a_batch_without_any_label_trains_nothing_and_still_counts_as_a_step(balancer_calls):
    # "first" labelled on [0, 6), "second" on [18, 24): some batches hold neither.
    benchmark = _benchmark(first_labelled=6, second_labelled=6)
    run = train_run(benchmark, "uw", config=TrainConfig(seed=0, diagnostics_every=1))
    assert run.completed
    first, second = _loss(benchmark, 0).present, _loss(benchmark, 1).present
    some = [a or b for a, b in zip(first, second, strict=True)]
    both = [a and b for a, b in zip(first, second, strict=True)]
    assert not all(some)  # the case under test happened
    assert len(balancer_calls) == sum(some)
    assert run.weight_steps == [step for step in range(STEPS) if some[step]]
    assert run.diagnostic_steps == [step for step in range(STEPS) if both[step]]


def test_diagnostics_are_recorded_only_where_every_task_has_labels():
    benchmark = _benchmark()
    run = train_run(benchmark, "mgda", config=TrainConfig(seed=0, diagnostics_every=1))
    second = _loss(benchmark, 1).present
    assert 0 < sum(second) < STEPS
    assert run.diagnostic_steps == [step for step in range(STEPS) if second[step]]


def test_a_kpi_method_reads_no_kpi_of_an_absent_task(balancer_calls):
    read: list[tuple[str, bool]] = []

    def kpi(name: str) -> Any:
        reference = regression_kpi(1.0)

        def recorded(output: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> float:
            read.append((name, bool((~target.isnan()).any())))
            return reference(output, target, loss)

        return recorded

    plain = _benchmark()
    tasks = tuple(
        Task(task.name, task.loss, task.metrics, kpi=kpi(task.name)) for task in plain.tasks
    )
    benchmark = Benchmark(
        "partial",
        tasks,
        plain.train,
        plain.validation,
        plain.test,
        model=Models(),
        defaults=plain.defaults,
    )
    run = train_run(benchmark, "dtp", config=TrainConfig(seed=0, diagnostics_every=0))
    assert run.completed
    second = _loss(benchmark, 1).present
    assert [labelled for name, labelled in read if name == "second"] == [True] * sum(second)
    assert len([name for name, _ in read if name == "first"]) == STEPS
    assert len(balancer_calls) == STEPS
    for call, labelled in zip(balancer_calls, second, strict=True):
        if not labelled:
            assert call["kpis"][1] == 1.0  # in [0, 1], as the balancer requires; ignored


class _Returns:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> Any:
        return self.value


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.5, r"0\.5 \(float\)"),
        (torch.tensor([0.5]), r"a tensor of shape \(1,\)"),
        ("nan", r"'nan' \(str\)"),
    ],
)
def test_a_loss_of_the_wrong_type_is_an_error_naming_the_task(value, shown):
    benchmark = _benchmark(second_loss=_Returns(value))
    with pytest.raises(BenchmarkError, match=rf"task 'second': its loss returned {shown}; "):
        train_run(benchmark, "ew", config=TrainConfig(seed=0))


class _NanWithoutLabels(MaskedLoss):
    """The beginner's masked mean: NaN (a mean over no samples) instead of None."""

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        loss = super().__call__(output, target)
        return output.sum() * math.nan if loss is None else loss


def test_a_nan_loss_stops_the_run_naming_the_task_and_the_none_contract():
    benchmark = _benchmark(second_loss=_NanWithoutLabels())
    run = train_run(benchmark, "ew", config=TrainConfig(seed=0))
    assert run.failure is not None
    assert "'second' = nan" in run.failure
    assert "its loss should return None there" in run.failure
    assert "'first' =" not in run.failure  # the finite task is not blamed


def test_a_single_task_model_ignores_another_tasks_nan_loss():
    """The single-task model of task "first" trains on its own loss: task "second"'s NaN
    (which stops a multi-task run, above) must not stop it."""
    benchmark = _benchmark(second_loss=_NanWithoutLabels())
    run = train_run(benchmark, None, single_task=0, config=TrainConfig(seed=0))
    assert run.failure is None
    assert run.completed
    own = train_run(benchmark, None, single_task=1, config=TrainConfig(seed=0))
    assert own.failure is not None
    assert "'second' = nan" in own.failure


_BENCH_FILE = """
import math
import torch
from torch import nn
from taskbalance.bench import Benchmark, Task, TensorTaskDataset, TrainingDefaults, mean_metric

def loss(output, target):
    labelled = ~target.isnan()
    if not bool(labelled.any()):
        return NONE_OR_NAN
    return ((output.squeeze(1) - target)[labelled] ** 2).mean()

def error(output, target):
    return (output.squeeze(1) - target).abs()[KEPT]

def make():
    x = torch.randn(24, 3, generator=torch.Generator().manual_seed(0))
    second = torch.where(torch.arange(24) >= 18, x.sum(dim=1), math.nan)
    data = TensorTaskDataset(x, [x[:, 0], second])
    tasks = tuple(Task(name, loss, (mean_metric("mae", error, higher_is_better=False),))
                  for name in ("first", "second"))
    return Benchmark("cli-partial", tasks, data, data, data,
                     model=lambda: (nn.Linear(3, 4), [nn.Linear(4, 1) for _ in "ab"]),
                     defaults=TrainingDefaults(epochs=1, batch_size=3, lr=0.01))
"""


def _cli(tmp_path, capsys, command: str, none_or_nan: str, kept: str) -> tuple[int, str, str]:
    from taskbalance.bench.cli import main

    path = tmp_path / "bench.py"
    body = _BENCH_FILE.replace("NONE_OR_NAN", none_or_nan).replace("KEPT", kept)
    path.write_text(body)
    arguments = [command, "--bench", f"{path}:make", "--quiet", "--out", str(tmp_path / "out")]
    if command == "compare":
        arguments += ["--methods", "ew,uw", "--seeds", "1"]
    else:
        arguments += ["--method", "ew"]
    code = main(arguments)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_a_nan_loss_fails_every_method_run_with_exit_code_one(tmp_path, capsys):
    code, out, err = _cli(tmp_path, capsys, "compare", "output.sum() * math.nan", "~target.isnan()")
    assert code == 1
    assert "every method's run failed" in err
    assert re.search(r"failed: ew seed 0: non-finite loss at step \d+: 'second' = nan", out)
    assert "its loss should return None there" in out
    # The single-task model of "first" trains; "second"'s is named as such when it stops.
    assert "failed: single-task second seed 0:" in out
    assert "failed: single-task first" not in out
    code, out, _ = _cli(tmp_path, capsys, "train", "output.sum() * math.nan", "~target.isnan()")
    assert code == 1
    assert "training stopped: non-finite loss" in out


def test_cli_a_metric_that_keeps_unlabelled_samples_is_named_in_a_warning(tmp_path, capsys):
    code, _, err = _cli(tmp_path, capsys, "compare", "None", "...")
    assert code == 0
    assert "taskbalance: warning: benchmark 'cli-partial': a reported test metric is NaN" in err
    assert "second/mae in 3 run(s): single-task seed 0, ew seed 0, uw seed 0" in err
    assert "must leave out the samples without labels" in err
    # The metric that drops them gives a ranked table and no such warning.
    code, _, err = _cli(tmp_path, capsys, "compare", "None", "~target.isnan()")
    assert code == 0
    assert "metric is NaN" not in err


def test_a_run_with_every_label_calls_the_balancer_as_before(balancer_calls):
    benchmark = _benchmark(second_labelled=SIZE, epochs=2)
    run = train_run(benchmark, "uw", config=TrainConfig(seed=0))
    assert len(balancer_calls) == 2 * STEPS
    assert all("present" not in call for call in balancer_calls)
    # The mean training loss is the old sum over every batch / the batches, bit for bit.
    for task in range(2):
        returned = _loss(benchmark, task).returned
        for epoch, record in enumerate(run.epochs):
            total = torch.zeros(())
            for value in returned[epoch * STEPS : (epoch + 1) * STEPS]:
                assert value is not None
                total += value
            assert record.train_losses[task] == (total / STEPS).item()


# ---------------------------------------------------------------------------------------------
# DDP: two gloo ranks, each with its slice of every global batch.

DDP_BATCH = 4


def _ddp_benchmark() -> Benchmark:
    """Rare labels: slices where one rank has a task and the other has not, or has none."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(SIZE, 3, generator=generator)
    index = torch.arange(SIZE)
    first = torch.where(index % 3 == 0, inputs[:, 0], math.nan)
    second = torch.where(index % 5 == 0, inputs.sum(dim=1), math.nan)
    data = TensorTaskDataset(inputs, [first, second])
    tasks = tuple(
        Task(name, MaskedLoss(), (mean_metric("mae", _masked_error, higher_is_better=False),))
        for name in ("first", "second")
    )
    return Benchmark(
        "partial-ddp",
        tasks,
        data,
        data,
        data,
        model=Models(),
        defaults=TrainingDefaults(epochs=2, batch_size=DDP_BATCH, lr=1e-2),
    )


def _ddp_worker(rank: int, store: str, out: str) -> None:
    with gloo_group(rank, store):
        result: dict[str, Any] = {}
        for method in ("mgda", "uw"):
            benchmark = _ddp_benchmark()
            run = train_run(benchmark, method, config=TrainConfig(seed=0, diagnostics_every=1))
            result[method] = {
                "failure": run.failure,
                "final_test": run.final_test,
                "weights": run.weight_rows,
                "weight_steps": run.weight_steps,
                "train_losses": [record.train_losses for record in run.epochs],
                "present": [_loss(benchmark, k).present for k in range(2)],
            }
        single = _ddp_benchmark()
        run = train_run(single, None, single_task=1, config=TrainConfig(seed=0))
        result["single"] = {"failure": run.failure, "present": _loss(single, 1).present}
        torch.save(result, f"{out}/rank{rank}.pt")


def test_ddp_ranks_with_different_labels_train_together(tmp_path):
    results = run_ranks(_ddp_worker, tmp_path)
    for method in ("mgda", "uw"):
        zero, one = results[0][method], results[1][method]
        assert zero["failure"] is None, method
        assert one["failure"] is None, method
        assert zero["weights"] == one["weights"]
        assert zero["final_test"] == one["final_test"]
        assert zero["train_losses"] == one["train_losses"]
        assert all(math.isfinite(value) for value in zero["final_test"])
        # What was tested happened: a task labelled on one rank only, a rank without labels
        # while the other had some, and a step without labels anywhere (no weights recorded).
        here = [list(zip(*rank["present"], strict=True)) for rank in (zero, one)]
        steps = list(zip(*here, strict=True))  # per step: (rank 0's, rank 1's) presence
        assert any(a != b for a, b in steps)
        assert any(any(a) != any(b) for a, b in steps)
        skipped = [step for step, (a, b) in enumerate(steps) if not any(a) and not any(b)]
        assert skipped
        assert not set(skipped) & set(zero["weight_steps"])
        assert len(zero["weight_steps"]) == len(steps) - len(skipped)
    for rank in results:
        assert rank["single"]["failure"] is None


def test_the_weights_plot_averages_every_step_of_a_window():
    """500 steps drawn as at most 80 points: windows of 7 steps. A task absent at one step in
    7 (weight 0 there) shows as 6/7 in every full window; every 7th step alone would miss
    each of those steps (they are not at a window's start) and draw a flat 1."""
    from taskbalance.bench.plots import MAX_CURVE_POINTS, window_means

    steps = list(range(500))
    rows = [[1.0, 0.0 if step % 7 == 3 else 1.0] for step in steps]
    drawn_steps, drawn = window_means(steps, rows, MAX_CURVE_POINTS)
    assert len(drawn) == math.ceil(500 / 7) <= MAX_CURVE_POINTS
    assert drawn_steps[0] == 3.0  # the mean of steps 0..6
    full = drawn[: 500 // 7]
    assert all(row[0] == 1.0 for row in drawn)
    assert all(row[1] == pytest.approx(6 / 7) for row in full)
    assert [row[1] for row in rows[::7]] == [1.0] * len(rows[::7])


class _BagTrunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4, sparse=True, mode="mean")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bag(x)


@pytest.mark.parametrize("method", ["ew", "mgda", None])
def test_a_sparse_embedding_trains_through_batches_without_labels(method):
    """The absent task's zero fill gives a table read with sparse=True a sparse zero
    gradient: a dense one made SGD raise "add(sparse, dense) is not supported"."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 10, (SIZE, 3), generator=generator)
    index = torch.arange(SIZE)
    second = torch.where(index >= SIZE - SIZE // 4, tokens.sum(dim=1).float(), math.nan)
    data = TensorTaskDataset(tokens, [tokens[:, 0].float(), second])
    tasks = tuple(
        Task(name, MaskedLoss(), (mean_metric("mae", _masked_error, higher_is_better=False),))
        for name in ("first", "second")
    )
    benchmark = Benchmark(
        "sparse",
        tasks,
        data,
        data,
        data,
        model=lambda: (_BagTrunk(), [nn.Linear(4, 1), nn.Linear(4, 1)]),
        defaults=TrainingDefaults(epochs=1, batch_size=BATCH, lr=1e-2, optimizer="sgd"),
    )
    run = train_run(benchmark, method, single_task=None if method else 1, config=TrainConfig())
    assert run.failure is None
    assert run.completed
    assert not all(tasks[1].loss.present)  # some batches did lack the second task's labels
