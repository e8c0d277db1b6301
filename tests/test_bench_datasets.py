"""The bundled benchmark builders: shapes, determinism under a seed, disjoint splits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from taskbalance.bench import (
    BenchmarkError,
    TrainConfig,
    benchmark_names,
    load_benchmark,
    train_run,
)
from taskbalance.bench.gradnorm_toy import sigmas as gradnorm_sigmas
from taskbalance.bench.multidigits import compose_pairs

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
