"""Several shared tensors in features mode (issue 8, item 9): ``G = Σ_t J_t J_tᵀ``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import taskbalance as tb
from taskbalance._gramian import gramian_from_rows, jacobian_rows
from test_gramian import reference_gramian


def two_scale_problem(K: int = 3, seed: int = 0):
    """Two encoders (or two scales) z1, z2; every head reads both, one task reads z1 only."""
    torch.manual_seed(seed)
    enc1, enc2 = nn.Linear(4, 5), nn.Conv1d(1, 2, 3, padding=1)
    heads1 = nn.ModuleList([nn.Linear(5, 1) for _ in range(K)])
    heads2 = nn.ModuleList([nn.Linear(8, 1) for _ in range(K)])
    x = torch.randn(6, 4)
    z1 = torch.tanh(enc1(x))
    z2 = torch.tanh(enc2(x.unsqueeze(1))).flatten(1)  # [6, 2·4], another shape
    parts = [
        ((heads1[k](z1) + (heads2[k](z2) if k else 0.0)) ** 2).mean() * (k + 1) for k in range(K)
    ]
    return torch.stack(parts), z1, z2


@pytest.mark.parametrize("batched", [None, True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_features_list_is_the_gramian_of_the_concatenation(batched, dtype):
    losses, z1, z2 = two_scale_problem()
    G = tb.gramian(losses, features=[z1, z2], dtype=dtype, batched=batched)
    assert G.dtype == dtype
    torch.testing.assert_close(
        G.double(), reference_gramian(losses, [z1, z2]), rtol=1e-5, atol=1e-8
    )
    # It is the sum of the per-tensor Gramians.
    parts = tb.gramian(losses, features=z1, dtype=dtype).double() + reference_gramian(losses, [z2])
    torch.testing.assert_close(G.double(), parts, rtol=1e-5, atol=1e-8)
    # Task 0 reads z1 only: fine in the list, but alone z2 leaves task 0 outside the graph.
    with pytest.raises(ValueError, match=r"^losses\[0\]: this task's loss reaches none"):
        tb.gramian(losses, features=(z2,), dtype=dtype, batched=batched)


def test_features_keyword_with_one_tensor_equals_wrt():
    losses, z1, _ = two_scale_problem()
    assert torch.equal(tb.gramian(losses, features=z1), tb.gramian(losses, z1))


def test_engine_signatures_the_balancer_uses_take_a_list_of_features():
    losses, z1, z2 = two_scale_problem()
    rows, _ = jacobian_rows(losses, [z1, z2], batched=None)
    assert [row.shape for row in rows] == [(3, z1.numel()), (3, z2.numel())]
    G = gramian_from_rows(rows, features_mode=True, dtype=torch.float64)
    torch.testing.assert_close(G, reference_gramian(losses, [z1, z2]), rtol=1e-5, atol=1e-8)


def test_a_listed_feature_no_head_reads_is_refused_by_index():
    losses, z1, z2 = two_scale_problem()
    with pytest.raises(ValueError, match=r"^features\[2\]: no task loss reaches this tensor"):
        tb.gramian(losses, features=[z1, z2, z2 * 1.0])
    with pytest.raises(ValueError, match=r"^features \(every tensor listed\): no task loss"):
        tb.gramian(losses, features=[z1.detach().requires_grad_(), z2.detach().requires_grad_()])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, TypeError, r"wrt, features: expected exactly one"),
        ({"wrt": "z1", "features": "z1"}, TypeError, r"wrt, features: expected exactly one"),
        ({"features": []}, TypeError, r"features: expected a tensor or a non-empty sequence"),
        ({"features": ["z1", 3.0]}, TypeError, r"features\[1\]: expected a tensor, got float"),
        ({"features": ["z1", "z2d"]}, ValueError, r"features\[1\]: the tensor does not require"),
    ],
)
def test_bad_features_are_named(kwargs, error, match):
    losses, z1, z2 = two_scale_problem()
    values = {"z1": z1, "z2d": z2.detach()}

    def resolve(value):
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return values.get(value, value) if isinstance(value, str) else value

    with pytest.raises(error, match=match):
        tb.gramian(losses, **{key: resolve(value) for key, value in kwargs.items()})
