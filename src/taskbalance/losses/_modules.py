"""``nn.Module`` wrappers: one per loss function, holding its options.

Each class validates its options at construction (so a bad ``delta`` fails when the model is
built, not at the first batch) and its ``forward`` calls the matching function. Tensor options
(class weights) are registered as buffers so that ``.to(device)`` moves them with the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from taskbalance._precision import opmath_dtype
from taskbalance._validation import (
    check_bool,
    check_choice,
    check_floating,
    check_in_range,
    check_int,
    check_nonnegative,
    check_nonnegative_entries,
    check_optional_int,
    check_positive,
)
from taskbalance.losses._classification import (
    binary_cross_entropy,
    check_dice_weight,
    cross_entropy,
    dice_loss,
    focal_loss,
)
from taskbalance.losses._common import (
    Reduction,
    check_reduction,
)
from taskbalance.losses._distances import (
    FeatureExtractor,
    frechet_distance,
    kl_divergence,
    perceptual_loss,
    wasserstein_1d,
)
from taskbalance.losses._regression import (
    TUKEY_C,
    absolute_error,
    bbox_kl_loss,
    gaussian_nll_loss,
    huber_loss,
    squared_error,
    tukey_loss,
)


def _check_class_vector(name: str, value: Tensor | None) -> None:
    """A per-class tensor option: floating point and 1-D; its length ``C`` waits for the input."""
    if value is None:
        return
    check_floating(name, value)
    if value.dim() != 1:
        raise ValueError(
            f"{name}: expected shape (C,) (one entry per class), got shape {tuple(value.shape)}"
        )


class _Loss(nn.Module):
    def __init__(self, reduction: Reduction) -> None:
        super().__init__()
        check_reduction(reduction)
        self.reduction: Reduction = reduction

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class SquaredErrorLoss(_Loss):
    """Module form of :func:`squared_error`.

    Example:
        >>> import torch
        >>> SquaredErrorLoss()(torch.tensor([1.0, 2.0]), torch.zeros(2))
        tensor(2.5000)
    """

    def __init__(self, *, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return squared_error(input, target, reduction=self.reduction)


class AbsoluteErrorLoss(_Loss):
    """Module form of :func:`absolute_error`.

    Example:
        >>> import torch
        >>> AbsoluteErrorLoss(reduction="sum")(torch.tensor([1.0, -3.0]), torch.zeros(2))
        tensor(4.)
    """

    def __init__(self, *, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return absolute_error(input, target, reduction=self.reduction)


class HuberLoss(_Loss):
    """Module form of :func:`huber_loss` (Huber, 1964).

    Example:
        >>> import torch
        >>> HuberLoss(delta=1.0, reduction="none")(torch.tensor([0.5, 3.0]), torch.zeros(2))
        tensor([0.1250, 2.5000])
    """

    def __init__(self, *, delta: float = 1.0, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)
        check_positive("delta", delta)
        self.delta = delta

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return huber_loss(input, target, delta=self.delta, reduction=self.reduction)


class TukeyLoss(_Loss):
    """Module form of :func:`tukey_loss` (Belagiannis et al., ICCV 2015).

    Example:
        >>> import torch
        >>> loss = TukeyLoss(mad_scaling=True)
        >>> loss(torch.tensor([0.1, -0.2, 0.3, 50.0]), torch.zeros(4)).item() < 4.685**2 / 6
        True
    """

    def __init__(
        self,
        *,
        c: float = TUKEY_C,
        mad_scaling: bool = False,
        mad_dim: int | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(reduction)
        check_positive("c", c)
        self.c = c
        self.mad_scaling = check_bool("mad_scaling", mad_scaling)
        self.mad_dim = check_optional_int("mad_dim", mad_dim)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return tukey_loss(
            input,
            target,
            c=self.c,
            mad_scaling=self.mad_scaling,
            mad_dim=self.mad_dim,
            reduction=self.reduction,
        )


class BinaryCrossEntropyLoss(_Loss):
    """Module form of :func:`binary_cross_entropy`.

    Example:
        >>> import torch
        >>> loss = BinaryCrossEntropyLoss(from_logits=True)
        >>> round(loss(torch.zeros(3), torch.ones(3)).item(), 4)  # log 2
        0.6931
    """

    def __init__(
        self,
        *,
        from_logits: bool = False,
        weight: Tensor | None = None,
        pos_weight: Tensor | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(reduction)
        if weight is not None:
            check_floating("weight", weight)
        if pos_weight is not None:
            check_floating("pos_weight", pos_weight)
        self.from_logits = check_bool("from_logits", from_logits)
        self.weight: Tensor | None
        self.pos_weight: Tensor | None
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy(
            input,
            target,
            from_logits=self.from_logits,
            weight=self.weight,
            pos_weight=self.pos_weight,
            reduction=self.reduction,
        )


class CrossEntropyLoss(_Loss):
    """Module form of :func:`cross_entropy`.

    Example:
        >>> import torch
        >>> loss = CrossEntropyLoss(label_smoothing=0.1)
        >>> loss(torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([0])).item() > 0
        True
    """

    def __init__(
        self,
        *,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(reduction)
        check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)
        _check_class_vector("weight", weight)
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.label_smoothing = label_smoothing
        self.weight: Tensor | None
        self.register_buffer("weight", weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )


class FocalLoss(_Loss):
    """Module form of :func:`focal_loss` (Lin et al., ICCV 2017).

    Example:
        >>> import torch
        >>> loss = FocalLoss(gamma=2.0, alpha=0.25)
        >>> loss(torch.tensor([4.0, -4.0]), torch.tensor([1.0, 0.0])).item() < 1e-4
        True
    """

    def __init__(
        self,
        *,
        gamma: float = 2.0,
        alpha: float | Tensor | None = None,
        ignore_index: int | None = -100,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(reduction)
        check_nonnegative("gamma", gamma)
        if isinstance(alpha, Tensor):
            _check_class_vector("alpha", alpha)
            check_nonnegative_entries("alpha", alpha)
        elif alpha is not None:
            # A float alpha is the binary form; only whether the input is binary must wait.
            check_in_range("alpha", alpha, 0.0, 1.0)
        self.gamma = gamma
        self.ignore_index = check_optional_int("ignore_index", ignore_index)
        self.alpha: float | Tensor | None
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return focal_loss(
            input,
            target,
            gamma=self.gamma,
            alpha=self.alpha,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )


class DiceLoss(_Loss):
    """Module form of :func:`dice_loss`.

    Example:
        >>> import torch
        >>> mask = torch.tensor([[1.0, 0.0, 1.0]])
        >>> DiceLoss()(mask, mask)
        tensor(0.)
    """

    def __init__(
        self,
        *,
        multiclass: bool = False,
        from_logits: bool = False,
        smooth: float = 1.0,
        weight: Tensor | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(reduction)
        self.multiclass = check_bool("multiclass", multiclass)
        self.from_logits = check_bool("from_logits", from_logits)
        check_nonnegative("smooth", smooth)
        if weight is not None and not multiclass:
            raise ValueError("weight: expected None (per-class weights need multiclass=True)")
        _check_class_vector("weight", weight)
        if weight is not None:
            check_dice_weight(weight, opmath_dtype(weight.dtype))
        self.smooth = smooth
        self.weight: Tensor | None
        self.register_buffer("weight", weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return dice_loss(
            input,
            target,
            multiclass=self.multiclass,
            from_logits=self.from_logits,
            smooth=self.smooth,
            weight=self.weight,
            reduction=self.reduction,
        )


class PerceptualLoss(_Loss):
    """Module form of :func:`perceptual_loss` (Johnson et al., ECCV 2016).

    The extractor is registered as a submodule when it is an ``nn.Module`` (so ``.to()`` moves
    it); freeze it (``requires_grad_(False)``, ``eval()``) if it is not meant to be trained.

    Example:
        >>> import torch
        >>> extractor = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> loss = PerceptualLoss(extractor, layers=["0", "1"])
        >>> x = torch.randn(2, 4)
        >>> loss(x, x).item()
        0.0
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        *,
        layers: Sequence[str] | None = None,
        layer_weights: Sequence[float] | None = None,
        distance: Literal["squared", "absolute"] = "squared",
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(reduction)
        check_choice("distance", distance, ("squared", "absolute"))
        if layers is not None and layer_weights is not None and len(layers) != len(layer_weights):
            raise ValueError(
                f"layer_weights: expected one entry per layer ({len(layers)}), got "
                f"{len(layer_weights)} entries"
            )
        self.extractor = extractor
        self.layers = None if layers is None else list(layers)
        self.layer_weights = None if layer_weights is None else list(layer_weights)
        self.distance: Literal["squared", "absolute"] = distance

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return perceptual_loss(
            input,
            target,
            extractor=self.extractor,
            layers=self.layers,
            layer_weights=self.layer_weights,
            distance=self.distance,
            reduction=self.reduction,
        )


class GaussianNLLLoss(_Loss):
    """Module form of :func:`gaussian_nll_loss` (Kendall & Gal, NeurIPS 2017).

    Example:
        >>> import torch
        >>> GaussianNLLLoss()(torch.zeros(1), torch.ones(1), log_variance=torch.zeros(1))
        tensor(0.5000)
    """

    def __init__(self, *, full: bool = False, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)
        self.full = check_bool("full", full)

    def forward(self, input: Tensor, target: Tensor, *, log_variance: Tensor) -> Tensor:
        return gaussian_nll_loss(
            input, target, log_variance=log_variance, full=self.full, reduction=self.reduction
        )


class BBoxKLLoss(_Loss):
    """Module form of :func:`bbox_kl_loss` (He et al., CVPR 2019).

    Example:
        >>> import torch
        >>> BBoxKLLoss()(torch.tensor([0.5]), torch.zeros(1), log_variance=torch.zeros(1))
        tensor(0.1250)
    """

    def __init__(self, *, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)

    def forward(self, input: Tensor, target: Tensor, *, log_variance: Tensor) -> Tensor:
        return bbox_kl_loss(input, target, log_variance=log_variance, reduction=self.reduction)


class KLDivergenceLoss(_Loss):
    """Module form of :func:`kl_divergence`: ``KL(target‖input)``.

    Example:
        >>> import torch
        >>> p = torch.tensor([[0.5, 0.5]])
        >>> KLDivergenceLoss(from_logits=True)(torch.zeros(1, 2), p)
        tensor(0.)
    """

    def __init__(
        self, *, from_logits: bool = False, dim: int = -1, reduction: Reduction = "mean"
    ) -> None:
        super().__init__(reduction)
        self.from_logits = check_bool("from_logits", from_logits)
        self.dim = check_int("dim", dim)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return kl_divergence(
            input, target, from_logits=self.from_logits, dim=self.dim, reduction=self.reduction
        )


class Wasserstein1DLoss(_Loss):
    """Module form of :func:`wasserstein_1d`.

    Example:
        >>> import torch
        >>> Wasserstein1DLoss()(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0]))
        tensor(2.)
    """

    def __init__(self, *, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        *,
        input_weights: Tensor | None = None,
        target_weights: Tensor | None = None,
    ) -> Tensor:
        return wasserstein_1d(
            input,
            target,
            input_weights=input_weights,
            target_weights=target_weights,
            reduction=self.reduction,
        )


class FrechetDistanceLoss(_Loss):
    """Module form of :func:`frechet_distance`.

    Example:
        >>> import torch
        >>> features = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
        >>> round(FrechetDistanceLoss()(features, features + 2).item(), 4)  # ‖μ₁ − μ₂‖² = 8
        8.0
    """

    def __init__(self, *, reduction: Reduction = "mean") -> None:
        super().__init__(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return frechet_distance(input, target, reduction=self.reduction)
