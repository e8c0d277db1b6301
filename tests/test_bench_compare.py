"""Comparisons: parallel runs equal serial ones, finished runs are resumed, --fresh restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from taskbalance.bench.compare import BenchmarkSource, run_comparison
from taskbalance.bench.harness import Method, TrainConfig
from taskbalance.bench.variants import parse_methods

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_benchmark.py"


def _per_run(comparison):
    return {
        (run.method, run.single_task, run.seed): (
            [record.test for record in run.epochs],
            run.weight_rows,
            run.diagnostic_grams,
        )
        for run in comparison.runs
    }


@pytest.mark.slow
def test_jobs_two_gives_the_runs_of_jobs_one(tmp_path):
    pytest.importorskip("sklearn")
    source = BenchmarkSource("digits-mixed", small=True)
    methods = parse_methods("rlw,pcgrad")
    config = TrainConfig(epochs=1)
    serial = run_comparison(source, methods, seeds=[0, 1], out=tmp_path / "a", config=config)
    parallel = run_comparison(
        source, methods, seeds=[0, 1], out=tmp_path / "b", config=config, jobs=2, threads=2
    )
    assert len(serial.runs) == 2 * (4 + 2)
    assert _per_run(serial) == _per_run(parallel)
    assert [row.delta_m_mean for row in serial.rows] == [row.delta_m_mean for row in parallel.rows]


def test_resume_skips_finished_runs_and_fresh_restarts(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from taskbalance.bench import compare

    source = BenchmarkSource("multidigits", small=True)
    methods = [Method("ew")]
    config = TrainConfig(epochs=1)
    first = run_comparison(source, methods, seeds=[0], out=tmp_path, config=config)
    files = sorted(path.name for path in (tmp_path / "runs").glob("*.json"))
    assert files == [
        "ew-seed0.json",
        "single-task_left_-seed0.json",
        "single-task_right_-seed0.json",
    ]
    calls = []
    real = compare.train_run
    monkeypatch.setattr(compare, "train_run", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = run_comparison(source, methods, seeds=[0], out=tmp_path, config=config)
    assert calls == []
    assert again.resumed == 3
    assert _per_run(again) == _per_run(first)
    # Other settings do not reuse the stored runs.
    run_comparison(source, methods, seeds=[0], out=tmp_path, config=TrainConfig(epochs=2))
    assert len(calls) == 3
    calls.clear()
    run_comparison(source, methods, seeds=[0], out=tmp_path, config=config, fresh=True)
    assert len(calls) == 3
    stored = json.loads((tmp_path / "runs" / "ew-seed0.json").read_text())
    assert stored["key"]["config"]["epochs"] == 1


_EDITABLE_BENCH = """
import torch
from torch import nn
from taskbalance.bench import (Benchmark, Task, TensorTaskDataset, TrainingDefaults,
                               mean_metric)
from taskbalance.bench.losses import mse

def make():
    x = torch.randn(SIZE, 2, generator=torch.Generator().manual_seed(0))
    data = TensorTaskDataset(x, [x[:, 0], x[:, 1]])
    def loss(output, target):
        return SCALE * mse(output, target)

    tasks = tuple(Task(name, loss, (mean_metric("se", lambda o, t: (o.squeeze(1) - t) ** 2,
                                                 higher_is_better=False),))
                  for name in ("a", "b"))
    return Benchmark("editable", tasks, data, data, data,
                     model=lambda: (nn.Linear(2, WIDTH), [nn.Linear(WIDTH, 1) for _ in "ab"]),
                     defaults=TrainingDefaults(epochs=1, batch_size=4, lr=LR))
"""


@pytest.mark.parametrize(
    "edit",
    [{"LR": 0.05}, {"SIZE": 12}, {"WIDTH": 5}, {"SCALE": 3.0}],
    ids=["defaults", "split size", "model", "loss code"],
)
def test_an_edit_of_the_benchmark_file_is_not_resumed_as_the_old_runs(tmp_path, monkeypatch, edit):
    """Runs are keyed on what the benchmark fixes (metadata.json's data, tasks, model and
    training settings) and on the bench file's text, not only on the command line: an edited
    bench file trains again, even where the edit is inside a loss metadata only names."""
    # An edit within the second of the last write, at the same size, would import the stale
    # bytecode: none is written (each `taskbalance compare` of a user recompiles an edit).
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    settings = {"SIZE": 8, "WIDTH": 3, "LR": 0.1, "SCALE": 1.0}
    path = tmp_path / "editable_bench.py"

    def write(values):
        header = "".join(f"{name} = {value!r}\n" for name, value in values.items())
        path.write_text(header + _EDITABLE_BENCH)

    def compare():
        return run_comparison(
            BenchmarkSource(f"{path}:make"), [Method("ew")], seeds=[0], out=tmp_path / "out"
        )

    write(settings)
    first = compare()
    assert first.resumed == 0
    assert len(first.runs) == 3
    assert compare().resumed == 3  # unchanged: every run resumed
    write({**settings, **edit})
    edited = compare()
    assert edited.resumed == 0
    assert _per_run(edited) != _per_run(first)


_IMPORTED_LOSS = """
import torch
from taskbalance.bench.losses import mse

def loss(output, target):
    return SCALE * mse(output, target)
"""

_BENCH_USING_IMPORTED_LOSS = """
import torch
from torch import nn
from taskbalance.bench import (Benchmark, Task, TensorTaskDataset, TrainingDefaults,
                               mean_metric)
from scaled_losses import loss

def make():
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    data = TensorTaskDataset(x, [x[:, 0], NOISE * x[:, 1]])
    tasks = tuple(Task(name, loss, (mean_metric("se", lambda o, t: (o.squeeze(1) - t) ** 2,
                                                 higher_is_better=False),))
                  for name in ("a", "b"))
    return Benchmark("imported", tasks, data, data, data,
                     model=lambda: (nn.Linear(2, 3), [nn.Linear(3, 1) for _ in "ab"]),
                     defaults=TrainingDefaults(epochs=1, batch_size=4, lr=0.1))
"""


@pytest.mark.parametrize("edited", ["scaled_losses", "real_bench"])
def test_an_edit_of_an_imported_loss_or_a_reexported_factory_is_not_resumed(
    tmp_path, monkeypatch, edited
):
    """The bench file the spec names only re-exports the factory, which imports its loss from
    a third module: an edit of either of those files trains again (before, only the named
    file's text was keyed, and both edits resumed the old runs)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # as in the test above
    values = {"scaled_losses": {"SCALE": 1.0}, "real_bench": {"NOISE": 1.0}}
    bodies = {"scaled_losses": _IMPORTED_LOSS, "real_bench": _BENCH_USING_IMPORTED_LOSS}

    def write(name):
        header = "".join(f"{key} = {value!r}\n" for key, value in values[name].items())
        (tmp_path / f"{name}.py").write_text(header + bodies[name])

    for name in bodies:
        write(name)
    named = tmp_path / "reexport_bench.py"
    named.write_text("from real_bench import make\n")

    def compare():
        # Each `taskbalance compare` is a new process that imports the edited modules afresh.
        for name in bodies:
            monkeypatch.delitem(sys.modules, name, raising=False)
        return run_comparison(
            BenchmarkSource(f"{named}:make"), [Method("ew")], seeds=[0], out=tmp_path / "out"
        )

    first = compare()
    assert first.resumed == 0
    assert compare().resumed == 3  # unchanged: every run resumed
    values[edited] = {key: 3.0 for key in values[edited]}
    write(edited)
    edited_runs = compare()
    assert edited_runs.resumed == 0
    assert _per_run(edited_runs) != _per_run(first)


_WRAPPED_DATA = """
import torch
from torch.utils.data import Dataset

class Readings(Dataset):
    def __init__(self):
        self.x = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        x = self.x[index]
        return x, (FACTOR * x[0], x[1])
"""

_BENCH_OF_SUBSETS = """
from torch import nn
from torch.utils.data import Subset
from taskbalance.bench import Benchmark, Task, TrainingDefaults, mean_metric
from taskbalance.bench.losses import mse
from readings import Readings

def make():
    data = Readings()
    train, rest = Subset(data, range(8)), Subset(data, range(8, 12))
    tasks = tuple(Task(name, mse, (mean_metric("se", lambda o, t: (o.squeeze(1) - t) ** 2,
                                                 higher_is_better=False),))
                  for name in ("a", "b"))
    return Benchmark("subsets", tasks, train, rest, rest,
                     model=lambda: (nn.Linear(2, 3), [nn.Linear(3, 1) for _ in "ab"]),
                     defaults=TrainingDefaults(epochs=1, batch_size=4, lr=0.1))
"""


def test_an_edit_of_a_data_set_behind_a_subset_is_not_resumed(tmp_path, monkeypatch):
    """The splits are torch Subsets of the user's data set class: its module is keyed too."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # as in the tests above
    data_file = tmp_path / "readings.py"
    named = tmp_path / "subsets_bench.py"
    named.write_text(_BENCH_OF_SUBSETS)

    def compare(factor):
        data_file.write_text(f"FACTOR = {factor!r}\n" + _WRAPPED_DATA)
        monkeypatch.delitem(sys.modules, "readings", raising=False)  # a new process's import
        return run_comparison(
            BenchmarkSource(f"{named}:make"), [Method("ew")], seeds=[0], out=tmp_path / "out"
        )

    assert compare(1.0).resumed == 0
    assert compare(1.0).resumed == 3
    assert compare(10.0).resumed == 0


def test_a_class_defined_without_a_source_file_is_left_out_of_the_key(tmp_path):
    """A data set class defined in ``python -c`` (or a notebook cell) has no file to hash;
    the comparison runs, and a second one resumes it."""
    script = f"""
from pathlib import Path
import torch
from torch import nn
from torch.utils.data import Dataset
from taskbalance.bench import Benchmark, Task, TrainingDefaults, mean_metric
from taskbalance.bench.api import register_benchmark
from taskbalance.bench.compare import BenchmarkSource, run_comparison
from taskbalance.bench.harness import Method
from taskbalance.bench.losses import mse

class Readings(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, index):
        x = torch.full((2,), float(index))
        return x, (x[0], x[1])

def make():
    tasks = tuple(Task(name, mse, (mean_metric("se", lambda o, t: (o.squeeze(1) - t) ** 2,
                                                 higher_is_better=False),))
                  for name in ("a", "b"))
    return Benchmark("inline", tasks, Readings(), Readings(), Readings(),
                     model=lambda: (nn.Linear(2, 3), [nn.Linear(3, 1) for _ in "ab"]),
                     defaults=TrainingDefaults(epochs=1, batch_size=4, lr=0.01))

register_benchmark("inline", make, description="inline")
for _ in range(2):
    result = run_comparison(BenchmarkSource("inline"), [Method("ew")], seeds=[0],
                            out=Path({str(tmp_path / "out")!r}))
    print("resumed", result.resumed)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["resumed", "0", "resumed", "3"]


_BENCH_WITH_OBJECTS = """
import functools
import torch
from torch import nn
from taskbalance.bench import (Benchmark, Task, TensorTaskDataset, TrainingDefaults,
                               mean_metric)
from taskbalance.bench.losses import mse

class ScaledMSE:  # a callable-object loss: its repr carries a memory address
    def __call__(self, output, target):
        return 2.0 * mse(output, target)

def make():
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    data = TensorTaskDataset(x, [x[:, 0], x[:, 1]])
    metric = lambda: (mean_metric("se", lambda o, t: (o.squeeze(1) - t) ** 2,
                                  higher_is_better=False),)
    tasks = (Task("a", functools.partial(mse), metric()), Task("b", ScaledMSE(), metric()))
    return Benchmark("objects", tasks, data, data, data,
                     model=lambda: (nn.Linear(2, 3), [nn.Linear(3, 1) for _ in "ab"]),
                     defaults=TrainingDefaults(epochs=1, batch_size=4, lr=0.1),
                     settings={"activation": torch.relu, "missing": float("nan")})
"""


def test_a_second_process_resumes_runs_whose_benchmark_reprs_hold_addresses(tmp_path):
    """A partial or callable-object loss, a function or a NaN among the settings: the stored
    key must equal the one a new process computes, or every rerun trains everything again."""
    path = tmp_path / "objects_bench.py"
    path.write_text(_BENCH_WITH_OBJECTS)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from taskbalance.bench.compare import BenchmarkSource, run_comparison\n"
        "from taskbalance.bench.harness import Method\n"
        f"done = run_comparison(BenchmarkSource({str(path) + ':make'!r}), [Method('ew')], "
        f"seeds=[0], out=Path({str(tmp_path / 'out')!r}))\n"
        "print('resumed', done.resumed)\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    resumed = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
            env=environment, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        resumed.append(result.stdout.split()[-1])
    assert resumed == ["0", "3"]


def test_custom_benchmark_example_runs():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ew: level/mae=" in result.stdout
    assert "uw: level/mae=" in result.stdout


@pytest.mark.slow
def test_compare_on_the_custom_benchmark_from_the_command_line(tmp_path):
    pytest.importorskip("matplotlib")
    command = [
        sys.executable,
        "-m",
        "taskbalance.bench.cli",
        "compare",
        "--bench",
        f"{EXAMPLE}:make_benchmark",
        "--methods",
        "ew,uw,mgda",
        "--seeds",
        "2",
        "--small",
        "--epochs",
        "2",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for text in ["Benchmark sensors", "Δm% ↓", "vs ew W/L", "vs ew p", "level/r2 ↑", "mgda"]:
        assert text in result.stdout
    assert str(tmp_path / "comparison.md") in result.stdout
