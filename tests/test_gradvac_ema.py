"""GradVac's moving-average targets move on every visited pair, adjusted or not (Algorithm 1)."""

from __future__ import annotations

import math

import torch

import taskbalance as tb
from taskbalance.methods._gradvac import gradvac_weights


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


def test_identical_gradients_meet_a_target_of_one_without_adjustment():
    # Identical rows have cosine exactly 1 (√(fl(x²)) = x), so a target of 1 leaves them alone.
    # Computed as G_jm·(1/‖g_j‖)·(1/‖g_m‖) this x gave 1 − 2⁻⁵³, and the floored sine turned
    # that rounding into weights of 3.1.
    x = 1.0160481444332998
    gram = torch.full((2, 2), x, dtype=torch.float64)
    balancer = tb.create("gradvac", num_tasks=2, beta=0.5)
    balancer.target_cosines.fill_(1.0)
    weights = balancer.compute_weights(torch.ones(2), gram=gram)
    torch.testing.assert_close(weights.double(), torch.ones(2, dtype=torch.float64), rtol=0, atol=0)


def test_opposite_gradients_have_cosine_exactly_minus_one():
    # Targets move by β·cos: for exactly opposite rows the observed cosine is −1 to the bit
    # (this x gave −1 + 2⁻⁵³ through the inverse norms).
    x = 7.755858880277834
    gram = torch.tensor([[x, -x], [-x, x]], dtype=torch.float64)
    balancer = tb.create("gradvac", num_tasks=2, beta=1.0)
    balancer.compute_weights(torch.ones(2), gram=gram)
    expected = torch.tensor([[0.0, -1.0], [-1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(balancer.target_cosines, expected, rtol=0, atol=0)


def test_a_cancelled_gradient_is_zero_for_the_pairs_after_it():
    # g_2 = −g_1: visiting task 2 first, g_1' = g_1 + a·g_2 cancels (to rounding: the step is
    # ‖g_1‖·√(1−φ̂²)/√(1−φ̂²)). The pair (1, 3) that follows has no cosine, so its target stays
    # put; the rounding residual's cosine with g_3 (here ±0.38) used to move it.
    row_1 = [1.6500876972225647, -1.7420690656414446, 1.4470345342545599]
    row_1 += [0.09401084335447547, -1.6724024703465736]
    row_3 = [-0.44328643199805917, -0.7400246837578275, 1.291943213996394]
    row_3 += [1.752282808054093, -0.8666446997763193]
    jacobian = torch.tensor([row_1, [-v for v in row_1], row_3], dtype=torch.float64)
    targets = [[0.0, -0.7799670666860893, 0.0], [0.0] * 3, [0.0] * 3]
    weights, new_targets = gradvac_weights(
        jacobian @ jacobian.T, [[1, 2], [0, 2], [0, 1]], targets, 0.5
    )
    assert new_targets[0][2] == 0.0
    assert new_targets[0][1] == 0.5 * targets[0][1] - 0.5  # the cancelling pair itself moves
    # Exactly: g_1' = g_1 + g_2 = 0 and g_2' = g_2 + g_1 = 0 (c = (1, 1, 0) each); g_3 is
    # projected off g_1 (or, equivalently, off g_2 = −g_1): g_3' = g_3 − p·g_1.
    p = float(jacobian[2] @ jacobian[0] / (jacobian[0] @ jacobian[0]))
    expected = torch.tensor([2.0 - p, 2.0, 1.0], dtype=torch.float64)
    if p < 0:  # cos(g_3, g_1) < 0: the adjustment is on c_3[1] instead (g_1 = −g_2)
        expected = torch.tensor([2.0, 2.0 + p, 1.0], dtype=torch.float64)
    direction = expected @ jacobian
    torch.testing.assert_close(weights @ jacobian, direction, rtol=1e-12, atol=1e-12)


def test_cosines_are_exact_where_the_diagonal_products_leave_the_float_range():
    # G_jj·G_mm overflows at 1e300 and underflows at 1e-300: the balancer hands the rule G
    # scaled by a power of two, and identical rows still have cosine exactly 1 (the target
    # moves by β·1). The rows are orthogonal or identical: any task order gives the same.
    jacobian = torch.tensor(
        [[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [-1.0, 0.5, 3.0]], dtype=torch.float64
    )
    for factor in (1e300, 1e-300, 1.0):
        gram = (jacobian @ jacobian.T) * factor
        balancer = tb.create("gradvac", num_tasks=3, beta=0.5, gram_dtype=torch.float64)
        weights = balancer.compute_weights(torch.ones(3, dtype=torch.float64), gram=gram)
        targets = balancer.target_cosines.tolist()
        assert targets[0][1] == targets[1][0] == 0.5, factor
        assert targets[0][2] == targets[2][0] == 0.0, factor  # orthogonal rows: cosine 0
        torch.testing.assert_close(weights, torch.ones(3, dtype=torch.float64), rtol=0, atol=0)


def test_a_cosine_within_rounding_of_minus_one_cancels_exactly_at_any_target():
    # From G, cos(g_1, −3·g_1) is −1 + 2⁻⁵³. Taken as it is, its sine is ~1.5e-8, and at a
    # target of −0.97 the step leaves a residual of ~1e-8·‖g_2‖, whose cosine with g_3
    # moved the target (1, 3) by β·0.86; as −1, the step cancels g_2 and the pair is skipped.
    g_1 = [0.194, 1.112, -0.206, -0.926]
    g_3 = [0.584, 0.583, -0.215, -0.783]
    jacobian = torch.tensor([g_1, [-3 * v for v in g_1], g_3], dtype=torch.float64)
    gram = jacobian @ jacobian.T
    assert float(gram[0, 1] / (gram[0, 0] * gram[1, 1]).sqrt()) > -1.0  # the rounding
    for target in (-0.9, -0.97, -0.999999):
        targets = [[0.0, target, 0.0], [target, 0.0, 0.0], [0.0, 0.0, 0.0]]
        _, new_targets = gradvac_weights(gram, [[1, 2], [0, 2], [0, 1]], targets, 0.5)
        assert new_targets[1][2] == 0.0, target
        assert new_targets[0][2] == 0.0, target
