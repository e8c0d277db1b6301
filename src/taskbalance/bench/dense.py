"""The dense tasks of NYUv2-style benchmarks: MTAN's losses and the invalid-pixel conventions.

Shared by ``scenes``, ``nyuv2`` and ``cityscapes``. Targets follow the preprocessed NYUv2 files
of MTAN / LibMTL / Nash-MTL: a label map ``[N, H, W]`` where anything outside
``[0, num_classes)`` (NYUv2's ``-1``, other loaders' ``255``) is unlabelled; depth
``[N, 1, H, W]`` with 0 for a missing measurement; unit normals ``[N, 3, H, W]`` with the zero
vector where there is none.

Losses, as MTAN's ``model_fit`` (used unchanged by Nash-MTL, CAGrad, FAMO and LibMTL):

- segmentation: pixel-wise cross-entropy over labelled pixels;
- depth: ``Σ |pred − gt|·mask / Σ mask``, the L1 error over valid pixels;
- normals: ``1 − Σ ⟨pred, gt⟩·mask / Σ mask``, one minus the mean cosine over valid pixels
  (the prediction is already unit length).

Departures: a batch without a single valid pixel gives a loss of 0 (depth) or 1 (normals), a
constant with zero gradient, where the reference divides by zero (NaN).

Example:
    >>> import torch
    >>> depth_loss(torch.ones(1, 1, 1, 2), torch.tensor([[[[3.0, 0.0]]]]))  # 2nd pixel missing
    tensor(2.)
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional

#: The label value the losses give to unlabelled pixels.
IGNORE_INDEX = -1


def _valid_pixels(target: Tensor) -> Tensor:
    """``[N, 1, ...]`` float mask of pixels where some channel of ``target`` is non-zero."""
    return (target != 0).any(dim=1, keepdim=True).to(target.dtype)


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over labelled pixels.

    Args:
        logits: ``[N, C, H, W]``.
        target: labels ``[N, H, W]`` (integer, or float holding integers); values outside
            ``[0, C)`` are unlabelled.

    Returns:
        The mean over labelled pixels (a 0-d tensor).

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 2, 1, 2)
        >>> round(float(segmentation_loss(logits, torch.tensor([[[1, 255]]]))), 4)  # log 2
        0.6931
    """
    labels = target.long()
    labelled = (labels >= 0) & (labels < logits.shape[1])
    labels = labels.masked_fill(~labelled, IGNORE_INDEX)
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1 depth error averaged over valid (non-zero) pixels.

    Args:
        pred: ``[N, 1, H, W]``.
        target: ``[N, 1, H, W]``, 0 for a missing measurement.

    Returns:
        ``Σ |pred − gt|·mask / Σ mask`` (a 0-d tensor).
    """
    mask = _valid_pixels(target)
    return ((pred - target).abs() * mask).sum() / mask.sum().clamp_min(1.0)


def normal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """One minus the mean cosine between unit predicted and true normals over valid pixels.

    Args:
        pred: unit normals ``[N, 3, H, W]``.
        target: unit normals ``[N, 3, H, W]``, the zero vector where there is none.

    Returns:
        ``1 − Σ ⟨pred, gt⟩·mask / Σ mask`` (a 0-d tensor).

    Example:
        >>> import torch
        >>> unit = torch.tensor([[[[1.0]], [[0.0]], [[0.0]]]])
        >>> float(normal_loss(unit, unit))
        0.0
    """
    mask = _valid_pixels(target)
    return 1.0 - (pred * target * mask).sum() / mask.sum().clamp_min(1.0)
