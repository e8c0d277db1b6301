"""``digits-mixed``: one noisy digit, four tasks of different kinds and scales.

Tasks: class (cross-entropy; accuracy), parity (binary cross-entropy; accuracy), ink mass (MSE
in raw pixel units, in the hundreds, deliberately unscaled; mean absolute error) and denoising
reconstruction (MSE; MSE). The input is the digit scaled to [0, 1] plus fixed Gaussian noise
(σ = 0.3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from taskbalance.bench.api import (
    Benchmark,
    Task,
    TrainingDefaults,
    accuracy,
    binary_accuracy,
    binary_kpi,
    classification_kpi,
    mean_absolute_error,
    mean_squared_error,
    reference_loss,
    register_benchmark,
    regression_kpi,
)
from taskbalance.bench.data import EVAL_BATCH_SIZE, TensorTaskDataset, split_digits
from taskbalance.bench.losses import binary_cross_entropy, cross_entropy, mse
from taskbalance.bench.models import linear_heads, mlp_trunk

INPUT_NOISE = 0.3
SMALL_SIZE = 256
DESCRIPTION = "one noisy digit; class, parity, ink mass and denoising: mixed kinds and scales"
DEFAULTS = TrainingDefaults(
    epochs=30, batch_size=64, lr=2e-3, balancer_lr=2e-2, eval_batch_size=EVAL_BATCH_SIZE
)


def _split(
    images: Tensor, raw_images: Tensor, labels: Tensor, pool: Tensor, rng: torch.Generator
) -> TensorTaskDataset:
    clean = images[pool].reshape(-1, 64)
    noisy = clean + INPUT_NOISE * torch.randn(clean.shape, generator=rng)
    label = labels[pool]
    return TensorTaskDataset(
        noisy,
        (label, (label % 2).float(), raw_images[pool].sum(dim=(1, 2)), clean),
        source_ids=pool,
    )


def model() -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """MLP trunk 64 → 128 → 128 and linear heads of sizes 10, 1, 1, 64."""
    return mlp_trunk(64, [128, 128]), linear_heads(128, [10, 1, 1, 64])


def build(small: bool = False, data_seed: int = 0) -> Benchmark:
    """Build ``digits-mixed``.

    Args:
        small: at most 256 images per split, for smoke tests.
        data_seed: seed of the split and of the input noise.

    Returns:
        The benchmark.
    """
    digits = split_digits(data_seed)
    limit = SMALL_SIZE if small else None
    pools = [pool[:limit] for pool in digits.pools]
    train, validation, test = (
        _split(digits.images, digits.raw_images, digits.labels, pool, digits.rng) for pool in pools
    )
    ink_reference = reference_loss(train.targets[2])
    denoise_reference = reference_loss(train.targets[3])
    tasks = (
        Task(
            "digit", cross_entropy, (accuracy(),), "classification", classification_kpi, "class 0-9"
        ),
        Task(
            "parity",
            binary_cross_entropy,
            (binary_accuracy(),),
            "classification",
            binary_kpi,
            "odd digit",
        ),
        Task(
            "ink",
            mse,
            (mean_absolute_error(),),
            "regression",
            regression_kpi(ink_reference),
            "ink mass, raw pixel units (hundreds)",
        ),
        Task(
            "denoise",
            mse,
            (mean_squared_error(),),
            "regression",
            regression_kpi(denoise_reference),
            "clean image from the noisy input",
        ),
    )
    return Benchmark(
        name="digits-mixed",
        tasks=tasks,
        train=train,
        validation=validation,
        test=test,
        model=model,
        defaults=DEFAULTS,
        description=DESCRIPTION,
        settings={"data_seed": data_seed, "small": small, "input_noise": INPUT_NOISE},
    )


register_benchmark(
    "digits-mixed",
    build,
    description=DESCRIPTION,
    tasks=(
        "digit: cross-entropy; accuracy ↑",
        "parity: binary cross-entropy; accuracy ↑",
        "ink: MSE (raw units); mae ↓",
        "denoise: MSE; mse ↓",
    ),
)
