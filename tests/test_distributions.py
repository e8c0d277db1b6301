"""Tests for taskbalance.distributions: Gumbel against SciPy, Gumbel-max and Gumbel-softmax."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import scipy.stats
import torch

import taskbalance.distributions as distributions
from taskbalance.distributions import Gumbel, gumbel_max_sample, gumbel_softmax

F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def parameters() -> tuple[torch.Tensor, torch.Tensor]:
    g = _generator(0)
    loc = 3 * torch.randn(4, 1, dtype=F64, generator=g)
    scale = 0.2 + 2 * torch.rand(1, 5, dtype=F64, generator=g)
    return loc, scale


def test_gumbel_matches_scipy(parameters: tuple[torch.Tensor, torch.Tensor]) -> None:
    loc, scale = parameters
    gumbel = Gumbel(loc, scale)
    assert gumbel.batch_shape == (4, 5)
    reference = scipy.stats.gumbel_r(loc=loc.numpy(), scale=scale.numpy())
    x = torch.randn(4, 5, dtype=F64, generator=_generator(1)) * 3
    y = torch.rand(4, 5, dtype=F64, generator=_generator(2)) * 0.98 + 0.01
    np.testing.assert_allclose(
        gumbel.log_prob(x).exp().numpy(), reference.pdf(x.numpy()), rtol=1e-12
    )
    np.testing.assert_allclose(gumbel.log_prob(x).numpy(), reference.logpdf(x.numpy()), rtol=1e-12)
    np.testing.assert_allclose(gumbel.cdf(x).numpy(), reference.cdf(x.numpy()), rtol=1e-12)
    np.testing.assert_allclose(gumbel.icdf(y).numpy(), reference.ppf(y.numpy()), rtol=1e-12)
    np.testing.assert_allclose(gumbel.mean.numpy(), reference.mean(), rtol=1e-12)
    np.testing.assert_allclose(gumbel.variance.numpy(), reference.var(), rtol=1e-12)
    np.testing.assert_allclose(gumbel.stddev.numpy(), reference.std(), rtol=1e-12)
    np.testing.assert_allclose(gumbel.entropy().numpy(), reference.entropy(), rtol=1e-12)
    torch.testing.assert_close(gumbel.mode, loc.expand(4, 5))


def test_gumbel_is_torchs_gumbel_plus_what_it_lacks(
    parameters: tuple[torch.Tensor, torch.Tensor],
) -> None:
    loc, scale = parameters
    ours, theirs = Gumbel(loc, scale), torch.distributions.Gumbel(loc, scale)
    assert isinstance(ours, torch.distributions.Gumbel)
    # Inside torch's working range (cdf not rounding to 0 or 1) the closed forms agree with
    # its transformed Uniform.
    x = loc + scale * (4 * torch.rand(4, 5, dtype=F64, generator=_generator(3)) - 1.5)
    y = torch.rand(4, 5, dtype=F64, generator=_generator(17)) * 0.98 + 0.01
    torch.testing.assert_close(ours.cdf(x), theirs.cdf(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours.icdf(y), theirs.icdf(y), rtol=1e-12, atol=1e-15)
    # Where torch's base Uniform(tiny, 1 - eps) clips, the closed forms stay exact.
    far = torch.tensor([50.0, -10.0], dtype=F64)
    with pytest.raises(ValueError, match="support"):
        torch.distributions.Gumbel(0.0, 1.0, validate_args=True).cdf(far.float())
    np.testing.assert_allclose(
        Gumbel(0.0, 1.0, validate_args=True).cdf(far).numpy(),
        scipy.stats.gumbel_r.cdf(far.numpy()),
        rtol=1e-12,
    )
    ends = Gumbel(0.0, 1.0).icdf(torch.tensor([0.0, 1.0]))
    assert ends.tolist() == [-math.inf, math.inf]
    assert torch.isfinite(torch.distributions.Gumbel(0.0, 1.0).icdf(torch.tensor([0.0, 1.0]))).all()


def test_gumbel_samples_follow_the_distribution() -> None:
    gumbel = Gumbel(torch.tensor(1.5, dtype=F64), torch.tensor(0.7, dtype=F64))
    samples = gumbel.sample((4000,), generator=_generator(4))
    assert samples.shape == (4000,)
    result = scipy.stats.kstest(samples.numpy(), scipy.stats.gumbel_r(loc=1.5, scale=0.7).cdf)
    assert result.pvalue > 0.001
    assert abs(samples.mean().item() - gumbel.mean.item()) < 4 * gumbel.stddev.item() / math.sqrt(
        4000
    )


def test_gumbel_shapes_dtype_reproducibility_and_expand() -> None:
    gumbel = Gumbel(torch.zeros(3), 1.0)
    assert gumbel.rsample((2,)).shape == (2, 3)
    assert gumbel.sample().dtype == torch.float32
    assert Gumbel(torch.zeros(3, dtype=F64), 1.0).rsample().dtype == F64
    first = gumbel.sample((5,), generator=_generator(5))
    torch.testing.assert_close(first, gumbel.sample((5,), generator=_generator(5)), rtol=0, atol=0)
    expanded = gumbel.expand((4, 3))
    assert expanded.batch_shape == (4, 3)
    assert expanded.sample().shape == (4, 3)
    assert torch.isfinite(Gumbel(0.0, 1.0).sample((100000,), generator=_generator(6))).all()


def test_gumbel_rsample_is_differentiable() -> None:
    loc = torch.tensor([0.3, -1.0], dtype=F64, requires_grad=True)
    scale = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)

    def draw(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return Gumbel(loc, scale).rsample((3,), generator=_generator(7))

    assert torch.autograd.gradcheck(draw, (loc, scale))
    draw(loc, scale).sum().backward()
    torch.testing.assert_close(loc.grad, torch.full((2,), 3.0, dtype=F64))  # d x / d μ = 1
    noise = (draw(loc, scale) - loc) / scale  # d x / d β is the standard Gumbel noise
    torch.testing.assert_close(scale.grad, noise.sum(0).detach())
    assert not Gumbel(loc, scale).sample().requires_grad


def test_gumbel_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"scale must be positive \(β > 0\), got -1.0"):
        Gumbel(0.0, -1.0)
    with pytest.raises(ValueError, match=r"scale must be positive \(β > 0\), got 0.0"):
        Gumbel(torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"icdf value must be a probability in \[0, 1\], got 1.5"):
        Gumbel(0.0, 1.0, validate_args=True).icdf(torch.tensor([0.5, 1.5]))


def _chi_square_pvalue(indices: torch.Tensor, probabilities: torch.Tensor) -> float:
    counts = torch.bincount(indices.reshape(-1), minlength=len(probabilities)).numpy()
    expected = probabilities.double().numpy()
    expected = expected / expected.sum() * counts.sum()  # float32 softmax does not sum to 1 exactly
    return float(scipy.stats.chisquare(counts, expected).pvalue)


LOGITS = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
DRAWS = 20000


def test_gumbel_max_frequencies_match_softmax() -> None:
    indices = gumbel_max_sample(LOGITS.expand(DRAWS, 5), generator=_generator(8))
    assert indices.shape == (DRAWS,)
    assert indices.dtype == torch.long
    assert _chi_square_pvalue(indices, torch.softmax(LOGITS, 0)) > 0.001
    masked = torch.tensor([0.0, -torch.inf, 0.0])
    assert (gumbel_max_sample(masked.expand(500, 3), generator=_generator(9)) != 1).all()


def test_gumbel_softmax_soft_samples() -> None:
    samples = gumbel_softmax(LOGITS.expand(DRAWS, 5), tau=0.7, generator=_generator(10))
    assert samples.shape == (DRAWS, 5)
    torch.testing.assert_close(samples.sum(-1), torch.ones(DRAWS))
    assert (samples >= 0).all()
    # argmax of the relaxed sample is the Gumbel-max sample: categorical(softmax(logits)).
    assert _chi_square_pvalue(samples.argmax(-1), torch.softmax(LOGITS, 0)) > 0.001
    # Same generator state, same noise: argmax equals gumbel_max_sample exactly.
    torch.testing.assert_close(
        gumbel_softmax(LOGITS, tau=3.0, generator=_generator(11)).argmax(),
        gumbel_max_sample(LOGITS, generator=_generator(11)),
    )
    cold = gumbel_softmax(LOGITS.expand(100, 5), tau=1e-3, generator=_generator(12))
    assert (cold.max(-1).values > 0.99).all()  # τ → 0 approaches one-hot


def test_gumbel_softmax_hard_mean_is_softmax() -> None:
    samples = gumbel_softmax(LOGITS.expand(DRAWS, 5), tau=0.5, hard=True, generator=_generator(13))
    assert ((samples == 0) | (samples == 1)).all()
    torch.testing.assert_close(samples.sum(-1), torch.ones(DRAWS))
    probabilities = torch.softmax(LOGITS, 0)
    tolerance = 4 * torch.sqrt(probabilities * (1 - probabilities) / DRAWS)
    assert ((samples.mean(0) - probabilities).abs() < tolerance).all()


def test_gumbel_softmax_straight_through_gradient() -> None:
    logits = torch.randn(6, 4, generator=_generator(14), requires_grad=True)
    weights = torch.randn(6, 4, generator=_generator(15))
    hard = gumbel_softmax(logits, tau=0.8, hard=True, generator=_generator(16))
    (grad_hard,) = torch.autograd.grad((hard * weights).sum(), logits)
    soft = gumbel_softmax(logits, tau=0.8, hard=False, generator=_generator(16))
    (grad_soft,) = torch.autograd.grad((soft * weights).sum(), logits)
    expected = torch.nn.functional.one_hot(soft.argmax(-1), 4).float()
    assert torch.equal(hard.detach(), expected)  # forward: exactly one-hot
    torch.testing.assert_close(grad_hard, grad_soft)  # backward: the soft sample's gradient
    assert grad_soft.abs().sum() > 0
    assert gumbel_softmax(logits.double(), hard=True).dtype == F64


@pytest.mark.parametrize("tau", [0.0, -1.0, math.inf, math.nan])
def test_gumbel_softmax_rejects_bad_tau(tau: float) -> None:
    with pytest.raises(ValueError, match=r"tau: expected a (finite number|number > 0), got"):
        gumbel_softmax(LOGITS, tau=tau)


def test_logits_type_errors() -> None:
    with pytest.raises(
        TypeError, match=r"logits: expected a floating-point tensor, got dtype torch.int64"
    ):
        gumbel_max_sample(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"logits: expected a tensor, got list"):
        gumbel_softmax([0.0, 1.0])
    with pytest.raises(
        ValueError, match=r"logits: expected a non-empty category axis .* got shape \(\)"
    ):
        gumbel_softmax(torch.tensor(1.0))


def test_module_doctests() -> None:
    assert doctest.testmod(distributions).failed == 0


HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_low_precision_logits_draw_rare_categories_as_often_as_softmax(dtype: torch.dtype) -> None:
    # P(category 1) = 1/(1 + e⁶) ≈ 0.00247 needs Gumbel noise differences above 6: with uniforms
    # drawn in float16 (bfloat16) the noise stopped at 7.6 (5.5), and category 1 came 0.88×
    # (0.54×) as often.
    draws = 4_000_000
    logits = torch.tensor([0.0, -6.0], dtype=dtype).expand(draws, 2)
    probability = 1 / (1 + math.exp(6))
    # Six binomial standard errors: a correct sampler fails with probability 2·10⁻⁹.
    tolerance = 6 * math.sqrt(probability * (1 - probability) / draws)
    indices = gumbel_max_sample(logits, generator=_generator(21))
    assert abs((indices == 1).double().mean().item() - probability) < tolerance
    hard = gumbel_softmax(logits, tau=0.5, hard=True, generator=_generator(22))
    assert hard.dtype == dtype
    assert abs(hard[:, 1].double().mean().item() - probability) < tolerance
    soft = gumbel_softmax(logits[:4], tau=0.5, generator=_generator(23))
    assert soft.dtype == dtype


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_low_precision_gumbel_samples_keep_the_upper_tail(dtype: torch.dtype) -> None:
    loc = torch.tensor(0.0, dtype=dtype, requires_grad=True)
    gumbel = Gumbel(loc, torch.tensor(1.0, dtype=dtype))
    draws = 1_000_000
    samples = gumbel.sample((draws,), generator=_generator(24))
    assert samples.dtype == dtype
    # A sample rounds above 8 exactly when it exceeds the midpoint to the next value of dtype.
    threshold = torch.tensor(8.0, dtype=dtype)
    midpoint = (8.0 + torch.nextafter(threshold, torch.tensor(math.inf, dtype=dtype)).item()) / 2
    probability = scipy.stats.gumbel_r.sf(midpoint)  # 3.3·10⁻⁴; the old noise stopped at 7.6
    tolerance = 6 * math.sqrt(probability * (1 - probability) / draws)
    assert abs((samples > threshold).double().mean().item() - probability) < tolerance
    rsample = gumbel.rsample((draws,), generator=_generator(25))
    assert rsample.dtype == dtype
    assert abs((rsample > threshold).double().mean().item() - probability) < tolerance
    (grad,) = torch.autograd.grad(rsample[:256].sum(), loc)
    assert grad.dtype == dtype
    assert grad.item() == 256  # ∂(μ + β·g)/∂μ = 1 per sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gumbel_cdf_gradient_in_the_far_left_tail(dtype: torch.dtype) -> None:
    loc, scale = 0.5, 2.0
    points = [-2000.0, -200.0, -100.0, -30.0, -10.0, -3.0, 0.0, 5.0, 60.0]
    x = torch.tensor(points, dtype=dtype, requires_grad=True)
    gumbel = Gumbel(torch.tensor(loc, dtype=dtype), torch.tensor(scale, dtype=dtype))
    cdf = gumbel.cdf(x)
    (grad,) = torch.autograd.grad(cdf.sum(), x)
    reference = scipy.stats.gumbel_r(loc=loc, scale=scale)
    # e^{−z} overflowed at z = −100.25 (float32) and −1000.25 (float64): 0 · inf = NaN. The
    # cdf and its derivative (the pdf) underflow to 0 there: below the dtype's least subnormal.
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    atol = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    with np.errstate(over="ignore"):  # scipy's own e^{−z} overflows to its correct limit 0
        expected_cdf, expected_pdf = reference.cdf(points), reference.pdf(points)
    np.testing.assert_allclose(cdf.detach().numpy(), expected_cdf, rtol=rtol, atol=atol)
    np.testing.assert_allclose(grad.numpy(), expected_pdf, rtol=rtol, atol=atol)
    # At −inf the limits: cdf 0, derivative 0.
    minus_infinity = torch.tensor(-math.inf, dtype=dtype, requires_grad=True)
    at_minus_infinity = gumbel.cdf(minus_infinity)
    (grad_at_minus_infinity,) = torch.autograd.grad(at_minus_infinity, minus_infinity)
    assert at_minus_infinity.item() == 0.0
    assert grad_at_minus_infinity.item() == 0.0


def test_an_integer_location_is_refused_by_name():
    """torch.finfo failed on it later, without naming the argument."""
    with pytest.raises(TypeError, match=r"loc must be floating point, got dtype torch.int64"):
        Gumbel(torch.tensor(1), torch.tensor(1.0))
    assert float(Gumbel(1, 2.0).mean) == pytest.approx(1 + 2 * 0.5772156649, rel=1e-6)


@pytest.mark.parametrize(
    ("logits", "message"),
    [
        ([[0.0, math.nan, 1.0]], "NaN entries"),
        ([[0.0, 1.0], [-math.inf, -math.inf]], "a row whose every logit is -inf"),
    ],
)
def test_gumbel_max_sample_refuses_what_has_no_category_to_draw(logits, message) -> None:
    """argmax returned the NaN's index, or 0 for a row with no possible category (review)."""
    with pytest.raises(ValueError, match=rf"^logits: expected a distribution .* got {message}"):
        gumbel_max_sample(torch.tensor(logits))
    # -inf for some categories is fine: they are never drawn
    draws = gumbel_max_sample(
        torch.tensor([[-math.inf, 0.0, -math.inf]]).expand(200, 3),
        generator=torch.Generator().manual_seed(0),
    )
    assert draws.eq(1).all()
