"""The field's evaluation metrics, accumulated over a whole split, and Δm%.

Every metric is a small accumulator: ``update(pred, target)`` once per batch, ``compute()`` at
the end of the split, ``reset()`` before the next one, and a ``direction`` (``"higher"`` or
``"lower"`` is better) that Δm% reads. They follow the reference code of the NYUv2 /
Cityscapes / CelebA comparisons (MTAN, LibMTL, Nash-MTL, FAMO) exactly, including its
conventions for invalid pixels:

- **Segmentation** (:class:`MeanIoU`, :class:`PixelAccuracy`): one confusion matrix over the
  split; a pixel counts only when its label is in ``[0, num_classes)``, so NYUv2's ``-1`` and the
  ``255`` of other loaders are both ignored. ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` and
  ``mIoU = mean_c IoU_c``; pixel accuracy is ``trace / total``. A class that is in neither the
  labels nor the predictions of the split has ``IoU = 0/0``: the reference code returns a NaN
  mIoU then (``empty_classes="nan"``, the default); ``"ignore"`` averages over the other classes.
- **Depth** (:class:`DepthAbsError`, :class:`DepthRelError`): ``|pred − gt|`` and
  ``|pred − gt| / gt`` over pixels whose ground truth is non-zero (zero depth = missing
  measurement). ``reduction="pixel"`` (default, LibMTL) averages over every valid pixel of the
  split; ``"batch"`` averages per batch first and then over batches, as the MTAN and Nash-MTL
  training scripts do (their numbers depend on the batch size).
- **Surface normals** (:class:`NormalMeanAngle`, :class:`NormalMedianAngle`,
  :class:`NormalWithinAngle`): the angle in degrees between the L2-normalised prediction and the
  ground truth, over pixels whose ground-truth normal is not the zero vector; the mean, the
  median, and the fraction of pixels with an angle strictly below 11.25°, 22.5° or 30°.
  Reductions as for depth (LibMTL: over the split; MTAN/Nash-MTL: mean of per-batch values).
- **Binary attributes** (:class:`BinaryAccuracy`, :class:`BinaryF1`): FAMO's CelebA metric is the
  F1 score from TP/FP/FN counted over the split, ``P = TP/(TP+FP+ε)``, ``R = TP/(TP+FN+ε)``,
  ``F1 = 2PR/(P+R+ε)``, ``ε = 1e-8``; with several columns the mean over columns.

Fractions (mIoU, pixel accuracy, within-angle, F1) are in ``[0, 1]`` as the reference code
returns them; the papers' tables print them ×100. Δm% is scale-free, so this does not change it.

Departures: a ground-truth normal is invalid when *every* channel is zero; the reference tests
``sum over channels == 0``, which also drops a valid normal whose components sum to exactly zero
(e.g. ``(0.6, 0, −0.6)`` after normalisation). A depth value is invalid when it is zero, entry by
entry, which for the reference's ``[N, 1, H, W]`` maps is its ``sum over channels == 0`` exactly
and also holds for maps without a channel axis (``[N, H, W]``). The prediction of the normal
metrics is divided by ``max(‖pred‖, 1e-12)`` rather than ``‖pred‖`` so a zero prediction gives
a 90° error instead of NaN.

Example:
    >>> import torch
    >>> miou = MeanIoU(num_classes=2)
    >>> miou.update(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, -1]]))
    >>> miou.compute(), miou.direction
    (1.0, 'higher')
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import Literal

import torch
from torch import Tensor

Direction = Literal["higher", "lower"]
Reduction = Literal["pixel", "batch"]

#: The ε of FAMO's CelebA F1 (and of its precision and recall).
F1_EPS = 1e-8

#: NYUv2's thresholds for the fraction of normals within an angle, in degrees.
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)


def _check_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_reduction(reduction: str) -> None:
    if reduction not in ("pixel", "batch"):
        raise ValueError(f"reduction must be 'pixel' or 'batch', got {reduction!r}")


def _check_same_shape(pred: Tensor, target: Tensor, what: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"{what}: pred and target must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )


def _channel_valid(target: Tensor) -> Tensor:
    """Pixels of a ``[N, C, ...]`` ground truth where some channel is non-zero: ``[N, ...]``."""
    return (target != 0).any(dim=1)


class Accumulator(ABC):
    """Base of the accumulators: one number from a whole split.

    Subclasses set ``name`` and ``direction`` and implement ``update``, ``compute`` and
    ``reset``.

    Attributes:
        name: short metric name, e.g. ``"miou"``.
        direction: ``"higher"`` or ``"lower"``: which values are better.
    """

    name: str = "metric"
    direction: Direction = "higher"

    @property
    def higher_is_better(self) -> bool:
        """``True`` when higher values are better (δ_m = 1 in Δm%)."""
        return self.direction == "higher"

    @abstractmethod
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch."""

    @abstractmethod
    def compute(self) -> float:
        """The metric over every batch added since the last reset."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every batch."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, direction={self.direction!r})"


class ConfusionMatrix:
    """Counts ``[true class, predicted class]`` over a split, ignoring labels out of range.

    Args:
        num_classes: number of classes C.

    Example:
        >>> import torch
        >>> matrix = ConfusionMatrix(2)
        >>> matrix.update(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 255]))
        >>> matrix.counts.tolist()
        [[1, 1], [0, 0]]
    """

    def __init__(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            pred: logits ``[N, C, ...]`` (the arg-max over dim 1 is taken) or class indices of
                ``target``'s shape.
            target: class labels ``[N, ...]`` (integer, or float holding integers as in the
                NYUv2 files); labels outside ``[0, C)`` are ignored.
        """
        _check_tensor(pred, "pred")
        _check_tensor(target, "target")
        if pred.dim() == target.dim() + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"pred has {pred.shape[1]} class channels, expected num_classes="
                    f"{self.num_classes}"
                )
            pred = pred.argmax(dim=1)
        _check_same_shape(pred, target, "segmentation")
        labels = target.detach().long()
        predicted = pred.detach().long()
        keep = (labels >= 0) & (labels < self.num_classes)
        if predicted[keep].numel() and (
            predicted[keep].min() < 0 or predicted[keep].max() >= self.num_classes
        ):
            raise ValueError(f"predicted classes must be in [0, {self.num_classes})")
        index = labels[keep] * self.num_classes + predicted[keep]
        batch = torch.bincount(index, minlength=self.num_classes**2)
        self.counts = self.counts.to(batch.device) + batch.reshape(
            self.num_classes, self.num_classes
        )

    def reset(self) -> None:
        """Set every count to zero."""
        self.counts = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def iou(self) -> Tensor:
        """Per-class IoU ``TP / (TP + FP + FN)``, NaN for a class absent from both axes."""
        counts = self.counts.double()
        true_positive = counts.diagonal()
        union = counts.sum(0) + counts.sum(1) - true_positive
        return true_positive / union

    def accuracy(self) -> float:
        """Pixel accuracy ``trace / total`` (NaN when nothing was counted)."""
        counts = self.counts.double()
        return float(counts.diagonal().sum() / counts.sum())


class MeanIoU(Accumulator):
    """Mean intersection over union from a confusion matrix over the split (higher is better).

    Args:
        num_classes: number of classes C; labels outside ``[0, C)`` are ignored.
        empty_classes: a class in neither labels nor predictions: ``"nan"`` makes the mIoU NaN
            (the reference code's ``mean`` of a 0/0); ``"ignore"`` leaves it out of the mean.

    Example:
        >>> import torch
        >>> miou = MeanIoU(3, empty_classes="ignore")  # class 2 never occurs
        >>> miou.update(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
        >>> round(miou.compute(), 4)  # IoU 1/2 and 1/2
        0.5
    """

    name = "miou"
    direction: Direction = "higher"

    def __init__(self, num_classes: int, empty_classes: Literal["nan", "ignore"] = "nan") -> None:
        if empty_classes not in ("nan", "ignore"):
            raise ValueError(f"empty_classes must be 'nan' or 'ignore', got {empty_classes!r}")
        self.matrix = ConfusionMatrix(num_classes)
        self.empty_classes = empty_classes

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch (see :meth:`ConfusionMatrix.update`)."""
        self.matrix.update(pred, target)

    def compute(self) -> float:
        """The mean IoU over classes."""
        iou = self.matrix.iou()
        if self.empty_classes == "ignore":
            iou = iou[~torch.isnan(iou)]
            if iou.numel() == 0:
                return math.nan
        return float(iou.mean())

    def reset(self) -> None:
        """Forget every batch."""
        self.matrix.reset()


class PixelAccuracy(Accumulator):
    """Fraction of labelled pixels predicted correctly, over the split (higher is better).

    Args:
        num_classes: number of classes C; labels outside ``[0, C)`` are ignored.

    Example:
        >>> import torch
        >>> accuracy = PixelAccuracy(2)
        >>> accuracy.update(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1]))
        >>> round(accuracy.compute(), 4)
        0.6667
    """

    name = "pixel_acc"
    direction: Direction = "higher"

    def __init__(self, num_classes: int) -> None:
        self.matrix = ConfusionMatrix(num_classes)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch (see :meth:`ConfusionMatrix.update`)."""
        self.matrix.update(pred, target)

    def compute(self) -> float:
        """Correct / counted pixels."""
        return self.matrix.accuracy()

    def reset(self) -> None:
        """Forget every batch."""
        self.matrix.reset()


class _MaskedMean(Accumulator):
    """A per-pixel error averaged over valid pixels, by pixel or by batch."""

    def __init__(self, reduction: Reduction = "pixel") -> None:
        _check_reduction(reduction)
        self.reduction = reduction
        self.reset()

    def reset(self) -> None:
        """Forget every batch."""
        self._total = 0.0
        self._count = 0
        self._batch_means: list[float] = []

    def _add(self, errors: Tensor) -> None:
        total = float(errors.sum())
        count = errors.numel()
        self._total += total
        self._count += count
        # The reference divides by the batch's valid-pixel count even when it is 0 (NaN).
        self._batch_means.append(total / count if count else math.nan)

    def compute(self) -> float:
        """The mean over valid pixels (``"pixel"``) or of the per-batch means (``"batch"``)."""
        if self.reduction == "batch":
            if not self._batch_means:
                return math.nan
            return sum(self._batch_means) / len(self._batch_means)
        return self._total / self._count if self._count else math.nan


class _DepthError(_MaskedMean):
    direction: Direction = "lower"

    @abstractmethod
    def _errors(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-pixel errors at the valid pixels."""

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            pred: predicted depth, ``[N, 1, H, W]`` (or any shape equal to ``target``'s, e.g.
                ``[N, H, W]``).
            target: ground-truth depth of the same shape; 0 marks a missing measurement, entry
                by entry.
        """
        _check_tensor(pred, "pred")
        _check_tensor(target, "target")
        _check_same_shape(pred, target, self.name)
        pred = pred.detach().double()
        target = target.detach().double()
        # Entry by entry, not "some channel non-zero": without a channel axis, axis 1 is an
        # image axis, and a zero-depth pixel would count whenever its column had any depth.
        valid = target != 0
        self._add(self._errors(pred[valid], target[valid]))


class DepthAbsError(_DepthError):
    """Mean absolute depth error ``|pred − gt|`` over valid (non-zero) pixels (lower is better).

    Args:
        reduction: ``"pixel"`` (over every valid pixel of the split, LibMTL) or ``"batch"``
            (mean of per-batch means, MTAN / Nash-MTL).

    Example:
        >>> import torch
        >>> error = DepthAbsError()
        >>> error.update(torch.tensor([[[[1.0, 5.0]]]]), torch.tensor([[[[2.0, 0.0]]]]))
        >>> error.compute()  # the zero-depth pixel is skipped
        1.0
    """

    name = "depth_abs"

    def _errors(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs()


class DepthRelError(_DepthError):
    """Mean relative depth error ``|pred − gt| / gt`` over valid pixels (lower is better).

    Args:
        reduction: ``"pixel"`` (LibMTL) or ``"batch"`` (MTAN / Nash-MTL).

    Example:
        >>> import torch
        >>> error = DepthRelError()
        >>> error.update(torch.tensor([[[[1.0, 5.0]]]]), torch.tensor([[[[2.0, 0.0]]]]))
        >>> error.compute()
        0.5
    """

    name = "depth_rel"

    def _errors(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs() / target


def normal_angles(pred: Tensor, target: Tensor) -> Tensor:
    """Angles in degrees between predicted and ground-truth normals at valid pixels.

    Args:
        pred: predicted normals ``[N, 3, ...]``; L2-normalised here.
        target: unit ground-truth normals of the same shape; the zero vector marks an invalid
            pixel.

    Returns:
        A 1-D tensor with one angle per valid pixel, in the inputs' precision (at least
        float32).

    Example:
        >>> import torch
        >>> pred = torch.tensor([[[1.0], [0.0], [0.0]]])  # one pixel, normal +x
        >>> normal_angles(pred, torch.tensor([[[0.0], [1.0], [0.0]]])).tolist()
        [90.0]
    """
    _check_tensor(pred, "pred")
    _check_tensor(target, "target")
    _check_same_shape(pred, target, "normals")
    if target.dim() < 2:
        raise ValueError(f"normals: expected [N, 3, ...] tensors, got {target.dim()}-d")
    # The precision of the inputs (float32 in the reference code), at 1/5 the cost of float64.
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    pred = pred.detach().to(dtype)
    target = target.detach().to(dtype)
    valid = _channel_valid(target)
    dot = (pred * target).sum(dim=1)[valid]
    length = (pred * pred).sum(dim=1)[valid].sqrt().clamp_min(1e-12)
    return torch.rad2deg(torch.acos((dot / length).clamp(-1.0, 1.0)))


class _NormalMetric(Accumulator):
    def __init__(self, reduction: Reduction = "pixel") -> None:
        _check_reduction(reduction)
        self.reduction = reduction
        self.reset()

    def reset(self) -> None:
        """Forget every batch."""
        self._angles: list[Tensor] = []

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            pred: predicted normals ``[N, 3, H, W]`` (normalised here).
            target: unit ground-truth normals ``[N, 3, H, W]``; zero vectors are invalid.
        """
        self._angles.append(normal_angles(pred, target).float().cpu())

    @abstractmethod
    def _statistic(self, angles: Tensor) -> float:
        """The metric of a set of angles (degrees)."""

    def compute(self) -> float:
        """The statistic over the split's valid pixels, or the mean of per-batch values."""
        if not self._angles:
            return math.nan
        if self.reduction == "batch":
            values = [self._statistic(angles) for angles in self._angles]
            return sum(values) / len(values)
        return self._statistic(torch.cat(self._angles))


class NormalMeanAngle(_NormalMetric):
    """Mean angular error of surface normals in degrees, over valid pixels (lower is better).

    Args:
        reduction: ``"pixel"`` (LibMTL) or ``"batch"`` (MTAN / Nash-MTL).

    Example:
        >>> import torch
        >>> metric = NormalMeanAngle()
        >>> target = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]])  # 2nd pixel invalid
        >>> metric.update(torch.tensor([[[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]]), target)
        >>> round(metric.compute(), 6)
        45.0
    """

    name = "normal_mean"
    direction: Direction = "lower"

    def _statistic(self, angles: Tensor) -> float:
        return float(angles.mean()) if angles.numel() else math.nan


class NormalMedianAngle(_NormalMetric):
    """Median angular error of surface normals in degrees (lower is better).

    The median of an even count is the mean of the two middle values (``numpy.median``, which
    the reference code calls). With ``reduction="pixel"`` every valid angle of the split is kept
    until :meth:`compute` (4 bytes per pixel, on the CPU), as LibMTL does.

    Args:
        reduction: ``"pixel"`` (LibMTL) or ``"batch"`` (MTAN / Nash-MTL: mean of batch medians).

    Example:
        >>> import torch
        >>> metric = NormalMedianAngle()
        >>> pred = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
        >>> metric.update(pred, torch.tensor([[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]]))
        >>> round(metric.compute(), 6)  # angles 0° and 45°
        22.5
    """

    name = "normal_median"
    direction: Direction = "lower"

    def _statistic(self, angles: Tensor) -> float:
        count = angles.numel()
        if count == 0:
            return math.nan
        middle = count // 2
        upper = float(torch.kthvalue(angles, middle + 1).values)
        if count % 2:
            return upper
        return (float(torch.kthvalue(angles, middle).values) + upper) / 2


class NormalWithinAngle(_NormalMetric):
    """Fraction of valid pixels whose normal error is strictly below a threshold (higher).

    Args:
        threshold: the angle in degrees (NYUv2: 11.25, 22.5 or 30).
        reduction: ``"pixel"`` (LibMTL) or ``"batch"`` (MTAN / Nash-MTL).

    Example:
        >>> import torch
        >>> metric = NormalWithinAngle(30.0)
        >>> pred = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
        >>> metric.update(pred, torch.tensor([[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]]))
        >>> metric.compute(), metric.name
        (0.5, 'normal_within_30')
    """

    direction: Direction = "higher"

    def __init__(self, threshold: float, reduction: Reduction = "pixel") -> None:
        if (
            isinstance(threshold, bool)  # True is an int: it would pass as 1 degree
            or not isinstance(threshold, (int, float))
            or not 0 < threshold <= 180
        ):
            raise ValueError(f"threshold must be an angle in (0, 180] degrees, got {threshold!r}")
        self.threshold = float(threshold)
        self.name = f"normal_within_{threshold:g}"
        super().__init__(reduction)

    def _statistic(self, angles: Tensor) -> float:
        if angles.numel() == 0:
            return math.nan
        return float((angles < self.threshold).double().mean())


class _BinaryCounts(Accumulator):
    direction: Direction = "higher"

    def __init__(self, logits: bool = True) -> None:
        self.logits = logits
        self.reset()

    def reset(self) -> None:
        """Forget every batch."""
        # Rows TP, FP, FN, TN; one column per attribute.
        self._counts: Tensor | None = None

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            pred: logits (``logits=True``, positive when > 0) or probabilities (> 0.5), shape
                ``[N]`` or ``[N, A]`` for A attributes.
            target: 0/1 labels of the same shape.
        """
        _check_tensor(pred, "pred")
        _check_tensor(target, "target")
        _check_same_shape(pred, target, self.name)
        if pred.dim() not in (1, 2):
            raise ValueError(
                f"pred: expected shape [N] or [N, A] (A attributes), got {tuple(pred.shape)}"
            )
        columns = 1 if pred.dim() == 1 else pred.shape[1]
        if self._counts is not None and self._counts.shape[1] != columns:
            raise ValueError(
                f"pred: expected {self._counts.shape[1]} attribute column(s), as in the "
                f"earlier batches of this split, got shape {tuple(pred.shape)}"
            )
        positive = pred.detach() > (0.0 if self.logits else 0.5)
        truth = target.detach() > 0.5
        if positive.dim() == 1:
            positive, truth = positive.unsqueeze(1), truth.unsqueeze(1)
        counts = (
            torch.stack(
                [positive & truth, positive & ~truth, ~positive & truth, ~positive & ~truth]
            )
            .sum(1)
            .double()
        )
        self._counts = counts if self._counts is None else self._counts + counts


class BinaryAccuracy(_BinaryCounts):
    """Fraction of correct binary predictions over the split (higher is better).

    Args:
        logits: ``True`` when predictions are logits (threshold 0), ``False`` for
            probabilities (threshold 0.5).

    Example:
        >>> import torch
        >>> accuracy = BinaryAccuracy()
        >>> accuracy.update(torch.tensor([2.0, -1.0, 3.0]), torch.tensor([1.0, 1.0, 1.0]))
        >>> round(accuracy.compute(), 4)
        0.6667
    """

    name = "accuracy"

    def compute(self) -> float:
        """Correct / total, averaged over attribute columns."""
        if self._counts is None:
            return math.nan
        tp, fp, fn, tn = self._counts
        return float(((tp + tn) / (tp + fp + fn + tn)).mean())


class BinaryF1(_BinaryCounts):
    """F1 score from TP/FP/FN counted over the split, FAMO's CelebA metric (higher is better).

    ``P = TP/(TP+FP+ε)``, ``R = TP/(TP+FN+ε)``, ``F1 = 2PR/(P+R+ε)`` with ``ε = 1e-8``; with
    several attribute columns, the mean F1 over columns.

    Args:
        logits: ``True`` when predictions are logits (threshold 0), ``False`` for
            probabilities (threshold 0.5, as FAMO's sigmoid outputs).

    Example:
        >>> import torch
        >>> f1 = BinaryF1()
        >>> f1.update(torch.tensor([2.0, -1.0, 3.0, 1.0]), torch.tensor([1.0, 1.0, 0.0, 1.0]))
        >>> round(f1.compute(), 4)  # P = 2/3, R = 2/3
        0.6667
    """

    name = "f1"

    def compute(self) -> float:
        """Mean F1 over attribute columns."""
        if self._counts is None:
            return math.nan
        tp, fp, fn, _ = self._counts
        precision = tp / (tp + fp + F1_EPS)
        recall = tp / (tp + fn + F1_EPS)
        return float((2 * precision * recall / (precision + recall + F1_EPS)).mean())


def nyuv2_metrics(
    num_classes: int = 13,
    reduction: Reduction = "pixel",
    empty_classes: Literal["nan", "ignore"] = "nan",
) -> tuple[list[Accumulator], list[Accumulator], list[Accumulator]]:
    """The nine NYUv2 metrics, grouped by task: segmentation, depth, normals.

    Args:
        num_classes: segmentation classes (13 on NYUv2, 7 or 19 on Cityscapes).
        reduction: ``"pixel"`` (LibMTL) or ``"batch"`` (MTAN / Nash-MTL) for depth and normals.
        empty_classes: see :class:`MeanIoU`.

    Returns:
        ``([mIoU, pixel acc], [abs err, rel err], [mean, median, <11.25°, <22.5°, <30°])``.

    Example:
        >>> seg, depth, normal = nyuv2_metrics()
        >>> [m.name for m in seg + depth + normal][:4]
        ['miou', 'pixel_acc', 'depth_abs', 'depth_rel']
    """
    segmentation: list[Accumulator] = [
        MeanIoU(num_classes, empty_classes=empty_classes),
        PixelAccuracy(num_classes),
    ]
    depth: list[Accumulator] = [DepthAbsError(reduction), DepthRelError(reduction)]
    normal: list[Accumulator] = [NormalMeanAngle(reduction), NormalMedianAngle(reduction)]
    normal += [NormalWithinAngle(threshold, reduction) for threshold in NORMAL_THRESHOLDS]
    return segmentation, depth, normal


def _as_higher(direction: object, index: int) -> bool:
    if isinstance(direction, bool):
        return direction
    if direction in ("higher", "lower"):
        return direction == "higher"
    raise ValueError(f"directions[{index}] must be 'higher', 'lower' or a bool, got {direction!r}")


def delta_m(
    values: Sequence[float],
    baselines: Sequence[float],
    directions: Sequence[Direction | bool],
    tasks: Sequence[Hashable] | None = None,
    *,
    on_zero_baseline: Literal["raise", "nan"] = "raise",
) -> float:
    """Δm% (Maninis et al., CVPR 2019) of a model against single-task baselines; lower is better.

    ``Δm = (1/M)·Σ_m (−1)^{δ_m}·(M_m − B_m)/|B_m|·100`` over all M metrics, ``δ_m = 1`` where
    higher is better: the formula of the MTAN, Nash-MTL, FAMO and Aligned-MTL tables. With
    ``tasks`` (one task label per metric) each task's metrics are averaged first and then the
    tasks: LibMTL's ``Δp``, which is ``−Δm`` of that task-averaged form (LibMTL reports
    improvements, higher is better).

    Each term is divided by ``|B_m|``: the published metrics are all positive, where the two
    agree, but a negative baseline (an R², a log-likelihood) divided by itself would flip the
    term's sign, so that a better model read as worse. A baseline of exactly 0 leaves Δm%
    undefined; no metric is dropped and no ε is added, since either would change the number
    silently.

    Args:
        values: the model's value of each metric.
        baselines: the single-task baseline of each metric.
        directions: each metric's direction: ``"higher"``/``"lower"`` or a bool (True = higher).
        tasks: optional task label of each metric, for the task-averaged form.
        on_zero_baseline: ``"raise"`` (default) raises on a zero baseline; ``"nan"`` returns
            NaN instead, for callers that report many Δm% and say themselves which one was
            undefined (the benchmark suite does).

    Returns:
        Δm in percent; NaN when any value or baseline is NaN, or a baseline is 0 under
        ``on_zero_baseline="nan"``.

    Raises:
        ValueError: empty or unequal lengths, a bad direction or ``on_zero_baseline``, or a
            zero baseline under ``on_zero_baseline="raise"``.

    Example:
        >>> round(delta_m([0.9, 2.0], [1.0, 1.0], ["higher", "lower"]), 6)  # (10% + 100%) / 2
        55.0
        >>> round(delta_m([0.9, 2.0, 1.0], [1.0, 1.0, 1.0], [True, False, False], [0, 0, 1]), 6)
        27.5
        >>> delta_m([0.9, 2.0], [0.0, 1.0], [True, False], on_zero_baseline="nan")
        nan
        >>> round(delta_m([0.1], [-0.2], ["higher"]), 6)  # an R² of 0.1 against -0.2: better
        -150.0
    """
    if on_zero_baseline not in ("raise", "nan"):
        raise ValueError(
            f"delta_m: on_zero_baseline must be 'raise' or 'nan', got {on_zero_baseline!r}"
        )
    count = len(values)
    if count == 0 or len(baselines) != count or len(directions) != count:
        raise ValueError(
            "delta_m: values, baselines and directions must be non-empty and of equal length, "
            f"got {count}, {len(baselines)}, {len(directions)}"
        )
    if tasks is not None and len(tasks) != count:
        raise ValueError(f"delta_m: tasks must have {count} labels, got {len(tasks)}")
    highers = [_as_higher(direction, index) for index, direction in enumerate(directions)]
    zero = [index for index, baseline in enumerate(baselines) if baseline == 0]
    if zero:
        if on_zero_baseline == "raise":
            raise ValueError(
                f"delta_m: baselines[{zero[0]}] is 0; Δm% divides by it "
                "(on_zero_baseline='nan' returns NaN instead)"
            )
        return math.nan
    relative = [
        (-1.0 if higher else 1.0) * (float(value) - float(baseline)) / abs(float(baseline))
        for value, baseline, higher in zip(values, baselines, highers, strict=True)
    ]
    if tasks is None:
        return 100.0 * sum(relative) / count
    groups: dict[Hashable, list[float]] = {}
    for label, term in zip(tasks, relative, strict=True):
        groups.setdefault(label, []).append(term)
    return 100.0 * sum(sum(g) / len(g) for g in groups.values()) / len(groups)


__all__ = [
    "NORMAL_THRESHOLDS",
    "Accumulator",
    "BinaryAccuracy",
    "BinaryF1",
    "ConfusionMatrix",
    "DepthAbsError",
    "DepthRelError",
    "Direction",
    "MeanIoU",
    "NormalMeanAngle",
    "NormalMedianAngle",
    "NormalWithinAngle",
    "PixelAccuracy",
    "delta_m",
    "normal_angles",
    "nyuv2_metrics",
]
