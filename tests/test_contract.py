"""The Balancer contract, checked for every registered loss-based method.

Properties: the objective's gradient with respect to the losses is ``b.weights``;
``compute_weights`` advances the state exactly like a call; lists of 0-d tensors equal a 1-D
tensor; weights are finite, of shape [K] and non-negative. Input checks: every bad input is a
clear ValueError/TypeError naming the argument, and a rejected call changes no state.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import (
    GRADIENT_METHODS,
    GRAM_METHODS,
    LOSS_METHODS,
    POSITIVE_METHODS,
    REQUIRED_HPARAMS,
    assert_same_state,
    call,
    compute,
    kpis_for,
    loss_gradient,
    losses_for,
    make_balancer,
    shared_features,
    snapshot,
)

K = 3


def _maybe_end_epoch(b: tb.Balancer, step: int) -> None:
    if step % 3 == 2:
        b.end_epoch()


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_the_loss_based_methods():
    names = tb.available()
    assert names == sorted(names)
    for name in ("ew", "fixed", "uw", "dwa", "dtp", "rlw", "gls", "si", "imtl_l", "famo"):
        assert name in names
        assert tb.method_class(name).name == name
        assert not tb.method_class(name).requires_gram


def test_create_is_the_same_as_the_class(loss_method):
    b = make_balancer(loss_method, K)
    assert type(b) is tb.method_class(loss_method)
    assert isinstance(b, tb.Balancer)
    assert isinstance(b, torch.nn.Module)
    assert b.num_tasks == K


def test_create_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*'dwa'.*'ew'"):
        tb.create("nope", num_tasks=2)
    for typo, name in (("nash-mtl", "nash_mtl"), ("MGDA", "mgda"), ("upgard", "upgrad")):
        with pytest.raises(ValueError, match=rf"'{typo}' \(did you mean '{name}'\?\)"):
            tb.create(typo, num_tasks=2)


def test_create_unknown_hyperparameter(loss_method):
    with pytest.raises(TypeError, match=rf"{loss_method}: unknown hyperparameter.*'colour'"):
        make_balancer(loss_method, K, colour=1.0)


def test_create_names_a_missing_required_hyperparameter_with_an_example():
    with pytest.raises(
        TypeError,
        match=r"fixed: missing the required hyperparameter\(s\) \['weights'\], e\.g\. "
        r"tb\.create\('fixed', num_tasks=3, weights=1\.0\)",
    ):
        tb.create("fixed", num_tasks=3)
    assert tb.create("fixed", num_tasks=3, weights=1.0).weights.tolist() == [1.0, 1.0, 1.0]


def test_create_builds_a_subclass_that_supplies_its_bases_required_hyperparameter(
    monkeypatch,
):
    from taskbalance import _registry
    from taskbalance.methods._fixed import Fixed

    class HalfFixed(Fixed):
        name = "half_fixed"

        def __init__(self, num_tasks: int, **options):
            super().__init__(num_tasks, weights=0.5, **options)

    monkeypatch.setitem(_registry._REGISTRY, "half_fixed", HalfFixed)
    assert tb.create("half_fixed", num_tasks=2).weights.tolist() == [0.5, 0.5]

    class PositionalFixed(Fixed):
        name = "positional_fixed"

        def __init__(self, num_tasks: int, scale: float, **options):
            super().__init__(num_tasks, weights=scale, **options)

    monkeypatch.setitem(_registry._REGISTRY, "positional_fixed", PositionalFixed)
    with pytest.raises(TypeError, match=r"positional_fixed: missing the required .*\['scale'\]"):
        tb.create("positional_fixed", num_tasks=2)
    assert tb.create("positional_fixed", num_tasks=2, scale=2.0).weights.tolist() == [2.0, 2.0]


def test_dwa_unknown_hyperparameter_lists_accepted_ones():
    with pytest.raises(TypeError, match=r"\['tempreature'\].*'temperature', 'window'\]"):
        tb.create("dwa", num_tasks=2, tempreature=2.0)


# ---------------------------------------------------------------------------------------------
# Generic properties


def test_gradient_of_objective_is_weights(loss_method):
    b = make_balancer(loss_method, K)
    for step in range(8):
        losses = losses_for(step, K).requires_grad_(True)
        objective = call(b, losses, step)
        assert objective.dim() == 0
        (grad,) = torch.autograd.grad(objective, losses)
        torch.testing.assert_close(grad, loss_gradient(b), rtol=1e-6, atol=1e-7)
        _maybe_end_epoch(b, step)


def test_gradient_of_objective_is_weights_float64(loss_method):
    b = make_balancer(loss_method, K)
    for step in range(4):
        losses = losses_for(step, K).double().requires_grad_(True)
        objective = call(b, losses, step)
        assert objective.dtype == torch.float64
        (grad,) = torch.autograd.grad(objective, losses)
        torch.testing.assert_close(grad, loss_gradient(b).double(), rtol=1e-6, atol=1e-7)
        _maybe_end_epoch(b, step)


def test_compute_weights_advances_state_like_a_call(loss_method):
    if loss_method in GRADIENT_METHODS and loss_method not in GRAM_METHODS:
        # The rule reads the task gradients themselves: refused, before any state changes.
        b = make_balancer(loss_method, K)
        before = snapshot(b)
        with pytest.raises(ValueError, match=r"^gram: .*call the balancer"):
            compute(b, losses_for(0, K), 0)
        assert_same_state(before, snapshot(b))
        return
    called = make_balancer(loss_method, K)
    computed = make_balancer(loss_method, K)
    for step in range(10):
        losses = losses_for(step, K)
        call(called, losses.clone().requires_grad_(True), step)
        weights = compute(computed, losses, step)
        torch.testing.assert_close(weights, called.weights, rtol=0, atol=0)
        torch.testing.assert_close(computed.weights, weights, rtol=0, atol=0)
        _maybe_end_epoch(called, step)
        _maybe_end_epoch(computed, step)
    assert_same_state(snapshot(called), snapshot(computed))


def test_list_of_scalars_equals_vector(loss_method):
    as_vector = make_balancer(loss_method, K)
    as_list = make_balancer(loss_method, K)
    for step in range(6):
        values = losses_for(step, K)
        vector = values.clone().requires_grad_(True)
        scalars = [values[k].clone().requires_grad_(True) for k in range(K)]
        obj_vector = call(as_vector, vector, step)
        obj_list = call(as_list, scalars, step)
        torch.testing.assert_close(obj_list, obj_vector, rtol=0, atol=0)
        torch.testing.assert_close(as_list.weights, as_vector.weights, rtol=0, atol=0)
        obj_list.backward()
        torch.testing.assert_close(torch.stack([s.grad for s in scalars]), loss_gradient(as_vector))
        _maybe_end_epoch(as_vector, step)
        _maybe_end_epoch(as_list, step)


def test_weights_are_detached_copies(loss_method):
    b = make_balancer(loss_method, K)
    call(b, losses_for(0, K).requires_grad_(True))
    weights = b.weights
    assert not weights.requires_grad
    weights.add_(100.0)
    assert not torch.equal(b.weights, weights)


def test_initial_weights_have_shape_k(loss_method):
    b = make_balancer(loss_method, K)
    assert b.weights.shape == (K,)
    assert torch.isfinite(b.weights).all()


def test_single_task(loss_method):
    b = make_balancer(loss_method, 1)
    for step in range(4):
        losses = torch.tensor([0.5 + step], requires_grad=True)
        objective = call(b, losses, step)
        (grad,) = torch.autograd.grad(objective, losses)
        torch.testing.assert_close(grad, loss_gradient(b))
        assert torch.isfinite(b.weights).all()
        b.end_epoch()


positive_losses = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def loss_sequences(draw: st.DrawFn) -> tuple[int, list[list[float]], list[list[float]]]:
    k = draw(st.integers(min_value=1, max_value=6))
    steps = draw(st.integers(min_value=1, max_value=6))
    losses = draw(
        st.lists(st.lists(positive_losses, min_size=k, max_size=k), min_size=steps, max_size=steps)
    )
    kpis = draw(
        st.lists(
            st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=k, max_size=k),
            min_size=steps,
            max_size=steps,
        )
    )
    return k, losses, kpis


# Methods whose combination of task gradients may subtract one from another (projections,
# pseudo-inverses, whitening): their weights are legitimately signed.
SIGNED_WEIGHT_METHODS = {"pcgrad", "gradvac", "imtl_g", "aligned_mtl", "config"}


@pytest.mark.parametrize("name", tb.available())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=loss_sequences(), epoch_every=st.integers(min_value=1, max_value=3))
def test_property_weights_finite_nonnegative(name, data, epoch_every):
    k, loss_steps, kpi_steps = data
    b = make_balancer(name, k)
    for step, (values, kpis) in enumerate(zip(loss_steps, kpi_steps, strict=True)):
        losses = torch.tensor(values, requires_grad=True)
        objective = call(b, losses, step, kpis=torch.tensor(kpis))
        weights = b.weights
        assert weights.shape == (k,)
        assert torch.isfinite(weights).all(), weights
        if name not in SIGNED_WEIGHT_METHODS:
            assert (weights >= 0).all(), weights
        assert torch.isfinite(objective)
        if name in ("rlw", "dwa"):
            assert weights.sum().item() == pytest.approx(k, rel=1e-5)
        (grad,) = torch.autograd.grad(objective, losses)
        torch.testing.assert_close(grad, loss_gradient(b), rtol=1e-5, atol=1e-6)
        if step % epoch_every == 0:
            b.end_epoch()


@settings(max_examples=25, deadline=None)
@given(
    window=st.integers(min_value=1, max_value=3),
    temperature=st.floats(min_value=0.1, max_value=10.0),
    data=loss_sequences(),
)
def test_property_dwa_window_sums_to_k(window, temperature, data):
    k, loss_steps, _ = data
    b = tb.create("dwa", num_tasks=k, temperature=temperature, window=window)
    for values in loss_steps:
        b(torch.tensor(values, requires_grad=True))
        assert b.weights.sum().item() == pytest.approx(k, rel=1e-5)
        assert (b.weights >= 0).all()


# ---------------------------------------------------------------------------------------------
# Input checks


def test_wrong_number_of_losses(loss_method):
    b = make_balancer(loss_method, K)
    with pytest.raises(ValueError, match=r"losses: expected 3 task losses, got 2"):
        call(b, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"losses: expected 3 task losses, got 4"):
        call(b, [torch.tensor(1.0)] * 4)
    with pytest.raises(ValueError, match=r"losses: expected 3 task losses, got an empty"):
        call(b, [])


def test_malformed_losses(loss_method):
    b = make_balancer(loss_method, K)
    with pytest.raises(ValueError, match=r"losses: expected a 1-D tensor .* got shape \(3, 1\)"):
        call(b, torch.ones(3, 1))
    with pytest.raises(TypeError, match=r"losses\[1\]: expected a tensor, got float \(pass the"):
        call(b, [torch.tensor(1.0), 2.0, torch.tensor(3.0)])
    with pytest.raises(ValueError, match=r"losses\[2\]: expected a scalar \(0-d\) loss"):
        call(b, [torch.tensor(1.0), torch.tensor(2.0), torch.ones(2)])
    with pytest.raises(TypeError, match=r"losses: expected a floating-point tensor"):
        call(b, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match=r"losses: expected a 1-D tensor or a list"):
        call(b, "abc")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_names_the_task(loss_method, bad):
    b = make_balancer(loss_method, K)
    with pytest.raises(ValueError, match=r"losses\[1\] is (nan|inf|-inf).*finite"):
        call(b, torch.tensor([1.0, bad, 2.0]))
    with pytest.raises(ValueError, match=r"losses\[1\] is (nan|inf|-inf).*finite"):
        compute(b, torch.tensor([1.0, bad, 2.0]))


@pytest.mark.parametrize("name", POSITIVE_METHODS)
@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_loss_rejected_where_logs_or_ratios(name, bad):
    b = make_balancer(name, K)
    with pytest.raises(ValueError, match=rf"losses\[2\] = {bad}: {name} takes logs or ratios.*> 0"):
        call(b, torch.tensor([1.0, 2.0, bad]))


def test_methods_taking_logs_or_ratios_declare_it():
    assert set(POSITIVE_METHODS) >= {"gls", "si", "dwa", "famo"}


def test_losses_without_grad_are_refused_in_a_training_call(loss_method):
    # torch.tensor([l.item() for l in ...]) cuts the graph: UW would then train only its own
    # scales and the model nothing, the others fail in backward() after the step was counted.
    b = make_balancer(loss_method, K)
    call(b, losses_for(0, K))
    before = snapshot(b)
    values = losses_for(1, K)
    kwargs = {"kpis": kpis_for(1, K)} if b.requires_kpis else {}
    if b.requires_gram:
        kwargs["features"] = shared_features()
    with pytest.raises(ValueError, match=r"^losses: the losses do not require grad.*\.item\(\)"):
        b(values, **kwargs)
    assert_same_state(before, snapshot(b))
    # One task's loss cut from the graph, in a list: refused unless that task is absent.
    if not b.requires_gram:
        attached = list(losses_for(1, K).requires_grad_())
        with pytest.raises(ValueError, match=r"^losses\[1\]: this task's loss does not require"):
            b([attached[0], values[1], attached[2]], **kwargs)
        assert_same_state(before, snapshot(b))
    # Evaluation needs no graph: under no_grad, or with the balancer in eval mode.
    with torch.no_grad():
        b(values, **kwargs)
    b.eval()
    b(values, **kwargs)
    assert_same_state(before, snapshot(b))


def test_a_cut_loss_of_an_absent_task_is_accepted():
    b = tb.create("uw", num_tasks=2)
    loss = torch.tensor(2.0, requires_grad=True)
    b([loss, torch.tensor(float("nan"))], present=[True, False]).backward()
    assert loss.grad is not None


@pytest.mark.parametrize("name", sorted(set(tb.available()) - set(POSITIVE_METHODS)))
def test_zero_and_negative_losses_accepted_elsewhere(name):
    b = make_balancer(name, K)
    losses = torch.tensor([0.0, -1.0, 2.0], requires_grad=True)
    objective = call(b, losses)
    (grad,) = torch.autograd.grad(objective, losses)
    torch.testing.assert_close(grad, loss_gradient(b))


@pytest.mark.parametrize(
    ("kpis", "match"),
    [
        ([0.5, 1.5, 0.2], r"kpis\[1\] = 1.5: expected a value in \[0, 1\]"),
        ([0.5, 0.2, -0.1], r"kpis\[2\] = -0.1.*: expected a value in \[0, 1\]"),
        ([math.nan, 0.2, 0.1], r"kpis\[0\] = nan: expected a value in \[0, 1\]"),
        ([0.5, 0.5], r"kpis: expected 3 per-task KPIs, got shape \(2,\)"),
        (None, r"kpis: dtp needs per-task KPIs"),
    ],
)
def test_bad_kpis(kpis, match):
    b = tb.create("dtp", num_tasks=3)
    with pytest.raises(ValueError, match=match):
        b(torch.ones(3), kpis=None if kpis is None else torch.tensor(kpis))
    with pytest.raises(ValueError, match=match):
        b.compute_weights(torch.ones(3), kpis=kpis)


BAD_HPARAMS = [
    ("dwa", {"temperature": 0.0}, ValueError, r"temperature: expected a number > 0, got 0.0"),
    ("dwa", {"temperature": -2.0}, ValueError, r"temperature: expected a number > 0, got -2.0"),
    ("dwa", {"temperature": math.inf}, ValueError, r"temperature: expected a finite number"),
    ("dwa", {"temperature": "2"}, TypeError, r"temperature: expected a real number, got '2'"),
    ("dwa", {"window": 0}, ValueError, r"window: expected an int >= 1, got 0"),
    ("dwa", {"window": 2.5}, TypeError, r"window: expected an int >= 1, got 2.5"),
    ("dtp", {"gamma": -1.0}, ValueError, r"gamma\[0\] = -1.0: expected .* >= 0"),
    ("dtp", {"gamma": [1.0, 2.0, -0.5]}, ValueError, r"gamma\[2\] = -0.5: expected .* >= 0"),
    ("dtp", {"gamma": [1.0, 2.0]}, ValueError, r"gamma: expected 3 values \(one per task\), got 2"),
    ("dtp", {"gamma": [1.0, math.nan, 2.0]}, ValueError, r"gamma\[1\]: expected a finite"),
    (
        "dtp",
        {"smoothing": 0.0},
        ValueError,
        r"smoothing: expected a number in \(0.0, 1.0\], got 0.0",
    ),
    (
        "dtp",
        {"smoothing": 1.5},
        ValueError,
        r"smoothing: expected a number in \(0.0, 1.0\], got 1.5",
    ),
    ("dtp", {"eps": 0.0}, ValueError, r"eps: expected a number in \(0.0, 1.0\), got 0.0"),
    ("dtp", {"eps": -1e-3}, ValueError, r"eps: expected a number in \(0.0, 1.0\), got -0.001"),
    ("dtp", {"eps": 1.0}, ValueError, r"eps: expected a number in \(0.0, 1.0\), got 1.0"),
    ("fixed", {"weights": [1.0, -1.0, 0.5]}, ValueError, r"weights\[1\] = -1.0: expected .* >= 0"),
    ("fixed", {"weights": [1.0, 1.0]}, ValueError, r"weights: expected 3 values .*got 2"),
    ("fixed", {"weights": [1.0, math.inf, 1.0]}, ValueError, r"weights\[1\]: expected a finite"),
    ("fixed", {"weights": "abc"}, TypeError, r"weights: expected a number or 3 numbers"),
    ("fixed", {"weights": math.nan}, ValueError, r"weights: expected a finite number, got nan"),
    ("fixed", {"weights": -1.0}, ValueError, r"weights\[0\] = -1.0: expected .* >= 0"),
    ("dtp", {"gamma": math.inf}, ValueError, r"gamma: expected a finite number, got inf"),
    ("rlw", {"seed": -1}, ValueError, r"seed: expected an int in \[0, 2\*\*64\), got -1"),
    ("rlw", {"seed": 1.5}, TypeError, r"seed: expected an int in \[0, 2\*\*64\), got 1.5"),
    ("famo", {"lr": 0.0}, ValueError, r"lr: expected a number > 0, got 0.0"),
    ("famo", {"lr": -0.1}, ValueError, r"lr: expected a number > 0, got -0.1"),
    ("famo", {"weight_decay": -0.001}, ValueError, r"weight_decay: expected a number >= 0"),
    ("famo", {"min_losses": [0.0, 1.0]}, ValueError, r"min_losses: expected 3 values"),
    ("famo", {"eps": -1e-8}, ValueError, r"eps: expected a number >= 0, got -1e-08"),
    ("famo", {"lr": math.nan}, ValueError, r"lr: expected a finite number, got nan"),
    ("uw", {"kinds": "regresion"}, ValueError, r"kinds\[0\]: expected one of .*got 'regresion'"),
    ("uw", {"kinds": ["regression"]}, ValueError, r"kinds: expected 3 task kinds, got 1"),
    ("uw", {"init": math.nan}, ValueError, r"init: expected a finite number, got nan"),
    ("imtl_l", {"init": math.inf}, ValueError, r"init: expected a finite number, got inf"),
    ("imtl_l", {"init": "0"}, TypeError, r"init: expected a real number, got '0'"),
]


@pytest.mark.parametrize(("name", "hparams", "error", "match"), BAD_HPARAMS)
def test_bad_hyperparameters(name, hparams, error, match):
    with pytest.raises(error, match=match):
        make_balancer(name, K, **hparams)


def test_every_method_with_hyperparameters_has_bad_hyperparameter_cases():
    covered = {name for name, *_ in BAD_HPARAMS}
    # ... or declared by the class itself (run by tests/test_methods_facts.py)
    covered |= {n for n in tb.available() if getattr(tb.method_class(n), "bad_hyperparameters", ())}
    for name in LOSS_METHODS:
        if set(tb.hyperparameters(name)) - {"accumulation_steps", "on_nonfinite"}:
            assert name in covered, f"add bad-hyperparameter cases for {name} to BAD_HPARAMS"


@pytest.mark.parametrize("name", tb.available())
def test_non_finite_numeric_hyperparameters_rejected(name):
    """Generic: a NaN for any hyperparameter whose default is a float is refused by name."""
    for key, default in tb.hyperparameters(name).items():
        if isinstance(default, float):
            with pytest.raises((ValueError, TypeError), match=rf"{key}(\[\d+\])?: expected"):
                make_balancer(name, K, **{key: math.nan})


@pytest.mark.parametrize("num_tasks", [0, -2])
def test_bad_num_tasks(loss_method, num_tasks):
    with pytest.raises(ValueError, match=rf"num_tasks: expected a positive int, got {num_tasks}"):
        make_balancer(loss_method, num_tasks)


@pytest.mark.parametrize("num_tasks", [2.0, True, "3"])
def test_num_tasks_of_wrong_type(loss_method, num_tasks):
    required = REQUIRED_HPARAMS.get(loss_method)
    hparams = required(K) if required else {}
    with pytest.raises(TypeError, match=r"num_tasks: expected a positive int"):
        tb.method_class(loss_method)(num_tasks, **hparams)


# ---------------------------------------------------------------------------------------------
# A rejected call changes nothing


def _bad_calls(b: tb.Balancer) -> list:
    """Callables that must each raise without touching the balancer's state."""
    good = torch.tensor([1.0, 2.0, 3.0])
    calls = [
        lambda: call(b, torch.tensor([1.0, 2.0])),
        lambda: call(b, torch.tensor([1.0, math.nan, 3.0])),
        lambda: call(b, torch.tensor([math.inf, 2.0, 3.0])),
        lambda: call(b, torch.ones(3, 1)),
        lambda: call(b, [torch.tensor(1.0), 2.0, torch.tensor(3.0)]),
        lambda: compute(b, torch.tensor([1.0, 2.0, math.nan])),
        lambda: compute(b, torch.tensor([1.0, 2.0, 3.0, 4.0])),
    ]
    if b.requires_positive_losses:
        calls += [
            lambda: call(b, torch.tensor([1.0, 0.0, 3.0])),
            lambda: call(b, torch.tensor([1.0, 2.0, -3.0])),
            lambda: compute(b, torch.tensor([-1.0, 2.0, 3.0])),
        ]
    if b.requires_kpis:
        calls += [
            lambda: b(good, kpis=torch.tensor([0.5, 1.5, 0.5])),
            lambda: b(good, kpis=torch.tensor([0.5, 0.5])),
            lambda: b(good, kpis=None),
            lambda: b(good),
            lambda: b.compute_weights(good, kpis=[0.1, -0.2, 0.3]),
            # a good loss vector must not sneak a KPI update through
            lambda: b(good, kpis=torch.tensor([0.5, 0.5, math.nan])),
        ]
    return calls


def test_rejected_call_leaves_state_unchanged(loss_method):
    b = make_balancer(loss_method, K)
    twin = make_balancer(loss_method, K)  # sees only the good calls
    for step in range(5):
        call(b, losses_for(step, K).requires_grad_(True), step)
        call(twin, losses_for(step, K).requires_grad_(True), step)
        _maybe_end_epoch(b, step)
        _maybe_end_epoch(twin, step)
    for bad in _bad_calls(b):
        before = snapshot(b)
        weights_before = b.weights
        with pytest.raises((ValueError, TypeError)):
            bad()
        assert_same_state(before, snapshot(b))
        assert torch.equal(b.weights, weights_before)
    # and the trajectory goes on as if the bad calls never happened
    for step in range(5, 9):
        call(b, losses_for(step, K).requires_grad_(True), step)
        call(twin, losses_for(step, K).requires_grad_(True), step)
        assert torch.equal(b.weights, twin.weights)
        _maybe_end_epoch(b, step)
        _maybe_end_epoch(twin, step)
    assert_same_state(snapshot(twin), snapshot(b))


def test_famo_below_min_losses_leaves_state_unchanged():
    b = tb.create("famo", num_tasks=2, min_losses=0.5)
    for step in range(3):
        b(torch.tensor([1.0 + step, 2.0], requires_grad=True))
    before = snapshot(b)
    with pytest.raises(ValueError, match=r"losses: FAMO takes log\(L − min_losses\)"):
        b(torch.tensor([0.2, 2.0], requires_grad=True))
    assert_same_state(before, snapshot(b))


def test_rlw_rejected_call_does_not_draw():
    b = tb.create("rlw", num_tasks=3, seed=5)
    state = b.generator.get_state().clone()
    with pytest.raises(ValueError, match=r"losses\[0\]"):
        b(torch.tensor([math.nan, 1.0, 1.0], requires_grad=True))
    assert torch.equal(b.generator.get_state(), state)


@pytest.mark.parametrize(
    ("name", "hparams", "match"),
    [
        ("rlw", {"seed": 2**70}, r"seed: expected an int in \[0, 2\*\*64\)"),
        ("imtl_g", {"rtol": 2.0}, r"rtol: expected a number in \(0.0, 1.0\)"),
        ("config", {"rtol": 0.0}, r"rtol: expected a number in \(0.0, 1.0\)"),
    ],
)
def test_degenerate_hyperparameters_are_refused_at_construction(name, hparams, match):
    with pytest.raises(ValueError, match=match):
        tb.create(name, num_tasks=3, **hparams)
