"""Distances between distributions and feature sets: KL, 1-D Wasserstein, Fréchet, perceptual."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from taskbalance._precision import autocast_off, opmath_dtype
from taskbalance._validation import (
    check_axis,
    check_bool,
    check_choice,
    check_floating,
    check_nonnegative_entries,
    check_same_shape,
    check_tensor,
)
from taskbalance.info import _expected_log_ratio, _probabilities_and_logs
from taskbalance.losses._common import (
    Reduction,
    as_float_target,
    autocast_float32,
    check_reduction,
    in_result_dtype,
    reduce,
)

FeatureExtractor = Callable[[Tensor], "Tensor | Sequence[Tensor] | Mapping[str, Tensor]"]


def kl_divergence(
    input: Tensor,
    target: Tensor,
    *,
    from_logits: bool = False,
    dim: int = -1,
    reduction: Reduction = "mean",
) -> Tensor:
    """KL divergence ``KL(p‖q) = Σ p · log(p / q)`` of the prediction ``q`` from the target ``p``.

    Kullback & Leibler (1951). Following the ``(input, target)`` order of all losses, ``input``
    is the prediction ``q`` and ``target`` the reference distribution ``p``, as in
    :class:`torch.nn.KLDivLoss` — so ``kl_divergence(q, p)`` here is
    ``taskbalance.info.kl_divergence(p, q)``. Minimising it over ``q`` is minimising the
    cross-entropy ``H(p, q)``. Terms with ``p = 0`` are 0; the loss is ``+inf`` where ``p > 0``
    and ``q = 0``.

    The divergence is summed over the distribution axis ``dim``; ``reduction`` then acts on the
    remaining axes, so ``"mean"`` is the mean KL per distribution (torch's ``"batchmean"`` for
    ``(N, C)`` inputs, not torch's element-wise ``"mean"``).

    Args:
        input: Predicted probabilities ``q``, or logits when ``from_logits`` is true.
        target: Target probabilities ``p`` of the same shape, summing to 1 along ``dim``.
        from_logits: Interpret ``input`` as logits (``log q = log_softmax(input, dim)``).
        dim: Distribution axis.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``dim`` reduced away).

    Returns:
        The reduced divergence, in ``input``'s dtype and device.

    Raises:
        ValueError: On a shape mismatch or an argument that is not a distribution along ``dim``.

    Example:
        >>> import torch
        >>> p = torch.tensor([[0.5, 0.5]])
        >>> q = torch.tensor([[0.25, 0.75]])
        >>> round(kl_divergence(q, p).item(), 4)  # KL(p‖q)
        0.1438
    """
    check_reduction(reduction)
    from_logits = check_bool("from_logits", from_logits)
    check_floating("input", input)
    check_tensor("target", target)
    check_same_shape("input", input, "target", target)
    input = autocast_float32(input)
    target = as_float_target(target, input)
    dim = check_axis("input", input, dim)
    p, log_p = _probabilities_and_logs(target, "target", dim, from_logits=False)
    _, log_q = _probabilities_and_logs(input, "input", dim, from_logits=from_logits)
    return reduce(_expected_log_ratio(p, log_p, log_q, dim, keepdim=False), reduction)


def _check_sample_weights(name: str, weights: Tensor, values_name: str, values: Tensor) -> Tensor:
    check_floating(name, weights)
    check_same_shape(values_name, values, name, weights)
    # In the dtype the distance is computed in: half-precision weights past 65504 are inf.
    weights = weights.to(dtype=opmath_dtype(values.dtype))
    # An infinite weight made the CDF inf/inf: a NaN distance, not an error
    check_nonnegative_entries(name, weights)
    with torch.no_grad():
        sums = weights.sum(dim=-1)
        bad = ~((sums > 0) & torch.isfinite(sums))
        if bool(bad.any()):
            raise ValueError(
                f"{name}: expected a positive, finite sum along the last axis, got "
                f"{sums[bad].reshape(-1)[0].item():.6g}"
            )
    return weights


def _empirical_cdf(
    sorted_values: Tensor, order: Tensor, weights: Tensor | None, points: Tensor
) -> Tensor:
    """CDF of the (weighted) sample ``sorted_values`` evaluated at ``points`` (right-continuous)."""
    # The positions are piecewise constant in the values, so no gradient is lost by detaching.
    count_below = torch.searchsorted(
        sorted_values.detach().contiguous(), points.detach().contiguous(), right=True
    )
    if weights is None:
        return count_below.to(dtype=sorted_values.dtype) / sorted_values.shape[-1]
    cumulative = torch.cumsum(weights.gather(-1, order), dim=-1)
    cumulative = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative], dim=-1)
    return cumulative.gather(-1, count_below) / cumulative[..., -1:]


def wasserstein_1d(
    input: Tensor,
    target: Tensor,
    *,
    input_weights: Tensor | None = None,
    target_weights: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """First Wasserstein (earth mover's) distance between two 1-D empirical distributions.

    Vaserstein (1969); for 1-D distributions with CDFs ``U`` and ``V`` (Ramdas, García Trillos &
    Cuturi, 2017, "On Wasserstein Two-Sample Testing", §2)::

        W₁(u, v) = ∫ |U(x) − V(x)| dx

    evaluated exactly as a sum over the merged sorted sample, like
    :func:`scipy.stats.wasserstein_distance`. The samples may have different sizes and optional
    non-negative weights (normalised to sum 1). The last axis holds the samples; leading axes are
    batch axes that must agree, and ``reduction`` acts on them. Differentiable with respect to
    the values (through the gaps between sorted values) and the weights.

    Args:
        input: Sample ``u``, shape ``(..., n)``.
        target: Sample ``v``, shape ``(..., m)``.
        input_weights: Optional weights of ``u``, shape ``(..., n)``.
        target_weights: Optional weights of ``v``, shape ``(..., m)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(...)``).

    Returns:
        The reduced distance, in ``input``'s dtype and device (computed in float32 for
        float16 and bfloat16 input, whose counts and weight sums overflow past 65504; kept in
        float32 under autocast).

    Raises:
        ValueError: On mismatched batch axes, empty samples or invalid weights.

    Example:
        >>> import torch
        >>> wasserstein_1d(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0]))
        tensor(2.)
    """
    check_reduction(reduction)
    check_floating("input", input)
    check_floating("target", target)
    target = as_float_target(target, input)
    if input.dim() == 0 or target.dim() == 0 or input.shape[:-1] != target.shape[:-1]:
        raise ValueError(
            "input, target: expected samples along the last axis with equal leading (batch) "
            f"axes, got input shape {tuple(input.shape)} and target shape {tuple(target.shape)}"
        )
    if input.shape[-1] == 0 or target.shape[-1] == 0:
        raise ValueError(
            f"input, target: expected at least one sample each, got input shape "
            f"{tuple(input.shape)} and target shape {tuple(target.shape)}"
        )
    if input_weights is not None:
        input_weights = _check_sample_weights("input_weights", input_weights, "input", input)
    if target_weights is not None:
        target_weights = _check_sample_weights("target_weights", target_weights, "target", target)

    # Half-precision counts and weight sums overflow past 65504 (n > 65504 samples gave NaN):
    # computed in float32 at least, as the other distances, and returned in input's dtype.
    work_dtype = opmath_dtype(input.dtype)
    values, others = input.to(dtype=work_dtype), target.to(dtype=work_dtype)
    if input_weights is not None:
        input_weights = input_weights.to(dtype=work_dtype)
    if target_weights is not None:
        target_weights = target_weights.to(dtype=work_dtype)
    with autocast_off(input.device.type):
        sorted_input, input_order = values.sort(dim=-1)
        sorted_target, target_order = others.sort(dim=-1)
        merged = torch.cat([sorted_input, sorted_target], dim=-1).sort(dim=-1).values
        gaps = merged.diff(dim=-1)
        points = merged[..., :-1]
        input_cdf = _empirical_cdf(sorted_input, input_order, input_weights, points)
        target_cdf = _empirical_cdf(sorted_target, target_order, target_weights, points)
        distance = ((input_cdf - target_cdf).abs() * gaps).sum(dim=-1)
    return in_result_dtype(reduce(distance, reduction), input)


def _centred_factor(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(mean, trace of covariance, R)`` with ``Rᵀ R = (N − 1) · Σ``.

    ``R`` is the centred data itself when there are at most as many samples as features, and the
    ``D × D`` triangular factor of its QR decomposition otherwise (``AᵀA = RᵀQᵀQR = RᵀR``), so
    the work stays ``O(min(N, D)²)`` whatever the number of samples.
    """
    count = features.shape[-2]
    mean = features.mean(dim=-2)
    centred = features - mean.unsqueeze(-2)
    trace = centred.square().sum(dim=(-2, -1)) / (count - 1)
    if count <= features.shape[-1]:
        return mean, trace, centred
    # mode="reduced" (not "r"): torch only differentiates QR when Q is computed.
    return mean, trace, torch.linalg.qr(centred, mode="reduced").R


def frechet_distance(input: Tensor, target: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    Fréchet (1957); Dowson & Landau (1982); used as FID by Heusel et al., NeurIPS 2017, "GANs
    Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"::

        d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})

    with the sample means and the unbiased (``N − 1``) sample covariances, as the reference FID
    code (``numpy.cov``) uses. The trace of the matrix square root is computed without forming
    any square root: with centred data ``A₁ (N × D)``, ``A₂ (M × D)`` and factors
    ``R₁ᵀR₁ = A₁ᵀA₁``, ``R₂ᵀR₂ = A₂ᵀA₂`` (QR), the eigenvalues of ``Σ₁Σ₂`` are the squared
    singular values of ``R₁R₂ᵀ / √((N − 1)(M − 1))``, so::

        Tr (Σ₁Σ₂)^{1/2} = Tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2} = ‖R₁R₂ᵀ‖_* / √((N − 1)(M − 1))

    (nuclear norm). This works on the data rather than the covariances (no squared condition
    number), cannot produce the small negative or complex eigenvalues that ``scipy.linalg.sqrtm``
    needs cleaning up for, and has a well-defined gradient (``U Vᵀ`` of the SVD) even for
    repeated singular values. The result is clamped at 0 against rounding. float16 and bfloat16
    features are computed in float32 (torch has no half-precision QR or SVD) and the result is
    rounded to ``input``'s dtype (kept in float32 under autocast).

    Rows are samples. Leading axes are batch axes and ``reduction`` acts on them.

    Args:
        input: Features ``(..., N, D)``, ``N ≥ 2``.
        target: Features ``(..., M, D)``, ``M ≥ 2``, same ``D`` and leading axes.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(...)``).

    Returns:
        The squared Fréchet distance (what FID reports), in ``input``'s dtype and device.

    Raises:
        ValueError: On mismatched feature dimensions or batch axes, fewer than 2 samples, or
            non-finite features.

    Example:
        >>> import torch
        >>> features = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
        >>> round(frechet_distance(features, features).item(), 4)
        0.0
        >>> round(frechet_distance(features, features + 1).item(), 4)  # ‖μ₁ − μ₂‖² = 3
        3.0
    """
    check_reduction(reduction)
    check_floating("input", input)
    check_floating("target", target)
    target = as_float_target(target, input)
    if (
        input.dim() < 2
        or target.dim() < 2
        or input.shape[-1] != target.shape[-1]
        or input.shape[:-2] != target.shape[:-2]
    ):
        raise ValueError(
            "input, target: expected feature sets (..., N, D) and (..., M, D) with the same D "
            f"and leading axes, got input shape {tuple(input.shape)} and target shape "
            f"{tuple(target.shape)}"
        )
    if input.shape[-2] < 2 or target.shape[-2] < 2:
        raise ValueError(
            "input, target: expected at least 2 samples (rows) each for a covariance, got input "
            f"shape {tuple(input.shape)} and target shape {tuple(target.shape)}"
        )
    with torch.no_grad():  # torch's SVD would fail on them, as an unnamed LinAlgError
        for name, features in (("input", input), ("target", target)):
            if not bool(torch.isfinite(features).all()):
                raise ValueError(f"{name}: expected finite features, got NaN or inf entries")
    # torch has no half-precision QR or SVD, and float16 covariances overflow: float32 at least,
    # autocast off (its half-precision products lose the traces' difference: 97% off, measured)
    work_dtype = opmath_dtype(input.dtype)
    with autocast_off(input.device.type):
        mean_input, trace_input, factor_input = _centred_factor(input.to(dtype=work_dtype))
        mean_target, trace_target, factor_target = _centred_factor(target.to(dtype=work_dtype))
        normaliser = math.sqrt((input.shape[-2] - 1) * (target.shape[-2] - 1))
        cross = factor_input @ factor_target.transpose(-2, -1)
        trace_sqrt = torch.linalg.svdvals(cross).sum(dim=-1) / normaliser
        distance = (
            (mean_input - mean_target).square().sum(dim=-1)
            + trace_input
            + trace_target
            - 2.0 * trace_sqrt
        )
    return in_result_dtype(reduce(distance.clamp(min=0.0), reduction), input)


def _as_feature_list(output: object, source: str) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, Sequence) and all(isinstance(item, Tensor) for item in output):
        return list(output)
    raise TypeError(
        f"{source}: expected to return a tensor, a sequence or a mapping of tensors, got "
        f"{type(output).__name__}"
    )


def _extract_features(
    extractor: FeatureExtractor, x: Tensor, layers: Sequence[str] | None
) -> list[Tensor]:
    if layers is None:
        return _as_feature_list(extractor(x), "extractor")
    if not isinstance(extractor, nn.Module):
        raise TypeError(
            f"extractor: expected a torch.nn.Module (layers= names its submodules), got "
            f"{type(extractor).__name__}"
        )
    captured: dict[str, Tensor] = {}

    def capture(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"layer {name!r}: expected a tensor output, got {type(output).__name__}"
                )
            captured[name] = output

        return hook

    handles = []
    try:
        for name in layers:
            try:
                module = extractor.get_submodule(name)
            except AttributeError as error:
                raise ValueError(
                    f"layers: expected names of submodules of extractor, got {name!r}"
                ) from error
            handles.append(module.register_forward_hook(capture(name)))
        extractor(x)
    finally:
        # Hooks must not outlive the call, or the next forward of the backbone would keep
        # filling a dead dictionary.
        for handle in handles:
            handle.remove()
    return [captured[name] for name in layers]


def perceptual_loss(
    input: Tensor,
    target: Tensor,
    *,
    extractor: FeatureExtractor,
    layers: Sequence[str] | None = None,
    layer_weights: Sequence[float] | None = None,
    distance: Literal["squared", "absolute"] = "squared",
    reduction: Reduction = "mean",
) -> Tensor:
    """Perceptual (feature reconstruction) loss between the features of input and target.

    Johnson, Alahi & Fei-Fei, ECCV 2016, "Perceptual Losses for Real-Time Style Transfer and
    Super-Resolution", eq. (2), summed over layers ``j`` with weights ``λ_j``::

        L = Σ_j λ_j · 1/(C_j H_j W_j) · ‖φ_j(x) − φ_j(y)‖²₂

    i.e. the mean squared (or, with ``distance="absolute"``, absolute) difference of each
    layer's features per sample. The extractor is supplied by the user — nothing is downloaded;
    pass e.g. a frozen torchvision VGG's ``features`` in ``eval()`` mode. Gradients flow to
    ``input`` and ``target`` (detach ``target`` to save memory) and to the extractor's
    parameters unless they are frozen.

    Features come either from the ``extractor``'s return value (a tensor, a sequence of tensors
    or a mapping of tensors), or, if ``layers`` is given, from forward hooks on the named
    submodules of an ``nn.Module`` extractor (names as in ``named_modules()``, e.g.
    ``"features.8"``); the hooks are removed after the call. An empty batch (``N = 0``, passed
    through the extractor as well) gives no per-sample losses: ``"sum"`` is 0 and ``"mean"`` NaN,
    as for the other losses.

    Args:
        input: Batch ``(N, ...)`` passed through the extractor.
        target: Batch of the same shape.
        extractor: Callable mapping a batch to features whose axis 0 is the batch axis.
        layers: Names of submodules whose outputs are compared; ``None`` to use the output.
        layer_weights: One weight per feature tensor; default all 1.
        distance: ``"squared"`` (Johnson et al.) or ``"absolute"`` per-element difference.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample, shape ``(N,)``).

    Returns:
        The reduced loss, in ``input``'s dtype and device.

    Raises:
        ValueError: On a shape mismatch, an unknown layer or distance, or a wrong number of
            ``layer_weights``.
        TypeError: If the extractor returns something other than tensors.

    Example:
        >>> import torch
        >>> extractor = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> x = torch.randn(2, 4)
        >>> perceptual_loss(x, x, extractor=extractor, layers=["0", "1"], layer_weights=[1.0, 0.5])
        tensor(0., grad_fn=<MeanBackward0>)
    """
    check_reduction(reduction)
    check_floating("input", input)
    check_tensor("target", target)
    check_same_shape("input", input, "target", target)
    check_choice("distance", distance, ("squared", "absolute"))
    if input.dim() == 0:
        raise ValueError("input: expected a batch axis, got a 0-d tensor")
    target = as_float_target(target, input)
    input_features = _extract_features(extractor, input, layers)
    target_features = _extract_features(extractor, target, layers)
    if layer_weights is None:
        layer_weights = [1.0] * len(input_features)
    elif len(layer_weights) != len(input_features):
        raise ValueError(
            f"layer_weights: expected one entry per feature tensor ({len(input_features)}), got "
            f"{len(layer_weights)} entries"
        )
    total = input.new_zeros(input.shape[0])
    for index, (weight, feature, reference) in enumerate(
        zip(layer_weights, input_features, target_features, strict=True)
    ):
        check_same_shape(f"input features {index}", feature, f"target features {index}", reference)
        if feature.dim() == 0 or feature.shape[0] != input.shape[0]:
            raise ValueError(
                f"features {index}: expected the batch axis of size {input.shape[0]}, got shape "
                f"{tuple(feature.shape)}"
            )
        difference = feature - reference
        elementwise = difference.square() if distance == "squared" else difference.abs()
        # An explicit width: reshape(0, -1) of an empty batch is ambiguous and raises.
        width = math.prod(feature.shape[1:])
        per_sample = elementwise.reshape(feature.shape[0], width).mean(dim=1)
        total = total + weight * per_sample.to(dtype=input.dtype)
    return reduce(total, reduction)
