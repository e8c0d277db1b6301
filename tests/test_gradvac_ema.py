"""GradVac's moving-average targets move on every visited pair, adjusted or not (Algorithm 1)."""

from __future__ import annotations

import math

import torch

import taskbalance as tb


def test_targets_move_when_no_adjustment_is_made():
    # cos(g_1, g_2) = 0.5 ≥ the initial target 0: no adjustment, the weights stay (1, 1), and
    # the targets still follow the observed cosine. (Updating only inside the adjustment
    # branch, as LibMTL at 13f5fc7d does, would leave them at 0.)
    gram = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    balancer = tb.create("gradvac", num_tasks=2, beta=0.5)
    weights = balancer.compute_weights(torch.ones(2), gram=gram)
    torch.testing.assert_close(weights.double(), torch.ones(2, dtype=torch.float64))
    expected = torch.tensor([[0.0, 0.25], [0.25, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(balancer.target_cosines, expected)
    balancer.compute_weights(torch.ones(2), gram=gram)
    # 0.25 ≤ 0.5 again: no adjustment; 0.5·0.25 + 0.5·0.5.
    torch.testing.assert_close(balancer.target_cosines, 1.5 * expected)


def test_targets_follow_the_cosine_observed_before_the_adjustment():
    # cos = −1/√2 < 0: each gradient is rotated to cosine 0 (PCGrad's projection), and the
    # target moves towards −1/√2, the cosine before the rotation, not towards 0 after it.
    gram = torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    beta = 0.1
    balancer = tb.create("gradvac", num_tasks=2, beta=beta)
    weights = balancer.compute_weights(torch.ones(2), gram=gram)
    # g_1' = g_1 + g_2/2 and g_2' = g_2 + g_1: w = (1 + 1, 1 + 1/2).
    torch.testing.assert_close(weights.double(), torch.tensor([2.0, 1.5], dtype=torch.float64))
    off_diagonal = -beta / math.sqrt(2.0)
    expected = torch.tensor([[0.0, off_diagonal], [off_diagonal, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(balancer.target_cosines, expected)
