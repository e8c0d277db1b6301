"""``multidigits``: two sklearn digits on one 12×12 canvas, the small analogue of MultiMNIST.

Left digit at the top-left, right digit offset by 4 px in both directions, combined by
pixelwise max; tasks: left digit and right digit (cross-entropy; accuracy). The 1,797 images
are split first (60/20/20, data seed) and pairs are composed within each split, so no image
appears in two splits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taskbalance.bench.api import (
    Benchmark,
    Task,
    TrainingDefaults,
    accuracy,
    classification_kpi,
    register_benchmark,
)
from taskbalance.bench.data import EVAL_BATCH_SIZE, TensorTaskDataset, split_digits
from taskbalance.bench.losses import cross_entropy
from taskbalance.bench.models import linear_heads, mlp_trunk

SIDE = 12
OFFSET = 4
PAIRS = (6000, 1500, 1500)
SMALL_PAIRS = (256, 128, 128)
DESCRIPTION = "two overlapping sklearn digits on a 12×12 canvas (MultiMNIST analogue)"
DEFAULTS = TrainingDefaults(
    epochs=8, batch_size=128, lr=2e-3, balancer_lr=2e-2, eval_batch_size=EVAL_BATCH_SIZE
)


def tasks() -> tuple[Task, ...]:
    """The two classification tasks."""
    return tuple(
        Task(
            name,
            cross_entropy,
            (accuracy(),),
            kind="classification",
            kpi=classification_kpi,
            description=description,
        )
        for name, description in (("left", "digit at the top-left"), ("right", "offset digit"))
    )


def compose_pairs(images: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Two 8×8 digits on a 12×12 canvas: left at the top-left, right offset by 4 px in both
    directions, combined by pixelwise max.

    Args:
        images: ``[N, 8, 8]`` source images.
        left: indices of the left digits.
        right: indices of the right digits.

    Returns:
        ``[len(left), 12, 12]`` canvases.
    """
    count = left.shape[0]
    top_left = torch.zeros(count, SIDE, SIDE)
    offset = torch.zeros(count, SIDE, SIDE)
    top_left[:, :8, :8] = images[left]
    offset[:, OFFSET:, OFFSET:] = images[right]
    return torch.maximum(top_left, offset)


def _pair_split(
    images: Tensor, labels: Tensor, pool: Tensor, count: int, rng: torch.Generator
) -> TensorTaskDataset:
    """``count`` pairs of two distinct images, both drawn from ``pool`` only."""
    size = pool.shape[0]
    left_positions = torch.randint(size, (count,), generator=rng)
    # A shift in 1..size-1 makes the right image always differ from the left one.
    shifts = torch.randint(1, size, (count,), generator=rng)
    left = pool[left_positions]
    right = pool[(left_positions + shifts) % size]
    return TensorTaskDataset(
        compose_pairs(images, left, right),
        (labels[left], labels[right]),
        source_ids=torch.stack([left, right], dim=1),
    )


def model() -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """MLP trunk 144 → 256 → 128 and one linear head per digit."""
    return mlp_trunk(SIDE * SIDE, [256, 128]), linear_heads(128, [10, 10])


def build(small: bool = False, data_seed: int = 0) -> Benchmark:
    """Build ``multidigits``.

    Args:
        small: a few hundred pairs per split, for smoke tests.
        data_seed: seed of the image split and of the pairing.

    Returns:
        The benchmark.
    """
    digits = split_digits(data_seed)
    counts = SMALL_PAIRS if small else PAIRS
    train, validation, test = (
        _pair_split(digits.images, digits.labels, pool, count, digits.rng)
        for pool, count in zip(digits.pools, counts, strict=True)
    )
    return Benchmark(
        name="multidigits",
        tasks=tasks(),
        train=train,
        validation=validation,
        test=test,
        model=model,
        defaults=DEFAULTS,
        description=DESCRIPTION,
        settings={"data_seed": data_seed, "small": small, "pairs": list(counts)},
    )


register_benchmark(
    "multidigits",
    build,
    description=DESCRIPTION,
    tasks=("left: cross-entropy; accuracy ↑", "right: cross-entropy; accuracy ↑"),
)
