"""The paired comparison over seeds against scipy and hand values."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbalance.bench.stats import incomplete_beta, paired_comparison, t_test_p_value

scipy_stats = pytest.importorskip("scipy.stats")
scipy_special = pytest.importorskip("scipy.special")


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.05, 50.0),
    st.floats(0.05, 50.0),
    st.floats(0.0, 1.0),
)
def test_incomplete_beta_matches_scipy(a, b, x):
    assert incomplete_beta(a, b, x) == pytest.approx(
        float(scipy_special.betainc(a, b, x)), abs=1e-10
    )


@pytest.mark.parametrize("nu", [1, 2, 3, 4, 9, 30])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.1, 4.3, 12.0, -2.5])
def test_t_test_p_value_matches_scipy(t, nu):
    expected = 2 * float(scipy_stats.t.sf(abs(t), nu))
    assert t_test_p_value(t, nu) == pytest.approx(expected, rel=1e-9, abs=1e-14)


def test_paired_comparison_by_hand():
    # d = (−1, −2, −3): mean −2, std 1, t = −2/(1/√3) = −2√3, ν = 2.
    comparison = paired_comparison({0: 1.0, 1: 1.0, 2: 1.0, 9: 5.0}, {0: 2.0, 1: 3.0, 2: 4.0})
    assert (comparison.seeds, comparison.wins, comparison.losses) == (3, 3, 0)
    assert comparison.mean_difference == pytest.approx(-2.0)
    assert comparison.std_difference == pytest.approx(1.0)
    assert comparison.t == pytest.approx(-2 * math.sqrt(3))
    # Student's t with 2 degrees of freedom: p = 1 − |t|/√(t² + 2) = 1 − √12/√14.
    assert comparison.p_value == pytest.approx(1 - math.sqrt(12 / 14))
    assert comparison.verdict == "tie"  # p ≈ 0.074


def test_paired_comparison_matches_scipy_ttest_rel():
    method = {0: 10.2, 1: 9.1, 2: 11.5, 3: 10.0, 4: 8.7}
    reference = {0: 12.0, 1: 11.9, 2: 12.2, 3: 13.1, 4: 10.0}
    comparison = paired_comparison(method, reference)
    expected = scipy_stats.ttest_rel(list(method.values()), list(reference.values()))
    assert comparison.t == pytest.approx(float(expected.statistic))
    assert comparison.p_value == pytest.approx(float(expected.pvalue))
    assert comparison.verdict == "better"
    assert paired_comparison(reference, method).verdict == "worse"


def test_degenerate_comparisons():
    one = paired_comparison({0: 1.0}, {0: 2.0})
    assert one.verdict == "n/a"
    assert math.isnan(one.p_value)
    identical = paired_comparison({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert identical.verdict == "tie"
    assert identical.p_value == 1.0
    constant_shift = paired_comparison({0: 1.0, 1: 2.0}, {0: 2.0, 1: 3.0})
    assert constant_shift.p_value == 0.0
    assert constant_shift.verdict == "better"
