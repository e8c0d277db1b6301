"""AdamState, the host-arithmetic Adam used inside FAMO and GradNorm, against torch.optim.Adam."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskbalance._adam import AdamState


@pytest.mark.parametrize(
    ("lr", "betas", "eps", "weight_decay"),
    [
        (0.025, (0.9, 0.999), 1e-8, 0.001),
        (0.1, (0.8, 0.99), 1e-6, 0.05),
        (1e-3, (0.9, 0.999), 1e-8, 0.0),
    ],
)
def test_adam_state_matches_torch_adam(lr, betas, eps, weight_decay):
    generator = torch.Generator().manual_seed(0)
    size = 5
    start = torch.randn(size, generator=generator)
    ours_state = AdamState(size, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    ours = start.tolist()
    theirs = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([theirs], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for _ in range(25):
        grad = torch.randn(size, generator=generator) * 3.0
        ours = ours_state.step(ours, grad.tolist())
        optimiser.zero_grad()
        theirs.grad = grad.clone()
        optimiser.step()
        torch.testing.assert_close(torch.tensor(ours), theirs.detach(), rtol=1e-6, atol=1e-7)
    state = optimiser.state[theirs]
    torch.testing.assert_close(ours_state.exp_avg, state["exp_avg"])
    torch.testing.assert_close(ours_state.exp_avg_sq, state["exp_avg_sq"])
    assert int(ours_state.step_count) == int(state["step"]) == 25


@settings(max_examples=40, deadline=None)
@given(
    start=st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=6),
    scale=st.floats(1e-4, 1e3),
    weight_decay=st.sampled_from([0.0, 0.01]),
    seed=st.integers(0, 2**16),
)
def test_adam_state_tracks_torch_adam_at_any_scale(start, scale, weight_decay, seed):
    generator = torch.Generator().manual_seed(seed)
    ours_state = AdamState(len(start), lr=0.05, weight_decay=weight_decay)
    theirs = torch.tensor(start, requires_grad=True)
    optimiser = torch.optim.Adam([theirs], lr=0.05, weight_decay=weight_decay)
    ours = list(start)
    for _ in range(10):
        grad = torch.randn(len(start), generator=generator) * scale
        ours = ours_state.step(ours, grad.tolist())
        optimiser.zero_grad()
        theirs.grad = grad
        optimiser.step()
    torch.testing.assert_close(torch.tensor(ours), theirs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        ours_state.exp_avg_sq, optimiser.state[theirs]["exp_avg_sq"], rtol=1e-5, atol=0
    )


def test_adam_state_does_not_modify_param_and_round_trips():
    state = AdamState(3, lr=0.1, weight_decay=0.01)
    param = [1.0, -2.0, 0.5]
    grad = [0.3, 0.1, -0.2]
    updated = state.step(param, grad)
    assert param == [1.0, -2.0, 0.5]
    assert updated != param
    # Resuming from state_dict continues the same trajectory, exactly.
    copy_state = AdamState(3, lr=0.1, weight_decay=0.01)
    copy_state.load_state_dict(state.state_dict())
    assert state.step(updated, grad) == copy_state.step(updated, grad)


def test_adam_state_mask_leaves_the_masked_entries_and_their_moments():
    state = AdamState(3, lr=0.1)
    state.step([1.0, 2.0, 3.0], [0.5, 0.5, 0.5])
    moments = (state.exp_avg.clone(), state.exp_avg_sq.clone())
    updated = state.step([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], mask=[True, False, True])
    assert updated[1] == 2.0
    assert updated[0] != 1.0
    assert updated[2] != 3.0
    assert state.exp_avg[1] == moments[0][1]
    assert state.exp_avg_sq[1] == moments[1][1]
    assert state.exp_avg[0] != moments[0][0]
    assert int(state.step_count) == 2  # the step count is shared


def test_adam_state_refuses_a_length_mismatch_without_changing_state():
    state = AdamState(3, lr=0.1)
    with pytest.raises(ValueError):
        state.step([1.0, 2.0, 3.0], [0.5, 0.5])
    assert int(state.step_count) == 0
    assert torch.equal(state.exp_avg, torch.zeros(3))
