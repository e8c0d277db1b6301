"""Exact answers of the spectral gradient methods on degenerate Gramians (issue 12, item 1).

A Gramian that is singular in exact arithmetic arrives with rounding noise; the methods must
give the exact answer of the singular problem, not an answer built from the noise.
"""

from __future__ import annotations

import pytest
import torch

import taskbalance as tb

# Rows (0.3, -1.2, 0.5) and (-0.7, 2.8, -7/6) = -(7/3)·(0.3, -1.2, 0.5): exactly opposite.
OPPOSITE_J = torch.tensor([[0.3, -1.2, 0.5], [-0.7, 2.8, -7 / 6]], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_config_two_opposite_gradients_give_the_zero_direction(dtype):
    gram = (OPPOSITE_J @ OPPOSITE_J.T).to(dtype)
    weights = tb.create("config", num_tasks=2).compute_weights(torch.ones(2), gram=gram)
    # g_v = U⁺·1 = 0 exactly: 1 is orthogonal to the span of the unit rows (u, −u).
    assert torch.equal(weights, torch.zeros(2))


def test_config_opposite_pair_plus_orthogonal_task_gives_the_zero_direction():
    # u1 = −u2: no direction has equal cosines with all three tasks, so the only
    # equal-angle direction is 0. (The official lstsq returns the least-squares g_v = u3,
    # orthogonal to tasks 1 and 2; with a third task at another angle it conflicts.)
    J = torch.tensor([[1.0, 0.0], [-3.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    weights = tb.create("config", num_tasks=3).compute_weights(torch.ones(3), gram=J @ J.T)
    assert torch.equal(weights, torch.zeros(3))


def test_config_more_tasks_than_dimensions_never_conflicts():
    # Three gradients on a line with mixed signs: the least-squares g_v of the official code
    # points along +x and ascends task 1; the exact answer is 0.
    J = torch.tensor([[-1.0], [1.0], [2.0]], dtype=torch.float64)
    weights = tb.create("config", num_tasks=3).compute_weights(torch.ones(3), gram=J @ J.T)
    assert torch.equal(weights, torch.zeros(3))


def test_config_zero_gradient_task_keeps_the_others_direction():
    # A zero gradient has no equation (u_i = 0), so tasks 1 and 3 still define g_v.
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    weights = tb.create("config", num_tasks=3).compute_weights(torch.ones(3), gram=J @ J.T)
    # g_v = (1, 1); projection length (1 + 2)/√2 along (1, 1)/√2: d = (1.5, 1.5) = J^T w
    torch.testing.assert_close(weights.float(), torch.tensor([1.5, 0.0, 0.75]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(20))
def test_imtl_g_exactly_parallel_gradients_descend_both_tasks(dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    row = torch.randn(1, 5, generator=generator, dtype=torch.float64)
    scales = torch.rand(2, 1, generator=generator, dtype=torch.float64) * 3 + 0.1
    J = scales * row  # g2 = c·g1, c > 0
    weights = tb.create("imtl_g", num_tasks=2).compute_weights(
        torch.ones(2), gram=(J @ J.T).to(dtype)
    )
    # Any α summing to 1 gives equal projections; the pseudo-inverse's minimum-norm one is
    # α = (1, 0), never the noise-inverted (−1, 2) that ascends both tasks.
    torch.testing.assert_close(weights.float(), torch.tensor([1.0, 0.0]), rtol=0, atol=1e-6)
    direction = J.T @ weights.double()
    assert bool((J @ direction >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_imtl_g_opposite_gradients_give_the_zero_direction(dtype):
    weights = tb.create("imtl_g", num_tasks=2).compute_weights(
        torch.ones(2), gram=(OPPOSITE_J @ OPPOSITE_J.T).to(dtype)
    )
    # α1·g1 + α2·(−7/3)·g1 with equal projections ⇒ α = (0.7, 0.3), direction 0.
    torch.testing.assert_close(weights.float(), torch.tensor([0.7, 0.3]), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        OPPOSITE_J.T @ weights.double(), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_imtl_g_one_zero_gradient_takes_all_the_weight_and_the_direction_is_zero(dtype):
    """The docstring's convention: g·u_3 = 0 forces every projection to 0."""
    J = torch.tensor([[1.0, 0.3], [0.2, 1.0], [0.0, 0.0]], dtype=torch.float64)
    weights = tb.create("imtl_g", num_tasks=3).compute_weights(
        torch.ones(3), gram=(J @ J.T).to(dtype)
    )
    torch.testing.assert_close(
        weights.double(), torch.tensor([0.0, 0.0, 1.0]).double(), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(J.T @ weights.double(), torch.zeros(2).double(), rtol=0, atol=1e-6)


def test_cagrad_one_huge_gradient_among_zeros():
    # Found by the permutation property test: the warm start of the inner min-norm solve was
    # the zero vector (no point of the simplex) and divided by its sum.
    J = torch.zeros(5, 1, dtype=torch.float64)
    J[4] = 1.4826e15
    weights = tb.create("cagrad", num_tasks=5).compute_weights(torch.ones(5), gram=J @ J.T)
    assert bool(torch.isfinite(weights).all())
    assert float((J.T @ weights).squeeze()) > 0  # the one task with a gradient descends


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_weights_where_only_zero_conflicts_with_no_task_are_the_least_the_cone_needs(
    name,
):
    """The docstrings' example: the dual cone of these rows is {0}, so each projection is 0
    and its multipliers are a w ≥ p with Jᵀw = 0. Those w are t·n, n = (4e-3, 1, 5e-7) spanning
    the null space of Jᵀ, and w ≥ p forces t ≥ max_i p_i / n_i: for the third task's
    preference alone, w_2 ≥ (1/3) / 5e-7 = 6.7e5. The weights are the least such (DualProj: one
    projection of p; UPGrad: the sum of the K projections of p_i·e_i), checked by the closed
    form and by scipy's linear program (minimise w_2 subject to Jᵀw = 0, w ≥ the preference)."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    J = torch.tensor([[0.0, 1.0], [1e-6, -4e-3], [-2.0, 0.0]], dtype=torch.float64)
    null = torch.tensor([4e-3, 1.0, 5e-7], dtype=torch.float64)
    assert float((J.T @ null).norm()) == 0.0
    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    preferences = torch.diag(third) if name == "upgrad" else third[None]
    least = sum(float((row / null).max()) for row in preferences)
    for row in preferences:
        program = linprog(
            c=[0.0, 1.0, 0.0], A_eq=J.T.numpy(), b_eq=[0.0, 0.0],
            bounds=[(float(v), None) for v in row],
        )  # fmt: skip
        assert program.status == 0
        assert program.fun == pytest.approx(float((row / null).max()), rel=1e-6)
    w = tb.create(name, 3).compute_weights(torch.ones(3), gram=J @ J.T)
    assert least >= 2e6 / 3
    assert torch.allclose(w, least * null, rtol=1e-7, atol=0.0)  # w_2 = w_3 / 5e-7: rounding × 2e6
    assert float((J.T @ w).norm()) <= 1e-12 * float(w.norm())
