"""The public benchmark API: plug-in loading, bad inputs, metrics accumulated over a split."""

from __future__ import annotations

import math
import pickle
import sys
import textwrap

import pytest
import torch
from torch import nn

from taskbalance.bench import (
    Benchmark,
    BenchmarkError,
    Method,
    SplitError,
    Task,
    TensorTaskDataset,
    TrainConfig,
    TrainingDefaults,
    evaluate,
    load_benchmark,
    mean_metric,
    regression_kpi,
    split_metric,
    train_run,
)
from taskbalance.bench.harness import GlobalBatchSampler, steps_per_epoch
from taskbalance.bench.losses import mse


def _absolute(output, target):
    return (output.reshape(target.shape) - target).abs()


def _tiny(size: int = 10, metrics=None, model=None) -> Benchmark:
    """Two regression tasks; ``metrics`` is a factory of each task's metrics."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(size, 3, generator=generator)
    data = TensorTaskDataset(inputs, [inputs.sum(dim=1), inputs[:, 0]])
    tasks = tuple(
        Task(
            name,
            mse,
            metrics() if metrics else (mean_metric("mae", _absolute, higher_is_better=False),),
            kpi=regression_kpi(1.0),
        )
        for name in ("sum", "first")
    )
    return Benchmark(
        "tiny",
        tasks,
        data,
        data,
        data,
        model=model or (lambda: (nn.Linear(3, 4), [nn.Linear(4, 1), nn.Linear(4, 1)])),
        defaults=TrainingDefaults(epochs=1, batch_size=3, lr=1e-2),
    )


def test_mean_metric_is_the_split_mean_not_the_mean_of_batch_means():
    benchmark = _tiny(size=10)  # batches of 3, 3, 3, 1: unequal sizes
    torch.manual_seed(0)
    model = benchmark.build_model()
    values = evaluate(benchmark, model, benchmark.test)
    with torch.no_grad():
        _, outputs = model(benchmark.test.inputs)
    for index, (output, target) in enumerate(zip(outputs, benchmark.test.targets, strict=True)):
        expected = float((output.squeeze(1) - target).abs().mean())
        assert values[index] == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        batch_means = [
            float(
                (
                    model(benchmark.test.inputs[i : i + 3])[1][0].squeeze(1)
                    - benchmark.test.targets[0][i : i + 3]
                )
                .abs()
                .mean()
            )
            for i in range(0, 10, 3)
        ]
    assert values[0] != pytest.approx(sum(batch_means) / len(batch_means), rel=1e-6)


def test_split_metric_sees_the_whole_split():
    seen = []

    def median_error(outputs, targets):
        seen.append(outputs.shape[0])
        return float((outputs.squeeze(1) - targets).abs().median())

    benchmark = _tiny(
        size=10, metrics=lambda: (split_metric("median", median_error, higher_is_better=False),)
    )
    evaluate(benchmark, benchmark.build_model(), benchmark.test)
    assert seen == [10, 10]


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_mapping_targets_and_plain_datasets_give_the_same_run():
    tensor_bench = _tiny(size=12)
    plain = tensor_bench.train
    # targets keyed by task name, through the DataLoader's default collate
    dict_data = _Items(
        [(x, {"first": b, "sum": a}) for x, (a, b) in (plain[i] for i in range(len(plain)))]
    )
    dict_bench = Benchmark(
        "tiny",
        tensor_bench.tasks,
        dict_data,
        dict_data,
        dict_data,
        model=tensor_bench.model,
        defaults=tensor_bench.defaults,
    )
    first = train_run(tensor_bench, "ew", config=TrainConfig(epochs=2))
    second = train_run(dict_bench, "ew", config=TrainConfig(epochs=2))
    assert first.final_test == pytest.approx(second.final_test, rel=1e-6)


def test_bad_tasks_and_benchmarks_are_named():
    with pytest.raises(TypeError, match="loss: expected a callable"):
        Task("a", "mse", (mean_metric("m", _absolute, higher_is_better=False),))
    with pytest.raises(TypeError, match="expected Metric instances"):
        Task("a", mse, (_absolute,))
    with pytest.raises(ValueError, match="kind"):
        Task("a", mse, (mean_metric("m", _absolute, higher_is_better=False),), kind="ranking")
    benchmark = _tiny()
    with pytest.raises(TypeError, match=r"train: expected a torch\.utils\.data\.Dataset"):
        Benchmark(
            "b",
            benchmark.tasks,
            [1, 2],
            benchmark.validation,
            benchmark.test,
            model=benchmark.model,
            defaults=benchmark.defaults,
        )
    shared = (mean_metric("m", _absolute, higher_is_better=False),)
    with pytest.raises(ValueError, match="one Metric instance is used twice"):
        Benchmark(
            "b",
            (Task("a", mse, shared), Task("b", mse, shared)),
            benchmark.train,
            benchmark.validation,
            benchmark.test,
            model=benchmark.model,
            defaults=benchmark.defaults,
        )
    with pytest.raises(ValueError, match="task names must differ"):
        Benchmark(
            "b",
            (benchmark.tasks[0], benchmark.tasks[0]),
            benchmark.train,
            benchmark.validation,
            benchmark.test,
            model=benchmark.model,
            defaults=benchmark.defaults,
        )
    with pytest.raises(ValueError, match="batch_size"):
        TrainingDefaults(epochs=1, batch_size=0, lr=1e-3)
    with pytest.raises(ValueError, match="optimizer"):
        TrainingDefaults(epochs=1, batch_size=1, lr=1e-3, optimizer="lbfgs")


def test_model_factory_returning_the_wrong_thing():
    wrong_heads = _tiny(model=lambda: (nn.Linear(3, 4), [nn.Linear(4, 1)]))
    with pytest.raises(BenchmarkError, match="1 head"):
        wrong_heads.build_model()
    not_a_model = _tiny(model=lambda: "resnet")
    with pytest.raises(BenchmarkError, match="returned str"):
        not_a_model.build_model()


def test_a_factory_handing_out_the_same_modules_again_is_refused():
    """Modules built once and returned at every call would let each run go on training the
    previous run's model (and single-task baselines learn the other tasks): refused."""
    trunk, heads = nn.Linear(3, 4), [nn.Linear(4, 1), nn.Linear(4, 1)]
    reused = _tiny(model=lambda: (trunk, heads))
    reused.build_model()
    with pytest.raises(BenchmarkError, match=r"parameter 'trunk.weight' of a model it built"):
        reused.build_model()
    one_head_reused = _tiny(model=lambda: (nn.Linear(3, 4), [heads[0], nn.Linear(4, 1)]))
    one_head_reused.build_model()
    with pytest.raises(BenchmarkError, match=r"parameter 'heads.0.weight'"):
        one_head_reused.build_model()
    fresh = _tiny()
    models = [fresh.build_model() for _ in range(3)]  # held: no id can be reused
    assert len({id(p) for model in models for p in model.parameters()}) == 3 * 6
    for _ in range(20):  # freed at once: new parameters may take the old ids
        fresh.build_model()


class _DictHeads(nn.Module):
    """A model whose forward returns ``(features, {task: output})``."""

    def __init__(self, names=("sum", "first")):
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({name: nn.Linear(4, 1) for name in names})

    def forward(self, x):
        z = self.trunk(x)
        return z, {name: head(z) for name, head in self.heads.items()}


def test_outputs_keyed_by_task_name_train_as_a_list_in_task_order():
    def listed_model():  # the same modules (and initialisation), heads in a list
        model = _DictHeads()
        return model.trunk, [model.heads["sum"], model.heads["first"]]

    torch.manual_seed(0)
    listed = train_run(_tiny(model=listed_model), Method("ew"), config=TrainConfig(epochs=1))
    assert listed.completed
    torch.manual_seed(0)
    keyed = train_run(_tiny(model=_DictHeads), Method("ew"), config=TrainConfig(epochs=1))
    assert keyed.completed
    assert keyed.failure is None
    assert [e.test for e in keyed.epochs] == [e.test for e in listed.epochs]


class _ReturnsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        out = self.layer(x)
        return {"sum": out[:, :1], "first": out[:, 1:]}


class _OneTensor(_ReturnsDict):
    def forward(self, x):
        out = self.layer(x)
        return out, out


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_ReturnsDict, r"forward returned dict; expected \(features, outputs\)"),
        (lambda: _DictHeads(("sum", "second")), r"no key\(s\) \['first'\]"),
        (lambda: (nn.Linear(3, 4), nn.Linear(4, 2)), r"returned Linear as the heads; expected"),
        (_OneTensor, r"outputs are Tensor; expected a list of 2"),
    ],
    ids=["dict without features", "a task's key missing", "one head module", "one tensor"],
)
def test_model_outputs_in_another_form_are_named(model, message):
    with pytest.raises(BenchmarkError, match=message):
        train_run(_tiny(model=model), Method("ew"), config=TrainConfig(epochs=1))


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(3), (torch.zeros(()), torch.zeros(()))


def test_a_streamed_split_is_refused_when_built_on_one_line():
    good = _tiny()
    with pytest.raises(SplitError, match=r"train: _Stream has no len\(\); expected a map-style"):
        Benchmark("tiny", good.tasks, _Stream(), good.validation, good.test, model=good.model,
                  defaults=good.defaults)  # fmt: skip
    assert issubclass(SplitError, BenchmarkError)  # the command line prints it on one line
    assert issubclass(SplitError, TypeError)


@pytest.mark.parametrize(
    ("split", "message"),
    [
        (
            torch.utils.data.TensorDataset(torch.zeros(4, 3), torch.zeros(4), torch.zeros(4)),
            r"train: an item is 3; expected \(input, targets\)",
        ),
        (
            torch.utils.data.TensorDataset(torch.zeros(4, 3), torch.zeros(4, 2)),
            r"train: the targets are Tensor; expected a list of 2 \(or a tuple: one per task",
        ),
        (
            _Items([(torch.zeros(3), {"sum": torch.zeros(())}) for _ in range(4)]),
            r"train: the targets have no key\(s\) \['first'\]",
        ),
    ],
    ids=["three-item tuples", "one target tensor for two tasks", "a task's key missing"],
)
def test_items_the_harness_cannot_read_are_named_when_read(split, message):
    """A two-column target tensor for two tasks would have been iterated over its batch
    dimension: with a batch of two, silently, each task given one example's targets."""
    good = _tiny()
    bad = Benchmark("tiny", good.tasks, split, good.validation, good.test, model=good.model,
                    defaults=TrainingDefaults(epochs=1, batch_size=2, lr=1e-2))  # fmt: skip
    with pytest.raises(BenchmarkError, match=message):
        train_run(bad, Method("ew"), config=TrainConfig(epochs=1))


class _LazyFile(torch.utils.data.Dataset):
    """Opens its file at the first read, as h5py/LMDB datasets do for DataLoader workers."""

    def __init__(self, size=6):
        self.size, self.opened = size, False

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        self.opened = True
        x = torch.full((3,), float(index))
        return x, (x.sum(), x[0])


def _two_linear_heads():
    return nn.Linear(3, 4), [nn.Linear(4, 1), nn.Linear(4, 1)]


def test_building_a_benchmark_reads_no_item_and_a_built_one_pickles():
    metric = lambda: (mean_metric("mae", _absolute, higher_is_better=False),)  # noqa: E731
    tasks = (Task("sum", mse, metric()), Task("first", mse, metric()))  # no KPI closures
    lazy = _LazyFile()
    built = Benchmark("tiny", tasks, lazy, lazy, lazy, model=_two_linear_heads,
                      defaults=TrainingDefaults(epochs=1, batch_size=3, lr=1e-2))  # fmt: skip
    assert not lazy.opened
    built.build_model()  # records its parameters (weakly)
    copied = pickle.loads(pickle.dumps(built))
    copied.build_model()
    assert train_run(copied, Method("ew"), config=TrainConfig(epochs=1)).completed


def test_one_task_with_plain_number_targets_trains():
    """torchvision's (image, int) items: one task, its target a number, collated to a tensor."""
    data = _Items([(torch.randn(3), float(index % 3)) for index in range(6)])
    task = Task("y", mse, (mean_metric("mae", _absolute, higher_is_better=False),))
    single = Benchmark("one", (task,), data, data, data,
                       model=lambda: (nn.Linear(3, 4), [nn.Linear(4, 1)]),
                       defaults=TrainingDefaults(epochs=1, batch_size=4, lr=1e-2))  # fmt: skip
    assert train_run(single, Method("ew"), config=TrainConfig(epochs=1)).completed


def test_heads_in_any_iterable_are_taken():
    generated = _tiny(model=lambda: (nn.Linear(3, 4), (nn.Linear(4, 1) for _ in range(2))))
    sequential = _tiny(
        model=lambda: (nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 1), nn.Linear(4, 1)))
    )
    assert len(list(generated.build_model().parameters())) == 6
    assert len(list(sequential.build_model().parameters())) == 6


def _batch_norm_model():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), [nn.Linear(4, 1), nn.Linear(4, 1)]


def test_drop_last_leaves_out_the_batch_of_one_a_batch_norm_cannot_train_on():
    """13 examples in batches of 4: the last holds one, which BatchNorm1d refuses in training;
    ``drop_last`` trains on the three full batches only."""
    plain = _tiny(size=13, model=_batch_norm_model)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        train_run(plain, Method("ew"), config=TrainConfig(epochs=1, batch_size=4))
    dropping = _tiny(size=13, model=_batch_norm_model)
    dropping = Benchmark(
        "tiny", dropping.tasks, dropping.train, dropping.validation, dropping.test,
        model=_batch_norm_model,
        defaults=TrainingDefaults(epochs=1, batch_size=4, lr=1e-2, drop_last=True),
    )  # fmt: skip
    assert steps_per_epoch(dropping) == 3
    batches = list(GlobalBatchSampler(13, 4, seed=0, drop_last=True))
    assert [len(batch) for batch in batches] == [4, 4, 4]
    assert len({index for batch in batches for index in batch}) == 12  # one left out
    assert [len(b) for b in GlobalBatchSampler(13, 4, seed=0)] == [4, 4, 4, 1]
    run = train_run(dropping, Method("ew"), config=TrainConfig(epochs=1))
    assert run.completed
    with pytest.raises(TypeError, match=r"drop_last: expected a bool, got 1"):
        TrainingDefaults(epochs=1, batch_size=4, lr=1e-2, drop_last=1)
    too_few = Benchmark(
        "tiny", dropping.tasks, dropping.train, dropping.validation, dropping.test,
        model=_batch_norm_model,
        defaults=TrainingDefaults(epochs=1, batch_size=20, lr=1e-2, drop_last=True),
    )  # fmt: skip
    with pytest.raises(BenchmarkError, match=r"drop_last with 13 training examples and batch_si"):
        train_run(too_few, Method("ew"), config=TrainConfig(epochs=1))


def _write(tmp_path, body: str):
    path = tmp_path / "my_bench.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_load_from_file_and_module(tmp_path, monkeypatch):
    path = _write(
        tmp_path,
        """
        from tests_helper_tiny import make  # noqa
        """,
    )
    helper = tmp_path / "tests_helper_tiny.py"
    helper.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from taskbalance.bench import (Benchmark, Task, TensorTaskDataset, TrainingDefaults,
                                           mean_metric)
            from taskbalance.bench.losses import mse

            def make(small=False, data_seed=0):
                g = torch.Generator().manual_seed(data_seed)
                x = torch.randn(8, 2, generator=g)
                data = TensorTaskDataset(x, [x[:, 0]])
                task = Task("y", mse, (mean_metric("se", lambda o, t: (o.squeeze(1) - t) ** 2,
                                                   higher_is_better=False),))
                return Benchmark("mine", (task,), data, data, data,
                                 model=lambda: (nn.Linear(2, 2), [nn.Linear(2, 1)]),
                                 defaults=TrainingDefaults(epochs=1, batch_size=4, lr=0.1),
                                 settings={"small": small, "data_seed": data_seed})

            def not_a_benchmark():
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from_file = load_benchmark(f"{path}:make", small=True, data_seed=2)
    assert from_file.name == "mine"
    assert dict(from_file.settings) == {"small": True, "data_seed": 2}
    from_module = load_benchmark("tests_helper_tiny:make")
    assert from_module.settings["data_seed"] == 0
    run = train_run(from_module, Method("ew"), config=TrainConfig(epochs=1))
    assert run.completed


def test_a_bench_file_imports_the_modules_beside_it(tmp_path, monkeypatch):
    """As under ``python my_bench.py``: a helper module next to the file imports by name."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored after the test
    (tmp_path / "sibling_helper_xyz.py").write_text("SIZE = 6\n")
    path = _write(
        tmp_path,
        """
        from sibling_helper_xyz import SIZE
        import torch
        from torch import nn
        from taskbalance.bench import (Benchmark, Task, TensorTaskDataset, TrainingDefaults,
                                       mean_metric)
        from taskbalance.bench.losses import mse

        def make():
            x = torch.randn(SIZE, 2)
            data = TensorTaskDataset(x, [x[:, 0]])
            task = Task("y", mse, (mean_metric("se", lambda o, t: (o.squeeze(1) - t) ** 2,
                                               higher_is_better=False),))
            return Benchmark("beside", (task,), data, data, data,
                             model=lambda: (nn.Linear(2, 2), [nn.Linear(2, 1)]),
                             defaults=TrainingDefaults(epochs=1, batch_size=4, lr=0.1))
        """,
    )
    assert len(load_benchmark(f"{path}:make").train) == 6


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing_file.py:make", "no such file"),
        ("{tmp}/my_bench.py:nope", "has no function 'nope'"),
        (
            "{tmp}/my_bench.py:not_a_benchmark",
            "returned int; expected a taskbalance.bench.Benchmark",
        ),
        ("{tmp}/my_bench.py:CONSTANT", "is not callable"),
        ("no_such_module_xyz:make", "no module 'no_such_module_xyz'"),
        ("nonexistent-bench", "unknown benchmark 'nonexistent-bench'"),
    ],
)
def test_bad_plug_ins_are_named(tmp_path, spec, message):
    _write(
        tmp_path,
        """
        CONSTANT = 3

        def not_a_benchmark():
            return 42
        """,
    )
    with pytest.raises(BenchmarkError, match=message):
        load_benchmark(spec.format(tmp=tmp_path))


def test_data_root_refused_by_a_benchmark_without_one():
    with pytest.raises(BenchmarkError, match="does not read a data directory"):
        load_benchmark("noisy-regression", small=True, data_root="/tmp")


@pytest.mark.parametrize(
    ("signature", "options", "match"),
    [
        # data_root without --data-root: it got None and failed inside the user's code
        ("data_root", {}, r"--data-root: benchmark .*make' reads a data directory"),
        ("data_root, small=False, /", {"data_root": "/tmp"}, r"\['small', 'data_root'\] are pos"),
        # an argument the harness cannot give: Python's TypeError traceback before
        ("foo, small=False", {}, r"make': the factory requires \['foo'\]"),
        ("model, small=False", {}, r"--model: benchmark .* requires a model name"),
    ],
)
def test_a_plug_in_factory_the_harness_cannot_call_is_named(tmp_path, signature, options, match):
    _write(tmp_path, f"def make({signature}):\n    raise AssertionError('not reached')\n")
    with pytest.raises(BenchmarkError, match=match):
        load_benchmark(f"{tmp_path}/my_bench.py:make", **options)


def test_small_and_a_data_seed_are_refused_by_a_factory_that_ignores_them(tmp_path):
    """Before: --data-seed 3 trained on the same data as seed 0, with no word."""
    _write(
        tmp_path,
        """
        from taskbalance.bench import load_benchmark

        def fixed_data():
            return load_benchmark("noisy-regression", small=True)
        """,
    )
    spec = f"{tmp_path}/my_bench.py:fixed_data"
    with pytest.raises(BenchmarkError, match=r"--small: benchmark .* has no small variant"):
        load_benchmark(spec, small=True)
    with pytest.raises(BenchmarkError, match=r"--data-seed 3: benchmark .* takes no data seed"):
        load_benchmark(spec, data_seed=3)
    assert load_benchmark(spec).name == "noisy-regression"


def test_the_module_form_of_a_file_in_this_folder_names_the_file_form(tmp_path, monkeypatch):
    """The console script does not put the working folder on sys.path."""
    (tmp_path / "bench_in_folder.py").write_text("def make():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BenchmarkError, match=r"file 'bench_in_folder.py', write bench_in_folder"):
        load_benchmark("bench_in_folder:make")


def test_a_module_whose_import_fails_is_not_called_missing(tmp_path, monkeypatch):
    (tmp_path / "bench_needing_more.py").write_text("import a_package_nobody_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BenchmarkError, match=r"importing 'bench_needing_more': No module named"):
        load_benchmark("bench_needing_more:make")


def test_regression_kpi_and_kpi_required_by_dtp():
    kpi = regression_kpi(2.0)
    assert kpi(None, None, torch.tensor(0.0)) == 1.0
    assert kpi(None, None, torch.tensor(2.0)) == pytest.approx(math.exp(-1))
    with pytest.raises(ValueError, match="reference_loss"):
        regression_kpi(0.0)
    benchmark = _tiny()
    no_kpi = Benchmark(
        "nokpi",
        tuple(Task(task.name, task.loss, task.metrics) for task in benchmark.tasks),
        benchmark.train,
        benchmark.validation,
        benchmark.test,
        model=benchmark.model,
        defaults=benchmark.defaults,
    )
    from taskbalance.bench.harness import check_method

    with pytest.raises(ValueError, match="have no kpi"):
        check_method(Method("dtp"), no_kpi)
    check_method(Method("dtp"), benchmark)


def test_missing_data_files_are_a_benchmark_error(tmp_path):
    path = tmp_path / "needs_data.py"
    path.write_text("def make(data_root=None):\n    return open(f'{data_root}/train.npy', 'rb')\n")
    with pytest.raises(BenchmarkError, match="No such file"):
        load_benchmark(f"{path}:make", data_root=str(tmp_path / "absent"))
