"""The command line: error paths (exit 2, one line on stderr, no training) and smoke runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from taskbalance.bench import cli, compare


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(cli, "train_run", fail)
    monkeypatch.setattr(compare, "train_run", fail)


def test_list_shows_methods_benchmarks_and_toys(capsys):
    code, out, _ = _run(["list"], capsys)
    assert code == 0
    for name in ["ew", "uw", "multidigits", "noisy-regression", "toy-2d", "↑", "FILE.py:FUNCTION"]:
        assert name in out


def test_unknown_benchmark(capsys, monkeypatch, tmp_path):
    _no_training(monkeypatch)
    code, _, err = _run(
        ["train", "--bench", "mnist", "--method", "ew", "--out", str(tmp_path)], capsys
    )
    assert code == 2
    assert "unknown benchmark 'mnist'" in err
    assert "multidigits" in err
    assert "Traceback" not in err


def test_unknown_method(capsys, monkeypatch, tmp_path):
    _no_training(monkeypatch)
    code, _, err = _run(["compare", "--methods", "ew,nope", "--out", str(tmp_path)], capsys)
    assert code == 2
    assert "error: --methods: unknown method 'nope'" in err
    assert "'dwa'" in err
    argv = ["train", "--bench", "multidigits", "--method", "nash-mtl", "--out", str(tmp_path)]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert "error: --method: unknown method 'nash-mtl' (did you mean 'nash_mtl'?)" in err


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("temperature=hot", "temperature"),
        ("colour=red", "no listed method has a hyperparameter 'colour'"),
        ("temperature", "expected key=value"),
        ("temperature=-1", "temperature"),
    ],
)
def test_bad_set_value(capsys, monkeypatch, tmp_path, setting, expected):
    _no_training(monkeypatch)
    argv = ["train", "--bench", "multidigits", "--method", "dwa", "--small", "--set", setting]
    code, _, err = _run([*argv, "--out", str(tmp_path)], capsys)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err


def test_unwritable_output_directory(capsys, monkeypatch, tmp_path):
    _no_training(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = _run(
        ["train", "--bench", "multidigits", "--method", "ew", "--out", str(blocker / "sub")],
        capsys,
    )
    assert code == 2
    assert "cannot write to output directory" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["compare", "--small", "--epochs", "2", "--select", "mean-last-9"],
            "--select mean-last-9: averages the last 9 epochs, but each run trains 2 epochs",
        ),
        (
            ["compare", "--small", "--diagnostics-every", "-5"],
            "--diagnostics-every: expected an int >= 0 (0: off), got -5",
        ),
        (
            ["train", "--bench", "multidigits", "--method", "ew", "--diagnostics-every", "-1"],
            "--diagnostics-every: expected an int >= 0",
        ),
        (["compare", "--small", "--device", "gpu"], "--device: expected cpu, cuda or cuda:N"),
        (
            ["train", "--bench", "multidigits", "--method", "ew", "--device", "gpu"],
            "--device: expected cpu, cuda or cuda:N, got 'gpu'",
        ),
    ],
)
def test_options_that_cannot_mean_anything_are_refused_before_any_file(
    capsys, monkeypatch, tmp_path, argv, expected
):
    """Before: mean-last-9 of 2 epochs averaged 2, and a negative interval turned diagnostics
    off, silently."""
    _no_training(monkeypatch)
    out = tmp_path / "out"
    code, _, err = _run([*argv, "--out", str(out)], capsys)
    assert code == 2
    assert expected in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--methods", "mgda,nash_mtl[update_every=0]"],
            "error: nash_mtl[update_every=0]: update_every: expected an int >= 1, got 0",
        ),
        (
            ["--methods", "uw,mgda", "--set", "update_every=0"],
            "error: mgda[update_every=0]: update_every: expected an int >= 1, got 0",
        ),
    ],
)
def test_compare_names_the_method_whose_setting_is_bad(
    capsys, monkeypatch, tmp_path, argv, expected
):
    """Before: 'update_every: expected an int >= 1, got 0', of which listed method unsaid."""
    _no_training(monkeypatch)
    code, _, err = _run(["compare", "--small", *argv, "--out", str(tmp_path)], capsys)
    assert code == 2
    assert expected in err


def test_list_into_a_closed_pipe_exits_quietly():
    """``taskbalance list | head -1``: exit 141 as the shell reports SIGPIPE, no traceback."""
    script = (
        "import subprocess, sys;"
        "p = subprocess.Popen([sys.executable, '-m', 'taskbalance.bench.cli', 'list'],"
        " stdout=subprocess.PIPE, stderr=subprocess.PIPE);"
        "p.stdout.close();"
        "err = p.stderr.read().decode(); code = p.wait();"
        "print(code); print(err)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    code, _, err = result.stdout.partition("\n")
    assert code == str(cli.BROKEN_PIPE_EXIT_CODE)
    assert "Traceback" not in err
    assert "BrokenPipeError" not in err


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(monkeypatch):
    """A worker's pipe breaking is an error, not the reader of our output going away."""

    def broken(arguments):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "command_list", broken)
    with pytest.raises(BrokenPipeError):
        cli.main(["list"])


def test_compare_refuses_toy(capsys, tmp_path):
    code, _, err = _run(["compare", "--bench", "toy-2d", "--out", str(tmp_path)], capsys)
    assert code == 2
    assert "taskbalance toy" in err


@pytest.mark.parametrize(
    ("bench", "method"),
    [
        ("multidigits", "mgda[params=trunk]"),
        ("digits-mixed", "dtp"),
        ("gradnorm-toy", "dwa"),
        ("noisy-regression", "uw"),
        ("toy-2d", "fixed"),
    ],
)
def test_train_one_epoch_on_each_benchmark(capsys, tmp_path, bench, method):
    argv = ["train", "--bench", bench, "--method", method, "--epochs", "1", "--small", "--quiet"]
    code, out, _ = _run([*argv, "--out", str(tmp_path)], capsys)
    assert code == 0
    assert (tmp_path / "metrics.csv").exists()
    assert (tmp_path / "weights.csv").exists()
    assert list(tmp_path.glob("*.png"))
    assert "wrote" in out
    if bench == "noisy-regression":
        assert "learned σ²" in out
        assert "recovered within 5%" in out
    elif bench != "toy-2d":
        assert "test metrics" in out
        assert "final weights" in out
        assert "mean weights over the last epoch" in out
        metadata = json.loads((tmp_path / "metadata.json").read_text())
        assert metadata["methods"][0]["label"] == method
        assert metadata["versions"]["torch"]


def test_compare_small_and_ctrl_c_writes_finished_runs(capsys, monkeypatch, tmp_path):
    real_train_run = compare.train_run
    calls = []

    def interrupt_on_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_train_run(*args, **kwargs)

    monkeypatch.setattr(compare, "train_run", interrupt_on_fourth)
    argv = ["compare", "--methods", "ew,uw", "--seeds", "1", "--epochs", "1", "--small"]
    code, out, err = _run([*argv, "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 130
    assert "interrupted" in err
    with (tmp_path / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["single-task", "single-task", "ew"]
    assert "Δm%" in (tmp_path / "comparison.md").read_text()
    assert "ew" in out
    # Rerunning resumes: the three finished runs are loaded, only uw trains.
    calls.clear()
    monkeypatch.setattr(compare, "train_run", real_train_run)
    code, out, _ = _run([*argv, "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "(3 resumed)" in out


def test_compare_small_complete_with_variants(capsys, tmp_path):
    argv = [
        "compare",
        "--methods",
        "ew,fixed[weights=[1,2]],mgda[params=trunk]",
        "--set",
        "update_every=2",
        "--seeds",
        "2",
        "--epochs",
        "2",
        "--small",
        "--quiet",
        "--select",
        "best-val",
        "--out",
        str(tmp_path),
    ]
    code, out, _ = _run(argv, capsys)
    assert code == 0
    table = (tmp_path / "comparison.md").read_text()
    assert "single-task" in table
    assert "mgda[update_every=2,params=trunk]" in table
    assert "fixed[weights=[1, 2]]" in table
    assert "selection: best-val" in table
    assert "vs ew W/L" in table
    for name in [
        "comparison.csv",
        "metadata.json",
        "diagnostics.csv",
        "weights.png",
        "task_metrics.png",
        "delta_m.png",
        "pareto.png",
        "cosines.png",
        "conflicts.png",
    ]:
        assert (tmp_path / name).exists(), name
        assert str(tmp_path / name) in out
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    mgda = metadata["methods"][2]
    assert mgda["mode"] == "parameters of 'trunk'"
    assert mgda["hyperparameters"]["update_every"] == 2
    assert metadata["training"]["epochs"] == 2
    assert metadata["selection"] == "best-val"
    assert metadata["benchmark"]["settings"]["data_seed"] == 0


def test_runs_csv_holds_the_numbers_the_table_took(capsys, tmp_path):
    """Under ``--select mean-last-2`` each run reports the mean of its last two epochs: the
    runs' rows of runs.csv average to the table's means (metrics.csv keeps every epoch)."""
    argv = ["compare", "--methods", "ew,uw", "--seeds", "2", "--epochs", "2", "--small"]
    argv += ["--select", "mean-last-2", "--quiet", "--out", str(tmp_path)]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    with (tmp_path / "runs.csv").open() as handle:
        runs = list(csv.DictReader(handle))
    with (tmp_path / "comparison.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    with (tmp_path / "metrics.csv").open() as handle:
        epochs = list(csv.DictReader(handle))
    columns = [name for name in runs[0] if name.startswith("test_")]
    assert columns
    assert {run["selection"] for run in runs} == {"mean-last-2"}
    for method in ("ew", "uw"):
        mine = [run for run in runs if run["method"] == method]
        assert len(mine) == 2
        for column in columns:
            mean = sum(float(run[column]) for run in mine) / 2
            assert mean == pytest.approx(float(rows[method][f"{column[5:]}_mean"]), rel=1e-12)
    last = {  # the last epoch's test numbers, which the runs' must not simply be
        (row["method"], row["seed"], "test_" + row["name"]): float(row["value"])
        for row in epochs
        if row["epoch"] == "2" and row["split"] == "test"
    }
    assert any(
        float(run[column]) != last[run["method"], run["seed"], column]
        for run in runs
        if run["method"] == "ew"
        for column in columns
    )


def test_train_on_a_benchmark_file(capsys, tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "custom_benchmark.py"
    argv = ["train", "--bench", f"{example}:make_benchmark", "--method", "dtp", "--small"]
    code, out, err = _run([*argv, "--epochs", "1", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert "sensors / dtp / seed 0" in out
    assert "state/macro_f1" in out


def test_bad_benchmark_file_is_one_line(capsys, tmp_path):
    code, _, err = _run(
        ["compare", "--bench", f"{tmp_path}/absent.py:make", "--out", str(tmp_path)], capsys
    )
    assert code == 2
    assert "no such file" in err
    assert "Traceback" not in err


def test_train_refuses_a_missing_tensorboard_before_the_run(tmp_path, monkeypatch, capsys):
    # Checked up front: on a long benchmark, a missing package found after training cost the
    # whole run.
    import importlib.util

    from taskbalance.bench import tensorboard

    real = importlib.util.find_spec
    monkeypatch.setattr(
        tensorboard.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "tensorboard" else real(name, *args),
    )
    out = tmp_path / "run"
    arguments = ["train", "--bench", "noisy-regression", "--method", "uw", "--small", "--quiet"]
    code = cli.main([*arguments, "--out", str(out), "--tensorboard", str(tmp_path / "board")])
    assert code == 2
    assert "--tensorboard: the 'tensorboard' package is not installed" in capsys.readouterr().err
    assert not out.exists()  # no epoch ran, no file was written


def test_readme_uncertainty_weighting_table(capsys, tmp_path):
    # The README's console block: a full default run recovers the three noise variances.
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("$ taskbalance train --bench noisy-regression --method uw\n", 1)[1]
    block = block.split("```", 1)[0]
    rows = re.findall(r"^  (y\d) +([\d.]+) +([\d.]+) +(-?[\d.]+)%$", block, re.M)
    assert [row[0] for row in rows] == ["y0", "y1", "y2"]
    argv = ["train", "--bench", "noisy-regression", "--method", "uw", "--quiet"]
    code, out, _ = _run([*argv, "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "recovered within 5%: yes" in out
    assert "recovered within 5%: yes" in block
    for task, true, learned, _ in rows:
        got = re.search(rf"^  {task} +{re.escape(true)} +([\d.]+) ", out, re.M)
        assert got is not None, out
        assert float(got.group(1)) == pytest.approx(float(learned), rel=0.01)


def test_set_errors_name_set_and_captions_count_epochs(capsys, monkeypatch, tmp_path):
    _no_training(monkeypatch)
    argv = ["train", "--bench", "multidigits", "--method", "mgda", "--out", str(tmp_path)]
    code, _, err = _run([*argv, "--set", "update_every"], capsys)
    assert code == 2
    assert "error: --set update_every: 'update_every': expected key=value" in err
    from taskbalance.bench.selection import parse_selection

    assert parse_selection("mean-last-1").describe().endswith("over the last 1 epoch")
    assert parse_selection("mean-last-3").describe().endswith("over the last 3 epochs")


def test_compare_best_val_mean_runs_on_one_direction_and_is_refused_on_mixed(
    capsys, tmp_path, monkeypatch
):
    argv = ["compare", "--methods", "ew", "--seeds", "1", "--epochs", "2", "--small", "--quiet"]
    select = ["--select", "best-val-mean"]
    code, _, _ = _run([*argv, "--bench", "multidigits", *select, "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "best mean validation metric" in (tmp_path / "comparison.md").read_text()
    assert json.loads((tmp_path / "metadata.json").read_text())["selection"] == "best-val-mean"
    _no_training(monkeypatch)  # digits-mixed: accuracy ↑ beside mae ↓
    code, _, err = _run(
        [*argv, "--bench", "digits-mixed", *select, "--out", str(tmp_path / "mixed")], capsys
    )
    assert code == 2
    assert "best-val-mean: the mean of metrics" in err
    assert "digits-mixed" in err
    assert not (tmp_path / "mixed").exists()


def test_a_comparison_without_ew_says_why_its_vs_ew_columns_are_empty(capsys, tmp_path):
    argv = ["compare", "--bench", "noisy-regression", "--small", "--epochs", "1", "--seeds", "1"]
    code, out, _ = _run([*argv, "--methods", "uw", "--out", str(tmp_path / "a")], capsys)
    assert code == 0
    note = (
        "Note: ew was not among the methods, so the vs ew columns are empty: add ew to "
        "--methods to test each method against it."
    )
    assert note in out
    assert note in (tmp_path / "a" / "comparison.md").read_text()
    code, out, _ = _run([*argv, "--methods", "ew,uw", "--out", str(tmp_path / "b")], capsys)
    assert code == 0
    assert "ew was not among the methods" not in out
