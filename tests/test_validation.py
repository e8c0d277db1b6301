"""The shared input checks: one argument order (name, value) and one message style.

Every check in :mod:`taskbalance._validation` is called with the argument's name first and
answers ``"NAME: expected WHAT, got VALUE"``; a wrong kind of object is a ``TypeError`` and a
wrong value of the right kind a ``ValueError``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taskbalance import _validation as v

#: (check, extra arguments after (name, value), bad value, error type, the "got" part).
BAD_CALLS: list[tuple[Callable[..., Any], tuple[Any, ...], object, type[Exception], str]] = [
    (v.check_real, (), "1", TypeError, "'1'"),
    (v.check_real, (), math.nan, ValueError, "nan"),
    (v.check_nonnegative, (), -1.5, ValueError, "-1.5"),
    (v.check_nonnegative, (), True, TypeError, "True"),
    (v.check_positive, (), 0, ValueError, "0"),
    (v.check_positive, (), math.inf, ValueError, "inf"),
    (v.check_positive, (), None, TypeError, "None"),
    (v.check_in_range, (0.0, 1.0), 1.5, ValueError, "1.5"),
    (v.check_positive_int, (), 0, ValueError, "0"),
    (v.check_positive_int, (), 2.0, TypeError, "2.0"),
    (v.check_choice, (("a", "b"),), "c", ValueError, "'c'"),
    (v.check_tensor, (), [1.0], TypeError, "list"),
    (v.check_floating, (), torch.tensor([1, 2]), TypeError, "dtype torch.int64"),
    (v.check_probabilities, (), torch.tensor([0.5, 1.25]), ValueError, "1.25"),
    (v.check_axis, (2,), torch.zeros(3, 2), ValueError, "2"),
    (v.check_distribution, (0,), torch.tensor([0.5, 0.25]), ValueError, r"\[0.75, 0.75\]"),
]


@pytest.mark.parametrize(
    ("check", "extra", "bad", "error", "shown"),
    BAD_CALLS,
    ids=[f"{call[0].__name__}-{i}" for i, call in enumerate(BAD_CALLS)],
)
def test_bad_values_are_named_first_and_shown(check, extra, bad, error, shown):
    name = "some_argument"
    with pytest.raises(error) as raised:
        check(name, bad, *extra)
    message = str(raised.value)
    # check_axis names the axis argument, dim, and says which tensor it indexes.
    expected_name = "dim" if check is v.check_axis else name
    assert message.startswith(f"{expected_name}: expected "), message
    assert re.search(rf"got .*{shown}", message), message
    if check is v.check_axis:
        assert name in message


def test_same_shape_names_both_arguments():
    with pytest.raises(ValueError, match=r"^a, b: expected the same shape, got a shape \(2,\)"):
        v.check_same_shape("a", torch.zeros(2), "b", torch.zeros(2, 1))
    v.check_same_shape("a", torch.zeros(2, 1), "b", torch.ones(2, 1))


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_positive_accepts_exactly_the_finite_numbers_above_zero(x):
    if math.isfinite(x) and x > 0:
        assert v.check_positive("x", x) == x
    else:
        with pytest.raises(ValueError, match=r"^x: expected a (finite number|number > 0)"):
            v.check_positive("x", x)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_in_range_matches_the_interval(x):
    inside = math.isfinite(x) and 0.0 < x <= 1.0
    if inside:
        assert v.check_in_range("x", x, 0.0, 1.0, low_open=True) == x
    else:
        with pytest.raises(ValueError, match=r"^x: expected a (finite number|number in \(0)"):
            v.check_in_range("x", x, 0.0, 1.0, low_open=True)


@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=6))
def test_probabilities_accepts_the_unit_interval(values):
    v.check_probabilities("p", torch.tensor(values, dtype=torch.float64))


def test_distribution_tolerance_grows_with_the_dtype():
    # 1 + 5e-4 is within half precision's tolerance (10 eps ≈ 1e-2) but not float64's (1e-4).
    p = torch.tensor([0.5, 0.5005])
    v.check_distribution("p", p.half(), 0)
    with pytest.raises(ValueError, match=r"^p: expected sums of 1 along dim 0"):
        v.check_distribution("p", p.double(), 0)
