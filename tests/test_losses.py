"""Tests for taskbalance.losses: references, gradients, dtypes, reductions, modules, errors."""

from __future__ import annotations

import doctest
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mpmath
import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import taskbalance.losses as losses
from taskbalance.losses import _classification, _common, _distances, _modules, _regression

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _residuals_away_from(
    shape: tuple[int, ...], bands: list[tuple[float, float]], generator: torch.Generator
) -> Tensor:
    """Residuals whose magnitudes fall in the given bands (away from kinks), random signs."""
    count = math.prod(shape)
    band = torch.randint(len(bands), (count,), generator=generator)
    low = torch.tensor([b[0] for b in bands], dtype=F64)[band]
    high = torch.tensor([b[1] for b in bands], dtype=F64)[band]
    magnitude = low + (high - low) * torch.rand(count, dtype=F64, generator=generator)
    sign = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0).to(F64)
    return (sign * magnitude).reshape(shape)


# ---------------------------------------------------------------------------------------------
# One case per loss: inputs in float64 away from non-differentiable points, converted per test.
# ---------------------------------------------------------------------------------------------


@dataclass
class LossCase:
    name: str
    function: Callable[..., Tensor]
    module: type[nn.Module]
    make: Callable[[torch.Generator], dict[str, Any]]
    none_shape: tuple[int, ...]
    grad_target: bool = True
    module_options: list[str] = field(default_factory=list)


def _regression_pair(bands: list[tuple[float, float]]) -> Callable[[torch.Generator], dict]:
    def make(generator: torch.Generator) -> dict[str, Any]:
        target = torch.randn(3, 4, dtype=F64, generator=generator)
        residual = _residuals_away_from((3, 4), bands, generator)
        return {"input": target + residual, "target": target, "options": {}, "forward": {}}

    return make


def _perceptual_extractor(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _make_case_inputs(case: LossCase, dtype: torch.dtype, device: str = "cpu") -> dict[str, Any]:
    made = case.make(_generator(7))

    def convert(value: Any) -> Any:
        if isinstance(value, Tensor):
            value = value.to(device)
            return value.to(dtype) if value.is_floating_point() else value
        if isinstance(value, nn.Module):
            return value.to(device=device, dtype=dtype)
        return value

    return {
        "input": convert(made["input"]),
        "target": convert(made["target"]),
        "options": {k: convert(v) for k, v in made["options"].items()},
        "forward": {k: convert(v) for k, v in made["forward"].items()},
    }


def _soft_labels(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return 0.1 + 0.8 * torch.rand(shape, dtype=F64, generator=generator)


CASES = [
    LossCase(
        "squared_error",
        losses.squared_error,
        losses.SquaredErrorLoss,
        _regression_pair([(0.1, 2.0)]),
        (3, 4),
    ),
    LossCase(
        "absolute_error",
        losses.absolute_error,
        losses.AbsoluteErrorLoss,
        _regression_pair([(0.1, 2.0)]),
        (3, 4),
    ),
    LossCase(
        "huber_loss",
        losses.huber_loss,
        losses.HuberLoss,
        _regression_pair([(0.1, 0.8), (1.3, 3.0)]),
        (3, 4),
    ),
    LossCase(
        "tukey_loss",
        losses.tukey_loss,
        losses.TukeyLoss,
        _regression_pair([(0.2, 4.3), (5.0, 8.0)]),
        (3, 4),
    ),
    LossCase(
        "binary_cross_entropy",
        losses.binary_cross_entropy,
        losses.BinaryCrossEntropyLoss,
        lambda g: {
            "input": _soft_labels((4, 3), g),
            "target": _soft_labels((4, 3), g),
            "options": {"weight": torch.rand(3, dtype=F64, generator=g) + 0.5},
            "forward": {},
        },
        (4, 3),
    ),
    LossCase(
        "binary_cross_entropy_logits",
        losses.binary_cross_entropy,
        losses.BinaryCrossEntropyLoss,
        lambda g: {
            "input": torch.randn(4, 3, dtype=F64, generator=g),
            "target": _soft_labels((4, 3), g),
            "options": {
                "from_logits": True,
                "pos_weight": torch.rand(3, dtype=F64, generator=g) + 0.5,
            },
            "forward": {},
        },
        (4, 3),
    ),
    LossCase(
        "cross_entropy_indices",
        losses.cross_entropy,
        losses.CrossEntropyLoss,
        lambda g: {
            "input": torch.randn(4, 3, 2, dtype=F64, generator=g),
            "target": torch.tensor([[0, 1], [2, -100], [1, 1], [0, 2]]),
            "options": {
                "weight": torch.rand(3, dtype=F64, generator=g) + 0.5,
                "label_smoothing": 0.1,
            },
            "forward": {},
        },
        (4, 2),
        grad_target=False,
    ),
    LossCase(
        "cross_entropy_probabilities",
        losses.cross_entropy,
        losses.CrossEntropyLoss,
        lambda g: {
            "input": torch.randn(4, 3, dtype=F64, generator=g),
            "target": torch.softmax(torch.randn(4, 3, dtype=F64, generator=g), dim=1),
            "options": {"label_smoothing": 0.2},
            "forward": {},
        },
        (4,),
        grad_target=False,
    ),
    LossCase(
        "focal_loss_binary",
        losses.focal_loss,
        losses.FocalLoss,
        lambda g: {
            "input": torch.randn(5, 3, dtype=F64, generator=g),
            "target": torch.randint(0, 2, (5, 3), generator=g).to(F64),
            "options": {"alpha": 0.25, "gamma": 2.0},
            "forward": {},
        },
        (5, 3),
        grad_target=False,
    ),
    LossCase(
        "focal_loss_multiclass",
        losses.focal_loss,
        losses.FocalLoss,
        lambda g: {
            "input": torch.randn(6, 4, dtype=F64, generator=g),
            "target": torch.randint(0, 4, (6,), generator=g),
            "options": {"alpha": torch.rand(4, dtype=F64, generator=g), "gamma": 1.5},
            "forward": {},
        },
        (6,),
        grad_target=False,
    ),
    LossCase(
        "dice_loss_binary",
        losses.dice_loss,
        losses.DiceLoss,
        lambda g: {
            "input": torch.randn(2, 3, 4, dtype=F64, generator=g),
            "target": _soft_labels((2, 3, 4), g),
            "options": {"from_logits": True},
            "forward": {},
        },
        (2,),
    ),
    LossCase(
        "dice_loss_multiclass",
        losses.dice_loss,
        losses.DiceLoss,
        lambda g: {
            "input": torch.randn(2, 3, 4, 4, dtype=F64, generator=g),
            "target": torch.randint(0, 3, (2, 4, 4), generator=g),
            "options": {
                "multiclass": True,
                "from_logits": True,
                "weight": torch.tensor([1.0, 2.0, 0.5], dtype=F64),
            },
            "forward": {},
        },
        (2,),
        grad_target=False,
    ),
    LossCase(
        "perceptual_loss",
        losses.perceptual_loss,
        losses.PerceptualLoss,
        lambda g: {
            "input": torch.randn(3, 5, dtype=F64, generator=g),
            "target": torch.randn(3, 5, dtype=F64, generator=g),
            "options": {
                "extractor": _perceptual_extractor(F64),
                "layers": ["1", "2"],
                "layer_weights": [1.0, 0.5],
            },
            "forward": {},
        },
        (3,),
        module_options=["extractor"],
    ),
    LossCase(
        "gaussian_nll_loss",
        losses.gaussian_nll_loss,
        losses.GaussianNLLLoss,
        lambda g: {
            "input": torch.randn(3, 4, dtype=F64, generator=g),
            "target": torch.randn(3, 4, dtype=F64, generator=g),
            "options": {"full": True},
            "forward": {"log_variance": torch.randn(3, 4, dtype=F64, generator=g)},
        },
        (3, 4),
    ),
    LossCase(
        "bbox_kl_loss",
        losses.bbox_kl_loss,
        losses.BBoxKLLoss,
        lambda g: {
            **_regression_pair([(0.1, 0.8), (1.3, 3.0)])(g),
            "forward": {"log_variance": torch.randn(3, 4, dtype=F64, generator=g)},
        },
        (3, 4),
    ),
    LossCase(
        "kl_divergence_logits",
        losses.kl_divergence,
        losses.KLDivergenceLoss,
        lambda g: {
            "input": torch.randn(3, 4, dtype=F64, generator=g),
            "target": torch.softmax(torch.randn(3, 4, dtype=F64, generator=g), dim=1),
            "options": {"from_logits": True},
            "forward": {},
        },
        (3,),
        grad_target=False,
    ),
    LossCase(
        "kl_divergence_probabilities",
        losses.kl_divergence,
        losses.KLDivergenceLoss,
        lambda g: {
            "input": torch.softmax(torch.randn(3, 4, dtype=F64, generator=g), dim=1),
            "target": torch.softmax(torch.randn(3, 4, dtype=F64, generator=g), dim=1),
            "options": {},
            "forward": {},
        },
        (3,),
    ),
    LossCase(
        "wasserstein_1d",
        losses.wasserstein_1d,
        losses.Wasserstein1DLoss,
        lambda g: {
            "input": torch.randn(2, 5, dtype=F64, generator=g),
            "target": torch.randn(2, 7, dtype=F64, generator=g) + 0.5,
            "options": {},
            "forward": {
                "input_weights": torch.rand(2, 5, dtype=F64, generator=g) + 0.1,
                "target_weights": torch.rand(2, 7, dtype=F64, generator=g) + 0.1,
            },
        },
        (2,),
    ),
    LossCase(
        "frechet_distance",
        losses.frechet_distance,
        losses.FrechetDistanceLoss,
        lambda g: {
            "input": torch.randn(2, 12, 3, dtype=F64, generator=g),
            "target": 1.5 * torch.randn(2, 10, 3, dtype=F64, generator=g) + 0.3,
            "options": {},
            "forward": {},
        },
        (2,),
    ),
]


def _call_function(case: LossCase, inputs: dict[str, Any], **extra: Any) -> Tensor:
    return case.function(
        inputs["input"], inputs["target"], **inputs["options"], **inputs["forward"], **extra
    )


def _build_module(case: LossCase, inputs: dict[str, Any], **extra: Any) -> nn.Module:
    options = dict(inputs["options"])
    positional = [options.pop(name) for name in case.module_options]
    return case.module(*positional, **options, **extra)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradcheck_float64(case: LossCase) -> None:
    inputs = _make_case_inputs(case, F64)
    names = ["input"] + (["target"] if case.grad_target else []) + list(inputs["forward"])
    tensors = [inputs[n] if n in ("input", "target") else inputs["forward"][n] for n in names]
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]

    def evaluate(*values: Tensor) -> Tensor:
        by_name = dict(zip(names, values, strict=True))
        forward = {k: by_name.get(k, v) for k, v in inputs["forward"].items()}
        return case.function(
            by_name["input"],
            by_name.get("target", inputs["target"]),
            **inputs["options"],
            **forward,
            reduction="none",
        )

    assert torch.autograd.gradcheck(evaluate, tuple(tensors), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dtype_device_reduction_and_module(case: LossCase, dtype: torch.dtype, device: str) -> None:
    inputs = _make_case_inputs(case, dtype, device)
    per_element = _call_function(case, inputs, reduction="none")
    assert per_element.shape == case.none_shape
    assert per_element.dtype == dtype
    assert per_element.device.type == device
    total = _call_function(case, inputs, reduction="sum")
    mean = _call_function(case, inputs, reduction="mean")
    assert total.shape == mean.shape == ()
    assert total.dtype == mean.dtype == dtype
    torch.testing.assert_close(total, per_element.sum())
    if not case.name.startswith(("cross_entropy_indices", "focal")):
        # Those two normalise by the (weighted) count of non-ignored targets, tested separately.
        torch.testing.assert_close(mean, per_element.mean())
    for reduction in ("mean", "sum", "none"):
        module = _build_module(case, inputs, reduction=reduction)
        from_module = module(inputs["input"], inputs["target"], **inputs["forward"])
        torch.testing.assert_close(from_module, _call_function(case, inputs, reduction=reduction))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_unknown_reduction_is_rejected(case: LossCase) -> None:
    inputs = _make_case_inputs(case, F64)
    with pytest.raises(ValueError, match=r"reduction: expected one of .* got 'avg'"):
        _call_function(case, inputs, reduction="avg")
    with pytest.raises(ValueError, match=r"reduction: expected one of .* got 'batchmean'"):
        _build_module(case, inputs, reduction="batchmean")


def test_module_doctests() -> None:
    for module in (losses, _classification, _common, _distances, _modules, _regression):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, module.__name__


# ---------------------------------------------------------------------------------------------
# Regression losses
# ---------------------------------------------------------------------------------------------

REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_squared_and_absolute_error_match_torch(reduction: str) -> None:
    g = _generator(1)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    torch.testing.assert_close(
        losses.squared_error(x, y, reduction=reduction),
        nn.functional.mse_loss(x, y, reduction=reduction),
    )
    torch.testing.assert_close(
        losses.absolute_error(x, y, reduction=reduction),
        nn.functional.l1_loss(x, y, reduction=reduction),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("delta", [0.3, 1.0, 2.5])
def test_huber_matches_torch(delta: float, reduction: str) -> None:
    g = _generator(2)
    x, y = 3 * torch.randn(40, generator=g), torch.randn(40, generator=g)
    reference = nn.HuberLoss(delta=delta, reduction=reduction)(x, y)
    torch.testing.assert_close(losses.huber_loss(x, y, delta=delta, reduction=reduction), reference)


@settings(max_examples=50, deadline=None)
@given(
    residual=st.floats(-1e3, 1e3, allow_nan=False),
    delta=st.floats(1e-3, 1e2, allow_nan=False),
)
def test_huber_bounds_property(residual: float, delta: float) -> None:
    # ½·min(r², δ|r|) ≤ ρ_δ(r) ≤ min(½r², δ|r|): quadratic inside, linear asymptote outside.
    value = losses.huber_loss(
        torch.tensor([residual], dtype=F64), torch.zeros(1, dtype=F64), delta=delta
    ).item()
    r2, linear = residual * residual, delta * abs(residual)
    assert 0.5 * min(r2, linear) - 1e-9 <= value <= min(0.5 * r2, linear) + 1e-9 * (1 + r2)


def _tukey_numpy(r: np.ndarray, c: float) -> np.ndarray:
    inside = np.abs(r) <= c
    return np.where(inside, c**2 / 6 * (1 - (1 - (r / c) ** 2) ** 3), c**2 / 6)


def test_tukey_matches_formula_and_is_constant_beyond_c() -> None:
    g = _generator(3)
    r = 4 * torch.randn(200, dtype=F64, generator=g)
    loss = losses.tukey_loss(r, torch.zeros_like(r), reduction="none")
    np.testing.assert_allclose(loss.numpy(), _tukey_numpy(r.numpy(), 4.685), rtol=1e-9, atol=1e-14)
    far = torch.tensor([4.7, -5.0, 10.0, 1e6], dtype=F64, requires_grad=True)
    far_loss = losses.tukey_loss(far, torch.zeros(4, dtype=F64), reduction="none")
    torch.testing.assert_close(far_loss, torch.full((4,), 4.685**2 / 6, dtype=F64))
    far_loss.sum().backward()
    assert torch.equal(far.grad, torch.zeros(4, dtype=F64))  # outliers do not pull
    custom = losses.tukey_loss(far, torch.zeros(4, dtype=F64), c=2.0, reduction="none")
    torch.testing.assert_close(custom, torch.full((4,), 4.0 / 6, dtype=F64))


@pytest.mark.parametrize("mad_dim", [None, 0])
def test_tukey_mad_scaling_matches_numpy_and_is_detached(mad_dim: int | None) -> None:
    g = _generator(4)
    x = torch.randn(9, 3, dtype=F64, generator=g)
    x[0, 0] = 40.0  # an outlier
    y = torch.randn(9, 3, dtype=F64, generator=g)
    residual = (x - y).numpy()
    axis = None if mad_dim is None else 0
    median = np.median(residual, axis=axis, keepdims=True)
    scale = 1.4826 * np.median(np.abs(residual - median), axis=axis, keepdims=True)
    expected = _tukey_numpy(residual / scale, 4.685)
    x.requires_grad_(True)
    loss = losses.tukey_loss(x, y, mad_scaling=True, mad_dim=mad_dim, reduction="none")
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-9, atol=1e-14)
    # The MAD is a constant: the gradient is that of the loss on residuals / fixed scale.
    loss.sum().backward()
    x_fixed = x.detach().clone().requires_grad_(True)
    scale_t = torch.from_numpy(scale)
    reference = losses.tukey_loss(x_fixed / scale_t, y / scale_t, reduction="sum")
    reference.backward()
    torch.testing.assert_close(x.grad, x_fixed.grad)


def test_tukey_mad_even_count_and_zero_mad() -> None:
    # Median of an even count is the mean of the middle values: residuals 1, 2, 3, 10.
    r = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=F64)
    scale = 1.4826 * np.median(np.abs(r.numpy() - np.median(r.numpy())))
    loss = losses.tukey_loss(r, torch.zeros(4, dtype=F64), mad_scaling=True, reduction="none")
    np.testing.assert_allclose(loss.numpy(), _tukey_numpy(r.numpy() / scale, 4.685))
    # All residuals equal: MAD = 0 is floored, the loss stays finite.
    same = losses.tukey_loss(torch.ones(5), torch.zeros(5), mad_scaling=True, reduction="none")
    assert torch.isfinite(same).all()


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gaussian_nll_matches_torch(full: bool, reduction: str) -> None:
    g = _generator(5)
    mean, target = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    log_variance = torch.randn(6, 2, generator=g)
    reference = nn.GaussianNLLLoss(full=full, reduction=reduction)(mean, target, log_variance.exp())
    ours = losses.gaussian_nll_loss(
        mean, target, log_variance=log_variance, full=full, reduction=reduction
    )
    torch.testing.assert_close(ours, reference)
    # Homoscedastic: one log-variance per column broadcasts over the batch.
    shared = torch.randn(2, generator=g)
    torch.testing.assert_close(
        losses.gaussian_nll_loss(mean, target, log_variance=shared, reduction=reduction),
        losses.gaussian_nll_loss(
            mean, target, log_variance=shared.expand(6, 2), reduction=reduction
        ),
    )


def test_bbox_kl_loss_closed_forms() -> None:
    g = _generator(6)
    target = torch.randn(8, 4, dtype=F64, generator=g)
    near = target + (torch.rand(8, 4, dtype=F64, generator=g) * 2 - 1)  # |x_g − x_e| ≤ 1
    zero = torch.zeros(8, 4, dtype=F64)
    torch.testing.assert_close(
        losses.bbox_kl_loss(near, target, log_variance=zero, reduction="none"),
        0.5 * (near - target) ** 2,
    )
    # General α, both branches, against the paper's piecewise formula.
    x_e = target + 3 * torch.randn(8, 4, dtype=F64, generator=g)
    alpha = torch.randn(8, 4, dtype=F64, generator=g)
    d = (target - x_e).abs().numpy()
    a = alpha.numpy()
    expected = np.where(d <= 1, np.exp(-a) * d**2 / 2 + a / 2, np.exp(-a) * (d - 0.5) + a / 2)
    np.testing.assert_allclose(
        losses.bbox_kl_loss(x_e, target, log_variance=alpha, reduction="none").numpy(),
        expected,
        rtol=1e-12,
    )


@pytest.mark.parametrize("alpha", [-200.0, -300.0])
def test_bbox_kl_loss_is_inf_not_nan_where_the_exact_value_overflows(alpha: float) -> None:
    """e^{−α}·r²/2 at α = −200, r = 0.5 is ~1e86: +inf in float32, as gaussian_nll_loss gives.
    The linear term's 0 (|r| ≤ 1) times the overflowed scale made it NaN (review)."""
    residuals = torch.tensor([0.5, 3.0, 0.0])
    log_variance = torch.full((3,), alpha)
    value = losses.bbox_kl_loss(
        residuals, torch.zeros(3), log_variance=log_variance, reduction="none"
    )
    assert value.tolist() == [math.inf, math.inf, alpha / 2]  # r = 0: no term, whatever α
    # in float64 the same inputs are finite, and match the paper's piecewise formula
    wide = losses.bbox_kl_loss(
        residuals.double(),
        torch.zeros(3, dtype=F64),
        log_variance=torch.full((3,), alpha, dtype=F64),
        reduction="none",
    )
    expected = [math.exp(-alpha) * 0.125 + alpha / 2, math.exp(-alpha) * 2.5 + alpha / 2, alpha / 2]
    np.testing.assert_allclose(wide.numpy(), expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Classification and segmentation losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_matches_torch(reduction: str) -> None:
    g = _generator(8)
    p = torch.rand(5, 3, generator=g).clamp(0.01, 0.99)
    y = torch.rand(5, 3, generator=g)
    weight = torch.rand(3, generator=g)
    torch.testing.assert_close(
        losses.binary_cross_entropy(p, y, weight=weight, reduction=reduction),
        nn.BCELoss(weight=weight, reduction=reduction)(p, y),
    )
    logits = 10 * torch.randn(5, 3, generator=g)
    pos_weight = torch.rand(3, generator=g) * 3
    torch.testing.assert_close(
        losses.binary_cross_entropy(
            logits, y, from_logits=True, weight=weight, pos_weight=pos_weight, reduction=reduction
        ),
        nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight, reduction=reduction)(logits, y),
    )


def test_binary_cross_entropy_extremes_are_finite() -> None:
    p = torch.tensor([0.0, 1.0, 0.0, 1.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = losses.binary_cross_entropy(p, y, reduction="none")
    torch.testing.assert_close(loss, nn.BCELoss(reduction="none")(p, y))  # log floor −100
    loss.sum().backward()
    assert torch.isfinite(p.grad).all()
    logits = torch.tensor([-200.0, 200.0], requires_grad=True)
    loss = losses.binary_cross_entropy(logits, torch.tensor([1.0, 0.0]), from_logits=True)
    torch.testing.assert_close(loss, torch.tensor(200.0))
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(("p", "y"), [(0.0, 1.0), (1.0, 0.0), (0.0, 0.5), (1.0, 0.25)])
def test_binary_cross_entropy_gradient_points_to_the_label_at_the_boundary(p, y) -> None:
    """At a probability of exactly 0 or 1 the floored log passed no gradient: a confident
    wrong p = 0 (y = 1) got none, and p = 0, y = ½ only the other term's, +½, which steps
    away from the label (found in review). The gradient is now BCELoss's there."""
    ours = torch.tensor([p], requires_grad=True)
    theirs = torch.tensor([p], requires_grad=True)
    losses.binary_cross_entropy(ours, torch.tensor([y])).backward()
    nn.BCELoss()(theirs, torch.tensor([y])).backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=0.0)
    assert abs(ours.grad.item()) > 1e11


def test_binary_cross_entropy_gradients_are_exact_inside_and_at_a_matching_boundary() -> None:
    g = _generator(21)
    p = torch.rand(50, dtype=F64, generator=g).clamp(1e-6, 1 - 1e-6).requires_grad_(True)
    y = torch.rand(50, dtype=F64, generator=g)
    (grad,) = torch.autograd.grad(
        losses.binary_cross_entropy(p, y, reduction="sum"), p, create_graph=True
    )
    torch.testing.assert_close(grad, (p - y) / (p * (1 - p)))  # −y/p + (1 − y)/(1 − p)
    (second,) = torch.autograd.grad(grad.sum(), p)
    torch.testing.assert_close(second, y / p**2 + (1 - y) / (1 - p) ** 2)
    # p = y ∈ {0, 1}: the exact ±1 (BCELoss gives 0 there)
    edge = torch.tensor([0.0, 1.0], requires_grad=True)
    losses.binary_cross_entropy(edge, torch.tensor([0.0, 1.0]), reduction="sum").backward()
    assert edge.grad.tolist() == [1.0, -1.0]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_indices_match_torch(
    weighted: bool, label_smoothing: float, reduction: str
) -> None:
    g = _generator(9)
    logits = torch.randn(6, 4, 3, generator=g)
    target = torch.randint(0, 4, (6, 3), generator=g)
    target[0, 0] = target[2, 1] = 255
    weight = torch.rand(4, generator=g) + 0.1 if weighted else None
    kwargs = {"weight": weight, "ignore_index": 255, "label_smoothing": label_smoothing}
    reference = nn.CrossEntropyLoss(**kwargs, reduction=reduction)(logits, target)
    ours = losses.cross_entropy(logits, target, **kwargs, reduction=reduction)
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_probabilities_match_torch(
    weighted: bool, label_smoothing: float, reduction: str
) -> None:
    g = _generator(10)
    logits = torch.randn(5, 4, 2, generator=g)
    target = torch.softmax(torch.randn(5, 4, 2, generator=g), dim=1)
    weight = torch.rand(4, generator=g) + 0.1 if weighted else None
    reference = nn.CrossEntropyLoss(
        weight=weight, label_smoothing=label_smoothing, reduction=reduction
    )(logits, target)
    ours = losses.cross_entropy(
        logits, target, weight=weight, label_smoothing=label_smoothing, reduction=reduction
    )
    torch.testing.assert_close(ours, reference)


def test_cross_entropy_unbatched_matches_torch() -> None:
    logits = torch.tensor([1.0, -0.5, 2.0])
    torch.testing.assert_close(
        losses.cross_entropy(logits, torch.tensor(2)),
        nn.functional.cross_entropy(logits, torch.tensor(2)),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_with_gamma_zero_is_cross_entropy(reduction: str) -> None:
    g = _generator(11)
    logits = 3 * torch.randn(7, 5, generator=g)
    labels = torch.randint(0, 5, (7,), generator=g)
    torch.testing.assert_close(
        losses.focal_loss(logits, labels, gamma=0.0, reduction=reduction),
        nn.CrossEntropyLoss(reduction=reduction)(logits, labels),
    )
    binary = torch.randint(0, 2, (7, 5), generator=g).float()
    torch.testing.assert_close(
        losses.focal_loss(logits, binary, gamma=0.0, reduction=reduction),
        nn.BCEWithLogitsLoss(reduction=reduction)(logits, binary),
    )
    labels[3] = -100  # ignored entries drop out of the mean, as in cross-entropy
    torch.testing.assert_close(
        losses.focal_loss(logits, labels, gamma=0.0, reduction=reduction),
        nn.CrossEntropyLoss(reduction=reduction)(logits, labels),
    )


def test_focal_matches_paper_formula() -> None:
    g = _generator(12)
    logits = torch.randn(10, 3, dtype=F64, generator=g)
    labels = torch.randint(0, 3, (10,), generator=g)
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    p_t = torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1).numpy()
    expected = -alpha.numpy()[labels.numpy()] * (1 - p_t) ** 2 * np.log(p_t)
    ours = losses.focal_loss(logits, labels, alpha=alpha, reduction="none")
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10)
    # Binary, torchvision's sigmoid_focal_loss formula with α = 0.25.
    x = torch.randn(10, dtype=F64, generator=g)
    y = torch.randint(0, 2, (10,), generator=g).to(F64)
    p = torch.sigmoid(x).numpy()
    yn = y.numpy()
    p_t = p * yn + (1 - p) * (1 - yn)
    alpha_t = 0.25 * yn + 0.75 * (1 - yn)
    expected = -alpha_t * (1 - p_t) ** 2 * np.log(p_t)
    ours = losses.focal_loss(x, y, alpha=0.25, reduction="none")
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10)


def test_focal_is_stable_for_confident_predictions() -> None:
    logits = torch.tensor([[60.0, -60.0], [-60.0, 60.0]], requires_grad=True)
    loss = losses.focal_loss(logits, torch.tensor([0, 0]), gamma=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def _dice_numpy(p: np.ndarray, g: np.ndarray, smooth: float, axes: tuple[int, ...]) -> np.ndarray:
    return 1 - (2 * (p * g).sum(axes) + smooth) / (p.sum(axes) + g.sum(axes) + smooth)


def test_dice_matches_formula_and_perfect_prediction_is_zero() -> None:
    g = _generator(13)
    p = torch.rand(3, 4, 5, dtype=F64, generator=g)
    mask = torch.randint(0, 2, (3, 4, 5), generator=g).to(F64)
    for smooth in (0.0, 1.0):
        ours = losses.dice_loss(p, mask, smooth=smooth, reduction="none")
        np.testing.assert_allclose(
            ours.numpy(), _dice_numpy(p.numpy(), mask.numpy(), smooth, (1, 2))
        )
        assert losses.dice_loss(mask, mask, smooth=smooth).item() == 0.0
    logits = torch.randn(3, 4, 5, dtype=F64, generator=g)
    torch.testing.assert_close(
        losses.dice_loss(logits, mask, from_logits=True), losses.dice_loss(logits.sigmoid(), mask)
    )


def test_dice_multiclass_matches_formula_with_weights() -> None:
    g = _generator(14)
    logits = torch.randn(2, 3, 4, 4, dtype=F64, generator=g)
    labels = torch.randint(0, 3, (2, 4, 4), generator=g)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    one_hot = nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).to(F64)
    per_class = _dice_numpy(logits.softmax(1).numpy(), one_hot.numpy(), 1.0, (2, 3))
    expected = (per_class * weight.numpy()).sum(1) / weight.sum().item()
    ours = losses.dice_loss(
        logits, labels, multiclass=True, from_logits=True, weight=weight, reduction="none"
    )
    np.testing.assert_allclose(ours.numpy(), expected)
    # One-hot targets are the same as class indices; perfect predictions give 0.
    torch.testing.assert_close(
        losses.dice_loss(logits, one_hot, multiclass=True, from_logits=True, weight=weight),
        ours.mean(),
    )
    assert losses.dice_loss(one_hot, labels, multiclass=True, smooth=0.0).item() == 0.0


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        ([0.0, 0.0, 0.0], r"weight: expected a positive, finite sum .* got 0"),
        ([1.0, -1.0, 1.0], r"weight: expected finite weights >= 0, got -1"),
        ([1.0, math.inf, 1.0], r"weight: expected finite weights >= 0, got inf"),
        ([3e38, 3e38, 1.0], r"weight: expected a positive, finite sum .* got inf"),
    ],
)
def test_dice_refuses_class_weights_without_an_average(weight, message) -> None:
    """All-zero class weights averaged 0/0: a NaN loss, not an error (review)."""
    labels = torch.tensor([[0, 1], [2, 1]]).unsqueeze(0)
    with pytest.raises(ValueError, match=message):
        losses.dice_loss(
            torch.zeros(1, 3, 2, 2), labels, multiclass=True, weight=torch.tensor(weight)
        )


def test_dice_empty_masks_are_defined() -> None:
    empty = torch.zeros(2, 6, requires_grad=True)
    for smooth in (0.0, 1.0):
        loss = losses.dice_loss(empty, torch.zeros(2, 6), smooth=smooth)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(empty.grad).all()
    # An empty class in a multi-class image (class 2 never appears, never predicted).
    probabilities = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    labels = torch.tensor([[0, 1]])
    assert losses.dice_loss(probabilities, labels, multiclass=True, smooth=0.0).item() == 0.0
    # Predicting something where the mask is empty is penalised.
    assert losses.dice_loss(torch.ones(1, 4), torch.zeros(1, 4), smooth=0.0).item() == 1.0


# ---------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------


def test_perceptual_loss_matches_manual_features_and_removes_hooks() -> None:
    extractor = _perceptual_extractor(torch.float32)
    g = _generator(15)
    x, y = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    hidden = lambda v: torch.tanh(extractor[0](v))  # noqa: E731
    expected = ((hidden(x) - hidden(y)) ** 2).mean(1) + 0.25 * (
        (extractor(x) - extractor(y)) ** 2
    ).mean(1)
    ours = losses.perceptual_loss(
        x, y, extractor=extractor, layers=["1", "2"], layer_weights=[1.0, 0.25], reduction="none"
    )
    torch.testing.assert_close(ours, expected)
    assert all(not m._forward_hooks for m in extractor.modules())

    def two_outputs(v: Tensor) -> list[Tensor]:
        return [hidden(v), extractor(v)]

    torch.testing.assert_close(
        losses.perceptual_loss(x, y, extractor=two_outputs, layer_weights=[1.0, 0.25]),
        expected.mean(),
    )
    absolute = losses.perceptual_loss(
        x, y, extractor=extractor, distance="absolute", reduction="sum"
    )
    torch.testing.assert_close(absolute, (extractor(x) - extractor(y)).abs().mean(1).sum())
    assert losses.perceptual_loss(x, x, extractor=extractor).item() == 0.0


def test_perceptual_loss_errors() -> None:
    extractor = _perceptual_extractor(torch.float32)
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"layers: expected names of submodules .* got 'head'"):
        losses.perceptual_loss(x, x, extractor=extractor, layers=["head"])
    assert all(not m._forward_hooks for m in extractor.modules())
    with pytest.raises(ValueError, match=r"layer_weights: expected one entry per .* \(1\), got 2"):
        losses.perceptual_loss(x, x, extractor=extractor, layer_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"distance: expected one of \[.*\], got 'l3'"):
        losses.perceptual_loss(x, x, extractor=extractor, distance="l3")
    with pytest.raises(TypeError, match="extractor: expected to return a tensor"):
        losses.perceptual_loss(x, x, extractor=lambda v: 3)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kl_divergence_matches_torch(reduction: str) -> None:
    g = _generator(16)
    logits = torch.randn(6, 5, generator=g)
    target = torch.softmax(torch.randn(6, 5, generator=g), dim=1)
    reference = nn.KLDivLoss(reduction="none" if reduction == "none" else reduction)(
        torch.log_softmax(logits, 1), target
    )
    if reduction == "none":
        reference = reference.sum(1)  # our "none" is one divergence per distribution
    ours_reduction = "mean" if reduction == "batchmean" else reduction
    torch.testing.assert_close(
        losses.kl_divergence(logits, target, from_logits=True, reduction=ours_reduction),
        reference,
    )
    torch.testing.assert_close(
        losses.kl_divergence(logits.softmax(1), target, reduction=ours_reduction), reference
    )


def test_kl_divergence_zero_mass_conventions() -> None:
    target = torch.tensor([[0.5, 0.5, 0.0]])
    prediction = torch.tensor([[0.25, 0.75, 0.0]], requires_grad=True)
    loss = losses.kl_divergence(prediction, target)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(prediction.grad).all()
    assert (
        losses.kl_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])).item() == math.inf
    )
    with pytest.raises(
        ValueError, match=r"target: expected sums of 1 along dim 1 .* got sums in \[1.2"
    ):
        losses.kl_divergence(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.6, 0.6]]))


@pytest.mark.parametrize("weighted", [False, True])
def test_wasserstein_matches_scipy(weighted: bool) -> None:
    rng = np.random.default_rng(17)
    for n, m in [(1, 1), (5, 8), (30, 17)]:
        u, v = rng.normal(size=n), rng.normal(1.0, 2.0, size=m)
        u_weights = rng.uniform(0.1, 2.0, size=n) if weighted else None
        v_weights = rng.uniform(0.1, 2.0, size=m) if weighted else None
        expected = scipy.stats.wasserstein_distance(u, v, u_weights, v_weights)
        ours = losses.wasserstein_1d(
            torch.from_numpy(u),
            torch.from_numpy(v),
            input_weights=None if u_weights is None else torch.from_numpy(u_weights),
            target_weights=None if v_weights is None else torch.from_numpy(v_weights),
        )
        assert ours.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_wasserstein_batched_and_ties() -> None:
    rng = np.random.default_rng(18)
    u = rng.integers(0, 4, size=(3, 6)).astype(float)  # many ties
    v = rng.integers(0, 4, size=(3, 9)).astype(float)
    ours = losses.wasserstein_1d(torch.from_numpy(u), torch.from_numpy(v), reduction="none")
    expected = [scipy.stats.wasserstein_distance(a, b) for a, b in zip(u, v, strict=True)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    u=st.lists(st.floats(-100, 100), min_size=1, max_size=12),
    v=st.lists(st.floats(-100, 100), min_size=1, max_size=12),
)
def test_wasserstein_symmetric_and_non_negative(u: list[float], v: list[float]) -> None:
    a, b = torch.tensor(u, dtype=F64), torch.tensor(v, dtype=F64)
    forward, backward = losses.wasserstein_1d(a, b), losses.wasserstein_1d(b, a)
    assert forward.item() >= 0
    assert forward.item() == pytest.approx(backward.item(), rel=1e-9, abs=1e-9)
    assert forward.item() == pytest.approx(scipy.stats.wasserstein_distance(u, v), abs=1e-8)


def _frechet_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """The reference FID computation (pytorch-fid): numpy.cov and scipy.linalg.sqrtm."""
    mu1, mu2 = x.mean(0), y.mean(0)
    sigma1, sigma2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _frechet_symmetric_eigh(x: np.ndarray, y: np.ndarray) -> float:
    """The symmetric form Tr((Σ1^½ Σ2 Σ1^½)^½) with eigh and clamped eigenvalues."""
    sigma1, sigma2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    values, vectors = np.linalg.eigh(sigma1)
    root = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root @ sigma2 @ root)
    diff = x.mean(0) - y.mean(0)
    trace_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    g = _generator(19)
    for shape in [(50, 4), (6, 10)]:
        features = torch.randn(*shape, dtype=F64, generator=g)
        assert losses.frechet_distance(features, features).item() == pytest.approx(0, abs=1e-10)
    features32 = torch.randn(200, 8, generator=g) * 5
    assert losses.frechet_distance(features32, features32).item() == pytest.approx(0, abs=1e-3)


@pytest.mark.parametrize("shapes", [((40, 5), (30, 5)), ((6, 8), (9, 8)), ((3, 4), (30, 4))])
def test_frechet_distance_matches_scipy_sqrtm(
    shapes: tuple[tuple[int, int], tuple[int, int]],
) -> None:
    rng = np.random.default_rng(20)
    mixing = rng.normal(size=(shapes[0][1], shapes[0][1]))
    x = rng.normal(size=shapes[0]) @ mixing
    y = rng.normal(0.5, 1.5, size=shapes[1])
    ours = losses.frechet_distance(torch.from_numpy(x), torch.from_numpy(y)).item()
    assert ours == pytest.approx(_frechet_numpy(x, y), rel=1e-6, abs=1e-8)
    assert ours == pytest.approx(_frechet_symmetric_eigh(x, y), rel=1e-8, abs=1e-8)


def _with_exact_moments(
    rng: np.random.Generator, n: int, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """Samples whose sample mean and unbiased covariance are exactly ``mean``, ``diag(std²)``."""
    raw = rng.normal(size=(n, len(mean)))
    raw -= raw.mean(0)
    orthonormal, _ = np.linalg.qr(raw)  # columns orthonormal and orthogonal to the ones vector
    return mean + orthonormal * std * np.sqrt(n - 1)


def test_frechet_distance_diagonal_gaussians_closed_form() -> None:
    rng = np.random.default_rng(21)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    std1, std2 = rng.uniform(0.5, 2, size=4), rng.uniform(0.5, 2, size=4)
    x = _with_exact_moments(rng, 25, mu1, std1)
    y = _with_exact_moments(rng, 31, mu2, std2)
    np.testing.assert_allclose(np.cov(x, rowvar=False), np.diag(std1**2), atol=1e-12)
    # Diagonal covariances: Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) = Σ_i (σ1_i − σ2_i)².
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum((std1 - std2) ** 2)
    ours = losses.frechet_distance(torch.from_numpy(x), torch.from_numpy(y)).item()
    assert ours == pytest.approx(closed_form, rel=1e-10)
    assert _frechet_numpy(x, y) == pytest.approx(closed_form, rel=1e-8)
    # Large samples from the Gaussians themselves approach the population value.
    gx = rng.normal(mu1, std1, size=(20000, 4))
    gy = rng.normal(mu2, std2, size=(20000, 4))
    approx = losses.frechet_distance(torch.from_numpy(gx), torch.from_numpy(gy)).item()
    assert approx == pytest.approx(closed_form, rel=0.05, abs=0.05)


def test_frechet_distance_batched() -> None:
    g = _generator(22)
    x, y = (
        torch.randn(3, 20, 4, dtype=F64, generator=g),
        torch.randn(3, 15, 4, dtype=F64, generator=g),
    )
    batched = losses.frechet_distance(x, y, reduction="none")
    single = torch.stack([losses.frechet_distance(a, b) for a, b in zip(x, y, strict=True)])
    torch.testing.assert_close(batched, single)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_shape_mismatch_names_both_shapes() -> None:
    x, y = torch.zeros(3, 1), torch.zeros(3)
    pattern = (
        r"input, target: expected the same shape, "
        r"got input shape \(3, 1\) and target shape \(3,\)"
    )
    for function in (
        losses.squared_error,
        losses.absolute_error,
        losses.huber_loss,
        losses.tukey_loss,
        losses.binary_cross_entropy,
        losses.dice_loss,
    ):
        with pytest.raises(ValueError, match=pattern):
            function(x, y)
    with pytest.raises(ValueError, match=pattern):
        losses.gaussian_nll_loss(x, y, log_variance=x)
    with pytest.raises(ValueError, match=r"log_variance: expected the shape of input .* \(4,\)"):
        losses.bbox_kl_loss(y, y, log_variance=torch.zeros(4))
    with pytest.raises(
        ValueError, match=r"target: expected shape \(2,\) .* shape \(2, 3\).* got shape \(3,\)"
    ):
        losses.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got input shape \(2, 3\) and target shape \(2, 4\)"):
        losses.frechet_distance(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"got input shape \(2, 3\) and target shape \(3, 3\)"):
        losses.wasserstein_1d(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="pass multiclass=True"):
        losses.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_bad_hyperparameters_name_the_argument_and_value() -> None:
    x = torch.zeros(4)
    with pytest.raises(ValueError, match=r"delta: expected a number > 0, got 0"):
        losses.huber_loss(x, x, delta=0)
    with pytest.raises(ValueError, match=r"delta: expected a number > 0, got -1.0"):
        losses.HuberLoss(delta=-1.0)
    with pytest.raises(ValueError, match=r"c: expected a number > 0, got -2"):
        losses.tukey_loss(x, x, c=-2)
    with pytest.raises(ValueError, match=r"gamma: expected a number >= 0, got -1"):
        losses.focal_loss(x, x, gamma=-1)
    with pytest.raises(ValueError, match=r"alpha: expected a float in \[0, 1\] .* got 1.5"):
        losses.focal_loss(x, x, alpha=1.5)
    with pytest.raises(ValueError, match=r"smooth: expected a number >= 0, got -1"):
        losses.dice_loss(torch.zeros(1, 4), torch.zeros(1, 4), smooth=-1)
    with pytest.raises(ValueError, match=r"label_smoothing: expected a number in \[0.0, 1.0\]"):
        losses.cross_entropy(
            torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), label_smoothing=1.5
        )
    with pytest.raises(ValueError, match=r"mad_dim: expected None or in \[-1, 0\] .* got 3"):
        losses.tukey_loss(x, x, mad_scaling=True, mad_dim=3)


def test_class_index_out_of_range() -> None:
    logits = torch.zeros(2, 3)
    message = r"target: expected class indices in \[0, 2\].* \(input has 3 classes\), got 3"
    with pytest.raises(ValueError, match=message):
        losses.cross_entropy(logits, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"target: expected class indices in \[0, 2\] .*, got -1"):
        losses.cross_entropy(logits, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=message):
        losses.focal_loss(logits, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=message):
        losses.dice_loss(logits, torch.tensor([0, 3]), multiclass=True)
    with pytest.raises(ValueError, match=r"weight: expected shape \(3,\) .* got shape \(2,\)"):
        losses.cross_entropy(logits, torch.tensor([0, 1]), weight=torch.ones(2))
    with pytest.raises(ValueError, match=r"alpha: expected a tensor of shape \(C,\)"):
        losses.focal_loss(logits, torch.tensor([0, 1]), alpha=0.25)


def test_invalid_probabilities() -> None:
    with pytest.raises(ValueError, match=r"input: expected probabilities in \[0, 1\], got 1.5"):
        losses.binary_cross_entropy(torch.tensor([0.5, 1.5]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"target: expected probabilities in \[0, 1\], got 2"):
        losses.binary_cross_entropy(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 2.0]))
    with pytest.raises(
        ValueError, match=r"target: expected sums of 1 along dim 1 .* got sums in \[0.5"
    ):
        losses.cross_entropy(torch.zeros(2, 2), torch.tensor([[0.25, 0.25], [0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"input: expected sums of 1 along dim 1"):
        losses.kl_divergence(torch.tensor([[0.9, 0.9]]), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"non-negative entries, got a minimum of -0.5"):
        losses.kl_divergence(torch.tensor([[1.5, -0.5]]), torch.tensor([[0.5, 0.5]]))
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"input_weights: expected finite weights >= 0"):
            losses.wasserstein_1d(
                torch.zeros(2), torch.zeros(2), input_weights=torch.tensor([1.0, bad])
            )
    with pytest.raises(ValueError, match=r"target_weights: expected a positive, finite sum .* inf"):
        losses.wasserstein_1d(
            torch.zeros(2), torch.zeros(2), target_weights=torch.tensor([3e38, 3e38])
        )
    with pytest.raises(ValueError, match=r"target_weights: expected a positive, finite sum .* 0"):
        losses.wasserstein_1d(torch.zeros(2), torch.zeros(2), target_weights=torch.zeros(2))


def test_type_errors() -> None:
    with pytest.raises(
        TypeError, match=r"input: expected a floating-point tensor, got dtype torch.int64"
    ):
        losses.squared_error(torch.tensor([1, 2]), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"target: expected a tensor, got list"):
        losses.squared_error(torch.zeros(2), [0.0, 0.0])
    with pytest.raises(TypeError, match=r"target: expected integer class indices .* torch.bool"):
        losses.cross_entropy(torch.zeros(2, 3), torch.tensor([True, False]))


# ---------------------------------------------------------------------------------------------
# Regressions: half precision, integer index dtypes, degenerate shapes, module options
# ---------------------------------------------------------------------------------------------

HALF_DTYPES = [torch.float16, torch.bfloat16]


def _unit_roundoff(dtype: torch.dtype) -> float:
    """The largest relative error of rounding a real number to ``dtype``."""
    return torch.finfo(dtype).eps / 2


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_dice_half_precision_sums_in_float32(dtype: torch.dtype) -> None:
    # Σp + Σg = 80000 exceeds float16's 65504: summed in float16 it was inf, and inf/inf NaN.
    ones = torch.ones(1, 1, 200, 200, dtype=dtype)
    loss = losses.dice_loss(ones, ones)
    assert loss.dtype == dtype
    assert loss.item() == 0.0
    g = _generator(40)
    p = torch.rand(2, 256, 256, generator=g).to(dtype)
    mask = (torch.rand(2, 256, 256, generator=g) < 0.7).to(dtype)
    ours = losses.dice_loss(p, mask, reduction="none")
    assert ours.dtype == dtype
    expected = _dice_numpy(p.double().numpy(), mask.double().numpy(), 1.0, (1, 2))
    # Computed in float32 and rounded once: within the dtype's unit roundoff of float64.
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1.01 * _unit_roundoff(dtype))
    logits = torch.randn(2, 3, 128, 128, generator=g).to(dtype)
    labels = torch.randint(0, 3, (2, 128, 128), generator=g)
    multi = losses.dice_loss(logits, labels, multiclass=True, from_logits=True, reduction="none")
    assert multi.dtype == dtype
    probabilities = scipy.special.softmax(logits.double().numpy(), axis=1)
    one_hot = np.moveaxis(np.eye(3)[labels.numpy()], -1, 1)
    expected = _dice_numpy(probabilities, one_hot, 1.0, (2, 3)).mean(1)
    np.testing.assert_allclose(multi.double().numpy(), expected, rtol=1.01 * _unit_roundoff(dtype))


def _precision_weighted_reference(
    residual: np.ndarray, log_variance: np.ndarray, *, bbox: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``e^{−s} f(r) + s/2`` and its derivatives in μ (``r = y − μ``) and s, with 50 digits.

    ``f`` is ``r²/2`` (Gaussian NLL) or smooth-L1 (KL box loss); mpmath has no overflow, so
    this is exact to float64 rounding where ``e^{−s}`` overflows any float dtype.
    """
    value, grad_input, grad_log_variance = [], [], []
    with mpmath.workdps(50):
        for r_float, s_float in zip(residual.tolist(), log_variance.tolist(), strict=True):
            r, s = mpmath.mpf(r_float), mpmath.mpf(s_float)
            if bbox and abs(r) > 1:
                f, slope = abs(r) - mpmath.mpf(0.5), mpmath.sign(r)
            else:
                f, slope = r * r / 2, r
            precision = mpmath.exp(-s)
            value.append(float(precision * f + s / 2))
            grad_input.append(float(-precision * slope))
            grad_log_variance.append(float(-precision * f + mpmath.mpf(0.5)))
    return np.array(value), np.array(grad_input), np.array(grad_log_variance)


# (residual, log-variance) pairs where e^{−s} overflows the dtype (or float32, for bfloat16).
_OVERFLOWING_PRECISIONS = {
    torch.float16: [(0.0, -12.0), (0.0, -30.0), (1e-3, -15.0), (-0.5, -9.0)],
    torch.bfloat16: [(0.0, -89.0), (0.0, -170.0), (1e-20, -100.0)],
    torch.float32: [(0.0, -89.0), (0.0, -1000.0), (1e-20, -100.0), (1e-36, -170.0)],
    torch.float64: [(0.0, -800.0), (1e-160, -800.0)],
}


@pytest.mark.parametrize("bbox", [False, True], ids=["gaussian_nll", "bbox_kl"])
@pytest.mark.parametrize("dtype", [*HALF_DTYPES, torch.float32, torch.float64])
def test_precision_weighted_losses_stay_finite_where_exp_overflows(
    dtype: torch.dtype, bbox: bool
) -> None:
    g = _generator(41)
    extreme = torch.tensor(_OVERFLOWING_PRECISIONS[dtype], dtype=F64)
    residual = torch.cat([0.5 * torch.randn(200, dtype=F64, generator=g), extreme[:, 0]])
    log_variance = torch.cat([16 * torch.rand(200, dtype=F64, generator=g) - 8, extreme[:, 1]])
    residual[:10] = 0.0  # zero residuals at moderate s too
    target = torch.zeros_like(residual).to(dtype)
    mu = (-residual).to(dtype).requires_grad_(True)  # r = y − μ, exactly representable
    s = log_variance.to(dtype).requires_grad_(True)
    function = losses.bbox_kl_loss if bbox else losses.gaussian_nll_loss
    loss = function(mu, target, log_variance=s, reduction="none")
    assert loss.dtype == dtype
    grad_mu, grad_s = torch.autograd.grad(loss.sum(), (mu, s))
    assert grad_mu.dtype == grad_s.dtype == dtype
    r_exact = (target.double() - mu.detach().double()).numpy()
    value, grad_input, grad_log_variance = _precision_weighted_reference(
        r_exact, s.detach().double().numpy(), bbox=bbox
    )
    # Rounding to the dtype (at most the unit roundoff) plus float32 (or float64) arithmetic
    # on terms as large as |e^{−s} f| and |s|/2, which the sum may cancel.
    work_eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    weighted = value - 0.5 * s.detach().double().numpy()
    for ours, reference, scale in (
        (loss, value, np.abs(weighted) + np.abs(value - weighted)),
        (grad_mu, grad_input, np.abs(grad_input)),
        (grad_s, grad_log_variance, np.abs(weighted) + 0.5),
    ):
        ours_values = ours.detach().double().numpy()
        assert np.isfinite(ours_values).all()
        error = np.abs(ours_values - reference)
        # ... and half the spacing of the dtype's subnormals, near 0.
        bound = (
            1.01 * _unit_roundoff(dtype) * np.abs(reference)
            + 8 * work_eps * scale
            + torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2
        )
        assert (error <= bound).all(), (ours_values[error > bound], reference[error > bound])
    # The brief's reproducer: r = 0 gives L = s/2 and ∂L/∂s = ½ exactly.
    zero = torch.zeros(2, dtype=dtype)
    s_zero = torch.full((2,), _OVERFLOWING_PRECISIONS[dtype][0][1], dtype=dtype, requires_grad=True)
    mean = function(zero, zero, log_variance=s_zero)
    (grad_zero,) = torch.autograd.grad(mean, s_zero)
    assert mean.item() == 0.5 * _OVERFLOWING_PRECISIONS[dtype][0][1]
    assert grad_zero.tolist() == [0.25, 0.25]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_class_indices_of_every_integer_dtype(dtype: torch.dtype) -> None:
    g = _generator(42)
    logits = torch.randn(4, 3, 5, dtype=F64, generator=g)
    labels = torch.randint(0, 3, (4, 5), generator=g)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    ignoring = labels.clone()
    if dtype.is_signed:
        ignoring[0, :2] = -100  # torch's default ignore_index, representable in int8
    for reduction in REDUCTIONS:
        ours = losses.cross_entropy(
            logits, ignoring.to(dtype), weight=weight, label_smoothing=0.1, reduction=reduction
        )
        expected = nn.functional.cross_entropy(
            logits, ignoring, weight=weight, label_smoothing=0.1, reduction=reduction
        )
        torch.testing.assert_close(ours, expected)
        # γ = 0 focal loss is the cross-entropy (torch's, with the ignored entries at 0).
        focal = losses.focal_loss(logits, ignoring.to(dtype), gamma=0.0, reduction=reduction)
        torch.testing.assert_close(
            focal, nn.functional.cross_entropy(logits, ignoring, reduction=reduction)
        )
        torch.testing.assert_close(
            losses.focal_loss(logits, labels.to(dtype), alpha=weight, reduction=reduction),
            losses.focal_loss(logits, labels, alpha=weight, reduction=reduction),
        )
    dice = losses.dice_loss(
        logits, labels.to(dtype), multiclass=True, from_logits=True, reduction="none"
    )
    one_hot = np.moveaxis(np.eye(3)[labels.numpy()], -1, 1)
    expected_dice = _dice_numpy(logits.softmax(1).numpy(), one_hot, 1.0, (2,)).mean(1)
    np.testing.assert_allclose(dice.numpy(), expected_dice)


def test_uint8_labels_are_not_confused_with_a_wrapped_ignore_index() -> None:
    # uint8(−100) is 156: compared in uint8, class 156 would be silently ignored.
    logits = torch.randn(2, 200, dtype=F64, generator=_generator(43))
    target = torch.tensor([156, 3], dtype=torch.uint8)
    torch.testing.assert_close(
        losses.cross_entropy(logits, target, reduction="none"),
        nn.functional.cross_entropy(logits, target.long(), reduction="none"),
    )
    with pytest.raises(ValueError, match=r"target: expected probabilities in \[0, 1\], got 156"):
        losses.focal_loss(torch.zeros(2), torch.tensor([156, 1], dtype=torch.uint8))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_frechet_distance_half_precision(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(44)
    x = torch.from_numpy(rng.normal(size=(60, 4))).to(dtype).requires_grad_(True)
    y = torch.from_numpy(rng.normal(0.5, 1.5, size=(50, 4))).to(dtype)
    ours = losses.frechet_distance(x, y)
    assert ours.dtype == dtype
    expected = _frechet_numpy(x.detach().double().numpy(), y.double().numpy())
    assert ours.item() == pytest.approx(expected, rel=1.01 * _unit_roundoff(dtype) + 1e-5)
    (grad,) = torch.autograd.grad(ours, x)
    assert grad.dtype == dtype
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("layers", [None, ["1", "2"]])
def test_perceptual_loss_of_an_empty_batch_reduces_like_the_other_losses(
    layers: list[str] | None,
) -> None:
    extractor = _perceptual_extractor(torch.float32)
    empty = torch.zeros(0, 5, requires_grad=True)
    per_sample = losses.perceptual_loss(
        empty, empty.detach(), extractor=extractor, layers=layers, reduction="none"
    )
    assert per_sample.shape == (0,)
    for reduction in ("mean", "sum"):
        ours = losses.perceptual_loss(
            empty, empty.detach(), extractor=extractor, layers=layers, reduction=reduction
        )
        # torch's own reduction of no elements: sum 0, mean NaN (as squared_error gives).
        expected = nn.functional.mse_loss(empty, empty.detach(), reduction=reduction)
        torch.testing.assert_close(ours, expected, equal_nan=True)
        torch.testing.assert_close(
            ours, losses.squared_error(empty, empty.detach(), reduction=reduction), equal_nan=True
        )
    (grad,) = torch.autograd.grad(
        losses.perceptual_loss(empty, empty.detach(), extractor=extractor, reduction="sum"), empty
    )
    assert grad.shape == (0, 5)


@pytest.mark.parametrize("mad_dim", [None, 0, -1])
def test_tukey_mad_scaling_of_a_0d_input(mad_dim: int | None) -> None:
    # The MAD of a single residual is 0, floored at tiny: a non-zero residual is an outlier
    # (ρ = c²/6, zero gradient), a zero one costs 0, as for a batch of one along mad_dim=0.
    for residual, expected in ((0.5, _regression.TUKEY_C**2 / 6), (0.0, 0.0)):
        x = torch.tensor(residual, dtype=F64, requires_grad=True)
        loss = losses.tukey_loss(x, torch.tensor(0.0), mad_scaling=True, mad_dim=mad_dim)
        assert loss.shape == ()
        assert loss.item() == pytest.approx(expected, rel=1e-15)
        (grad,) = torch.autograd.grad(loss, x)
        assert grad.item() == 0.0
    with pytest.raises(
        ValueError, match=r"mad_dim: expected None or in \[-1, 0\] for input of shape \(\), got 1"
    ):
        losses.tukey_loss(torch.tensor(0.5), torch.tensor(0.0), mad_scaling=True, mad_dim=1)


def test_modules_check_input_independent_options_at_construction() -> None:
    with pytest.raises(ValueError, match=r"alpha: expected a number in \[0.0, 1.0\], got 1.5"):
        losses.FocalLoss(alpha=1.5)
    with pytest.raises(ValueError, match=r"alpha: expected shape \(C,\) .* got shape \(2, 2\)"):
        losses.FocalLoss(alpha=torch.ones(2, 2))
    with pytest.raises(TypeError, match=r"alpha: expected a floating-point tensor, .* torch.int64"):
        losses.FocalLoss(alpha=torch.tensor([1, 2]))
    with pytest.raises(
        TypeError, match=r"weight: expected a floating-point tensor, .* torch.int64"
    ):
        losses.CrossEntropyLoss(weight=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"weight: expected shape \(C,\) .* got shape \(\)"):
        losses.CrossEntropyLoss(weight=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"weight: expected shape \(C,\) .* got shape \(1, 3\)"):
        losses.DiceLoss(multiclass=True, weight=torch.ones(1, 3))
    with pytest.raises(TypeError, match=r"pos_weight: expected a floating-point tensor"):
        losses.BinaryCrossEntropyLoss(pos_weight=torch.tensor([2]))
    with pytest.raises(TypeError, match=r"weight: expected a floating-point tensor"):
        losses.BinaryCrossEntropyLoss(weight=torch.tensor([True]))
    # Valid options still build (their shape against C is checked at forward).
    losses.FocalLoss(alpha=0.25)
    losses.FocalLoss(alpha=torch.tensor([0.25, 0.75]))
    losses.CrossEntropyLoss(weight=torch.ones(3))


@pytest.mark.parametrize(
    "loss",
    [
        lambda x, y: losses.gaussian_nll_loss(x, y, log_variance=0 * x, reduction="sum"),
        lambda x, y: losses.bbox_kl_loss(x, y, log_variance=0 * x, reduction="sum"),
        lambda x, y: losses.dice_loss(torch.sigmoid(x), (y > 0).to(x.dtype)),
        lambda x, y: losses.frechet_distance(x.reshape(-1, 8), y.reshape(-1, 8)),
    ],
    ids=["gaussian_nll", "bbox_kl", "dice", "frechet"],
)
def test_losses_computed_in_float32_stay_float32_under_autocast(loss) -> None:
    """As torch's own losses under autocast: a half input's loss is returned in float32 there,
    not rounded down (a float16 sum over an image batch would overflow, and GradScaler skip
    every step), and in the input's dtype outside autocast."""
    generator = torch.Generator().manual_seed(0)
    x = (300 * torch.randn(16, 1, 32, 32, generator=generator)).to(torch.bfloat16)
    y = (300 * torch.randn(16, 1, 32, 32, generator=generator)).to(torch.bfloat16)
    plain = loss(x, y)
    assert plain.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss(x, y)
    assert inside.dtype == torch.float32
    # The same value to bfloat16's precision (autocast runs some inner products in bfloat16)
    torch.testing.assert_close(inside, plain.float(), rtol=2**-7, atol=0)


# ---------------------------------------------------------------------------------------------
# Found by an audit against torch/scipy (session 19)


@pytest.mark.parametrize(
    ("values", "kwargs"),
    [
        ([[5.0, -0.3, 12.0]], {"mad_scaling": True, "mad_dim": 0}),  # a batch of one: MAD 0
        ([0.0, 0.0, 0.0, 10.0], {"mad_scaling": True}),  # most residuals equal: MAD 0
        ([math.inf, 1.0], {}),  # an infinite residual, no scaling
    ],
)
def test_tukey_passes_back_zero_beyond_c_even_for_huge_residuals(values, kwargs):
    """Beyond c the loss is the constant c²/6 and its gradient exactly 0. Squaring before
    the clamp passed back 2·inf·0 = NaN where the residual (over a MAD floored at tiny) was
    infinite."""
    x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    loss = losses.tukey_loss(x, torch.zeros_like(x), reduction="none", **kwargs)
    loss.sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    beyond = loss.detach() == 4.685**2 / 6
    assert bool(beyond.any())
    assert torch.equal(x.grad[beyond], torch.zeros_like(x.grad[beyond]))
    if not kwargs:  # the finite residual keeps its textbook gradient r·(1 − (r/c)²)²
        assert float(x.grad[1]) == pytest.approx((1 - (1 / 4.685) ** 2) ** 2)


def test_wasserstein_in_half_precision_counts_past_65504():
    """float16 counts and weight sums overflowed past 65504 (NaN): computed in float32."""
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(70000, generator=generator).half()
    v = (torch.randn(70000, generator=generator) + 0.5).half()
    got = losses.wasserstein_1d(u, v)
    assert got.dtype == torch.float16
    want = scipy.stats.wasserstein_distance(u.float().numpy(), v.float().numpy())
    assert float(got) == pytest.approx(want, rel=2e-3)
    weighted = losses.wasserstein_1d(
        torch.tensor([0.0, 1.0]).half(),
        torch.tensor([0.0, 1.0]).half(),
        input_weights=torch.tensor([4e4, 4e4]).half(),
        target_weights=torch.tensor([1.0, 3.0]).half(),
    )
    assert float(weighted) == 0.25  # scipy: 0.25


def test_an_empty_class_or_outcome_axis_is_refused_by_name():
    with pytest.raises(ValueError, match=r"input: expected at least one class along dim 1"):
        losses.cross_entropy(torch.zeros(2, 0), torch.zeros(2, 0))
    with pytest.raises(ValueError, match=r"target: expected a probability distribution with at"):
        losses.kl_divergence(torch.zeros(2, 0), torch.zeros(2, 0), reduction="none")
    # An empty batch (not an empty distribution) is still fine.
    assert losses.cross_entropy(torch.zeros(0, 3), torch.zeros(0, 3), reduction="sum") == 0


def test_wasserstein_half_input_keeps_float32_weights_past_65504():
    """The weights were cast to the input's float16 first: 1e5 became inf, the result NaN."""
    x = torch.arange(4.0)
    got = losses.wasserstein_1d(x.half(), x.half() + 1, input_weights=torch.full((4,), 1e5))
    assert float(got) == 1.0


def test_entropy_of_logits_over_no_outcome_is_refused():
    from taskbalance import info

    with pytest.raises(ValueError, match=r"p: expected logits of at least one outcome"):
        info.entropy(torch.empty(4, 0), from_logits=True)


def test_frechet_distance_refuses_non_finite_features_by_name():
    features = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    bad = features.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"target: expected finite features"):
        losses.frechet_distance(features, bad)


def test_under_float16_autocast_the_losses_run_in_float32_as_torchs():
    """Under autocast torch runs its own losses in float32; ours stayed float16, and a sum over
    a batch overflowed to inf where torch's was finite (new user's trial)."""
    import taskbalance.losses as tl

    torch.manual_seed(0)
    functional = torch.nn.functional
    with torch.autocast("cpu", dtype=torch.float16):
        z = torch.nn.Linear(8, 8)(torch.randn(20000, 8))
        assert z.dtype == torch.float16
        y = torch.randn(20000, 8) * 3
        classes = torch.randint(0, 8, (20000,))
        pairs = [
            (tl.squared_error(z, y, reduction="sum"), functional.mse_loss(z, y, reduction="sum")),
            (tl.absolute_error(z, y, reduction="sum"), functional.l1_loss(z, y, reduction="sum")),
            (
                tl.cross_entropy(z, classes, reduction="sum"),
                functional.cross_entropy(z, classes, reduction="sum"),
            ),
            (
                tl.binary_cross_entropy(z, (y > 0).float(), from_logits=True, reduction="sum"),
                functional.binary_cross_entropy_with_logits(z, (y > 0).float(), reduction="sum"),
            ),
        ]
        for ours, theirs in pairs:
            assert ours.dtype == theirs.dtype == torch.float32
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
        for name in ("huber_loss", "tukey_loss"):
            value = getattr(tl, name)(z, y, reduction="sum")
            assert value.dtype == torch.float32
            assert bool(torch.isfinite(value))
    # outside autocast a float16 input keeps its dtype, as with torch's losses
    half = torch.randn(4, dtype=torch.float16)
    assert tl.squared_error(half, half * 2).dtype == torch.float16


def test_focal_per_class_alpha_negative_or_infinite_is_refused():
    """A negative per-class alpha flipped the loss's sign; only the binary float alpha was
    checked (new user). Per-class weights above 1 stay allowed (class weights)."""
    from taskbalance.losses import FocalLoss, focal_loss

    logits, target = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    for alpha in (torch.tensor([0.5, -1.0]), torch.tensor([math.inf, 0.5])):
        with pytest.raises(ValueError, match=r"alpha: expected finite weights >= 0"):
            focal_loss(logits, target, alpha=alpha)
        with pytest.raises(ValueError, match=r"alpha: expected finite weights >= 0"):
            FocalLoss(alpha=alpha)
    assert bool(torch.isfinite(focal_loss(logits, target, alpha=torch.tensor([0.25, 0.75]))))
