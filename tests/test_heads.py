"""heads="unweighted": task heads get their own gradients, the shared trunk gets J_zᵀw."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import taskbalance as tb
from conftest import FEATURE_METHODS as GRADIENT_METHODS  # features mode throughout


def _model(K: int) -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(K)])
    return trunk, heads


def _losses(trunk, heads, x, y):
    z = trunk(x)
    losses = torch.stack(
        [nn.functional.mse_loss(head(z).squeeze(1), y[:, k]) for k, head in enumerate(heads)]
    )
    return z, losses


def _head_loss(name: str, loss: torch.Tensor) -> torch.Tensor:
    """What each method's reference code trains a task head on: DB-MTL's heads take the
    gradient of the log-loss (LibMTL's DB_MTL backpropagates log(L_k + 1e-8) per task), the
    others' the loss itself."""
    return torch.log(loss + 1e-8) if name == "db_mtl" else loss


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_heads_unweighted_gives_heads_own_gradients_and_trunk_jtw(name):
    K = 3
    trunk, heads = _model(K)
    torch.manual_seed(1)
    x, y = torch.randn(16, 5), torch.randn(16, K)
    b = tb.create(name, num_tasks=K, heads="unweighted")

    z, losses = _losses(trunk, heads, x, y)
    objective = b(losses, features=z)
    objective.backward()
    weights = b.weights

    # Independent reference: per-task gradients by separate backward passes (the trunk's
    # direction of a method that sets its own is checked in test_directions.py).
    jtw = not b._direction_from_rows()
    _, losses_ref = _losses(trunk, heads, x, y)
    trunk_params = list(trunk.parameters())
    expected_trunk = [torch.zeros_like(p) for p in trunk_params]
    for k in range(K):
        grads = torch.autograd.grad(losses_ref[k], trunk_params, retain_graph=True)
        for total, grad in zip(expected_trunk, grads, strict=True):
            total += weights[k] * grad
        head_grads = torch.autograd.grad(
            _head_loss(name, losses_ref[k]), list(heads[k].parameters()), retain_graph=True
        )
        for param, grad in zip(heads[k].parameters(), head_grads, strict=True):
            torch.testing.assert_close(param.grad, grad, rtol=1e-5, atol=1e-6)
    for param, expected in zip(trunk_params, expected_trunk, strict=True):
        if jtw:
            torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(objective.detach(), losses_ref.sum().detach())


def test_heads_unweighted_reuses_weights_between_refreshes_and_keeps_trunk_exact():
    K = 2
    trunk, heads = _model(K)
    torch.manual_seed(2)
    x, y = torch.randn(8, 5), torch.randn(8, K)
    b = tb.create("mgda", num_tasks=K, heads="unweighted", update_every=2)
    for _ in range(3):
        for p in [*trunk.parameters(), *heads.parameters()]:
            p.grad = None
        z, losses = _losses(trunk, heads, x, y)
        b(losses, features=z).backward()
        w = b.weights
        (gz,) = torch.autograd.grad((w * _losses(trunk, heads, x, y)[1]).sum(), [trunk[-1].weight])
        torch.testing.assert_close(trunk[-1].weight.grad, gz, rtol=1e-5, atol=1e-6)


def test_heads_unweighted_in_parameters_mode_gives_listed_params_jtw():
    """Parameters mode: the listed shared parameters get J^T w, everything else (heads, and
    shared parameters left out of params) the plain sum of the task gradients."""
    K = 3
    trunk, heads = _model(K)
    torch.manual_seed(4)
    x, y = torch.randn(16, 5), torch.randn(16, K)
    listed = list(trunk[-1].parameters())
    b = tb.create("pcgrad", num_tasks=K, params=listed)
    assert b.heads == "unweighted"
    _, losses = _losses(trunk, heads, x, y)
    b(losses).backward()
    weights = b.weights
    _, losses_ref = _losses(trunk, heads, x, y)
    unlisted = list(trunk[0].parameters())
    for group, coefficients in ((listed, weights), (unlisted, torch.ones(K))):
        for param in group:
            expected = sum(
                c * torch.autograd.grad(losses_ref[k], [param], retain_graph=True)[0]
                for k, c in enumerate(coefficients)
            )
            torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6)


def test_default_heads_follow_the_reference_code():
    weighted = {"mgda", "nash_mtl", "gradnorm", "excess_mtl"}
    for name in GRADIENT_METHODS:
        expected = "weighted" if name in weighted else "unweighted"
        assert tb.create(name, num_tasks=2).heads == expected, name
        assert tb.create(name, num_tasks=2, heads="weighted").heads == "weighted"
    with pytest.raises(ValueError, match=r"heads: expected one of \['weighted', 'unweighted'\]"):
        tb.create("mgda", num_tasks=2, heads="sometimes")


def test_heads_unweighted_survives_grad_scaling():
    """A GradScaler-style scaled objective scales every gradient alike."""
    K = 2
    trunk, heads = _model(K)
    torch.manual_seed(3)
    x, y = torch.randn(8, 5), torch.randn(8, K)
    grads = []
    for scale in (1.0, 1024.0):
        b = tb.create("upgrad", num_tasks=K, heads="unweighted")
        for p in [*trunk.parameters(), *heads.parameters()]:
            p.grad = None
        z, losses = _losses(trunk, heads, x, y)
        (scale * b(losses, features=z)).backward()
        grads.append([p.grad.clone() / scale for p in [*trunk.parameters(), *heads.parameters()]])
    for unscaled, scaled in zip(*grads, strict=True):
        torch.testing.assert_close(scaled, unscaled, rtol=1e-5, atol=1e-7)
