"""Method facts in one place, and the generic tests they drive (issue 12, item 8).

Every registered method declares its facts as class attributes (``taskbalance.methods._facts``):
signed weights, positive losses, claimed properties, required / example / bad
hyperparameters. From them, for every method in ``tb.available()``:

- bad hyperparameters are refused at construction with the declared message;
- every example (non-default) setting, and the gradient methods' generic options, keep the
  contract (gradient of the objective, ``compute_weights`` = call, state round trip) and are
  actually read (they change the weights);
- every gradient method gives finite weights on degenerate Gramians, with each option;
- every claimed property of the direction holds (hypothesis) on rank-deficient, duplicated,
  opposite and 1e±15-scaled inputs.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import (
    call,
    compute,
    directions_for,
    loss_gradient,
    losses_for,
    shared_parameter,
)
from taskbalance._base import LOOP_OPTIONS
from taskbalance.methods._facts import (
    NON_CONFLICTING,
    PERMUTATION_INVARIANT,
    PROPERTIES,
    SCALE_EQUIVARIANT,
    MethodFacts,
    method_facts,
)

K = 3


def facts(name: str) -> MethodFacts:
    return method_facts(tb.method_class(name))


def build(name: str, num_tasks: int = K, **hparams: Any) -> tb.Balancer:
    if facts(name).requires_params:
        hparams.setdefault("params", shared_parameter())
    return tb.create(name, num_tasks, **{**facts(name).required_hyperparameters, **hparams})


GRADIENT = [n for n in tb.available() if tb.method_class(n).requires_gram]
#: The gradient methods whose weights come from the Gramian (``compute_weights(gram=)``).
GRAM = [n for n in GRADIENT if facts(n).weights_from_gram]


def _option_sets(name: str) -> list[dict[str, Any]]:
    """Declared examples, plus the generic options of every gradient method."""
    options = [dict(example) for example in facts(name).example_hyperparameters]
    if tb.method_class(name).requires_gram:
        default_heads = tb.method_class(name).default_heads
        other = "weighted" if default_heads == "unweighted" else "unweighted"
        options += [{"heads": other}, {"update_every": 2}, {"gram_dtype": torch.float64}]
    return options


OPTION_CASES = [
    pytest.param(name, options, id=f"{name}-{i}")
    for name in tb.available()
    for i, options in enumerate(_option_sets(name))
]
BAD_CASES = [
    pytest.param(name, hparams, error, match, id=f"{name}-{i}")
    for name in tb.available()
    for i, (hparams, error, match) in enumerate(facts(name).bad_hyperparameters)
]


# ---------------------------------------------------------------------------------------------
# Completeness: the facts cover every registered method.


@pytest.mark.parametrize("name", tb.available())
def test_every_method_declares_consistent_facts(name):
    cls = tb.method_class(name)
    info = facts(name)
    assert info.claimed_properties <= PROPERTIES, info.claimed_properties
    accepted = tb.hyperparameters(name)
    for options in (info.required_hyperparameters, *info.example_hyperparameters):
        assert set(options) <= set(accepted), (name, options)
    for hparams, error, _ in info.bad_hyperparameters:
        assert set(hparams) <= set(accepted), (name, hparams)
        assert issubclass(error, (ValueError, TypeError))
    required = {k for k, v in accepted.items() if v is inspect.Parameter.empty}
    assert required <= set(info.required_hyperparameters), (name, required)
    generic = {"params", "update_every", "gram_dtype", "heads", *LOOP_OPTIONS}
    generic |= {"normalization", "group_aggregation"}
    if accepted.keys() - generic:
        assert info.bad_hyperparameters, f"{name}: declare bad_hyperparameters"
        assert info.example_hyperparameters, f"{name}: declare example_hyperparameters"
    if cls.requires_gram and not info.signed_weights and info.weights_from_gram:
        generator = torch.Generator().manual_seed(0)
        J = torch.randn(K, 6, generator=generator)
        J[1] = -J[0]  # a conflict: the methods that subtract gradients would show it here
        assert (build(name).compute_weights(torch.ones(K), gram=J @ J.T) >= 0).all(), name


@pytest.mark.parametrize(("name", "hparams", "error", "match"), BAD_CASES)
def test_declared_bad_hyperparameters_are_refused(name, hparams, error, match):
    with pytest.raises(error, match=match):
        build(name, **hparams)


# ---------------------------------------------------------------------------------------------
# Non-default options keep the contract and are read.


def _trajectory(b: tb.Balancer, steps: range, *, computed: bool = False) -> list[torch.Tensor]:
    weights = []
    for step in steps:
        losses = losses_for(step, b.num_tasks)
        if computed and getattr(b, "gram_dtype", torch.float32) == torch.float64:
            rows = directions_for(step, b.num_tasks).flatten(1).double()
            weights.append(b.compute_weights(losses, gram=rows @ rows.T))
        elif computed:
            weights.append(compute(b, losses, step))
        else:
            losses = losses.requires_grad_(True)
            objective = call(b, losses, step)
            (grad,) = torch.autograd.grad(objective, losses)
            # The objective applies the weights in the losses' dtype (float32 here), whatever
            # the kept weights' (float64 with gram_dtype=torch.float64).
            expected = loss_gradient(b).to(grad.dtype)
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
            weights.append(b.weights)
        if step % 2 == 1:
            b.end_epoch()
    return weights


@pytest.mark.parametrize(("name", "options"), OPTION_CASES)
def test_non_default_option_keeps_the_contract(name, options):
    info = facts(name)
    called = build(name, **options)
    got = _trajectory(called, range(8))
    for weights in got:
        assert torch.isfinite(weights).all(), weights
        if not info.signed_weights:
            assert (weights >= 0).all(), weights
    if info.weights_from_gram:
        computed = _trajectory(build(name, **options), range(8), computed=True)
        for have, want in zip(computed, got, strict=True):
            torch.testing.assert_close(have.to(want.dtype), want, rtol=0, atol=0)
    # state round trip mid-run
    first = build(name, **options)
    _trajectory(first, range(4))
    resumed = build(name, **options)
    resumed.load_state_dict(first.state_dict())
    for have, want in zip(_trajectory(resumed, range(4, 8)), got[4:], strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", tb.available())
def test_declared_example_options_change_the_weights(name):
    default = _trajectory(build(name), range(8))
    for options in facts(name).example_hyperparameters:
        changed = _trajectory(build(name, **options), range(8))
        assert any(not torch.equal(a, b) for a, b in zip(default, changed, strict=True)), (
            f"{name}: {options} did not change any weight: the option is not exercised"
        )


# ---------------------------------------------------------------------------------------------
# Degenerate Gramians: every gradient method, every option.

# Entries are 0 or of magnitude 1e-3…10: degeneracy comes from the families and the scales
# below, not from subnormal entries whose Gramian underflows.
magnitudes = st.floats(min_value=1e-3, max_value=10.0)
finite = st.one_of(st.just(0.0), magnitudes, magnitudes.map(lambda x: -x))
FAMILIES = ("as_is", "zero_row", "duplicated", "opposite", "rank_one", "wide", "all_zero")


@st.composite
def jacobians(draw: st.DrawFn, families: tuple[str, ...] = FAMILIES) -> tuple[torch.Tensor, str]:
    """A K×P Jacobian of one degenerate family, scaled by 1e-15, 1 or 1e15."""
    k = draw(st.integers(2, 5))
    p = draw(st.integers(1, 6))
    J = torch.tensor([draw(st.lists(finite, min_size=p, max_size=p)) for _ in range(k)])
    J = J.double()
    family = draw(st.sampled_from(families))
    if family == "zero_row":
        J[draw(st.integers(0, k - 1))] = 0.0
    elif family == "duplicated":
        J[k - 1] = J[0]
    elif family == "opposite":
        J[k - 1] = -draw(st.sampled_from([1.0, 2.5, 1e-3])) * J[0]
    elif family == "rank_one":
        J = J[:1].repeat(k, 1) * torch.linspace(0.5, 3.0, k, dtype=torch.float64)[:, None]
    elif family == "wide":
        J = J[:, :1] if p > 1 else J
    elif family == "all_zero":
        J = torch.zeros_like(J)
    scale = draw(st.sampled_from([1e-15, 1.0, 1e15]))
    return J * scale, family


@pytest.mark.parametrize("name", GRAM)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=jacobians(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_finite_weights_on_degenerate_gramians_with_every_option(name, data, dtype):
    J, _ = data
    k = J.shape[0]
    gram = (J @ J.T).to(dtype)
    losses = torch.linspace(0.5, 2.0, k)
    for options in [{}, *_option_sets(name)]:
        if "pref" in options or "nadir" in options:
            continue  # per-task values for K = 3 only
        b = build(name, num_tasks=k, **options)
        for _ in range(3):
            w = b.compute_weights(losses, gram=gram)
            assert w.shape == (k,), name
            assert torch.isfinite(w).all(), f"{name} {options}: {w} for G={gram}"


# ---------------------------------------------------------------------------------------------
# Claimed properties of the direction d = Jᵀw.


def _direction(name: str, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = J.shape[0]
    w = build(name, num_tasks=k).compute_weights(torch.ones(k), gram=J @ J.T).double()
    return J.T @ w, w


def _scale(J: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The size of the terms of ``Jᵀw``: rounding of ``w`` is relative to it, plus a float64
    noise floor relative to the largest gradient (the exact answer may be 0 with w of order 1,
    as for IMTL-G when a task has no gradient). The floor is 1e-10 of the largest gradient
    after the tests' 1e-4: the weights' rounding grows with the Gramian's condition number,
    and IMTL-G on ``_ILL_CONDITIONED`` (exact d = 0) gives |d| = 1.1e-11·max‖g_k‖."""
    norms = J.norm(dim=1)
    return (w.abs() * norms).sum() + 1e-6 * norms.max() * w.abs().sum()


#: Found by hypothesis: two opposite gradients and a zero one; the exact direction is 0
#: (Aligned-MTL gave 5e-16 from rounding at this scale and exactly 0 at 1e-15 times it).
_OPPOSITE_AND_ZERO = torch.tensor([[1.75], [0.0], [-1.75]], dtype=torch.float64)

#: Found by hypothesis: two zero gradients next to gradients 1e-18 … 9e-15 (condition ~1e8).
_ILL_CONDITIONED = torch.tensor(
    [[0, 9e-15, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1e-18], [0, 0, 5e-16, 1e-15]],
    dtype=torch.float64,
)


def _claiming(prop: str) -> list[str]:
    return [n for n in GRAM if prop in facts(n).claimed_properties]


@pytest.mark.parametrize("name", _claiming(NON_CONFLICTING))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=jacobians())
def test_property_non_conflicting(name, data):
    J, family = data
    d, w = _direction(name, J)
    tolerance = 1e-5 * J.norm(dim=1) * _scale(J, w)
    assert bool((J @ d >= -tolerance).all()), f"{name} ({family}): J d = {J @ d}"


@pytest.mark.parametrize("name", _claiming(PERMUTATION_INVARIANT))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=jacobians(), seed=st.integers(0, 2**16))
def test_property_permutation_invariant(name, data, seed):
    J, family = data
    order = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(seed))
    d, w = _direction(name, J)
    permuted, w_permuted = _direction(name, J[order])
    tolerance = 1e-4 * max(_scale(J, w), _scale(J[order], w_permuted))
    assert bool((permuted - d).norm() <= tolerance), f"{name} ({family}): {d} vs {permuted}"


@pytest.mark.parametrize("name", _claiming(SCALE_EQUIVARIANT))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=jacobians(), factor=st.sampled_from([1e-15, 0.37, 42.0, 1e15]))
@example(data=(_ILL_CONDITIONED, "as_is"), factor=1e-15)
@example(data=(_OPPOSITE_AND_ZERO, "opposite"), factor=1e-15)
def test_property_scale_equivariant(name, data, factor):
    J, family = data
    d, w = _direction(name, J)
    scaled, w_scaled = _direction(name, factor * J)
    tolerance = 1e-4 * max(_scale(J, w), _scale(J, w_scaled))
    assert bool((scaled / factor - d).norm() <= tolerance), f"{name} ({family}, ×{factor})"


# ---------------------------------------------------------------------------------------------
# Options that had no test: MGDA's normalisations, UPGrad's and DualProj's preferences.


def _min_norm_two(G: torch.Tensor) -> torch.Tensor:
    """The K = 2 min-norm point of the simplex, in closed form."""
    denominator = G[0, 0] + G[1, 1] - 2 * G[0, 1]
    first = ((G[1, 1] - G[0, 1]) / denominator).clamp(0, 1) if denominator > 0 else 0.5
    return torch.tensor([first, 1 - first], dtype=torch.float64)


@pytest.mark.parametrize(
    ("normalization", "expected"),
    [("none", [0.8, 0.2]), ("l2", [0.5, 0.5]), ("loss", [0.5, 0.5]), ("loss+", [0.2, 0.8])],
)
def test_mgda_normalisations_hand_values(normalization, expected):
    # g1 = (1, 0), g2 = (0, 2); L = (1, 2). l2: unit gradients, symmetric. loss: g/L = (1, 0),
    # (0, 1). loss+: g/(L‖g‖) = (1, 0), (0, 1/2): weights ∝ (1/4, 1).
    b = tb.create("mgda", num_tasks=2, normalization=normalization)
    w = b.compute_weights(torch.tensor([1.0, 2.0]), gram=torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    torch.testing.assert_close(w, torch.tensor(expected))


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(st.lists(finite, min_size=3, max_size=3), min_size=2, max_size=2),
    losses=st.lists(st.floats(0.1, 10.0), min_size=2, max_size=2),
)
def test_mgda_normalisations_are_min_norm_of_the_scaled_gradients(normalization, rows, losses):
    J = torch.tensor(rows, dtype=torch.float64)
    norms = J.norm(dim=1)
    if bool((norms < 1e-3).any()):
        return
    values = torch.tensor(losses, dtype=torch.float64)
    scale = {"l2": 1 / norms, "loss": 1 / values, "loss+": 1 / (values * norms)}[normalization]
    scaled = J * scale[:, None]
    expected = _min_norm_two(scaled @ scaled.T)
    b = tb.create("mgda", num_tasks=2, normalization=normalization, gram_dtype=torch.float64)
    w = b.compute_weights(values.float(), gram=J @ J.T)
    # compare directions of the scaled problem: the min-norm point is unique, w may not be
    got, want = scaled.T @ w.double(), scaled.T @ expected
    assert (got - want).norm() <= 1e-5 * (1 + scaled.norm()), (w, expected)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_preferences_on_orthogonal_gradients_are_the_weights(name):
    # Orthogonal gradients lie in their own dual cone: nothing is projected.
    pref = [0.2, 0.3, 0.5]
    b = tb.create(name, num_tasks=3, pref=pref)
    w = b.compute_weights(torch.ones(3), gram=torch.diag(torch.tensor([1.0, 4.0, 0.25])))
    torch.testing.assert_close(w, torch.tensor(pref))


def test_upgrad_weights_are_linear_in_the_preferences():
    # w(p) = Σ_i p_i (e_i + u_i): each row's projection is homogeneous in p_i.
    generator = torch.Generator().manual_seed(4)
    J = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    J[2] = -0.5 * J[0] + 0.1 * J[1]  # conflicts, so the projections are not trivial
    gram = J @ J.T
    pref = torch.tensor([0.2, 1.3, 0.5])
    combined = tb.create("upgrad", num_tasks=3, pref=pref.tolist())
    w = combined.compute_weights(torch.ones(3), gram=gram)
    parts = [
        tb.create("upgrad", num_tasks=3, pref=torch.eye(3)[i].tolist()).compute_weights(
            torch.ones(3), gram=gram
        )
        for i in range(3)
    ]
    expected = sum(p * part for p, part in zip(pref.double(), parts, strict=True))
    assert not torch.allclose(w, pref.double())  # the projections did act
    torch.testing.assert_close(w, expected, rtol=1e-4, atol=1e-6)
