"""Methods whose shared direction is not ``Jᵀw`` (issue 12, item 3), against independent
re-implementations of each paper's formula on an explicit Jacobian.

Each check runs a tiny trunk + heads model, computes the task gradients with plain
``torch.autograd.grad`` and the paper's update by hand, and compares the gradient the
balancer's one ordinary backward leaves on the shared tensors and on the heads.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import taskbalance as tb

K = 3


def _model(seed: int = 0) -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(K)])
    return trunk, heads


def _losses(trunk, heads, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 4, generator=generator)
    y = torch.randn(8, K, generator=generator)
    z = trunk(x)
    losses = torch.stack(
        [((head(z).squeeze(1) - y[:, k]) ** 2).mean() for k, head in enumerate(heads)]
    )
    return z, losses


def _flat_grads(loss: torch.Tensor, tensors) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(tensors), retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


def _grad_of(tensors) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in tensors])


# ---------------------------------------------------------------------------------------------
# DB-MTL in parameters mode: the paper's EMA of gradient vectors


def _db_mtl_reference(steps: int, beta: float, beta_sigma: float, heads_weighted: bool):
    """LibMTL's / the paper's update written out: returns per step (d, head grads, α/(L+ε))."""
    trunk, heads = _model()
    params = list(trunk.parameters())
    ema = torch.zeros(K, sum(p.numel() for p in params))
    out = []
    for t in range(1, steps + 1):
        _, losses = _losses(trunk, heads, t)
        log_losses = torch.log(losses + 1e-8)
        log_grads = torch.stack([_flat_grads(log_losses[k], params) for k in range(K)])
        rate = beta / t**beta_sigma
        ema = log_grads + rate * (ema - log_grads)
        norms = ema.norm(dim=1)
        alpha = norms.max() / norms
        d = (alpha[:, None] * ema).sum(0)
        weights = alpha / (losses.detach() + 1e-8)
        scale = weights if heads_weighted else torch.ones(K)
        head_grads = [scale[k] * _flat_grads(losses[k], heads[k].parameters()) for k in range(K)]
        out.append((d, head_grads, weights))
        with torch.no_grad():  # move the trunk along d so the steps differ
            offset = 0
            for p in params:
                p -= 0.1 * d[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
    return out


@pytest.mark.parametrize(
    ("beta", "beta_sigma", "heads"),
    [(0.9, 0.0, "unweighted"), (0.5, 0.5, "unweighted"), (0.9, 0.0, "weighted")],
)
def test_db_mtl_parameters_mode_is_the_papers_vector_ema(beta, beta_sigma, heads):
    expected = _db_mtl_reference(4, beta, beta_sigma, heads == "weighted")
    trunk, task_heads = _model()
    params = list(trunk.parameters())
    b = tb.create(
        "db_mtl", num_tasks=K, params=params, beta=beta, beta_sigma=beta_sigma, heads=heads
    )
    for t, (d, head_grads, weights) in enumerate(expected, start=1):
        _, losses = _losses(trunk, task_heads, t)
        trunk.zero_grad()
        task_heads.zero_grad()
        b(losses).backward()
        torch.testing.assert_close(_grad_of(params), d, rtol=1e-4, atol=1e-7)
        for k in range(K):
            torch.testing.assert_close(_grad_of(task_heads[k].parameters()), head_grads[k])
        torch.testing.assert_close(b.weights, weights, rtol=1e-5, atol=0)
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad


def test_db_mtl_parameters_mode_with_beta_zero_is_jtw_of_its_weights():
    """β = 0: ĝ_k is the current log-loss gradient, so d = Jᵀw with w = b.weights."""
    trunk, heads = _model(1)
    params = list(trunk.parameters())
    b = tb.create("db_mtl", num_tasks=K, params=params, beta=0.0)
    _, losses = _losses(trunk, heads, 0)
    J = torch.stack([_flat_grads(losses[k], params) for k in range(K)])
    b(losses).backward()
    torch.testing.assert_close(_grad_of(params), J.T @ b.weights, rtol=1e-5, atol=1e-7)


def test_db_mtl_features_mode_is_unchanged_jtw():
    trunk, heads = _model(2)
    b = tb.create("db_mtl", num_tasks=K)
    z, losses = _losses(trunk, heads, 0)
    Jz = torch.stack([_flat_grads(losses[k], [z]) for k in range(K)])
    (z_grad,) = torch.autograd.grad(b(losses, features=z), z)
    torch.testing.assert_close(z_grad.reshape(-1), Jz.T @ b.weights, rtol=1e-5, atol=1e-7)
    assert b.grad_averages.shape == (K, 0)


def test_db_mtl_parameters_mode_refuses_compute_weights_without_changing_state():
    trunk, _ = _model()
    b = tb.create("db_mtl", num_tasks=K, params=trunk.parameters())
    before = {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"gram: db_mtl in parameters mode keeps an EMA"):
        b.compute_weights(torch.ones(K), gram=torch.eye(K))
    for key, value in b.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[key]), key


def test_db_mtl_parameters_mode_state_round_trip():
    def run(b, trunk, heads, steps):
        out = []
        for t in steps:
            _, losses = _losses(trunk, heads, t)
            trunk.zero_grad()
            b(losses).backward()
            out.append(_grad_of(trunk.parameters()).clone())
        return out

    trunk, heads = _model()
    reference = tb.create("db_mtl", num_tasks=K, params=trunk.parameters())
    expected = run(reference, trunk, heads, range(6))
    first = tb.create("db_mtl", num_tasks=K, params=trunk.parameters())
    run(first, trunk, heads, range(3))
    resumed = tb.create("db_mtl", num_tasks=K, params=trunk.parameters())
    resumed.load_state_dict(first.state_dict())
    for have, want in zip(run(resumed, trunk, heads, range(3, 6)), expected[3:], strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=0)
