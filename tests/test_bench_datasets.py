"""The bundled benchmark builders: shapes, determinism under a seed, disjoint splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("sklearn")

from taskbalance.bench import (
    BenchmarkError,
    TrainConfig,
    benchmark_names,
    cli,
    load_benchmark,
    train_run,
)
from taskbalance.bench.gradnorm_toy import sigmas as gradnorm_sigmas
from taskbalance.bench.multidigits import compose_pairs
from taskbalance.bench.real_datasets import (
    DatasetLayoutError,
    NpyDenseDataset,
    build_cityscapes,
    dense_splits,
)
from test_dense_loaders import write_npy_layout

DATA_BENCHMARKS = ["multidigits", "digits-mixed", "gradnorm-toy", "noisy-regression"]


def _splits(benchmark):
    return [benchmark.train, benchmark.validation, benchmark.test]


@pytest.mark.parametrize("name", DATA_BENCHMARKS)
def test_shapes_and_model_outputs(name):
    benchmark = load_benchmark(name, small=True)
    for split in _splits(benchmark):
        assert len(split.targets) == benchmark.num_tasks
        for target in split.targets:
            assert target.shape[0] == len(split)
    model = benchmark.build_model()
    features, outputs = model(benchmark.test.inputs[:5])
    assert features.shape[0] == 5
    assert len(outputs) == benchmark.num_tasks
    for output, target in zip(outputs, benchmark.test.targets, strict=True):
        assert output.shape[0] == 5
        assert output.numel() // 5 == max(target[:5].numel() // 5, 1) or output.dim() == 2


def test_bundled_names_and_full_sizes():
    assert benchmark_names()[:4] == DATA_BENCHMARKS
    assert "toy-2d" not in benchmark_names()
    multidigits = load_benchmark("multidigits")
    assert tuple(multidigits.train.inputs.shape) == (6000, 12, 12)
    assert float(multidigits.train.inputs.max()) == 1.0
    mixed = load_benchmark("digits-mixed")
    assert len(mixed.train) + len(mixed.validation) + len(mixed.test) == 1797
    ink = mixed.train.targets[2]
    assert 100 < float(ink.mean()) < 1000  # raw units, in the hundreds


@pytest.mark.parametrize("name", DATA_BENCHMARKS)
def test_deterministic_under_data_seed(name):
    first = load_benchmark(name, small=True, data_seed=3)
    second = load_benchmark(name, small=True, data_seed=3)
    other = load_benchmark(name, small=True, data_seed=4)
    assert torch.equal(first.train.inputs, second.train.inputs)
    for a, b in zip(first.test.targets, second.test.targets, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.train.inputs, other.train.inputs)


@pytest.mark.parametrize("name", ["multidigits", "digits-mixed"])
def test_no_source_image_in_two_splits(name):
    benchmark = load_benchmark(name)
    sets = [set(split.source_ids.flatten().tolist()) for split in _splits(benchmark)]
    assert not sets[0] & sets[1]
    assert not sets[0] & sets[2]
    assert not sets[1] & sets[2]
    if name == "multidigits":
        # Split first, then pair: each split's pairs only use that split's images, two distinct.
        for split in _splits(benchmark):
            assert bool((split.source_ids[:, 0] != split.source_ids[:, 1]).all())
        assert sum(len(s) for s in sets) <= 1797


def test_compose_pairs_geometry():
    images = torch.zeros(2, 8, 8)
    images[0, 0, 0] = 1.0
    images[1, 7, 7] = 0.5
    canvas = compose_pairs(images, torch.tensor([0]), torch.tensor([1]))[0]
    assert canvas.shape == (12, 12)
    assert canvas[0, 0] == 1.0
    assert canvas[11, 11] == 0.5
    overlap = compose_pairs(
        torch.ones(1, 8, 8) * torch.arange(8.0), torch.tensor([0]), torch.tensor([0])
    )[0]
    assert overlap[4, 4] == 4.0  # max of left pixel (col 4) and right pixel (col 0)


def test_gradnorm_toy_scales_and_noisy_regression_variances():
    sigmas = gradnorm_sigmas()
    assert len(sigmas) == 10
    assert sigmas[0] == pytest.approx(1)
    assert sigmas[-1] == pytest.approx(100)
    toy = load_benchmark("gradnorm-toy", small=True)
    spreads = [float(target.abs().max()) for target in toy.train.targets]
    assert all(spread <= sigma + 1e-4 for spread, sigma in zip(spreads, sigmas, strict=True))
    noisy = load_benchmark("noisy-regression")
    assert noisy.noise_variances == (0.25, 4.0, 64.0)
    for noisy_target, clean, variance in zip(
        noisy.train.targets, noisy.train.clean_targets, noisy.noise_variances, strict=True
    ):
        assert float((noisy_target - clean).var()) == pytest.approx(variance, rel=0.05)
    # Validation and test are scored against the clean signal.
    for target, clean in zip(noisy.test.targets, noisy.test.clean_targets, strict=True):
        assert torch.equal(target, clean)


def test_unknown_benchmark_lists_names():
    with pytest.raises(BenchmarkError, match="multidigits"):
        load_benchmark("mnist")
    with pytest.raises(BenchmarkError, match="unknown benchmark 'toy-2d'"):
        load_benchmark("toy-2d")


def test_training_is_deterministic_under_seed():
    benchmark = load_benchmark("digits-mixed", small=True)
    config = TrainConfig(seed=5, epochs=2)
    first = train_run(benchmark, "rlw", config=config)
    second = train_run(benchmark, "rlw", config=config)
    assert first.final_test == second.final_test
    assert first.weight_rows == second.weight_rows
    other = train_run(benchmark, "rlw", config=TrainConfig(seed=6, epochs=2))
    assert other.weight_rows != first.weight_rows


def test_single_task_model_trains_one_task():
    benchmark = load_benchmark("multidigits", small=True)
    run = train_run(benchmark, None, single_task=1, config=TrainConfig(epochs=1))
    assert run.method == "single-task"
    assert run.single_task == 1
    assert not run.weight_rows
    assert not run.diagnostic_steps
    with pytest.raises(ValueError, match="single_task"):
        train_run(benchmark, None, config=TrainConfig(epochs=1))


# ---------------------------------------------------------------------------------------------
# NYUv2 / Cityscapes in MTAN's .npy layout (tiny files): every scene's files are checked, not
# only scene 0's, and the command line reads Cityscapes' 19-class labels.


def test_a_wrong_shaped_training_file_after_the_first_is_named_not_stretched(tmp_path):
    write_npy_layout(tmp_path, "nyuv2", sizes=(4, 3))  # 8×12 scenes
    # A truncated normal map: the scale-crop would resize it back to 8×12 without a word.
    np.save(tmp_path / "train" / "normal" / "2.npy", np.ones((6, 12, 3), np.float32))
    train, _, _ = dense_splits(tmp_path, "nyuv2")  # only scene 0 is read up front
    assert train.augment
    torch.manual_seed(0)
    train[1]  # the scenes around it still load
    pattern = r"train/normal/2\.npy: shape \(6, 12, 3\); expected \(8, 12, 3\)"
    with pytest.raises(DatasetLayoutError, match=pattern):
        train[2]


def test_a_channel_first_test_file_is_named_instead_of_a_stack_error(tmp_path):
    write_npy_layout(tmp_path, "nyuv2", sizes=(2, 3))
    np.save(tmp_path / "val" / "depth" / "1.npy", np.ones((1, 8, 12), np.float32))
    test = NpyDenseDataset(tmp_path, "val", "nyuv2")
    pattern = r"(?s)val/depth/1\.npy: shape \(1, 8, 12\); expected \(8, 12, 1\).*DATA_ROOT/"
    with pytest.raises(DatasetLayoutError, match=pattern):
        list(DataLoader(test, batch_size=3))


def test_a_wrong_shaped_test_file_is_a_one_line_command_line_error(tmp_path, capsys):
    root = tmp_path / "data"
    write_npy_layout(root, "cityscapes", sizes=(2, 2), label_folder="label_7", size=(32, 64))
    np.save(root / "val" / "depth" / "1.npy", np.ones((1, 32, 64), np.float32))
    argv = ["train", "--bench", "cityscapes", "--data-root", str(root), "--small", "--method"]
    argv += ["ew", "--quiet", "--out", str(tmp_path / "out")]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "val/depth/1.npy: shape (1, 32, 64)" in err
    assert "Traceback" not in err


def test_a_file_that_is_not_numbers_is_named(tmp_path):
    write_npy_layout(tmp_path, "nyuv2", sizes=(2, 2))
    np.save(tmp_path / "val" / "label" / "1.npy", np.full((8, 12), "x"))
    with pytest.raises(DatasetLayoutError, match=r"val/label/1\.npy: dtype <U1"):
        NpyDenseDataset(tmp_path, "val", "nyuv2")[1]


def test_cityscapes_command_line_reads_label_19_when_label_7_is_absent(tmp_path, capsys):
    root = tmp_path / "c19"
    write_npy_layout(root, "cityscapes", sizes=(2, 2), label_folder="label_19", size=(32, 64))
    benchmark = load_benchmark("cityscapes", data_root=str(root), small=True)
    assert benchmark.settings["num_classes"] == 19
    assert "19-class" in benchmark.description
    image, _ = benchmark.train[0]
    _, outputs = benchmark.build_model()(image[None])
    assert outputs[0].shape[1] == 19
    argv = ["train", "--bench", "cityscapes", "--data-root", str(root), "--small", "--method"]
    argv += ["ew", "--quiet", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    # Both label sets: the papers' 7 classes, unless the caller asks for 19.
    write_npy_layout(root, "cityscapes", sizes=(2, 2), label_folder="label_7", size=(32, 64))
    assert load_benchmark("cityscapes", data_root=str(root)).settings["num_classes"] == 7
    assert build_cityscapes(str(root), num_classes=19).settings["num_classes"] == 19
    with pytest.raises(ValueError, match="7 or 19"):
        build_cityscapes(str(root), num_classes=20)
