"""What the engine's per-task passes do to the graph between the losses and the listed tensors.

``docs/concepts.md`` ("What the tensors you did not list receive") states these; the tests pin
them: activation checkpointing there recomputes once per pass (K passes for stacked losses,
one batched pass for a loss vector made by one op) with exact gradients, and a hook there
runs in each of the K passes, seeing the task's gradient times 2**16, and once more in the
final backward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import taskbalance as tb

K = 3


def model():
    torch.manual_seed(0)
    bottom = nn.Linear(5, 6)
    block = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(K)])
    return bottom, block, heads, torch.randn(8, 5)


def task_losses(heads, z, stacked=True):
    if stacked:  # one backward pass per task
        return torch.stack([(head(z) - k).pow(2).mean() for k, head in enumerate(heads)])
    # one op makes the loss vector: one batched backward over the tasks
    outputs = torch.cat([head(z) for head in heads], dim=1)
    return (outputs - torch.arange(K, dtype=outputs.dtype)).pow(2).mean(0)


@pytest.mark.parametrize(("stacked", "passes"), [(True, K), (False, 1)])
def test_checkpointing_above_the_listed_parameters_is_exact_and_recomputes_per_pass(
    stacked, passes
):
    results = []
    for checkpointed in (False, True):
        bottom, block, heads, x = model()
        h = bottom(x)
        z = checkpoint(block, h, use_reentrant=False) if checkpointed else block(h)
        balancer = tb.create("mgda", num_tasks=K, params=bottom.parameters())
        balancer(task_losses(heads, z, stacked)).backward()
        assert bottom.weight.grad is not None
        tracked = int(block[1].num_batches_tracked)
        results.append((balancer.weights, bottom.weight.grad, tracked))
    (weights, grad, tracked), (weights_ckpt, grad_ckpt, tracked_ckpt) = results
    torch.testing.assert_close(weights_ckpt, weights, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_ckpt, grad, rtol=1e-6, atol=1e-9)
    # the forward, then one recomputation per task pass and one for the final backward
    assert (tracked, tracked_ckpt) == (1, 1 + passes + 1)


def test_a_hook_above_the_listed_parameters_sees_each_task_gradient_scaled_by_2_16():
    bottom, block, heads, x = model()
    h = bottom(x)
    middle = block(h)
    seen: list[torch.Tensor] = []
    middle.register_hook(lambda grad: seen.append(grad.clone()))
    losses = task_losses(heads, middle)
    expected = [torch.autograd.grad(loss, middle, retain_graph=True)[0] for loss in losses]
    seen.clear()  # the reference gradients above ran the hook too
    balancer = tb.create("mgda", num_tasks=K, params=bottom.parameters())
    objective = balancer(losses)
    assert len(seen) == K
    for got, task_grad in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, task_grad * 2.0**16, rtol=1e-6, atol=0)
    objective.backward()
    assert len(seen) == K + 1
    weighted = sum(w * g for w, g in zip(balancer.weights, expected, strict=True))
    torch.testing.assert_close(seen[-1], weighted, rtol=1e-5, atol=1e-7)
