"""Not in the graph is an error, a zero gradient is not (issue 8, item 1).

Autograd tells "no path from this loss to that tensor" (``None`` under ``allow_unused``) from a
gradient that is exactly zero. Every path of the engine (per-task edges, batched, looped) must
refuse the first with a ValueError naming the tensor, and accept the second.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import taskbalance as tb
from conftest import FEATURE_METHODS, assert_same_state, make_balancer, snapshot
from taskbalance._gramian import gramian_from_rows, jacobian_rows
from test_gramian import reference_gramian

PATHS = [None, True, False]  # default (per-task edges for a stack), batched, looped


def problem(K: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(6, 2) for _ in range(K)])
    x = torch.randn(4, 5)
    z = trunk(x)
    losses = torch.stack([(head(z) ** 2).mean() * (k + 1) for k, head in enumerate(heads)])
    return trunk, heads, x, z, losses


# ---------------------------------------------------------------------------------------------
# Features that no loss reaches


@pytest.mark.parametrize("batched", PATHS)
@pytest.mark.parametrize("source", ["stack", "vector"])
def test_features_the_heads_do_not_read_are_refused(batched, source):
    _, _, _, z, losses = problem()
    if source == "vector":  # the same values through one op: no per-task edges
        losses = losses * torch.ones(3)
    stray = z * 1.0  # computed from z, but no head reads it
    with pytest.raises(ValueError, match=r"^features: no task loss reaches it") as info:
        tb.gramian(losses, stray, batched=batched)
    message = str(info.value)
    for cause in ("torch.compile", "find_unused_parameters=True", "heads do not read", "Fix:"):
        assert cause in message


def test_the_message_names_the_fix_examples():
    _, _, _, z, losses = problem()
    with pytest.raises(ValueError, match=r"examples/compile_model\.py") as info:
        tb.gramian(losses, z.detach().requires_grad_())
    assert "examples/ddp_unused_parameters.py" in str(info.value)


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_every_gradient_method_refuses_instead_of_uniform_weights(name):
    """Before the fix MGDA/UPGrad returned uniform weights here and Nash-MTL a SolverError."""
    b = make_balancer(name, 3)
    _, _, _, z, losses = problem()
    b(losses, features=z).backward()  # a good step, so there is state to keep
    before = snapshot(b)
    _, _, _, z, losses = problem(seed=1)
    with pytest.raises(ValueError, match=r"features: no task loss reaches"):
        b(losses, features=z.detach().requires_grad_())
    assert_same_state(before, snapshot(b))


# ---------------------------------------------------------------------------------------------
# A zero gradient is legitimate


@pytest.mark.parametrize("batched", PATHS)
@pytest.mark.parametrize("source", ["stack", "vector"])
def test_dead_relu_zero_gradient_is_not_refused(batched, source):
    _, heads, _, z, _ = problem()
    dead = torch.relu(heads[1](z) - 100.0).sum()  # in the graph, gradient exactly zero
    parts = [(heads[0](z) ** 2).mean(), dead, heads[2](z).sum()]
    losses = torch.stack(parts) if source == "stack" else torch.cat([p.reshape(1) for p in parts])
    G = tb.gramian(losses, z, batched=batched)
    assert torch.all(G[1] == 0)
    assert torch.all(G[:, 1] == 0)
    assert G[0, 0] > 0
    assert G[2, 2] > 0
    torch.testing.assert_close(G.double(), reference_gramian(losses, [z]), rtol=1e-5, atol=1e-7)


def test_all_tasks_with_zero_gradient_are_not_refused():
    _, heads, _, z, _ = problem()
    losses = torch.stack([torch.relu(head(z) - 100.0).sum() for head in heads])
    for batched in PATHS:
        assert torch.all(tb.gramian(losses, z, batched=batched) == 0)


# ---------------------------------------------------------------------------------------------
# A task that reaches none of the shared tensors


@pytest.mark.parametrize("batched", PATHS)
@pytest.mark.parametrize("kind", ["constant", "other_tensor"])
def test_a_task_outside_the_graph_is_refused_on_every_path(batched, kind):
    _, heads, x, z, losses = problem()
    if kind == "constant":  # a task without labels whose loss was set to a constant
        outside = torch.tensor(0.0)
    else:  # a head that reads another tensor than the features given
        outside = (heads[1](torch.tanh(x[:, :6].repeat(1, 2)[:, :6])) ** 2).mean()
    mixed = torch.stack([losses[0], outside, losses[2]])
    with pytest.raises(ValueError, match=r"^losses\[1\]: this task's loss reaches none") as info:
        tb.gramian(mixed, z, batched=batched)
    assert "present=" in str(info.value)


@pytest.mark.parametrize("batched", PATHS)
def test_present_mask_exempts_absent_tasks(batched):
    _, _, _, z, losses = problem()
    mixed = torch.stack([losses[0], torch.tensor(float("nan")), losses[2]])
    rows, _ = jacobian_rows(mixed, [z], batched=batched, present=[True, False, True])
    G = gramian_from_rows(rows, features_mode=True, dtype=torch.float64)
    expected = reference_gramian(losses, [z])
    expected[1] = 0
    expected[:, 1] = 0
    assert torch.isfinite(G).all()
    torch.testing.assert_close(G, expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match=r"present: expected 3 entries, got 2"):
        jacobian_rows(mixed, [z], batched=batched, present=[True, False])


# ---------------------------------------------------------------------------------------------
# Parameters mode


@pytest.mark.parametrize("batched", PATHS)
def test_a_listed_parameter_no_loss_reaches_is_refused(batched):
    trunk, _heads, _, _, losses = problem()
    stray = nn.Parameter(torch.ones(3))
    params = [*trunk.parameters(), stray]
    with pytest.raises(ValueError, match=r"^params\[2\]: no task loss reaches this parameter"):
        tb.gramian(losses, params, batched=batched)
    with pytest.raises(ValueError, match=r"^params: no task loss reaches any of the 1 listed"):
        tb.gramian(losses, [stray], batched=batched)


def test_balancer_in_params_mode_refuses_a_parameter_no_loss_reaches():
    trunk, _heads, _, _, losses = problem()
    other = nn.Linear(2, 2)
    b = tb.create("upgrad", num_tasks=3, params=[*trunk.parameters(), *other.parameters()])
    with pytest.raises(ValueError, match=r"^params\[2\]: no task loss reaches this parameter"):
        b(losses)


def test_head_parameters_read_by_one_task_are_fine_in_params_mode():
    """A parameter that only some tasks reach is legitimate: zero rows for the others."""
    trunk, heads, _, _, losses = problem()
    params = [*trunk.parameters(), *heads[0].parameters()]
    G = tb.gramian(losses, params)
    torch.testing.assert_close(G.double(), reference_gramian(losses, params), rtol=1e-5, atol=1e-7)
