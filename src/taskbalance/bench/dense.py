"""The dense tasks of NYUv2-style benchmarks: MTAN's losses, the field's metrics, DTP's KPIs.

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

from collections.abc import Sequence
from typing import Literal

from torch import Tensor
from torch.nn import functional

from taskbalance.bench.api import Metric, Task
from taskbalance.metrics import Accumulator, Reduction, nyuv2_metrics

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


class FieldMetrics(Metric):
    """Accumulators of :mod:`taskbalance.metrics` reported together as one benchmark Metric.

    Args:
        accumulators: e.g. ``[MeanIoU(13), PixelAccuracy(13)]``; their names and directions
            become this metric's.

    Example:
        >>> from taskbalance.metrics import DepthAbsError, DepthRelError
        >>> metric = FieldMetrics([DepthAbsError(), DepthRelError()])
        >>> metric.names, metric.higher_is_better
        (('depth_abs', 'depth_rel'), (False, False))
    """

    def __init__(self, accumulators: Sequence[Accumulator]) -> None:
        self.accumulators = list(accumulators)
        self.names = tuple(a.name for a in self.accumulators)
        self.higher_is_better = tuple(a.higher_is_better for a in self.accumulators)

    def reset(self) -> None:
        """Forget every batch."""
        for accumulator in self.accumulators:
            accumulator.reset()

    def update(self, output: Tensor, target: Tensor) -> None:
        """Add one batch to every accumulator."""
        for accumulator in self.accumulators:
            accumulator.update(output, target)

    def compute(self) -> list[float]:
        """One number per accumulator."""
        return [accumulator.compute() for accumulator in self.accumulators]


def segmentation_kpi(output: Tensor, target: Tensor, loss: Tensor) -> float:
    """DTP's KPI for segmentation: the batch's pixel accuracy over labelled pixels."""
    labels = target.long()
    labelled = (labels >= 0) & (labels < output.shape[1])
    if not bool(labelled.any()):
        return 0.0
    return float((output.argmax(1) == labels)[labelled].float().mean())


def depth_kpi(output: Tensor, target: Tensor, loss: Tensor) -> float:
    """DTP's KPI for depth: ``max(0, 1 − relative error)`` over the batch's valid pixels."""
    valid = _valid_pixels(target).bool().expand_as(target)
    if not bool(valid.any()):
        return 0.0
    # A KPI is a statistic of the batch, not part of the graph.
    relative = ((output.detach() - target).abs()[valid] / target[valid]).mean()
    return max(0.0, 1.0 - float(relative))


def normal_kpi(output: Tensor, target: Tensor, loss: Tensor) -> float:
    """DTP's KPI for normals: the mean cosine over valid pixels (``1 − loss``), clipped at 0."""
    return min(1.0, max(0.0, 1.0 - float(loss.detach())))


def dense_tasks(
    num_classes: int,
    normals: bool = True,
    reduction: Reduction = "pixel",
    empty_classes: Literal["nan", "ignore"] = "nan",
) -> tuple[Task, ...]:
    """NYUv2's tasks (segmentation, depth, normals) or Cityscapes' (without normals).

    Segmentation reports mIoU and pixel accuracy, depth the absolute and relative errors,
    normals the mean and median angle and the fractions within 11.25°, 22.5° and 30°: the nine
    numbers of the NYUv2 tables (seven on Cityscapes).

    Args:
        num_classes: segmentation classes.
        normals: include the surface-normal task.
        reduction: ``"pixel"`` (LibMTL) or ``"batch"`` (MTAN / Nash-MTL) for depth and normals.
        empty_classes: how mIoU treats a class absent from a split (see
            :class:`~taskbalance.metrics.MeanIoU`).

    Returns:
        The tasks, in the order of the model's heads.

    Example:
        >>> [task.name for task in dense_tasks(13)]
        ['segmentation', 'depth', 'normal']
    """
    segmentation, depth, normal = nyuv2_metrics(num_classes, reduction, empty_classes)
    tasks = [
        Task(
            "segmentation",
            segmentation_loss,
            (FieldMetrics(segmentation),),
            kind="classification",
            kpi=segmentation_kpi,
            description=f"{num_classes}-class segmentation (cross-entropy; mIoU, pixel acc)",
        ),
        Task(
            "depth",
            depth_loss,
            (FieldMetrics(depth),),
            kind="regression",
            kpi=depth_kpi,
            description="depth (L1 over valid pixels; abs and rel error)",
        ),
    ]
    if normals:
        tasks.append(
            Task(
                "normal",
                normal_loss,
                (FieldMetrics(normal),),
                kind="regression",
                kpi=normal_kpi,
                description="normals (1 − cosine; mean/median angle, within 11.25/22.5/30°)",
            )
        )
    return tuple(tasks)
