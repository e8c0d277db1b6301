"""The Gumbel distribution and the Gumbel-max / Gumbel-softmax tricks.

Gumbel noise turns sampling from a categorical distribution into an ``argmax`` (Gumbel, 1954;
the "Gumbel-max trick"): if ``g_i`` are i.i.d. standard Gumbel variables, then
``argmax_i (logits_i + g_i)`` is distributed as ``Categorical(softmax(logits))``. Replacing the
``argmax`` by a tempered softmax gives a differentiable relaxation, the Gumbel-softmax or
Concrete distribution (Jang, Gu & Poole, ICLR 2017; Maddison, Mnih & Teh, ICLR 2017).

Every sampler takes an optional :class:`torch.Generator` so that draws are reproducible
without touching the global random state. The generator must live on the device of the
parameters. The noise is drawn (and added, and the argmax or softmax taken) in at least float32
whatever the parameters' dtype: float16 and bfloat16 uniforms are too coarse near 1 and cut off
the Gumbel upper tail. Samples are returned in the parameters' dtype.

Example:
    >>> import torch
    >>> from taskbalance.distributions import Gumbel, gumbel_max_sample, gumbel_softmax
    >>> generator = torch.Generator().manual_seed(0)
    >>> logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    >>> gumbel_max_sample(logits, generator=generator).shape
    torch.Size([])
    >>> sample = gumbel_softmax(logits, tau=0.5, hard=True, generator=generator)
    >>> sample.sum().item()
    1.0
    >>> round(Gumbel(0.0, 1.0).mean.item(), 4)  # the Euler–Mascheroni constant
    0.5772
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions.utils import broadcast_all

from taskbalance._precision import opmath_dtype
from taskbalance._validation import (
    check_bool,
    check_floating,
    check_generator,
    check_positive,
)

__all__ = ["Gumbel", "gumbel_max_sample", "gumbel_softmax"]

# Below z = -10 the Gumbel cdf exp(−e^{−z}) < exp(−22026) is 0 in every floating dtype.
_CDF_Z_FLOOR = -10.0


def _standard_gumbel(
    shape: torch.Size,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """Standard Gumbel noise ``−log(−log U)``, ``U ~ Uniform(0, 1)``, in ``dtype``.

    ``torch.rand`` can return exactly 0, where ``−log(−log 0) = −inf``; clamping ``U`` at the
    smallest normal number bounds the noise below by about ``−4.5`` (float32) instead. ``U < 1``
    always, so the upper tail needs no guard. Callers pass at least float32
    (:func:`~taskbalance._precision.opmath_dtype`).
    """
    check_generator("generator", generator)
    uniform = torch.rand(shape, dtype=dtype, device=device, generator=generator)
    uniform = uniform.clamp(min=torch.finfo(dtype).tiny)
    return -torch.log(-torch.log(uniform))


class Gumbel(torch.distributions.Gumbel):
    """Gumbel (type-I extreme value) distribution with location ``μ`` and scale ``β > 0``.

    Gumbel (1954), "Statistical Theory of Extreme Values"; the ``gumbel_r`` of SciPy. With
    ``z = (x − μ)/β``::

        pdf(x)   = (1/β) · exp(−(z + e^{−z}))
        cdf(x)   = exp(−e^{−z})
        icdf(y)  = μ − β · ln(−ln y)
        mean     = μ + β · γ_E          (γ_E ≈ 0.5772, the Euler–Mascheroni constant)
        variance = π² β² / 6
        entropy  = ln β + γ_E + 1

    This is :class:`torch.distributions.Gumbel` (``log_prob``, ``mean``, ``mode``, ``stddev``,
    ``variance``, ``entropy``, ``expand`` and the ``batch_shape`` conventions are torch's) with
    only what it lacks added:

    - ``cdf`` and ``icdf`` in closed form. Torch's go through its base ``Uniform(tiny, 1 − eps)``:
      ``cdf`` raises for real values whose cdf rounds to 0 or 1 (e.g. ``x = 50``) and ``icdf``
      is finite at 0 and 1; here ``icdf(0) = −inf`` and ``icdf(1) = +inf``.
    - a ``generator`` argument to ``sample`` and ``rsample``, for reproducible draws without
      the global random state. ``rsample`` is ``μ + β · g`` with standard Gumbel noise ``g``,
      differentiable with respect to ``loc`` and ``scale``.
    - a ``ValueError`` naming the offending ``scale`` value, always checked (torch checks it
      only when argument validation is on).

    Args:
        loc: Location ``μ`` (float or tensor).
        scale: Scale ``β > 0`` (float or tensor, broadcastable with ``loc``).
        validate_args: As in :class:`torch.distributions.Distribution` (checks values passed
            to ``log_prob``/``cdf``/``icdf``). ``scale`` is always checked.

    Raises:
        ValueError: If any ``scale`` is not positive.
        TypeError: If ``scale`` is not floating point.

    Example:
        >>> import torch
        >>> gumbel = Gumbel(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]))
        >>> gumbel.batch_shape
        torch.Size([2])
        >>> gumbel.cdf(gumbel.icdf(torch.tensor([0.3, 0.9])))
        tensor([0.3000, 0.9000])
        >>> gumbel.rsample((5,), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        loc: Tensor | float,
        scale: Tensor | float,
        validate_args: bool | None = None,
    ) -> None:
        location, checked = broadcast_all(loc, scale)
        if not checked.is_floating_point():
            raise TypeError(f"scale must be floating point, got dtype {checked.dtype}")
        if not location.is_floating_point():  # torch.finfo would fail on it, unnamed
            raise TypeError(f"loc must be floating point, got dtype {location.dtype}")
        with torch.no_grad():
            not_positive = ~(checked > 0)
            if bool(not_positive.any()):
                bad = checked[not_positive].reshape(-1)[0].item()
                raise ValueError(f"scale must be positive (β > 0), got {bad!r}")
        super().__init__(loc, scale, validate_args=validate_args)

    def expand(
        self, batch_shape: torch.Size | list[int] | tuple[int, ...], _instance: Gumbel | None = None
    ) -> Gumbel:
        """Returns a view with a larger ``batch_shape`` (see ``Distribution.expand``)."""
        # torch's expand refuses subclasses that define __init__ unless handed the instance.
        new = self._get_checked_instance(Gumbel, _instance)
        return super().expand(torch.Size(batch_shape), _instance=new)

    def rsample(
        self,
        sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size(),  # noqa: B008
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Reparameterised sample ``μ + β · g``, shape ``sample_shape + batch_shape``.

        The noise ``g`` is drawn, and ``μ + β · g`` formed, in at least float32; the sample is
        then rounded to the dtype of ``loc``.
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        work_dtype = opmath_dtype(self.loc.dtype)
        noise = _standard_gumbel(
            shape, dtype=work_dtype, device=self.loc.device, generator=generator
        )
        sample = self.loc.to(dtype=work_dtype) + self.scale.to(dtype=work_dtype) * noise
        return sample.to(dtype=self.loc.dtype)

    def sample(
        self,
        sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size(),  # noqa: B008
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample without gradient, shape ``sample_shape + batch_shape``."""
        with torch.no_grad():
            return self.rsample(sample_shape, generator=generator)

    def cdf(self, value: Tensor) -> Tensor:
        """``exp(−e^{−z})``, for every real ``value``.

        ``z`` is clamped at -10 first: the cdf and its derivative are already 0 there in every
        dtype (``exp(−e¹⁰) ≈ 10⁻⁹⁵⁶⁶``), and without the clamp the derivative would be
        ``0 · e^{−z} = 0 · inf = NaN`` once ``e^{−z}`` overflows (``z < −88.7`` in float32).
        """
        if self._validate_args:
            self._validate_sample(value)
        z = (value - self.loc) / self.scale
        return torch.exp(-torch.exp(-z.clamp(min=_CDF_Z_FLOOR)))

    def icdf(self, value: Tensor) -> Tensor:
        """``μ − β · ln(−ln y)`` for ``y ∈ [0, 1]`` (``−inf`` at 0, ``+inf`` at 1)."""
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        if self._validate_args:
            with torch.no_grad():
                outside = (value < 0) | (value > 1) | torch.isnan(value)
                if bool(outside.any()):
                    bad = value[outside].reshape(-1)[0].item()
                    raise ValueError(f"icdf value must be a probability in [0, 1], got {bad!r}")
        return self.loc - self.scale * torch.log(-torch.log(value))


def _check_logits(logits: object) -> Tensor:
    checked = check_floating("logits", logits)
    if checked.dim() == 0 or checked.shape[-1] == 0:
        raise ValueError(
            f"logits: expected a non-empty category axis (the last), got shape "
            f"{tuple(checked.shape)}"
        )
    return checked


def gumbel_max_sample(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draws category indices with the Gumbel-max trick.

    Gumbel (1954); Maddison, Tarlow & Minka, NeurIPS 2014, "A* Sampling". With i.i.d. standard
    Gumbel ``g``::

        k = argmax_i (logits_i + g_i)  ~  Categorical(softmax(logits))

    ``logits`` may be unnormalised (any additive constant cancels) and may contain ``-inf`` for
    impossible categories, but not NaN, nor a row of ``-inf`` only (no category to draw):
    those raise rather than return an index.

    Args:
        logits: Log-probabilities up to a constant, categories along the last axis.
        generator: Optional random generator for reproducible draws.

    Returns:
        ``torch.long`` indices of shape ``logits.shape[:-1]``.

    Raises:
        ValueError: If ``logits`` has NaN entries or a row whose every entry is ``-inf``.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[0.0, -torch.inf], [-torch.inf, 0.0]])
        >>> gumbel_max_sample(logits, generator=torch.Generator().manual_seed(0))
        tensor([0, 1])
    """
    logits = _check_logits(logits)
    with torch.no_grad():
        # argmax would still return an index: of the NaN, or 0 from a row with no category
        nan = torch.isnan(logits).any()
        empty = (logits == -torch.inf).all(dim=-1).any()
        if bool(nan | empty):
            what = "NaN entries" if bool(nan) else "a row whose every logit is -inf"
            raise ValueError(f"logits: expected a distribution to sample from, got {what}")
    work_dtype = opmath_dtype(logits.dtype)
    noise = _standard_gumbel(
        logits.shape, dtype=work_dtype, device=logits.device, generator=generator
    )
    # The sum in float32 too: rounding it to float16 would create ties and shift the argmax.
    return (logits.detach().to(dtype=work_dtype) + noise).argmax(dim=-1)


def gumbel_softmax(
    logits: Tensor,
    tau: float = 1.0,
    hard: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Gumbel-softmax (Concrete) sample, optionally discretised with straight-through gradients.

    Jang, Gu & Poole, ICLR 2017, "Categorical Reparameterization with Gumbel-Softmax", eq. (1);
    Maddison, Mnih & Teh, ICLR 2017, "The Concrete Distribution". With i.i.d. standard Gumbel
    ``g`` and temperature ``τ > 0``::

        y = softmax((logits + g) / τ)

    ``y`` lies on the simplex (rows sum to 1); ``argmax y`` is exactly the Gumbel-max sample, so
    it is distributed as ``Categorical(softmax(logits))`` for every ``τ``, and ``y`` approaches a
    one-hot vector as ``τ → 0``. With ``hard=True`` the straight-through estimator (Jang et al.,
    §2.2; Bengio et al., 2013) returns ``one_hot(argmax y) − sg(y) + y``: the forward value is
    exactly one-hot, the gradient is that of the soft sample ``y``. The mean of hard samples is
    therefore ``softmax(logits)``.

    Unlike :func:`torch.nn.functional.gumbel_softmax` this accepts a ``generator``.

    Args:
        logits: Log-probabilities up to a constant, categories along the last axis.
        tau: Temperature ``τ > 0``.
        hard: Return one-hot samples with straight-through gradients.
        generator: Optional random generator for reproducible draws.

    Returns:
        A sample of ``logits``' shape, dtype and device.

    Raises:
        ValueError: If ``tau`` is not a finite number > 0.

    Example:
        >>> import torch
        >>> logits = torch.zeros(4, 3, requires_grad=True)
        >>> sample = gumbel_softmax(logits, tau=0.5, hard=True,
        ...                         generator=torch.Generator().manual_seed(0))
        >>> sample.sum(dim=-1)
        tensor([1., 1., 1., 1.], grad_fn=<SumBackward1>)
        >>> bool(((sample == 0) | (sample == 1)).all())
        True
    """
    logits = _check_logits(logits)
    hard = check_bool("hard", hard)
    check_positive("tau", tau)
    work_dtype = opmath_dtype(logits.dtype)
    noise = _standard_gumbel(
        logits.shape, dtype=work_dtype, device=logits.device, generator=generator
    )
    soft = torch.softmax((logits.to(dtype=work_dtype) + noise) / tau, dim=-1)
    if not hard:
        return soft.to(dtype=logits.dtype)
    # The argmax of the float32 sample: rounded to float16 it could tie and change category.
    index = soft.argmax(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    # Straight-through: the value is one_hot (soft − soft.detach() is exactly 0), the gradient
    # is soft's.
    return (one_hot - soft.detach() + soft).to(dtype=logits.dtype)
