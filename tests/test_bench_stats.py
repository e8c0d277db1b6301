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


NAN = math.nan


def test_all_nan_differences_give_no_counts_and_no_verdict():
    # A zero single-task baseline makes every Δm% NaN, on both sides.
    comparison = paired_comparison({0: NAN, 1: NAN, 2: NAN}, {0: NAN, 1: NAN, 2: NAN})
    assert (comparison.seeds, comparison.wins, comparison.losses) == (0, 0, 0)
    for value in (comparison.mean_difference, comparison.std_difference, comparison.t):
        assert math.isnan(value)
    assert math.isnan(comparison.p_value)
    assert comparison.verdict == "n/a"
    one_sided = paired_comparison({0: 1.0, 1: 2.0}, {0: NAN, 1: NAN})
    assert (one_sided.seeds, one_sided.wins, one_sided.losses) == (0, 0, 0)
    assert one_sided.verdict == "n/a"


def test_nan_seeds_are_left_out_of_the_paired_test():
    method = {0: 10.2, 1: 9.1, 2: NAN, 3: 10.0, 4: 8.7}
    reference = {0: 12.0, 1: 11.9, 2: 12.2, 3: NAN, 4: 10.0}
    comparison = paired_comparison(method, reference)
    kept = [0, 1, 4]
    expected = scipy_stats.ttest_rel([method[s] for s in kept], [reference[s] for s in kept])
    assert (comparison.seeds, comparison.wins, comparison.losses) == (3, 3, 0)
    assert comparison.t == pytest.approx(float(expected.statistic))
    assert comparison.p_value == pytest.approx(float(expected.pvalue))
    assert comparison.verdict == ("better" if expected.pvalue < 0.05 else "tie")


def test_a_nan_p_value_is_never_a_tie_or_a_win():
    from taskbalance.bench.stats import PairedComparison

    for mean in (-5.0, 0.0, 5.0, NAN):
        assert PairedComparison(1, 1, 0, mean, NAN, NAN, NAN).verdict == "n/a"


_finite = st.floats(-100.0, 100.0, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(_finite, _finite), min_size=2, max_size=8),
    st.lists(st.sampled_from(["method", "reference", "both"]), max_size=4),
)
def test_adding_nan_seeds_changes_nothing(pairs, nan_sides):
    method = {seed: a for seed, (a, _) in enumerate(pairs)}
    reference = {seed: b for seed, (_, b) in enumerate(pairs)}
    clean = paired_comparison(method, reference)
    for offset, side in enumerate(nan_sides):
        seed = len(pairs) + offset
        method[seed] = NAN if side in ("method", "both") else 1.0
        reference[seed] = NAN if side in ("reference", "both") else 1.0
    noisy = paired_comparison(method, reference)
    assert (noisy.seeds, noisy.wins, noisy.losses) == (clean.seeds, clean.wins, clean.losses)
    assert noisy.verdict == clean.verdict
    for a, b in ((noisy.t, clean.t), (noisy.p_value, clean.p_value)):
        assert (math.isnan(a) and math.isnan(b)) or a == b
