"""Shared tensors of unusual kinds, as users meet them.

A sparse gradient (``nn.Embedding(sparse=True)`` listed in ``params=``) is densified for the
Gramian: the weights and the trunk's gradient equal those of the same model with a dense
embedding. A complex shared tensor (an FFT feature, a complex parameter) is refused: cast to a
real dtype its imaginary part was dropped and the weights were silently wrong; the message
names the real-view fix, which a test runs. A parametrized weight (``weight_norm``) listed
in ``params=`` is a computed tensor that later forwards replace: its error says what to list.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import taskbalance as tb
from conftest import assert_same_state, make_balancer, snapshot

# default and looped; batched=True raises torch's NotImplementedError (no vmap rule for a
# sparse backward), as it does for any graph without batching rules
PATHS = [None, False]


def embedding_problem(sparse: bool, K: int = 3):
    torch.manual_seed(0)
    embedding = nn.Embedding(20, 6, sparse=sparse)
    heads = nn.ModuleList([nn.Linear(6, 2) for _ in range(K)])
    tokens = torch.tensor([[1, 4, 4, 7], [2, 7, 9, 1]])
    z = embedding(tokens).mean(1)
    losses = torch.stack([(head(z) - k).pow(2).mean() for k, head in enumerate(heads)])
    return embedding, losses


@pytest.mark.parametrize("batched", PATHS)
def test_gramian_of_a_sparse_gradient_equals_the_dense_one(batched):
    dense_embedding, dense_losses = embedding_problem(sparse=False)
    sparse_embedding, sparse_losses = embedding_problem(sparse=True)
    expected = tb.gramian(dense_losses, [dense_embedding.weight], batched=batched)
    got = tb.gramian(sparse_losses, [sparse_embedding.weight], batched=batched)
    assert bool(expected.abs().sum() > 0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "name", ["mgda", "nash_mtl", "upgrad", "pcgrad", "db_mtl", "moco", "graddrop"]
)
def test_sparse_embedding_in_params_mode_trains_like_the_dense_one(name):
    """Weighted heads, unweighted heads (the ⟨x, c⟩ correction) and own directions: the same
    weights and gradient as the dense table, and a sparse .grad that SparseAdam can step.
    Before: RuntimeError 'reshape is not implemented for sparse tensors'; then a dense .grad
    from the correction, which SparseAdam refuses."""
    results = []
    for sparse in (False, True):
        embedding, losses = embedding_problem(sparse)
        balancer = make_balancer(name, 3, params=[embedding.weight])
        balancer(losses).backward()
        grad = embedding.weight.grad
        assert grad is not None
        assert grad.is_sparse == sparse
        if sparse:
            torch.optim.SparseAdam([embedding.weight]).step()
        results.append((balancer.weights.clone(), grad.to_dense()))
    (dense_weights, dense_grad), (sparse_weights, sparse_grad) = results
    torch.testing.assert_close(sparse_weights, dense_weights, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-5, atol=1e-7)
    assert bool(dense_grad.abs().sum() > 0)


def complex_problem():
    torch.manual_seed(1)
    weight = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    signal = torch.randn(8, 4, dtype=torch.complex64)
    return weight, signal


def complex_losses(z: torch.Tensor) -> torch.Tensor:
    return torch.stack([(z.real - 1).pow(2).mean(), (z.imag + 1).pow(2).mean()])


def test_a_complex_parameter_is_refused_at_construction_naming_its_group():
    """Before: a torch warning, and weights computed from the real parts only."""
    weight, _ = complex_problem()
    real = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"^params\[0\]: a complex tensor") as info:
        make_balancer("mgda", 2, params=[weight])
    assert "torch.view_as_real" in str(info.value)
    with pytest.raises(ValueError, match=r"^params\['b'\]\[0\]: a complex tensor"):
        make_balancer("mgda", 2, params={"a": [real], "b": [weight]})


@pytest.mark.parametrize("present", [None, [True, False]])
def test_complex_features_are_refused_on_every_call_and_change_no_state(present):
    """Also on a call that computes no task gradient (one task absent: weighted heads)."""
    weight, signal = complex_problem()
    z = signal * weight
    balancer = make_balancer("mgda", 2)
    before = snapshot(balancer)
    with pytest.raises(ValueError, match=r"^features: a complex tensor"):
        balancer(complex_losses(z), features=z, present=present)
    assert_same_state(before, snapshot(balancer))
    with pytest.raises(ValueError, match=r"^params\[0\]: a complex tensor"):
        tb.gramian(complex_losses(signal * weight), [weight])
    with pytest.raises(ValueError, match=r"^features\[1\]: a complex tensor"):
        tb.gramian(complex_losses(z), features=[z.real, z])


def test_the_real_view_the_message_suggests_gives_the_exact_weights():
    """MGDA at K = 2 in closed form, from the task gradients of the real view."""
    weight, signal = complex_problem()
    zr = torch.view_as_real(signal * weight)
    losses = complex_losses(torch.view_as_complex(zr))
    g1, g2 = (
        torch.autograd.grad(loss, zr, retain_graph=True)[0].reshape(-1).double() for loss in losses
    )
    first = float(((g2 - g1) @ g2) / (g1 - g2).pow(2).sum())
    expected = torch.tensor([min(max(first, 0.0), 1.0)], dtype=torch.float64)
    balancer = tb.create("mgda", num_tasks=2)
    balancer(losses, features=zr).backward()
    assert weight.grad is not None
    assert bool(weight.grad.abs().sum() > 0)
    weights = balancer.weights.double()
    torch.testing.assert_close(weights[:1], expected, rtol=1e-5, atol=1e-6)
    assert 0.0 < float(weights[0]) < 1.0  # both tasks count: not a degenerate check


def test_a_parametrized_weight_in_params_is_refused_naming_the_parameters_to_list():
    """A weight_norm weight is a computed tensor that the next forward replaces: the first
    call finds no loss reaching it and says what to list instead (before: no hint)."""
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    heads = [nn.Linear(4, 1) for _ in range(2)]
    stale = tb.create("mgda", num_tasks=2, params=[layer.weight])
    z = layer(torch.randn(3, 4))
    losses = torch.stack([(head(z) - k).pow(2).mean() for k, head in enumerate(heads)])
    with pytest.raises(ValueError, match=r"computed tensor \(grad_fn \w+\)") as info:
        stale(losses)
    assert "layer.parameters()" in str(info.value)
    balancer = tb.create("mgda", num_tasks=2, params=layer.parameters())
    balancer(losses).backward()
    original = layer.parametrizations.weight
    for tensor in (original.original0, original.original1):
        assert tensor.grad is not None
        assert bool(tensor.grad.abs().sum() > 0)


def test_computed_weights_made_in_the_step_are_accepted():
    """Fast weights (MAML's w - lr·g) or a hypernetwork's output, listed in a balancer made in
    the same step, are the tensors the losses read: accepted."""
    torch.manual_seed(0)
    base = nn.Parameter(torch.randn(4, 4))
    heads = [nn.Linear(4, 1) for _ in range(2)]
    x = torch.randn(6, 4)
    inner = (x @ base).pow(2).mean()
    fast = base - 0.1 * torch.autograd.grad(inner, base, create_graph=True)[0]
    z = x @ fast
    losses = torch.stack([(head(z) - k).pow(2).mean() for k, head in enumerate(heads)])
    tb.create("mgda", num_tasks=2, params=[fast])(losses).backward()
    assert base.grad is not None
    assert bool(base.grad.abs().sum() > 0)
