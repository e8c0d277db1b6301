"""``tb.gradient_diagnostics`` against cosines and norms computed by hand from task gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb


def by_hand(gradients: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine matrix and norms of flat per-task gradients, one dot product at a time."""
    count = len(gradients)
    cosines = torch.empty(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(count):
            cosines[i, j] = torch.dot(gradients[i], gradients[j]) / (
                gradients[i].norm() * gradients[j].norm()
            )
    return cosines, torch.stack([gradient.norm() for gradient in gradients])


def test_exported_from_the_package():
    assert "gradient_diagnostics" in tb.__all__
    assert "GradientDiagnostics" in tb.__all__
    assert isinstance(tb.gradient_diagnostics(torch.eye(2)), tb.GradientDiagnostics)


def test_equal_cosines_of_per_task_gradients_of_a_network():
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh())
    heads = [torch.nn.Linear(7, 1) for _ in range(4)]
    features = trunk(torch.randn(16, 5))
    losses = torch.stack([(head(features) - k).pow(2).mean() for k, head in enumerate(heads)])
    found = tb.gradient_diagnostics(tb.gramian(losses, features, dtype=torch.float64))
    gradients = [
        torch.autograd.grad(loss, features, retain_graph=True)[0].flatten().double()
        for loss in losses
    ]
    cosines, norms = by_hand(gradients)
    torch.testing.assert_close(found.cosines, cosines, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(found.norms, norms, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(found.norm_ratios, norms / norms.mean(), rtol=1e-6, atol=1e-12)
    upper = [float(cosines[i, j]) for i in range(4) for j in range(i + 1, 4)]
    assert found.conflict_fraction == sum(value < 0 for value in upper) / 6


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda k: st.lists(
            st.lists(st.floats(-10, 10, allow_nan=False), min_size=3, max_size=3),
            min_size=k,
            max_size=k,
        )
    )
)
def test_any_jacobian_matches_the_hand_computation(rows):
    jacobian = torch.tensor(rows, dtype=torch.float64)
    norms = jacobian.norm(dim=1)
    if bool((norms < 1e-3).any()):
        return  # zero gradients: the next test pins their convention
    found = tb.gradient_diagnostics(jacobian @ jacobian.T)
    cosines, hand_norms = by_hand(list(jacobian))
    torch.testing.assert_close(found.cosines, cosines.clamp(-1, 1), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(found.norms, hand_norms, rtol=1e-7, atol=1e-9)
    assert found.norm_ratios.mean().item() == pytest.approx(1.0)
    count = len(rows)
    conflicting = sum(
        float(cosines[i, j]) < -1e-9 for i in range(count) for j in range(i + 1, count)
    )
    uncertain = sum(
        abs(float(cosines[i, j])) <= 1e-9 for i in range(count) for j in range(i + 1, count)
    )
    pairs = count * (count - 1) / 2
    assert conflicting / pairs <= found.conflict_fraction <= (conflicting + uncertain) / pairs


def test_opposite_zero_and_orthogonal_gradients_and_bad_input():
    gram = torch.tensor(
        [[1.0, -1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    )
    found = tb.gradient_diagnostics(gram)
    assert found.cosines.dtype == torch.float64
    assert found.cosines[0, 1] == -1.0
    assert found.cosines[0, 2] == 0.0
    assert found.cosines[3, 3] == 0.0  # a zero gradient has no direction
    assert found.norms.tolist() == [1.0, 1.0, 2.0, 0.0]
    assert found.norm_ratios.tolist() == [1.0, 1.0, 2.0, 0.0]
    assert found.conflict_fraction == pytest.approx(1 / 6)
    one = tb.gradient_diagnostics(torch.tensor([[9.0]]))
    assert one.norms.tolist() == [3.0]
    assert one.conflict_fraction == 0.0
    with pytest.raises(ValueError, match=r"gram: expected a \[K, K\] tensor, got shape \(2, 3\)"):
        tb.gradient_diagnostics(torch.ones(2, 3))
    with pytest.raises(ValueError, match="gram: expected finite"):
        tb.gradient_diagnostics(torch.tensor([[float("nan")]]))
