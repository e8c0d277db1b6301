"""AdamState, the tensor-only Adam used inside FAMO, against torch.optim.Adam."""

from __future__ import annotations

import pytest
import torch

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
    ours = start.clone()
    theirs = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([theirs], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for _ in range(25):
        grad = torch.randn(size, generator=generator) * 3.0
        ours = ours_state.step(ours, grad)
        optimiser.zero_grad()
        theirs.grad = grad.clone()
        optimiser.step()
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-7)
    state = optimiser.state[theirs]
    torch.testing.assert_close(ours_state.exp_avg, state["exp_avg"])
    torch.testing.assert_close(ours_state.exp_avg_sq, state["exp_avg_sq"])
    assert int(ours_state.step_count) == int(state["step"]) == 25


def test_adam_state_does_not_modify_param_in_place_and_round_trips():
    state = AdamState(3, lr=0.1, weight_decay=0.01)
    param = torch.tensor([1.0, -2.0, 0.5])
    original = param.clone()
    grad = torch.tensor([0.3, 0.1, -0.2])
    updated = state.step(param, grad)
    assert torch.equal(param, original)
    assert not torch.equal(updated, original)
    # Resuming from state_dict continues the same trajectory.
    copy_state = AdamState(3, lr=0.1, weight_decay=0.01)
    copy_state.load_state_dict(state.state_dict())
    torch.testing.assert_close(
        state.step(updated, grad), copy_state.step(updated, grad), rtol=0, atol=0
    )


def test_adam_state_accepts_float64_params_and_grads():
    state = AdamState(3, lr=0.1, weight_decay=0.01)
    reference = AdamState(3, lr=0.1, weight_decay=0.01)
    param = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    grad = torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64)
    updated = state.step(param, grad)
    assert updated.dtype == torch.float64
    torch.testing.assert_close(updated.float(), reference.step(param.float(), grad.float()))
