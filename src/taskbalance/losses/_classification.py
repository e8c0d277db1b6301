"""Classification and segmentation losses: binary and categorical cross-entropy, focal, Dice."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional

from taskbalance._precision import opmath_dtype
from taskbalance._validation import (
    check_bool,
    check_distribution,
    check_floating,
    check_in_range,
    check_int,
    check_nonnegative,
    check_nonnegative_entries,
    check_optional_int,
    check_probabilities,
    check_same_shape,
    check_tensor,
)
from taskbalance.losses._common import (
    Reduction,
    as_float_target,
    autocast_float32,
    check_broadcastable_to,
    check_class_indices,
    check_class_weight,
    check_index_target_shape,
    check_reduction,
    class_dim,
    in_result_dtype,
    reduce,
    safe_log,
)

# torch.nn.BCELoss clamps log-probabilities at -100 so that a confident wrong prediction costs
# 100 nats instead of inf; the same floor keeps the two implementations interchangeable.
_BCE_LOG_FLOOR = -100.0


def _bce_log(x: Tensor) -> Tensor:
    """``max(log x, −100)`` (as :class:`torch.nn.BCELoss`), whose gradient is ``1/max(x, ε)``.

    ``ε = 1e-12`` (or the dtype's smallest normal number, if larger): where ``x > ε`` this is
    ``torch.log`` itself, every derivative exact. At or below it the value is floored as
    ``BCELoss``'s and the gradient is ``1/ε``, as large as ``BCELoss``'s there (it floors
    ``p(1 − p)`` at 1e-12) and of the right sign: the floor's own derivative, 0, left a
    confident wrong probability (p = 0, y = 1) with no gradient, and at p = 0, y = ½ with the
    other term's alone, a step away from the label.
    """
    eps = max(1e-12, torch.finfo(x.dtype).tiny)
    interior = x > eps
    inside = torch.log(torch.where(interior, x, torch.ones_like(x)))
    floored = safe_log(x.detach(), floor=_BCE_LOG_FLOOR) + (x - x.detach()) / eps
    return torch.where(interior, inside, floored)


def _class_weight_view(weight: Tensor, input: Tensor, dim: int) -> Tensor:
    """Reshapes a ``(C,)`` weight so that it broadcasts along the class axis ``dim`` of input."""
    return weight.to(dtype=input.dtype).reshape((-1,) + (1,) * (input.dim() - dim - 1))


def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    from_logits: bool = False,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Binary cross-entropy between predicted probabilities (or logits) and targets in [0, 1].

    Cox (1958), logistic regression; with ``p = input`` (or ``p = σ(input)`` for logits), target
    ``y``, element weight ``w`` and positive-class weight ``w₊``::

        L = −w · [w₊ · y · log p + (1 − y) · log(1 − p)]

    With logits, ``log p = logsigmoid(x)`` and ``log(1 − p) = logsigmoid(−x)`` are evaluated
    without forming ``p``, which is stable for large ``|x|`` (as
    :class:`torch.nn.BCEWithLogitsLoss`). With probabilities the logarithms are floored at -100
    as in :class:`torch.nn.BCELoss`, so ``p ∈ {0, 1}`` gives a large but finite loss, and
    their gradient ``1/p`` is taken as ``1/max(p, 1e-12)`` (likewise for ``1 − p``): exact
    inside, large and towards the label at the boundary, as ``BCELoss``'s (which floors
    ``p(1 − p)`` at 1e-12 instead, and so gives 0 at ``p = y ∈ {0, 1}``, where this gives the
    exact ±1).

    Args:
        input: Probabilities in ``[0, 1]``, or logits when ``from_logits`` is true.
        target: Targets in ``[0, 1]`` (hard or soft labels) of the same shape; any dtype.
        from_logits: Interpret ``input`` as logits.
        weight: Optional element weights, broadcastable to ``input``'s shape.
        pos_weight: Optional weight of the positive term, broadcastable to ``input``'s shape
            (e.g. ``(C,)`` for multi-label ``(N, C)``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The reduced loss, in ``input``'s dtype and device.

    Raises:
        ValueError: If shapes differ, or probabilities / targets leave ``[0, 1]``.

    Example:
        >>> import torch
        >>> p = torch.tensor([0.9, 0.2])
        >>> y = torch.tensor([1.0, 0.0])
        >>> binary_cross_entropy(p, y, reduction="none")  # −log 0.9, −log 0.8
        tensor([0.1054, 0.2231])
        >>> bool(torch.isclose(binary_cross_entropy(p.logit(), y, from_logits=True),
        ...                    binary_cross_entropy(p, y)))
        True
    """
    check_reduction(reduction)
    from_logits = check_bool("from_logits", from_logits)
    check_floating("input", input)
    input = autocast_float32(input)
    check_tensor("target", target)
    check_same_shape("input", input, "target", target)
    target = as_float_target(target, input)
    check_probabilities("target", target)
    if from_logits:
        log_p = functional.logsigmoid(input)
        log_one_minus_p = functional.logsigmoid(-input)
    else:
        check_probabilities("input", input)
        log_p = _bce_log(input)
        log_one_minus_p = _bce_log(1.0 - input)
    positive_term = target * log_p
    if pos_weight is not None:
        check_floating("pos_weight", pos_weight)
        check_broadcastable_to("pos_weight", pos_weight, "input", input.shape)
        positive_term = pos_weight.to(dtype=input.dtype) * positive_term
    loss = -(positive_term + (1.0 - target) * log_one_minus_p)
    if weight is not None:
        check_floating("weight", weight)
        check_broadcastable_to("weight", weight, "input", input.shape)
        loss = weight.to(dtype=input.dtype) * loss
    return reduce(loss, reduction)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Categorical cross-entropy from logits, with class-index or probability targets.

    With ``log q = log_softmax(input)`` over the class axis (1, or 0 for unbatched ``(C,)``),
    ``C`` classes, class weights ``w`` and smoothing ``ε`` (Szegedy et al., CVPR 2016,
    "Rethinking the Inception Architecture", §7)::

        class index y:       L = (1 − ε) · w_y · (−log q_y) + ε/C · Σ_c w_c · (−log q_c)
        probabilities p:     L = −Σ_c w_c · p'_c · log q_c,   p' = (1 − ε) · p + ε/C

    This is :func:`torch.nn.functional.cross_entropy`, including its reductions: with
    class-index targets ``"mean"`` divides by ``Σ w_y`` over the non-ignored entries (the weighted
    mean), and entries equal to ``ignore_index`` contribute 0 (a mean over no entries is NaN, as
    in torch). ``ignore_index`` has no effect on probability targets, which must be
    distributions along the class axis.

    Args:
        input: Logits ``(N, C, d1, ...)`` or ``(C,)``.
        target: Class indices ``(N, d1, ...)`` (integer dtype) or probabilities of ``input``'s
            shape (floating dtype).
        weight: Optional per-class weights, shape ``(C,)``.
        ignore_index: Class-index value that is skipped.
        label_smoothing: ``ε ∈ [0, 1]``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(N, d1, ...)``).

    Returns:
        The reduced loss, in ``input``'s dtype and device.

    Raises:
        TypeError: If ``input`` is not floating point.
        ValueError: On a shape mismatch, no class (C = 0), a class index out of range,
            probability targets that are not distributions, or ``label_smoothing`` outside
            ``[0, 1]``.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0, 0.0]])
        >>> loss = cross_entropy(logits, torch.tensor([0]))
        >>> bool(torch.isclose(loss, -torch.log_softmax(logits, 1)[0, 0]))
        True
    """
    check_reduction(reduction)
    ignore_index = check_int("ignore_index", ignore_index)
    check_floating("input", input)
    input = autocast_float32(input)
    check_tensor("target", target)
    if input.dim() == 0:
        raise ValueError(
            "input: expected a class axis, shape (C,) or (N, C, ...), got a 0-d tensor"
        )
    check_in_range("label_smoothing", label_smoothing, 0.0, 1.0)
    dim = class_dim(input)
    num_classes = input.shape[dim]
    if num_classes == 0:
        raise ValueError(
            f"input: expected at least one class along dim {dim}, got shape {tuple(input.shape)}"
        )
    check_class_weight("weight", weight, num_classes)
    log_q = torch.log_softmax(input, dim=dim)
    weight_view = None if weight is None else _class_weight_view(weight, input, dim)

    if target.is_floating_point():
        check_same_shape("input", input, "target", target)
        target = as_float_target(target, input)
        check_distribution("target", target, dim)
        smoothed = target * (1.0 - label_smoothing) + label_smoothing / num_classes
        weighted_log_q = log_q if weight_view is None else log_q * weight_view
        loss = -(smoothed * weighted_log_q).sum(dim=dim)
        return reduce(loss, reduction)

    check_index_target_shape("target", target, input)
    target, valid = check_class_indices("target", target, num_classes, ignore_index)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    log_q_target = log_q.gather(dim, safe_target.unsqueeze(dim)).squeeze(dim)
    target_weight = (
        torch.ones_like(log_q_target)
        if weight is None
        else weight.to(dtype=input.dtype)[safe_target]
    )
    loss = (1.0 - label_smoothing) * target_weight * (-log_q_target)
    if label_smoothing > 0:
        weighted_log_q = log_q if weight_view is None else log_q * weight_view
        loss = loss + (label_smoothing / num_classes) * (-weighted_log_q.sum(dim=dim))
    zero = torch.zeros_like(loss)
    loss = torch.where(valid, loss, zero)
    if reduction == "mean":
        # torch's weighted mean: normalise by the weights of the counted targets, not by N.
        return loss.sum() / torch.where(valid, target_weight, zero).sum()
    return reduce(loss, reduction)


def focal_loss(
    input: Tensor,
    target: Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | Tensor | None = None,
    ignore_index: int | None = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    """Focal loss from logits, binary or multi-class.

    Lin, Goyal, Girshick, He & Dollár, ICCV 2017, "Focal Loss for Dense Object Detection",
    eq. (5)::

        FL(p_t) = −α_t · (1 − p_t)^γ · log p_t

    where ``p_t`` is the predicted probability of the true class. The mode follows the shapes:

    * **binary** (``target.shape == input.shape``): ``input`` are logits, ``target`` labels in
      ``[0, 1]``; ``p_t = p·y + (1 − p)(1 − y)`` with ``p = σ(input)`` and ``−log p_t`` the binary
      cross-entropy with logits (so soft labels work as in torchvision's
      ``sigmoid_focal_loss``); ``α`` is a float in ``[0, 1]``, ``α_t = α·y + (1 − α)(1 − y)``.
    * **multi-class** (``target`` holds class indices of shape ``(N, d1, ...)`` for ``input``
      ``(N, C, d1, ...)``): ``p_t = softmax(input)_y``; ``α`` is a per-class tensor of shape
      ``(C,)``, ``α_t = α_y``.

    ``α`` defaults to ``None`` (``α_t = 1``), so that ``γ = 0`` is exactly the (binary)
    cross-entropy; the paper's detector setting is ``γ = 2, α = 0.25``. Entries whose target
    equals ``ignore_index`` contribute 0 and are not counted by ``"mean"``, which averages over
    the counted entries (not weighted by ``α``, as in the paper and torchvision). ``1 − p_t`` is
    computed as ``−expm1(log p_t)`` (multi-class) or ``σ(∓x)`` (binary), without cancellation.

    Args:
        input: Logits; ``(...)`` for binary, ``(N, C, d1, ...)`` or ``(C,)`` for multi-class.
        target: Binary labels of ``input``'s shape, or integer class indices.
        gamma: Focusing parameter ``γ ≥ 0``.
        alpha: Class balance: float (binary) or ``(C,)`` tensor (multi-class); ``None`` for 1.
        ignore_index: Target value to skip, or ``None`` to count every entry.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (element-wise, target's shape).

    Returns:
        The reduced loss, in ``input``'s dtype and device.

    Raises:
        ValueError: On a shape mismatch, ``gamma < 0``, a float ``alpha`` outside ``[0, 1]``,
            a per-class ``alpha`` with a negative or non-finite entry or of the wrong shape,
            or a class index out of range.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
        >>> labels = torch.tensor([0, 1])
        >>> focal = focal_loss(logits, labels, gamma=0.0)
        >>> bool(torch.isclose(focal, torch.nn.functional.cross_entropy(logits, labels)))
        True
        >>> bool(focal_loss(logits, labels) < focal)  # well-classified examples are down-weighted
        True
    """
    check_reduction(reduction)
    ignore_index = check_optional_int("ignore_index", ignore_index)
    check_floating("input", input)
    input = autocast_float32(input)
    check_tensor("target", target)
    check_nonnegative("gamma", gamma)
    if input.dim() == 0:
        raise ValueError("input: expected at least one dimension, got a 0-d tensor")

    if target.shape == input.shape:
        # Integer labels are compared as torch.long: a uint8 target would wrap ignore_index=-100
        # to 156.
        comparable = target if target.is_floating_point() else target.to(dtype=torch.long)
        valid = (
            torch.ones_like(target, dtype=torch.bool)
            if ignore_index is None
            else comparable != ignore_index
        )
        labels = as_float_target(target, input)
        labels = torch.where(valid, labels, torch.zeros_like(labels))
        check_probabilities("target", labels)
        # −log p_t: the binary cross-entropy with logits, stable for large |x|.
        log_p_t = labels * functional.logsigmoid(input) + (1.0 - labels) * functional.logsigmoid(
            -input
        )
        # 1 − p_t = σ(x)(1 − y) + σ(−x) y, a sum of non-negative terms: no cancellation near 1.
        one_minus_p_t = torch.sigmoid(input) * (1.0 - labels) + torch.sigmoid(-input) * labels
        if alpha is not None:
            if isinstance(alpha, Tensor) or not 0.0 <= alpha <= 1.0:
                raise ValueError(
                    f"alpha: expected a float in [0, 1] for binary focal loss, got {alpha!r}"
                )
            alpha_t = alpha * labels + (1.0 - alpha) * (1.0 - labels)
        else:
            alpha_t = None
    else:
        if input.dim() == target.dim() or target.is_floating_point():
            check_same_shape("input", input, "target", target)
        check_index_target_shape("target", target, input)
        dim = class_dim(input)
        num_classes = input.shape[dim]
        target, valid = check_class_indices("target", target, num_classes, ignore_index)
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        log_p_t = torch.log_softmax(input, dim=dim).gather(dim, safe_target.unsqueeze(dim))
        log_p_t = log_p_t.squeeze(dim)
        one_minus_p_t = -torch.expm1(log_p_t)
        if alpha is not None:
            if not isinstance(alpha, Tensor):
                raise ValueError(
                    "alpha: expected a tensor of shape (C,) with one weight per class for "
                    f"multi-class focal loss, got {alpha!r}"
                )
            check_class_weight("alpha", alpha, num_classes)
            check_nonnegative_entries("alpha", alpha)  # a negative one flips the loss
            alpha_t = alpha.to(dtype=input.dtype)[safe_target]
        else:
            alpha_t = None

    loss = -log_p_t
    if gamma != 0:
        # Floor at tiny: (1 − p_t)^γ with γ < 1 has an infinite slope at 0.
        loss = one_minus_p_t.clamp(min=torch.finfo(input.dtype).tiny).pow(gamma) * loss
    if alpha_t is not None:
        loss = alpha_t * loss
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        return loss.sum() / valid.sum()
    return reduce(loss, reduction)


def check_dice_weight(weight: Tensor, dtype: torch.dtype) -> None:
    """Dice's class weights: finite, >= 0 and with a positive sum in ``dtype`` (the classes'
    weighted average divides by it: all-zero weights made it 0/0, a NaN loss)."""
    check_nonnegative_entries("weight", weight)
    weight_sum = float(weight.to(dtype=dtype).sum())
    if not 0 < weight_sum < math.inf:
        raise ValueError(
            "weight: expected a positive, finite sum (the classes' weighted average divides by "
            f"it), got {weight_sum:.6g}"
        )


def dice_loss(
    input: Tensor,
    target: Tensor,
    *,
    multiclass: bool = False,
    from_logits: bool = False,
    smooth: float = 1.0,
    weight: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Soft Dice loss for binary or multi-class segmentation.

    Milletari, Navab & Ahmadi, 3DV 2016, "V-Net"; soft Dice with additive smoothing ``s`` as in
    Sudre et al., DLMIA 2017, "Generalised Dice Overlap as a Deep Learning Loss Function". For a
    sample's predicted probabilities ``p`` and ground truth ``g`` over its pixels::

        D = (2 · Σ p·g + s) / (Σ p + Σ g + s),    L = 1 − D

    * **binary** (``multiclass=False``): ``input`` and ``target`` have shape ``(N, ...)``; one
      Dice per sample over all non-batch axes; ``from_logits`` applies a sigmoid.
    * **multi-class** (``multiclass=True``): ``input`` is ``(N, C, ...)``; ``target`` holds
      class indices ``(N, ...)`` or per-class probabilities ``(N, C, ...)``; one Dice per sample
      and class, averaged over classes with ``weight`` (default uniform); ``from_logits`` applies
      a softmax over the class axis.

    A class absent from both prediction and ground truth (``Σ p + Σ g = 0``) is a perfect match:
    its Dice is 1 (loss 0) even with ``smooth=0``, where the formula would be 0/0. float16 and
    bfloat16 inputs are computed in float32 (the sums over an image overflow float16) and the
    result is rounded to ``input``'s dtype (kept in float32 under autocast).

    Args:
        input: Probabilities, or logits when ``from_logits`` is true.
        target: Ground truth as described above (values in ``[0, 1]`` or class indices).
        multiclass: Treat axis 1 as the class axis.
        from_logits: Apply sigmoid (binary) or softmax (multi-class) to ``input`` first.
        smooth: ``s ≥ 0``, added to numerator and denominator.
        weight: Optional per-class weights ``(C,)``, finite and >= 0 with a positive sum;
            multi-class only.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample losses, shape ``(N,)``).

    Returns:
        The reduced loss, in ``input``'s dtype and device.

    Raises:
        ValueError: On a shape mismatch, probabilities outside ``[0, 1]``, a class index out of
            range, a negative ``smooth``, or ``weight`` without ``multiclass``.

    Example:
        >>> import torch
        >>> mask = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
        >>> dice_loss(mask, mask)
        tensor(0.)
        >>> labels = torch.tensor([[0, 1, 1]])
        >>> probabilities = torch.nn.functional.one_hot(labels, 2).movedim(-1, 1).float()
        >>> dice_loss(probabilities, labels, multiclass=True)
        tensor(0.)
    """
    check_reduction(reduction)
    multiclass = check_bool("multiclass", multiclass)
    from_logits = check_bool("from_logits", from_logits)
    check_floating("input", input)
    check_tensor("target", target)
    check_nonnegative("smooth", smooth)
    if input.dim() < 2:
        raise ValueError(
            "input: expected a batch axis and at least one more axis, shape (N, ...) or "
            f"(N, C, ...), got shape {tuple(input.shape)}"
        )
    work_dtype = opmath_dtype(input.dtype)

    if multiclass:
        num_classes = input.shape[1]
        check_class_weight("weight", weight, num_classes)
        if weight is not None:
            check_dice_weight(weight, work_dtype)
        if target.is_floating_point():
            check_same_shape("input", input, "target", target)
            ground_truth = as_float_target(target, input)
            check_probabilities("target", ground_truth)
        else:
            check_index_target_shape("target", target, input)
            indices, _ = check_class_indices("target", target, num_classes, ignore_index=None)
            one_hot = functional.one_hot(indices, num_classes).movedim(-1, 1)
            ground_truth = one_hot.to(dtype=input.dtype)
        if from_logits:
            probabilities = torch.softmax(input.to(dtype=work_dtype), dim=1)
        else:
            check_probabilities("input", input)
            probabilities = input
        sum_dims = tuple(range(2, input.dim()))
    else:
        if weight is not None:
            raise ValueError("weight: expected None (per-class weights need multiclass=True)")
        if input.shape != target.shape and input.dim() == target.dim() + 1:
            raise ValueError(
                f"input, target: expected the same shape, got input shape "
                f"{tuple(input.shape)} and target shape {tuple(target.shape)}; for class-index "
                "targets pass multiclass=True"
            )
        check_same_shape("input", input, "target", target)
        ground_truth = as_float_target(target, input)
        check_probabilities("target", ground_truth)
        if from_logits:
            probabilities = torch.sigmoid(input.to(dtype=work_dtype))
        else:
            check_probabilities("input", input)
            probabilities = input
        sum_dims = tuple(range(1, input.dim()))

    # Σp + Σg of a 181 × 181 all-ones mask already overflows float16 (65504), and bfloat16 keeps
    # 8 bits of a sum over millions of pixels: sum (and divide) in float32.
    probabilities = probabilities.to(dtype=work_dtype)
    ground_truth = ground_truth.to(dtype=work_dtype)
    intersection = (
        (probabilities * ground_truth).sum(dim=sum_dims)
        if sum_dims
        else (probabilities * ground_truth)
    )
    total = (
        (probabilities.sum(dim=sum_dims) + ground_truth.sum(dim=sum_dims))
        if sum_dims
        else probabilities + ground_truth
    )
    denominator = total + smooth
    defined = denominator > 0
    # Both empty and no smoothing: 0/0, defined as a perfect match (Dice 1).
    dice = torch.where(
        defined,
        (2.0 * intersection + smooth) / torch.where(defined, denominator, torch.ones_like(total)),
        torch.ones_like(total),
    )
    loss = 1.0 - dice
    if multiclass:
        if weight is None:
            loss = loss.mean(dim=1)
        else:
            class_weight = weight.to(dtype=work_dtype)
            loss = (loss * class_weight).sum(dim=1) / class_weight.sum()
    return in_result_dtype(reduce(loss, reduction), input)
