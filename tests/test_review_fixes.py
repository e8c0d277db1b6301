"""Regression tests for defects a review of this release's loop features found."""

from __future__ import annotations

import copy

import pytest
import torch

import taskbalance as tb


def _nested_losses(stage1, stage2, heads, x, y):
    z1 = stage1(x)
    z2 = stage2(torch.relu(z1))
    outputs = [heads[0](z1), heads[1](z2)]
    losses = [((o.squeeze(1) - y[:, k]) ** 2).mean() for k, o in enumerate(outputs)]
    return losses, z1, z2


@pytest.mark.parametrize("heads", ["weighted", "unweighted"])
def test_features_computed_from_one_another_are_refused(heads):
    """Multi-scale features of one backbone (z2 = stage2(z1)) would count the path through z2
    twice in the Gramian and, with unweighted heads, in the trunk's gradient (40% off)."""
    torch.manual_seed(0)
    stage1, stage2 = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6)
    head_modules = torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(2)])
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    b = tb.create("mgda", num_tasks=2, heads=heads)
    losses, z1, z2 = _nested_losses(stage1, stage2, head_modules, x, y)
    before = b.state_dict()
    with pytest.raises(ValueError, match=r"features\[1\]: computed from features\[0\]"):
        b(losses, features=[z1, z2])
    assert int(b.num_steps) == 0
    assert torch.equal(b.state_dict()["_last_weights"], before["_last_weights"])
    losses, z1, _ = _nested_losses(stage1, stage2, head_modules, x, y)
    with pytest.raises(ValueError, match=r"features\[1\]: the same tensor as features\[0\]"):
        b(losses, features=[z1, z1])


def test_separate_feature_tensors_give_the_exact_trunk_gradient():
    """Two encoders (no tensor computed from the other): the trunk gradient is Σ w_k ∇L_k."""
    torch.manual_seed(1)
    encoders = torch.nn.ModuleList([torch.nn.Linear(4, 6) for _ in range(2)])
    heads = torch.nn.ModuleList([torch.nn.Linear(12, 1) for _ in range(2)])
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def losses_of():
        z = [encoder(x) for encoder in encoders]
        joined = torch.cat(z, dim=1)
        return [((h(joined).squeeze(1) - y[:, k]) ** 2).mean() for k, h in enumerate(heads)], z

    b = tb.create("upgrad", num_tasks=2)
    losses, z = losses_of()
    b(losses, features=z).backward()
    w = b.weights.double()
    losses, _ = losses_of()
    for encoder in encoders:
        expected = sum(
            w[k] * torch.autograd.grad(losses[k], encoder.weight, retain_graph=True)[0].double()
            for k in range(2)
        )
        torch.testing.assert_close(encoder.weight.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_unweighted_heads_fp16_features_survive_gradscaler_initial_scale():
    """With float16 features, the unweighted-heads objective's inner product ran in float16:
    its upstream gradient (GradScaler's initial scale 2**16) overflowed to inf at every step."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(8, 16)
    heads = torch.nn.ModuleList([torch.nn.Linear(16, 1) for _ in range(2)]).half()
    x, y = torch.randn(256, 8), torch.randn(256, 2)

    def losses_of(t, hs, dtype):
        z = t(x.to(t.weight.dtype)).to(dtype)
        outs = [hs[k](z).double().squeeze(1) for k in range(2)]
        return [((o - y[:, k].double()) ** 2).mean() for k, o in enumerate(outs)]

    scale = 2.0**16
    b = tb.create("mgda", num_tasks=2, heads="unweighted")
    captured = []
    # The features are the trunk's float16 output, which both heads read.
    handle = heads[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    losses = losses_of(trunk, heads, torch.half)
    handle.remove()
    (b([loss.float() for loss in losses], features=captured[0]) * scale).backward()
    got = trunk.weight.grad.double() / scale
    assert bool(torch.isfinite(got).all())
    w = b.weights.double()
    trunk64, heads64 = copy.deepcopy(trunk).double(), copy.deepcopy(heads).double()
    reference = losses_of(trunk64, heads64, torch.double)
    expected = sum(
        w[k] * torch.autograd.grad(reference[k], trunk64.weight, retain_graph=True)[0]
        for k in range(2)
    )
    assert float((got - expected).norm() / expected.norm()) < 1e-3


def test_a_gradient_method_that_never_sees_every_task_warns():
    """With one task absent from every batch, a gradient method can never recompute its
    weights (its rule needs every task's gradient): that must not stay silent."""
    b = tb.create("mgda", num_tasks=3)
    z = torch.randn(4, 2, requires_grad=True)

    def call(step: int) -> None:
        losses = torch.stack([(z * (k + 1)).sum() ** 2 for k in range(3)])
        present = torch.ones(3, dtype=torch.bool)
        present[step % 3] = False
        b(losses, features=z, present=present)

    for step in range(99):
        call(step)
    with pytest.warns(RuntimeWarning, match=r"present: mgda has not recomputed its weights"):
        call(99)
    assert torch.equal(b.weights, torch.tensor([0.0, 1.0, 1.0]))  # never recomputed
