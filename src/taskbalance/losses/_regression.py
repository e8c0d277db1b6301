"""Regression losses: squared, absolute, Huber, Tukey, Gaussian NLL and the KL box loss."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from taskbalance._precision import opmath_dtype
from taskbalance._validation import (
    check_bool,
    check_floating,
    check_optional_int,
    check_positive,
    check_same_shape,
    check_tensor,
)
from taskbalance.losses._common import (
    Reduction,
    as_float_target,
    autocast_float32,
    check_broadcastable_to,
    check_reduction,
    in_result_dtype,
    reduce,
)

# Belagiannis et al. (2015), eq. (5): 1.4826 makes the MAD a consistent estimate of the standard
# deviation of normally distributed residuals (1 / Φ⁻¹(3/4)).
MAD_TO_STD = 1.4826
# Belagiannis et al. (2015): c = 4.685 gives 95 % asymptotic efficiency on normal residuals.
TUKEY_C = 4.685


def _residual(input: Tensor, target: Tensor) -> Tensor:
    check_floating("input", input)
    check_tensor("target", target)
    check_same_shape("input", input, "target", target)
    input = autocast_float32(input)
    return input - as_float_target(target, input)


def _precision_scale(residual: Tensor, log_variance: Tensor) -> Tensor:
    """``e^{−s/2}`` for the precision-weighted terms, with ``s`` replaced by 0 where ``r = 0``.

    ``e^{−s} · f(r)`` is evaluated as products with ``e^{−s/2}``, which stays finite down to
    ``s ≈ −177.4`` (float32), twice the range of ``e^{−s}``. Where ``r = 0`` the term is 0 for
    every ``s``, but ``e^{−s/2}`` may still overflow and ``0 · inf`` is NaN in the value and the
    gradient; there ``s`` is replaced by 0, which leaves the term (0) and its gradients (0, the
    exact derivatives at ``r = 0``) unchanged.
    """
    zero = torch.zeros((), dtype=log_variance.dtype, device=log_variance.device)
    return torch.exp(-0.5 * torch.where(residual == 0, zero, log_variance))


def squared_error(input: Tensor, target: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Squared error ``(x − y)²`` (the L2 / mean-squared-error loss).

    Gauss (1809), least squares; same as :func:`torch.nn.functional.mse_loss` except that shapes
    must match exactly (no broadcasting).

    Args:
        input: Predictions, floating point.
        target: Targets of the same shape (cast to ``input``'s dtype).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (element-wise losses).

    Returns:
        The reduced loss, in ``input``'s dtype and device.

    Example:
        >>> import torch
        >>> squared_error(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
        tensor(2.5000)
    """
    check_reduction(reduction)
    residual = _residual(input, target)
    return reduce(residual.square(), reduction)


def absolute_error(input: Tensor, target: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Absolute error ``|x − y|`` (the L1 loss).

    Laplace (1774), least absolute deviations; same as :func:`torch.nn.functional.l1_loss`
    without broadcasting. The gradient at ``x = y`` is 0 (the subgradient ``sign(0)``).

    Args:
        input: Predictions, floating point.
        target: Targets of the same shape (cast to ``input``'s dtype).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The reduced loss, in ``input``'s dtype and device.

    Example:
        >>> import torch
        >>> absolute_error(torch.tensor([1.0, -3.0]), torch.tensor([0.0, 0.0]), reduction="sum")
        tensor(4.)
    """
    check_reduction(reduction)
    residual = _residual(input, target)
    return reduce(residual.abs(), reduction)


def huber_loss(
    input: Tensor, target: Tensor, *, delta: float = 1.0, reduction: Reduction = "mean"
) -> Tensor:
    """Huber loss: quadratic for small residuals, linear for large ones.

    Huber (1964), "Robust Estimation of a Location Parameter", with ``r = x − y``::

        ρ_δ(r) = ½ r²              if |r| ≤ δ
                 δ (|r| − ½ δ)     otherwise

    Equal to :class:`torch.nn.HuberLoss` (and to ``δ ·`` smooth-L1 with ``β = δ``).

    Args:
        input: Predictions, floating point.
        target: Targets of the same shape (cast to ``input``'s dtype).
        delta: Threshold ``δ > 0`` between the quadratic and the linear part.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The reduced loss, in ``input``'s dtype and device.

    Raises:
        ValueError: If ``delta`` is not a finite number > 0.

    Example:
        >>> import torch
        >>> huber_loss(torch.tensor([0.5, 3.0]), torch.zeros(2), reduction="none")
        tensor([0.1250, 2.5000])
    """
    check_reduction(reduction)
    check_positive("delta", delta)
    residual = _residual(input, target)
    absolute = residual.abs()
    # Split |r| = q + l with q = min(|r|, δ): ½q² + δl is the Huber function on both branches
    # without a torch.where, so neither branch can leak inf/NaN into the gradient.
    quadratic = absolute.clamp(max=delta)
    linear = absolute - quadratic
    return reduce(0.5 * quadratic.square() + delta * linear, reduction)


def _median(x: Tensor, dim: int | None) -> Tensor:
    """Median that averages the two middle values for an even count (``torch.median`` does not)."""
    if dim is None:
        x = x.reshape(-1)
        dim = 0
    ordered = x.sort(dim=dim).values
    count = ordered.shape[dim]
    upper = ordered.narrow(dim, count // 2, 1)
    if count % 2 == 1:
        return upper
    lower = ordered.narrow(dim, count // 2 - 1, 1)
    return 0.5 * (lower + upper)


def median_absolute_deviation(residual: Tensor, dim: int | None = None) -> Tensor:
    """``MAD = median(|r − median(r)|)``, over all entries or along ``dim`` (kept as size 1)."""
    centre = _median(residual, dim)
    deviation = _median((residual - centre).abs(), dim)
    return deviation if dim is not None else deviation.reshape(())


def tukey_loss(
    input: Tensor,
    target: Tensor,
    *,
    c: float = TUKEY_C,
    mad_scaling: bool = False,
    mad_dim: int | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Tukey's biweight loss, optionally on MAD-scaled residuals.

    Beaton & Tukey (1974); used for deep regression by Belagiannis, Rupprecht, Carneiro & Navab,
    ICCV 2015, "Robust Optimization for Deep Regression", eq. (4)–(5). With ``r = x − y``::

        ρ_c(r) = c²/6 · [1 − (1 − (r/c)²)³]    if |r| ≤ c
                 c²/6                          otherwise

    so residuals beyond ``c`` (outliers) have zero gradient. With ``mad_scaling=True`` the
    residuals are first divided by ``1.4826 · MAD`` of the residuals, which makes ``c`` a
    multiple of a robust standard deviation. As in the paper the MAD is treated as a constant:
    it is computed from detached residuals, so no gradient flows through it. The paper computes
    one MAD per output coordinate over the mini-batch, which is ``mad_dim=0`` for ``(N, D)``
    predictions; the default ``mad_dim=None`` pools all residuals. A 0-d input has one axis, as
    in torch (``mad_dim`` 0 or -1 names it), and its MAD is that of its single residual. A MAD
    of 0 (e.g. more than half the residuals equal, or a batch of one with ``mad_dim=0``) is
    floored at the dtype's ``tiny`` so the division stays finite: every nonzero residual then
    lies beyond ``c``, an outlier with the constant loss and a zero gradient.

    Args:
        input: Predictions, floating point.
        target: Targets of the same shape (cast to ``input``'s dtype).
        c: Tuning constant ``c > 0`` (4.685: 95 % efficiency under Gaussian noise).
        mad_scaling: Divide residuals by ``1.4826 · MAD`` (detached) first.
        mad_dim: Axis along which the MAD is computed; ``None`` uses all residuals.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The reduced loss, in ``input``'s dtype and device.

    Raises:
        ValueError: If ``c`` is not a finite number > 0, or ``mad_dim`` is out of range.

    Example:
        >>> import torch
        >>> loss = tukey_loss(torch.tensor([0.0, 100.0]), torch.zeros(2), reduction="none")
        >>> bool(torch.isclose(loss[1], torch.tensor(4.685**2 / 6)))  # constant beyond c
        True
    """
    check_reduction(reduction)
    mad_scaling = check_bool("mad_scaling", mad_scaling)
    mad_dim = check_optional_int("mad_dim", mad_dim)
    check_positive("c", c)
    residual = _residual(input, target)
    if mad_scaling:
        # torch's convention: a 0-d tensor has one axis, which dim 0 and -1 both name.
        axes = max(residual.dim(), 1)
        if mad_dim is not None and not -axes <= mad_dim < axes:
            raise ValueError(
                f"mad_dim: expected None or in [{-axes}, {axes - 1}] for input of shape "
                f"{tuple(residual.shape)}, got {mad_dim}"
            )
        if residual.dim() == 0:
            # The MAD along the only axis of a single residual is the MAD over all residuals.
            mad_dim = None
        if residual.numel() > 0:
            scale = MAD_TO_STD * median_absolute_deviation(residual.detach(), mad_dim)
            residual = residual / scale.clamp(min=torch.finfo(residual.dtype).tiny)
    # With u = min((r/c)², 1): 1 − (1 − u)³ = u·(3 − 3u + u²), which avoids the cancellation of
    # the textbook form for small residuals; clamping u at 1 gives the constant c²/6 (and zero
    # gradient) beyond c without a branch.
    # Clamped before squaring: a residual beyond c then passes back exactly 0, also where it
    # is huge or infinite (a MAD floored at tiny), whose square would pass back 2·inf·0 = NaN.
    u = (residual / c).clamp(-1.0, 1.0).square()
    return reduce((c * c / 6.0) * u * (3.0 - 3.0 * u + u.square()), reduction)


def gaussian_nll_loss(
    input: Tensor,
    target: Tensor,
    *,
    log_variance: Tensor,
    full: bool = False,
    reduction: Reduction = "mean",
) -> Tensor:
    """Gaussian negative log-likelihood with a predicted log-variance (aleatoric uncertainty).

    Kendall & Gal, NeurIPS 2017, "What Uncertainties Do We Need in Bayesian Deep Learning for
    Computer Vision?", eq. (8). With mean ``μ = input``, ``s = log σ²``::

        L = ½ · exp(−s) · (y − μ)² + ½ · s   [+ ½ · log 2π  if full]

    Predicting ``s`` rather than ``σ²`` keeps the loss finite and avoids a division by zero, so
    (unlike :class:`torch.nn.GaussianNLLLoss`) no variance clamping is needed. The first term is
    evaluated as ``½ · (r · e^{−s/2})²`` with ``r = y − μ``, and as 0 where ``r = 0`` whatever
    ``s``, so value and gradient are finite wherever the exact ones are, except for
    ``s < −177.4`` with ``0 < |r| < 6·10⁻²⁰`` (float32; ``s < −1419`` in float64), where the term
    is ``+inf``. float16 and bfloat16 inputs are computed in float32 and the result is rounded to
    ``input``'s dtype, kept in float32 under autocast (``e^{−s}`` alone overflows float16 for
    ``s < −11.1``).

    Args:
        input: Predicted means ``μ``, floating point.
        target: Observations ``y`` of the same shape (cast to ``input``'s dtype).
        log_variance: Predicted ``s = log σ²``, the shape of ``input`` or broadcastable to it.
        full: Add the constant ``½ log 2π`` (the exact negative log-density).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The reduced loss, in ``input``'s dtype and device.

    Raises:
        ValueError: If ``log_variance`` does not broadcast to ``input``'s shape.

    Example:
        >>> import torch
        >>> gaussian_nll_loss(torch.zeros(1), torch.ones(1), log_variance=torch.zeros(1))
        tensor(0.5000)
    """
    check_reduction(reduction)
    full = check_bool("full", full)
    residual = _residual(input, target)
    check_floating("log_variance", log_variance)
    check_broadcastable_to("log_variance", log_variance, "input", input.shape)
    work_dtype = opmath_dtype(input.dtype)
    residual = residual.to(dtype=work_dtype)
    log_variance = log_variance.to(dtype=work_dtype)
    # (r · e^{−s/2})² = e^{−s} · r², without overflowing e^{−s} or underflowing r² on the way.
    scaled = residual * _precision_scale(residual, log_variance)
    loss = 0.5 * scaled.square() + 0.5 * log_variance
    if full:
        loss = loss + 0.5 * math.log(2.0 * math.pi)
    return in_result_dtype(reduce(loss, reduction), input)


def bbox_kl_loss(
    input: Tensor,
    target: Tensor,
    *,
    log_variance: Tensor,
    reduction: Reduction = "mean",
) -> Tensor:
    """KL loss for bounding-box regression with uncertainty.

    He, Zhu, Wang, Savvides & Zhang, CVPR 2019, "Bounding Box Regression with Uncertainty for
    Accurate Object Detection", eq. (5) and (9). With predicted coordinate ``x_e = input``,
    ground truth ``x_g = target`` and predicted ``α = log σ²``::

        L = e^{−α} · (x_g − x_e)² / 2 + α / 2          if |x_g − x_e| ≤ 1
            e^{−α} · (|x_g − x_e| − ½) + α / 2         otherwise

    i.e. ``e^{−α} · smoothL1(x_g − x_e) + α/2``; the constant ``½ log 2π`` and the entropy of the
    Dirac ground truth are dropped as in the paper. As in :func:`gaussian_nll_loss`, ``e^{−α}``
    is applied as two factors ``e^{−α/2}`` and the first term is 0 where ``x_g = x_e`` whatever
    ``α``, so value and gradient are finite wherever the exact ones are (except for
    ``α < −177.4`` with a residual below ``6·10⁻²⁰`` in float32), and float16 and bfloat16 inputs
    are computed in float32, the result rounded to ``input``'s dtype (kept in float32 under
    autocast).

    Args:
        input: Predicted box coordinates ``x_e`` (any shape, e.g. ``(N, 4)``).
        target: Ground-truth coordinates ``x_g`` of the same shape.
        log_variance: Predicted ``α``, the shape of ``input`` or broadcastable to it.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The reduced loss, in ``input``'s dtype and device.

    Raises:
        ValueError: If ``log_variance`` does not broadcast to ``input``'s shape.

    Example:
        >>> import torch
        >>> bbox_kl_loss(torch.tensor([0.5, 3.0]), torch.zeros(2),
        ...              log_variance=torch.zeros(2), reduction="none")
        tensor([0.1250, 2.5000])
    """
    check_reduction(reduction)
    residual = _residual(input, target)
    check_floating("log_variance", log_variance)
    check_broadcastable_to("log_variance", log_variance, "input", input.shape)
    work_dtype = opmath_dtype(input.dtype)
    residual = residual.to(dtype=work_dtype)
    log_variance = log_variance.to(dtype=work_dtype)
    absolute = residual.abs()
    # smoothL1 = ½q² + l with q = min(|r|, 1), l = max(|r| − 1, 0) = |r| − q. l is not formed as
    # |r| − q: for |r| < 1 its gradient would be e^{−α} · (1 − 1), NaN once e^{−α} overflows,
    # while the clamp passes no gradient at all.
    quadratic = absolute.clamp(max=1.0)
    linear = (absolute - 1.0).clamp(min=0.0)
    # e^{−α} · smoothL1 as ½ (q · e^{−α/2})² + (l · e^{−α/2}) · e^{−α/2}: see _precision_scale.
    # Each term takes the scale of its own factor: with the residual's, l = 0 (|r| ≤ 1) times
    # an overflowed e^{−α/2} made the value NaN where it is +inf (α = −200, r = 0.5).
    scale = _precision_scale(residual, log_variance)
    linear_scale = _precision_scale(linear, log_variance)
    weighted = 0.5 * (quadratic * scale).square() + (linear * linear_scale) * linear_scale
    return in_result_dtype(reduce(weighted + 0.5 * log_variance, reduction), input)
