"""Data helpers shared by the bundled benchmarks: in-memory data sets, seeded splits, digits.

:class:`TensorTaskDataset` holds inputs and one target tensor per task in memory and hands a
``DataLoader`` whole batches at once (``__getitems__``), so in-memory benchmarks pay no
per-example collation; any other ``Dataset`` goes through the ``DataLoader``'s default collate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from taskbalance.bench.api import require_module

#: Evaluation batch size of the bundled in-memory benchmarks: a whole small split at once.
EVAL_BATCH_SIZE = 4096

#: Fractions of the source data given to train, validation and test.
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Collated:
    """A batch a data set built itself; :func:`collate` passes it through unchanged."""

    batch: tuple[Tensor, tuple[Tensor, ...]]


def collate(items: Any) -> Any:
    """The harness's ``collate_fn``: pre-built batches as they are, else the default collate."""
    if isinstance(items, Collated):
        return items.batch
    return default_collate(items)


class TensorTaskDataset(Dataset[tuple[Tensor, tuple[Tensor, ...]]]):
    """Inputs and one target tensor per task, all with the same first dimension N.

    Args:
        inputs: ``[N, ...]`` model inputs.
        targets: one ``[N, ...]`` tensor per task.
        source_ids: indices of the source items each example is made of, or None.

    Attribute ``clean_targets`` holds noise-free targets where a benchmark knows them.

    Example:
        >>> data = TensorTaskDataset(torch.zeros(4, 2), [torch.arange(4), torch.ones(4)])
        >>> x, (a, b) = data[1]
        >>> tuple(x.shape), int(a), float(b)
        ((2,), 1, 1.0)
    """

    def __init__(
        self, inputs: Tensor, targets: Sequence[Tensor], source_ids: Tensor | None = None
    ) -> None:
        count = int(inputs.shape[0])
        for index, target in enumerate(targets):
            if int(target.shape[0]) != count:
                raise ValueError(
                    f"targets[{index}]: expected first dimension {count}, got {tuple(target.shape)}"
                )
        self.inputs = inputs
        self.targets = tuple(targets)
        self.source_ids = source_ids
        self.clean_targets: tuple[Tensor, ...] | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self.inputs[index], tuple(target[index] for target in self.targets)

    def __getitems__(self, indices: Sequence[int]) -> Collated:
        positions = torch.as_tensor(indices, dtype=torch.long)
        return Collated(
            (self.inputs[positions], tuple(target[positions] for target in self.targets))
        )


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def split_indices(count: int, rng: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded permutation of ``range(count)`` cut into train/validation/test by
    :data:`SPLIT_FRACTIONS`.

    Args:
        count: number of source items.
        rng: the random generator.

    Returns:
        Three disjoint index tensors whose union is ``range(count)``.
    """
    order = torch.randperm(count, generator=rng)
    train_end = round(count * SPLIT_FRACTIONS[0])
    validation_end = train_end + round(count * SPLIT_FRACTIONS[1])
    return order[:train_end], order[train_end:validation_end], order[validation_end:]


def load_digits() -> tuple[Tensor, Tensor]:
    """The 1,797 sklearn digits as raw ``[N, 8, 8]`` pixel values in 0..16, and the labels."""
    datasets = require_module("sklearn.datasets")
    digits = datasets.load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return images, labels


@dataclass(frozen=True)
class DigitsSplit:
    """The sklearn digits split into train/validation/test pools by a data seed.

    Args:
        raw_images: ``[1797, 8, 8]`` pixel values in 0..16.
        images: the same scaled to [0, 1].
        labels: the digit of each image.
        pools: image indices of the train, validation and test splits.
        rng: the generator, advanced past the split (for what the benchmark draws next).
    """

    raw_images: Tensor
    images: Tensor
    labels: Tensor
    pools: tuple[Tensor, Tensor, Tensor]
    rng: torch.Generator


def split_digits(data_seed: int) -> DigitsSplit:
    """Load the digits and split the images 60/20/20 with a generator seeded by ``data_seed``."""
    raw_images, labels = load_digits()
    rng = generator(data_seed)
    pools = split_indices(raw_images.shape[0], rng)
    return DigitsSplit(raw_images, raw_images / 16.0, labels, pools, rng)
