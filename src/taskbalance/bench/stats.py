"""Paired comparison of two methods over seeds: wins, losses and a paired t-test.

Each seed trains both methods from the same initial weights on the same batches, so the
per-seed differences ``d_s = Δm_method,s − Δm_reference,s`` are paired; the test is Student's
paired t-test, ``t = mean(d) / (std(d)/√n)`` with n − 1 degrees of freedom, two-sided. Its
p-value uses the regularised incomplete beta function (no scipy needed):
``p = I_{ν/(ν+t²)}(ν/2, 1/2)``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

#: Two-sided significance level of the paired test.
ALPHA = 0.05


@dataclass(frozen=True)
class PairedComparison:
    """A method against a reference over the seeds both completed.

    Args:
        seeds: number of paired seeds.
        wins: seeds where the method's Δm% is lower (better).
        losses: seeds where it is higher.
        mean_difference: mean of ``Δm_method − Δm_reference`` over the seeds.
        std_difference: its sample standard deviation.
        t: the paired t statistic (NaN with fewer than 2 seeds).
        p_value: two-sided p-value (NaN with fewer than 2 seeds).
    """

    seeds: int
    wins: int
    losses: int
    mean_difference: float
    std_difference: float
    t: float
    p_value: float

    @property
    def verdict(self) -> str:
        """``"better"``/``"worse"`` when the difference exceeds seed noise (p < 0.05), else
        ``"tie"``; ``"n/a"`` with fewer than 2 seeds."""
        if math.isnan(self.p_value):
            return "n/a"
        if self.p_value >= ALPHA:
            return "tie"
        return "better" if self.mean_difference < 0 else "worse"


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``x ∈ [0, 1]``.

    Example:
        >>> round(incomplete_beta(1.0, 1.0, 0.3), 12)  # uniform: I_x(1, 1) = x
        0.3
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x: expected a float in [0, 1], got {x!r}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def t_test_p_value(t: float, degrees_of_freedom: int) -> float:
    """Two-sided p-value of Student's t statistic ``t`` with ``ν`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    nu = float(degrees_of_freedom)
    return incomplete_beta(nu / 2.0, 0.5, nu / (nu + t * t))


def paired_comparison(
    method: Mapping[int, float], reference: Mapping[int, float]
) -> PairedComparison:
    """Compare per-seed Δm% of a method with a reference's on the seeds both have.

    Args:
        method: ``{seed: Δm%}`` of the method.
        reference: ``{seed: Δm%}`` of the reference (equal weights).

    Returns:
        The comparison; NaN statistics with fewer than 2 paired seeds.

    Example:
        >>> c = paired_comparison({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 4.0, 2: 6.0})
        >>> c.wins, c.losses, c.mean_difference, round(c.t, 6)
        (3, 0, -2.0, -3.464102)
    """
    seeds = sorted(set(method) & set(reference))
    differences = [method[seed] - reference[seed] for seed in seeds]
    differences = [d for d in differences if not math.isnan(d)]
    count = len(differences)
    wins = sum(d < 0 for d in differences)
    losses = sum(d > 0 for d in differences)
    if count < 2:
        mean = differences[0] if differences else math.nan
        return PairedComparison(count, wins, losses, mean, math.nan, math.nan, math.nan)
    mean = statistics.fmean(differences)
    std = statistics.stdev(differences)
    if std == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / (std / math.sqrt(count))
    return PairedComparison(count, wins, losses, mean, std, t, t_test_p_value(t, count - 1))
