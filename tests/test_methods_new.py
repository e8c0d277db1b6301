"""STCH and ExcessMTL against hand-computed values and independent re-implementations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb

# ---------------------------------------------------------------------------------------------
# STCH


def test_stch_warmup_is_the_log_loss_then_uses_the_last_warmup_epoch_mean():
    b = tb.create("stch", num_tasks=2, mu=1.0, warmup_epochs=2)
    epoch_losses = [
        [torch.tensor([4.0, 1.0]), torch.tensor([2.0, 3.0])],  # epoch 0: warm-up only
        [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])],  # epoch 1: measures n = (2, 4)
    ]
    for epoch in epoch_losses:
        for losses in epoch:
            b(losses.requires_grad_())
            torch.testing.assert_close(b.weights, 1.0 / losses.detach())
        b.end_epoch()
    torch.testing.assert_close(b.nadir, torch.tensor([2.0, 4.0]))
    losses = torch.tensor([1.0, 8.0], requires_grad=True)
    objective = b(losses)
    # L/n = (0.5, 2): softmax ∝ (0.5, 2) → (0.2, 0.8); w = 2·(0.2/1, 0.8/8) = (0.4, 0.2)
    torch.testing.assert_close(b.weights, torch.tensor([0.4, 0.2]))
    assert objective.item() == pytest.approx(2 * math.log(0.5 + 2.0), rel=1e-6)
    (grad,) = torch.autograd.grad(objective, losses)
    torch.testing.assert_close(grad, b.weights)
    b.end_epoch()  # after the warm-up, epochs change nothing
    torch.testing.assert_close(b.nadir, torch.tensor([2.0, 4.0]))


@pytest.mark.parametrize("mu", [0.05, 0.3, 1.0, 7.0])
def test_stch_gradient_equals_autograd_of_the_reference_objective(mu):
    nadir = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    values = torch.tensor([0.7, 1.1, 3.0], dtype=torch.float64, requires_grad=True)
    # The reference code's objective: μ·log Σ exp((log(L/n) − max)/μ)·K (the shift by the
    # max changes nothing but the value).
    logs = torch.log(values / nadir)
    reference = mu * torch.log(torch.exp((logs - logs.max().detach()) / mu).sum()) * 3
    (expected,) = torch.autograd.grad(reference, values)
    b = tb.create("stch", num_tasks=3, mu=mu, nadir=nadir.tolist())
    b(values.detach().float().requires_grad_())
    torch.testing.assert_close(b.weights.double(), expected, rtol=1e-5, atol=0)


def test_stch_small_mu_approaches_the_tchebycheff_maximum():
    b = tb.create("stch", num_tasks=3, mu=1e-3, nadir=1.0)
    objective = b(torch.tensor([1.0, 5.0, 2.0], requires_grad=True))
    # weight all on the task furthest above its reference: w = (0, 3/5, 0)
    torch.testing.assert_close(b.weights, torch.tensor([0.0, 0.6, 0.0]), rtol=0, atol=1e-6)
    assert objective.item() == pytest.approx(3 * math.log(5.0), rel=1e-3)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=6),
    mu=st.floats(1e-3, 100.0),
)
def test_stch_weighted_losses_sum_to_k(values, mu):
    K = len(values)
    b = tb.create("stch", num_tasks=K, mu=mu, nadir=[1.0 + k for k in range(K)])
    losses = torch.tensor(values, requires_grad=True)
    b(losses)
    weighted = b.weights.double() * losses.detach().double()
    assert float(weighted.sum()) == pytest.approx(K, rel=1e-5)


def test_stch_empty_measuring_epoch_waits_for_the_next():
    b = tb.create("stch", num_tasks=2, warmup_epochs=1)
    b.end_epoch()  # no call in this epoch: n not measured yet
    assert not bool(b.has_nadir)
    b(torch.tensor([3.0, 1.0], requires_grad=True))
    b.end_epoch()
    torch.testing.assert_close(b.nadir, torch.tensor([3.0, 1.0]))


def test_stch_reference_losses_average_only_the_steps_each_task_was_present():
    b = tb.create("stch", num_tasks=2, warmup_epochs=1)
    # Task 1 absent for three steps, then 9.0: n = (mean of 0.5s, 9.0), not (0.5, (1+1+1+9)/4)
    # from the placeholder 1.0 an absent task carries.
    for present, loss in [(False, math.nan)] * 3 + [(True, 9.0)]:
        b(torch.tensor([0.5, loss], requires_grad=True), present=[True, present])
    b.end_epoch()
    torch.testing.assert_close(b.nadir, torch.tensor([0.5, 9.0]))


def test_stch_task_absent_through_the_measuring_epoch_extends_it():
    b = tb.create("stch", num_tasks=2, warmup_epochs=1)
    b(torch.tensor([0.5, math.nan], requires_grad=True), present=[True, False])
    with pytest.warns(UserWarning, match=r"stch: tasks \[1\] were absent"):
        b.end_epoch()
    assert not bool(b.has_nadir)
    b(torch.tensor([1.5, 4.0], requires_grad=True))
    b.end_epoch()
    torch.testing.assert_close(b.nadir, torch.tensor([1.0, 4.0]))


def test_stch_loads_a_state_with_one_count_for_every_task():
    b = tb.create("stch", num_tasks=2, warmup_epochs=1)
    b(torch.tensor([3.0, 1.0], requires_grad=True))
    state = b.state_dict()
    state["nadir_count"] = torch.tensor(1)  # as saved before the count was per task
    resumed = tb.create("stch", num_tasks=2, warmup_epochs=1)
    resumed.load_state_dict(state)
    resumed.end_epoch()
    torch.testing.assert_close(resumed.nadir, torch.tensor([3.0, 1.0]))


@pytest.mark.parametrize(
    ("hparams", "match"),
    [
        ({"mu": 0.0}, r"mu: expected a number > 0, got 0.0"),
        ({"warmup_epochs": 0}, r"warmup_epochs: expected an int >= 1, got 0"),
        ({"nadir": [1.0, 0.0, 2.0]}, r"nadir\[1\] = 0.0: expected a reference loss > 0"),
        ({"nadir": [1.0, 2.0]}, r"nadir: expected 3 values"),
    ],
)
def test_stch_bad_hyperparameters(hparams, match):
    with pytest.raises(ValueError, match=match):
        tb.create("stch", num_tasks=3, **hparams)


# ---------------------------------------------------------------------------------------------
# ExcessMTL


def _mirror_ascent(excesses: list[torch.Tensor], step_size: float) -> list[torch.Tensor]:
    """The reference code's weight update from each step's excess estimates."""
    K = excesses[0].shape[0]
    loss_weight = torch.ones(K, dtype=torch.float64)
    history = [loss_weight.clone()]
    for excess in excesses[1:]:
        loss_weight = loss_weight * torch.exp(step_size * excess / excesses[0])
        loss_weight = loss_weight / loss_weight.sum() * K
        history.append(loss_weight.clone())
    return history


def _libmtl_excess_mtl(rows_per_step: list[torch.Tensor], step_size: float, eps: float):
    """The reference code's per-coordinate (diagonal AdaGrad) rule, written independently."""
    squared_sums = torch.cumsum(torch.stack(rows_per_step) ** 2, dim=0)
    excesses = [
        ((rows / torch.sqrt(sums + eps)) * rows).sum(1)
        for rows, sums in zip(rows_per_step, squared_sums, strict=True)
    ]
    return _mirror_ascent(excesses, step_size)


def _scalar_excess_mtl(rows_per_step: list[torch.Tensor], step_size: float, eps: float):
    """The AdaGrad-norm form, straight from the docstring's formula."""
    squared = torch.stack([(rows**2).sum(1) for rows in rows_per_step])
    sums = torch.cumsum(squared, dim=0)
    return _mirror_ascent(list(squared / torch.sqrt(sums + eps)), step_size)


def _run_balancer(rows_per_step, **hparams):
    K = rows_per_step[0].shape[0]
    b = tb.create("excess_mtl", num_tasks=K, **hparams)
    return [b.compute_weights(torch.ones(K), gram=rows @ rows.T) for rows in rows_per_step]


@pytest.mark.parametrize("seed", range(5))
def test_excess_mtl_equals_the_scalar_adagrad_formula(seed):
    generator = torch.Generator().manual_seed(seed)
    steps = [torch.randn(3, 7, generator=generator, dtype=torch.float64) for _ in range(8)]
    got = _run_balancer(steps, step_size=0.5, eps=1e-7)
    want = _scalar_excess_mtl(steps, step_size=0.5, eps=1e-7)
    for have, expected in zip(got, want, strict=True):
        torch.testing.assert_close(have.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("seed", range(5))
def test_excess_mtl_equals_the_reference_when_gradients_change_only_in_scale(seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    steps = []
    for _ in range(8):
        scale = torch.rand(3, 1, generator=generator, dtype=torch.float64) * 4 + 0.1
        signs = torch.randint(0, 2, (3, 6), generator=generator).double() * 2 - 1
        steps.append(scale * shapes * signs)
    got = _run_balancer(steps, step_size=0.3, eps=0.0)
    want = _libmtl_excess_mtl(steps, step_size=0.3, eps=0.0)
    for have, expected in zip(got, want, strict=True):
        torch.testing.assert_close(have.double(), expected, rtol=1e-6, atol=0)


def test_excess_mtl_hand_values():
    b = tb.create("excess_mtl", num_tasks=2, step_size=1.0, eps=0.0)
    first = b.compute_weights(torch.ones(2), gram=torch.diag(torch.tensor([1.0, 1.0])))
    torch.testing.assert_close(first, torch.ones(2))
    second = b.compute_weights(torch.ones(2), gram=torch.diag(torch.tensor([1.0, 4.0])))
    # sums (2, 5); e = (1/√2, 4/√5); e(1) = (1, 1); λ ∝ exp(e)
    ratio = math.exp(4 / math.sqrt(5) - 1 / math.sqrt(2))
    torch.testing.assert_close(second, torch.tensor([2 / (1 + ratio), 2 * ratio / (1 + ratio)]))


def test_excess_mtl_warmup_keeps_the_weights_and_averages_the_reference():
    """The paper's Appendix C.1: uniform weights during the warm-up, whose mean estimate is
    the reference e(1); the AdaGrad history counts the warm-up's steps too."""
    b = tb.create("excess_mtl", num_tasks=2, step_size=1.0, eps=0.0, warmup_steps=3)
    for squared in ([1.0, 1.0], [4.0, 1.0], [1.0, 4.0]):
        w = b.compute_weights(torch.ones(2), gram=torch.diag(torch.tensor(squared)))
        torch.testing.assert_close(w, torch.ones(2))
    # sums (1, 1), (5, 2), (6, 6): estimates (1, 1), (4/√5, 1/√2), (1/√6, 4/√6)
    reference = [
        (1 + 4 / math.sqrt(5) + 1 / math.sqrt(6)) / 3,
        (1 + 1 / math.sqrt(2) + 4 / math.sqrt(6)) / 3,
    ]
    w = b.compute_weights(torch.ones(2), gram=torch.eye(2))  # sums (7, 7): e = 1/√7 each
    ratios = torch.tensor([1 / math.sqrt(7) / value for value in reference], dtype=torch.float64)
    torch.testing.assert_close(w, (2 * torch.softmax(ratios, 0)).float())


def test_excess_mtl_state_saved_before_the_warmup_option_continues_alike():
    """A state without warmup_steps and refreshes (saved before they existed) acted with
    a warm-up of one step: it loads as that and continues the same trajectory."""
    uninterrupted = tb.create("excess_mtl", num_tasks=2, step_size=1.0)
    grams = [torch.diag(torch.tensor([1.0 + k, 2.0 - 0.3 * k])) for k in range(5)]
    for gram in grams[:2]:
        uninterrupted.compute_weights(torch.ones(2), gram=gram)
    old = uninterrupted.state_dict()
    del old["refreshes"]
    old["_extra_state"] = {
        **old["_extra_state"],
        "hyperparameters": {
            key: value
            for key, value in old["_extra_state"]["hyperparameters"].items()
            if key != "warmup_steps"
        },
    }
    resumed = tb.create("excess_mtl", num_tasks=2, step_size=1.0)
    resumed.load_state_dict(old)
    assert int(resumed.refreshes) == 1
    for gram in grams[2:]:
        expected = uninterrupted.compute_weights(torch.ones(2), gram=gram)
        torch.testing.assert_close(resumed.compute_weights(torch.ones(2), gram=gram), expected)
    with pytest.raises(RuntimeError, match=r"warmup_steps: saved 1, here 3"):
        tb.create("excess_mtl", num_tasks=2, step_size=1.0, warmup_steps=3).load_state_dict(old)


def test_excess_mtl_zero_first_gradient_takes_the_first_nonzero_as_reference():
    b = tb.create("excess_mtl", num_tasks=2, step_size=1.0, eps=0.0)
    b.compute_weights(torch.ones(2), gram=torch.diag(torch.tensor([1.0, 0.0])))
    # task 2: e = 0 so far, r = 0; task 1: sums 2, e = 1/√2, r = 1/√2
    w = b.compute_weights(torch.ones(2), gram=torch.diag(torch.tensor([1.0, 0.0])))
    expected = 2 * torch.softmax(torch.tensor([1 / math.sqrt(2), 0.0]), 0)
    torch.testing.assert_close(w, expected)
    # task 2's first non-zero excess (sums 9, e = 9/3 = 3) is its reference: r = 1
    w = b.compute_weights(torch.ones(2), gram=torch.diag(torch.tensor([1.0, 9.0])))
    expected = 2 * torch.softmax(torch.tensor([1 / math.sqrt(2) + 1 / math.sqrt(3), 1.0]), 0)
    torch.testing.assert_close(w, expected)
    assert torch.isfinite(w).all()


def test_excess_mtl_huge_ratios_do_not_overflow():
    b = tb.create("excess_mtl", num_tasks=2, step_size=1.0)
    b.compute_weights(torch.ones(2), gram=torch.diag(torch.tensor([1e-6, 1.0])))
    for _ in range(5):
        w = b.compute_weights(torch.ones(2), gram=torch.diag(torch.tensor([1e30, 1.0])))
        assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0]))


def test_stch_warning_under_w_error_leaves_the_epoch_uncounted():
    import warnings

    b = tb.create("stch", num_tasks=2, warmup_epochs=1)
    b(torch.tensor([0.5, math.nan], requires_grad=True), present=[True, False])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="were absent"):
            b.end_epoch()
    assert int(b.epochs_done) == 0
