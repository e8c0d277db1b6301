"""Batch losses of the bundled benchmarks, as ``(output, target) -> 0-d tensor`` callables."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of ``[N, C]`` logits against class indices, the batch mean."""
    return functional.cross_entropy(output, target)


def binary_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy of ``[N, 1]`` logits against 0/1 labels ``[N]``, the batch mean."""
    return functional.binary_cross_entropy_with_logits(output.reshape(target.shape), target)


def mse(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error, the head's output reshaped to the target's shape."""
    return functional.mse_loss(output.reshape(target.shape), target)
