"""The dense benchmarks end to end through the command line: scenes, nyuv2, cityscapes, celeba."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from taskbalance.bench import cli, load_benchmark
from test_dense_loaders import write_celeba, write_npy_layout

NYUV2_METRICS = [
    "segmentation/miou",
    "segmentation/pixel_acc",
    "depth/depth_abs",
    "depth/depth_rel",
    "normal/normal_mean",
    "normal/normal_median",
    "normal/normal_within_11.25",
    "normal/normal_within_22.5",
    "normal/normal_within_30",
]


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_scenes_is_registered_with_nyuv2s_nine_metrics():
    benchmark = load_benchmark("scenes", small=True)
    assert benchmark.metric_names == NYUV2_METRICS
    assert benchmark.directions == [True, True, False, False, False, False, True, True, True]
    image, _ = benchmark.train[0]
    _, outputs = benchmark.build_model()(image[None])
    assert [tuple(o.shape[1:]) for o in outputs] == [(13, 32, 48), (1, 32, 48), (3, 32, 48)]


def test_compare_scenes_small_reports_nine_metrics_and_delta_m(capsys, tmp_path):
    argv = ["compare", "--bench", "scenes", "--methods", "ew,mgda,uw", "--seeds", "1"]
    argv += ["--small", "--quiet", "--out", str(tmp_path)]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    for name in NYUV2_METRICS:
        assert name in out
    assert "Δm%" in out
    with open(tmp_path / "comparison.csv", newline="") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert {"ew", "mgda", "uw", "single-task"} <= set(rows)
    delta_column = next(key for key in rows["ew"] if key.startswith("delta_m") or "Δm" in key)
    for method in ("ew", "mgda", "uw"):
        assert rows[method][delta_column] not in ("", "nan")


@pytest.mark.parametrize(
    ("bench", "label_folder", "heads"),
    [("nyuv2", "label", 3), ("cityscapes", "label_7", 2)],
)
def test_train_one_epoch_on_a_tiny_npy_layout(capsys, tmp_path, bench, label_folder, heads):
    # MTAN's layout at 32×64 (divisible by SegNet's 2⁵), two scenes per split.
    root = tmp_path / "data"
    write_npy_layout(root, bench, sizes=(2, 2), label_folder=label_folder, size=(32, 64))
    argv = ["train", "--bench", bench, "--data-root", str(root), "--epochs", "1", "--method"]
    argv += ["ew", "--quiet", "--out", str(tmp_path / "out")]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "segmentation/miou" in out
    assert ("normal/normal_mean" in out) == (heads == 3)
    assert (tmp_path / "out" / "metrics.csv").is_file()


def test_train_one_epoch_on_a_tiny_celeba_layout(capsys, tmp_path):
    root = tmp_path / "celeba"
    write_celeba(root, partition=(0, 0, 0, 0, 1, 1, 2, 2))
    argv = ["train", "--bench", "celeba", "--data-root", str(root), "--epochs", "1"]
    argv += ["--method", "ew", "--quiet", "--out", str(tmp_path / "out")]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "Attr_0/f1" in out
    assert "Attr_39/f1" in out


@pytest.mark.parametrize("bench", ["nyuv2", "cityscapes", "celeba"])
def test_missing_data_root_shows_the_expected_layout(capsys, tmp_path, bench):
    code, _, err = _run(["train", "--bench", bench, "--method", "ew", "--quiet"], capsys)
    assert code == 2
    assert "--data-root" in err
    assert "Traceback" not in err
    code, _, err = _run(
        ["train", "--bench", bench, "--method", "ew", "--data-root", str(tmp_path), "--quiet"],
        capsys,
    )
    assert code == 2
    assert "list_attr_celeba.txt" in err if bench == "celeba" else "train/" in err
