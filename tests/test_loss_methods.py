"""Each loss-based method against values computed by hand from its paper's formula."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import taskbalance as tb


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _dwa_by_hand(previous: list[float], before: list[float], T: float) -> list[float]:
    ratios = [p / q for p, q in zip(previous, before, strict=True)]
    return [len(ratios) * s for s in _softmax([r / T for r in ratios])]


# ---------------------------------------------------------------------------------------------
# EW and fixed


def test_ew_is_the_plain_sum():
    b = tb.create("ew", num_tasks=3)
    losses = torch.tensor([1.0, 2.5, 4.0], requires_grad=True)
    objective = b(losses)
    assert objective.item() == pytest.approx(7.5)
    objective.backward()
    assert torch.equal(losses.grad, torch.ones(3))
    assert torch.equal(b.weights, torch.ones(3))


def test_fixed_uses_the_given_weights():
    b = tb.create("fixed", num_tasks=3, weights=[0.5, 0.0, 2.0])
    assert torch.equal(b.weights, torch.tensor([0.5, 0.0, 2.0]))  # before any call
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    objective = b(losses)
    assert objective.item() == pytest.approx(6.5)
    objective.backward()
    assert torch.equal(losses.grad, torch.tensor([0.5, 0.0, 2.0]))


# ---------------------------------------------------------------------------------------------
# DWA


EPOCHS = [
    [[3.0, 1.0, 0.5], [2.0, 1.2, 0.4]],  # epoch 1: mean [2.5, 1.1, 0.45]
    [[2.0, 0.9, 0.3], [1.0, 1.1, 0.5]],  # epoch 2: mean [1.5, 1.0, 0.4]
    [[0.9, 0.8, 0.6], [1.1, 0.8, 0.2]],  # epoch 3: mean [1.0, 0.8, 0.4]
    [[1.0, 1.0, 1.0]],
]


@pytest.mark.parametrize("T", [2.0, 0.5])
def test_dwa_per_epoch_over_three_epochs(T):
    b = tb.create("dwa", num_tasks=3, temperature=T)
    means = []
    seen = []
    for epoch in EPOCHS:
        for losses in epoch:
            seen.append(b(torch.tensor(losses, requires_grad=True)).detach())
            seen[-1] = b.weights
        means.append([sum(col) / len(epoch) for col in zip(*epoch, strict=True)])
        b.end_epoch()
    # w = 1 throughout the first two epochs
    for weights in seen[:4]:
        assert torch.equal(weights, torch.ones(3))
    # epoch 3: r = L̄(2) / L̄(1)
    expected3 = torch.tensor(_dwa_by_hand(means[1], means[0], T))
    for weights in seen[4:6]:
        torch.testing.assert_close(weights, expected3, rtol=1e-6, atol=1e-7)
    # epoch 4: r = L̄(3) / L̄(2)
    expected4 = torch.tensor(_dwa_by_hand(means[2], means[1], T))
    torch.testing.assert_close(seen[6], expected4, rtol=1e-6, atol=1e-7)
    assert seen[6].sum().item() == pytest.approx(3.0, rel=1e-6)


def test_dwa_window_mode():
    b = tb.create("dwa", num_tasks=3, window=2)
    steps = [losses for epoch in EPOCHS[:3] for losses in epoch]  # 6 steps = 3 windows
    seen = []
    for losses in steps:
        b(torch.tensor(losses, requires_grad=True))
        seen.append(b.weights)
        b.end_epoch()  # a no-op in window mode
    weights7 = b.compute_weights(torch.tensor([1.0, 1.0, 1.0]))
    means = [[(a + c) / 2 for a, c in zip(steps[i], steps[i + 1], strict=True)] for i in (0, 2, 4)]
    for weights in seen[:4]:
        assert torch.equal(weights, torch.ones(3))
    expected = torch.tensor(_dwa_by_hand(means[1], means[0], 2.0))
    torch.testing.assert_close(seen[4], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(seen[5], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        weights7, torch.tensor(_dwa_by_hand(means[2], means[1], 2.0)), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    ("name", "hyperparameters", "epoch_every", "warns"),
    [
        ("dwa", {}, None, True),
        ("stch", {}, None, True),
        ("dwa", {}, 7, True),  # a first epoch longer than the threshold: once, not per epoch
        ("stch", {}, 7, True),
        ("dwa", {}, 4, False),
        ("stch", {}, 4, False),
        ("dwa", {"window": 3}, None, False),
        ("stch", {"nadir": 1.0}, None, False),
    ],
)
def test_a_method_that_waits_for_epochs_warns_once_when_none_end(
    monkeypatch, name, hyperparameters, epoch_every, warns
):
    """The three-line recipe never calls end_epoch(): DWA kept weights 1 forever, silently."""
    monkeypatch.setattr("taskbalance._base.EPOCHLESS_STEPS", 5)
    b = tb.create(name, num_tasks=2, **hyperparameters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in range(1, 30):
            b(torch.tensor([1.0 + call, 2.0], requires_grad=True))
            if epoch_every is not None and call % epoch_every == 0:
                b.end_epoch()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if not warns:
        assert messages == []
        return
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"{name.upper()}: 5 training steps and no end_epoch() yet; ")
    assert "end_epoch() at each epoch boundary" in messages[0]
    assert {w.filename for w in caught} == {__file__}  # points at the user's call


@pytest.mark.parametrize("name", ["dwa", "stch"])
def test_the_epoch_warning_as_an_error_changes_no_state(monkeypatch, name):
    monkeypatch.setattr("taskbalance._base.EPOCHLESS_STEPS", 3)
    b = tb.create(name, num_tasks=2, warmup_epochs=1) if name == "stch" else tb.create(name, 2)
    for call in range(2):
        b(torch.tensor([1.0 + call, 2.0], requires_grad=True))
    before = {key: value.clone() for key, value in b.state_dict().items() if torch.is_tensor(value)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="no end_epoch"):
            b(torch.tensor([5.0, 2.0], requires_grad=True))
    after = {key: value for key, value in b.state_dict().items() if torch.is_tensor(value)}
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_dwa_end_epoch_without_steps_does_not_open_a_period():
    b = tb.create("dwa", num_tasks=2)
    b(torch.tensor([2.0, 1.0], requires_grad=True))
    b.end_epoch()
    b.end_epoch()  # empty period: ignored
    b(torch.tensor([1.0, 1.0], requires_grad=True))
    b.end_epoch()
    torch.testing.assert_close(
        b.compute_weights(torch.tensor([1.0, 1.0])),
        torch.tensor(_dwa_by_hand([1.0, 1.0], [2.0, 1.0], 2.0)),
    )


# ---------------------------------------------------------------------------------------------
# DTP


def _dtp_by_hand(kpi_steps, gamma, alpha, eps):
    smoothed = None
    out = []
    for kpis in kpi_steps:
        if smoothed is None:
            smoothed = list(kpis)
        else:
            smoothed = [alpha * k + (1 - alpha) * s for k, s in zip(kpis, smoothed, strict=True)]
        weights = []
        for s, g in zip(smoothed, gamma, strict=True):
            c = min(max(s, eps), 1.0)
            weights.append(-((1 - c) ** g) * math.log(c))
        out.append(weights)
    return out


def test_dtp_from_given_kpis_with_per_task_gamma():
    gamma = [2.0, 0.5, 0.0]
    kpi_steps = [[0.9, 0.5, 0.2], [0.7, 0.6, 0.4], [1.0, 0.1, 0.8], [0.95, 0.3, 0.5]]
    b = tb.create("dtp", num_tasks=3, gamma=gamma, smoothing=0.3, eps=1e-3)
    expected = _dtp_by_hand(kpi_steps, gamma, 0.3, 1e-3)
    for kpis, want in zip(kpi_steps, expected, strict=True):
        losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
        objective = b(losses, kpis=torch.tensor(kpis))
        torch.testing.assert_close(b.weights, torch.tensor(want), rtol=1e-5, atol=1e-7)
        (grad,) = torch.autograd.grad(objective, losses)
        torch.testing.assert_close(grad, torch.tensor(want), rtol=1e-5, atol=1e-7)


def test_dtp_default_gamma_and_list_kpis():
    b = tb.create("dtp", num_tasks=2)
    b(torch.tensor([1.0, 1.0], requires_grad=True), kpis=[0.9, 0.5])
    expected = [-(0.1**2) * math.log(0.9), -(0.5**2) * math.log(0.5)]
    torch.testing.assert_close(b.weights, torch.tensor(expected))


def test_dtp_starts_a_tasks_average_at_its_first_present_kpi():
    """Task 1 is absent at the first two calls (its KPI there, 1.0 and 0.0, is no
    observation): its κ̄ starts at the KPI of its first present call, 0.3, and then averages
    as the others do; task 0's average runs from the first call."""
    b = tb.create("dtp", num_tasks=2, gamma=2.0, smoothing=0.1)
    losses = torch.tensor([1.0, 1.0], requires_grad=True)
    b(losses, kpis=[0.5, 1.0], present=[True, False])
    b(losses, kpis=[0.5, 0.0], present=[True, False])
    assert b.weights[1] == 0
    b(losses, kpis=[0.5, 0.3], present=[True, True])
    torch.testing.assert_close(b.smoothed_kpis, torch.tensor([0.5, 0.3]))
    expected = [-(0.5**2) * math.log(0.5), -(0.7**2) * math.log(0.3)]
    torch.testing.assert_close(b.weights, torch.tensor(expected))
    b(losses, kpis=[0.5, 0.5], present=[True, True])
    torch.testing.assert_close(b.smoothed_kpis, torch.tensor([0.5, 0.1 * 0.5 + 0.9 * 0.3]))
    # The state carries which tasks have an average: a resumed copy continues alike.
    copy = tb.create("dtp", num_tasks=2, gamma=2.0, smoothing=0.1)
    copy.load_state_dict(b.state_dict())
    assert copy.has_kpis.tolist() == [True, True]


def test_dtp_clamps_a_zero_kpi_with_eps():
    b = tb.create("dtp", num_tasks=2, gamma=2.0, eps=1e-4)
    b(torch.tensor([1.0, 1.0], requires_grad=True), kpis=torch.tensor([0.0, 1.0]))
    expected = [-((1 - 1e-4) ** 2) * math.log(1e-4), 0.0]
    torch.testing.assert_close(b.weights, torch.tensor(expected), rtol=1e-5, atol=1e-7)
    assert torch.isfinite(b.weights).all()


# ---------------------------------------------------------------------------------------------
# UW and IMTL-L


def _set_log_scales(b: tb.Balancer, s: list[float]) -> None:
    with torch.no_grad():
        b.log_scales.copy_(torch.tensor(s))


def test_uw_objective_and_gradients_by_hand():
    kinds = ["regression", "classification", "regression"]
    s_values = [0.3, -0.7, 1.5]
    L_values = [2.0, 0.8, 5.0]
    b = tb.create("uw", num_tasks=3, kinds=kinds)
    _set_log_scales(b, s_values)
    losses = torch.tensor(L_values, requires_grad=True)
    objective = b(losses)

    s = torch.tensor(s_values, requires_grad=True)
    L = torch.tensor(L_values, requires_grad=True)
    c = torch.tensor([0.5, 1.0, 0.5])
    reference = (c * torch.exp(-s) * L + 0.5 * s).sum()
    ref_grad_L, ref_grad_s = torch.autograd.grad(reference, (L, s))

    value_by_hand = sum(
        (0.5 if k == "regression" else 1.0) * math.exp(-sv) * lv + 0.5 * sv
        for k, sv, lv in zip(kinds, s_values, L_values, strict=True)
    )
    assert objective.item() == pytest.approx(value_by_hand, rel=1e-6)
    grad_L, grad_s = torch.autograd.grad(objective, (losses, b.log_scales))
    torch.testing.assert_close(grad_L, ref_grad_L)
    torch.testing.assert_close(grad_s, ref_grad_s)
    # Hand formulas: ∂/∂L = c·e^{−s}; ∂/∂s = −c·e^{−s}·L + ½
    hand_L = [
        (0.5 if k == "regression" else 1.0) * math.exp(-sv)
        for k, sv in zip(kinds, s_values, strict=True)
    ]
    hand_s = [-h * lv + 0.5 for h, lv in zip(hand_L, L_values, strict=True)]
    torch.testing.assert_close(grad_L, torch.tensor(hand_L))
    torch.testing.assert_close(grad_s, torch.tensor(hand_s))
    torch.testing.assert_close(b.weights, torch.tensor(hand_L))
    torch.testing.assert_close(b.variances, torch.exp(torch.tensor(s_values)))


def test_uw_defaults_and_optimum():
    b = tb.create("uw", num_tasks=2)
    assert torch.equal(b.log_scales.detach(), torch.zeros(2))
    torch.testing.assert_close(b.weights, torch.tensor([0.5, 0.5]))  # ½·e^0 before any call
    # The regression optimum of ½e^{−s}L + ½s is e^s = L: the gradient wrt s vanishes there.
    _set_log_scales(b, [math.log(3.0), math.log(0.25)])
    objective = b(torch.tensor([3.0, 0.25], requires_grad=True))
    (grad_s,) = torch.autograd.grad(objective, b.log_scales)
    torch.testing.assert_close(grad_s, torch.zeros(2), atol=1e-6, rtol=0)


def test_imtl_l_objective_and_gradients_by_hand():
    s_values = [0.4, -1.2]
    L_values = [3.0, 0.5]
    b = tb.create("imtl_l", num_tasks=2)
    torch.testing.assert_close(b.weights, torch.ones(2))
    _set_log_scales(b, s_values)
    losses = torch.tensor(L_values, requires_grad=True)
    objective = b(losses)
    value = sum(math.exp(sv) * lv - sv for sv, lv in zip(s_values, L_values, strict=True))
    assert objective.item() == pytest.approx(value, rel=1e-6)
    grad_L, grad_s = torch.autograd.grad(objective, (losses, b.log_scales))
    torch.testing.assert_close(grad_L, torch.tensor([math.exp(sv) for sv in s_values]))
    torch.testing.assert_close(
        grad_s,
        torch.tensor([math.exp(sv) * lv - 1 for sv, lv in zip(s_values, L_values, strict=True)]),
    )
    torch.testing.assert_close(b.weights, grad_L)


def test_imtl_l_drives_scaled_losses_to_one():
    b = tb.create("imtl_l", num_tasks=3)
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    L = torch.tensor([10.0, 1.0, 0.1], requires_grad=True)
    for _ in range(500):
        opt.zero_grad()
        b(L).backward()
        opt.step()
    torch.testing.assert_close(
        torch.exp(b.log_scales.detach()) * L, torch.ones(3), rtol=1e-3, atol=0
    )


# ---------------------------------------------------------------------------------------------
# GLS and SI


def test_gls_objective_value_and_gradient():
    L_values = [0.5, 2.0, 8.0, 1.5]
    losses = torch.tensor(L_values, dtype=torch.float64, requires_grad=True)
    objective = tb.create("gls", num_tasks=4)(losses)
    reference_L = torch.tensor(L_values, dtype=torch.float64, requires_grad=True)
    reference = torch.prod(reference_L) ** 0.25
    assert objective.item() == pytest.approx(math.prod(L_values) ** 0.25, rel=1e-6)
    (grad,) = torch.autograd.grad(objective, losses)
    (ref_grad,) = torch.autograd.grad(reference, reference_L)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=0)
    gm = math.prod(L_values) ** 0.25
    torch.testing.assert_close(
        grad,
        torch.tensor([gm / (4 * lv) for lv in L_values], dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )


def test_si_objective_value_and_gradient():
    L_values = [0.5, 2.0, 8.0]
    losses = torch.tensor(L_values, requires_grad=True)
    b = tb.create("si", num_tasks=3)
    objective = b(losses)
    assert objective.item() == pytest.approx(sum(math.log(v) for v in L_values), rel=1e-6)
    (grad,) = torch.autograd.grad(objective, losses)
    torch.testing.assert_close(grad, torch.tensor([1 / v for v in L_values]))
    torch.testing.assert_close(b.weights, torch.tensor([1 / v for v in L_values]))


# ---------------------------------------------------------------------------------------------
# RLW


@pytest.mark.parametrize("seed", [0, 7, 12345])
def test_rlw_matches_seeded_softmax_of_normal_draws(seed):
    K = 4
    b = tb.create("rlw", num_tasks=K, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(5):
        b(torch.ones(K, requires_grad=True))
        expected = K * torch.softmax(torch.randn(K, generator=generator), dim=0)
        torch.testing.assert_close(b.weights, expected)
        assert b.weights.sum().item() == pytest.approx(K, rel=1e-6)
        assert (b.weights > 0).all()


def test_rlw_same_seed_same_draws_different_seed_different_draws():
    a, b, c = (tb.create("rlw", num_tasks=3, seed=s) for s in (3, 3, 4))
    for x in (a, b, c):
        x(torch.ones(3, requires_grad=True))
    assert torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)


# ---------------------------------------------------------------------------------------------
# FAMO


def test_famo_weights_and_logit_update_by_hand():
    K, lr, gamma = 3, 0.025, 0.001
    b = tb.create("famo", num_tasks=K, lr=lr, weight_decay=gamma)
    xi = torch.zeros(K, requires_grad=True)  # a copy of the logits, stepped by torch's Adam
    adam = torch.optim.Adam([xi], lr=lr, weight_decay=gamma)
    steps = [[2.0, 1.0, 0.5], [1.8, 0.7, 0.45], [1.7, 0.6, 0.5], [1.2, 0.65, 0.3], [1.1, 0.5, 0.2]]
    previous = None
    for L_values in steps:
        L = torch.tensor(L_values)
        if previous is not None:
            delta = torch.log(previous + 1e-8) - torch.log(L + 1e-8)
            # gradient of the logits: (∂softmax/∂ξ)ᵀ δ, the softmax Jacobian transposed times δ
            z = torch.softmax(xi.detach(), 0)
            jacobian = torch.diag(z) - torch.outer(z, z)  # J[i, j] = ∂z_i/∂ξ_j
            adam.zero_grad()
            xi.grad = jacobian.T @ delta
            adam.step()
        previous = L
        losses = L.clone().requires_grad_(True)
        objective = b(losses)
        torch.testing.assert_close(b.logits, xi.detach(), rtol=1e-6, atol=1e-8)
        z = torch.softmax(xi.detach(), 0)
        D = L + 1e-8
        c = (z / D).sum()
        expected_weights = z / (c * D)
        torch.testing.assert_close(b.weights, expected_weights, rtol=1e-6, atol=1e-8)
        # value: Σ (z/c)·log D, gradient: z/(c·D)
        assert objective.item() == pytest.approx(float((z / c * torch.log(D)).sum()), abs=1e-6)
        (grad,) = torch.autograd.grad(objective, losses)
        torch.testing.assert_close(grad, expected_weights, rtol=1e-6, atol=1e-8)
    assert not torch.equal(b.logits, torch.zeros(K))  # the logits did move


def test_famo_min_losses_shift():
    b = tb.create("famo", num_tasks=2, min_losses=0.5)
    b(torch.tensor([1.5, 0.75], requires_grad=True))
    D = torch.tensor([1.0, 0.25]) + 1e-8
    z = torch.full((2,), 0.5)
    torch.testing.assert_close(b.weights, z / ((z / D).sum() * D))
    with pytest.raises(ValueError, match=r"min_losses"):
        b(torch.tensor([0.4, 1.0], requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_famo_logits_stay_put_while_the_losses_do_not_change(dtype):
    """δ = 0 exactly for an unchanged loss: the current log-loss is rounded as the stored one
    (Adam would turn a rounding-level δ into a full-size step)."""
    b = tb.create("famo", num_tasks=3, weight_decay=0.0).to(dtype)
    for _ in range(6):
        b(torch.tensor([2.0, 5.0, 3.0], requires_grad=True))
    assert torch.equal(b.logits, torch.zeros(3, dtype=b.logits.dtype))
    b(torch.tensor([1.0, 5.0, 3.0], requires_grad=True))  # task 0 fell: it loses weight
    assert b.logits[0] < b.logits[1]


def test_famo_initial_weights_are_uniform():
    b = tb.create("famo", num_tasks=4)
    torch.testing.assert_close(b.weights, torch.full((4,), 0.25))
    b(torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True))
    torch.testing.assert_close(b.weights, torch.full((4,), 0.25))


def test_dwa_huge_loss_ratio_gives_finite_weights():
    # L̄(2)/L̄(1) = 1e30/1e-30 overflows float32: the weights must stay finite, not NaN.
    b = tb.create("dwa", num_tasks=3, temperature=0.5)
    for losses in ([1e-30, 1.0, 1.0], [1e30, 1.0, 1.0]):
        b(torch.tensor(losses, requires_grad=True))
        b.end_epoch()
    weights = b.compute_weights(torch.tensor([1.0, 1.0, 1.0]))
    assert torch.isfinite(weights).all(), weights
    torch.testing.assert_close(weights, torch.tensor([3.0, 0.0, 0.0]))


def test_famo_negative_lower_bounds_allow_negative_losses():
    """A Gaussian NLL can be negative: with min_losses below it, FAMO takes log(L − min)."""
    b = tb.create("famo", num_tasks=2, min_losses=[-5.0, 0.0])
    losses = torch.tensor([-1.0, 2.0], requires_grad=True)
    objective = b(losses)
    shifted = torch.tensor([4.0, 2.0]) + 1e-8
    z = torch.full((2,), 0.5)
    expected = z / ((z / shifted).sum() * shifted)
    torch.testing.assert_close(b.weights, expected)
    (grad,) = torch.autograd.grad(objective, losses)
    torch.testing.assert_close(grad, expected)
    with pytest.raises(ValueError, match=r"FAMO takes log\(L − min_losses\)"):
        b(torch.tensor([-6.0, 2.0], requires_grad=True))


def test_famo_same_batch_update_is_the_official_loop():
    """delta='same_batch': weights from z; update(L_after) does one Adam step on the logits
    with δ = log L_before − log L_after, exactly as the official training loop."""
    b = tb.create("famo", num_tasks=3, delta="same_batch")
    logits = torch.zeros(3, requires_grad=True)
    reference = torch.optim.Adam([logits], lr=0.025, weight_decay=0.001)
    before_steps = [torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.5, 0.9, 0.45])]
    after_steps = [torch.tensor([1.6, 0.95, 0.49]), torch.tensor([1.2, 0.88, 0.3])]
    for before, after in zip(before_steps, after_steps, strict=True):
        b(before.clone().requires_grad_(True))
        z = torch.softmax(logits.detach(), dim=0)
        shifted = before + 1e-8
        expected = z / ((z / shifted).sum() * shifted)
        torch.testing.assert_close(b.weights, expected)
        b.update(after)
        decrease = torch.log(shifted) - torch.log(after + 1e-8)
        reference.zero_grad()
        logits.grad = z * (decrease - (z * decrease).sum())
        reference.step()
        torch.testing.assert_close(b.logits, logits.detach(), rtol=0, atol=1e-7)


def test_famo_update_learns_once_per_recorded_before():
    """A "before" is spent by its update(): a second update, or one after a call that the
    non-finite skip left unrecorded (GradScaler skipped its step), learns nothing."""
    b = tb.create("famo", num_tasks=2, delta="same_batch", lr=0.3, on_nonfinite="skip")
    b(torch.tensor([1.0, 1.0], requires_grad=True))
    b.update(torch.tensor([0.5, 0.9]))
    learned = b.logits.clone()
    assert not torch.equal(learned, torch.zeros(2))
    b.update(torch.tensor([0.4, 0.9]))
    assert torch.equal(b.logits, learned)
    skipped = b(torch.tensor([math.inf, 0.8], requires_grad=True))
    assert math.isnan(skipped.item())
    b.update(torch.tensor([0.6, 0.8]))
    assert torch.equal(b.logits, learned)
    b(torch.tensor([0.6, 0.8], requires_grad=True))  # a recorded step learns again
    b.update(torch.tensor([0.3, 0.8]))
    assert not torch.equal(b.logits, learned)


def test_famo_update_learns_nothing_after_a_skipped_micro_batch():
    b = tb.create(
        "famo",
        num_tasks=2,
        delta="same_batch",
        lr=0.3,
        on_nonfinite="skip",
        accumulation_steps=2,
    )
    b(torch.tensor([1.0, 1.0], requires_grad=True))  # the window's first call records
    assert math.isnan(b(torch.tensor([math.inf, 0.8], requires_grad=True)).item())
    b.update(torch.tensor([0.5, 0.9]))  # GradScaler skipped the window's optimiser step
    assert torch.equal(b.logits, torch.zeros(2))
    b(torch.tensor([1.0, 1.0], requires_grad=True))  # the next window learns again
    b(torch.tensor([0.9, 1.0], requires_grad=True))
    b.update(torch.tensor([0.5, 0.9]))
    assert not torch.equal(b.logits, torch.zeros(2))


def test_famo_update_after_a_skipped_first_call_learns_nothing():
    """A GradScaler loop whose very first step overflows still calls update()."""
    b = tb.create("famo", num_tasks=2, delta="same_batch", on_nonfinite="skip")
    assert math.isnan(b(torch.tensor([math.inf, 0.8], requires_grad=True)).item())
    b.update(torch.tensor([0.5, 0.9]))
    assert torch.equal(b.logits, torch.zeros(2))


def test_famo_update_is_refused_in_next_step_mode_and_before_a_call():
    with pytest.raises(ValueError, match=r"delta: FAMO.update\(\) is the same-batch update"):
        tb.create("famo", num_tasks=2).update(torch.ones(2))
    b = tb.create("famo", num_tasks=2, delta="same_batch")
    with pytest.raises(ValueError, match=r"needs a call first"):
        b.update(torch.ones(2))
    b(torch.ones(2, requires_grad=True))
    logits = b.logits.clone()
    with pytest.raises(ValueError, match=r"losses\[1\] is nan"):
        b.update(torch.tensor([1.0, float("nan")]))
    assert torch.equal(b.logits, logits)
