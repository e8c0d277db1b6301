"""PCGrad, GradVac, IMTL-G, Aligned-MTL, ConFIG, DB-MTL and GradNorm as Gramian rules.

Each method returns weights ``w`` computed from ``G = J Jᵀ`` (and the losses) whose direction
``Jᵀw`` must equal the paper's update. Checked here:

- hand-derived weights on small Gramians (orthogonal and conflicting gradients in 2-D);
- brute force: an independent implementation of each paper's update acting on the rows of a
  random J (projections, rotations, pinv, SVD, EMA, autograd + torch.optim.Adam for GradNorm)
  equals ``Jᵀw`` from the balancer;
- PCGrad leaves no conflict for K = 2 (hypothesis); finite weights of shape [K] on degenerate
  Gramians (hypothesis);
- end to end in features and parameters mode: ``objective.backward()`` gives ``Jᵀw``;
- state round trip for the stateful methods; GradNorm on the GradNorm paper's toy problem.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr
from torch import nn

import taskbalance as tb
from conftest import applies_jtw
from taskbalance.methods._aligned_mtl import AlignedMTL
from taskbalance.methods._config import ConFIG
from taskbalance.methods._db_mtl import DBMTL
from taskbalance.methods._gradnorm import GradNorm, gradnorm_weight_gradient
from taskbalance.methods._gradvac import GradVac
from taskbalance.methods._imtl_g import IMTLG
from taskbalance.methods._pcgrad import PCGrad, task_orders

METHODS = ["pcgrad", "gradvac", "imtl_g", "aligned_mtl", "config", "db_mtl", "gradnorm"]
STATEFUL = ["pcgrad", "gradvac", "db_mtl", "gradnorm"]
CLASSES = {
    "pcgrad": PCGrad,
    "gradvac": GradVac,
    "imtl_g": IMTLG,
    "aligned_mtl": AlignedMTL,
    "config": ConFIG,
    "db_mtl": DBMTL,
    "gradnorm": GradNorm,
}
SQRT2 = math.sqrt(2.0)
SQRT5 = math.sqrt(5.0)

ORTHOGONAL = torch.tensor([[1.0, 0.0], [0.0, 4.0]])  # g1 = (1, 0), g2 = (0, 2)
CONFLICT_J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)  # g1·g2 = −1
CONFLICT = (CONFLICT_J @ CONFLICT_J.T).float()


@pytest.fixture(autouse=True)
def _one_thread():
    """Two shared cores: intra-op threads only contend, so run these small ops on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_jacobian(K: int, P: int, seed: int) -> torch.Tensor:
    """Random K×P rows of different scales, with at least one conflicting pair."""
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(K, P, generator=generator, dtype=torch.float64)
    J *= torch.exp(torch.randn(K, 1, generator=generator, dtype=torch.float64))
    J[1] = -0.7 * J[0] + 0.5 * J[1]  # make tasks 0 and 1 conflict
    return J


def _positive_losses(K: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10_000 + seed)
    return (0.2 + 2.0 * torch.rand(K, generator=generator)).float()


def _other_orders(K: int, generator: torch.Generator) -> list[list[int]]:
    """The documented order: row i of one K × (K − 1) table of float64 uniforms, argsorted,
    permutes the other tasks."""
    keys = torch.rand(K, K - 1, dtype=torch.float64, generator=generator)
    orders = []
    for i in range(K):
        others = [j for j in range(K) if j != i]
        orders.append([others[p] for p in keys[i].argsort().tolist()])
    return orders


def test_random_orders_are_uniform_permutations_of_the_other_tasks():
    """Each task's order is a permutation of the other tasks, all (K − 1)! equally likely:
    a chi-square test on 6,000 draws (5 degrees of freedom, p = 1e-4 threshold 25.7)."""
    generator = torch.Generator().manual_seed(3)
    counts: list[dict[tuple[int, ...], int]] = [{} for _ in range(4)]
    draws = 6000
    for _ in range(draws):
        for i, order in enumerate(task_orders(4, "random", generator)):
            assert sorted(order) == [j for j in range(4) if j != i]
            counts[i][tuple(order)] = counts[i].get(tuple(order), 0) + 1
    expected = draws / 6
    for per_task in counts:
        assert len(per_task) == 6
        chi_square = sum((n - expected) ** 2 / expected for n in per_task.values())
        assert chi_square < 25.7, per_task


# ---------------------------------------------------------------------------------------------
# Reference implementations in gradient space (rows of J), written from the papers.


def ref_pcgrad(J: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    projected = []
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in orders[i]:
            dot = g @ J[j]
            if dot < 0 and J[j] @ J[j] > 0:
                g = g - dot / (J[j] @ J[j]) * J[j]
        projected.append(g)
    return torch.stack(projected).sum(0)


def ref_gradvac(
    J: torch.Tensor, orders: list[list[int]], targets: torch.Tensor, beta: float
) -> torch.Tensor:
    """One GradVac step; updates ``targets`` in place."""
    adjusted = []
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in orders[i]:
            phi = (g @ J[j]) / (g.norm() * J[j].norm())
            target = targets[i, j]
            if phi < target:
                g = (
                    g
                    + g.norm()
                    * (target * torch.sqrt(1 - phi**2) - phi * torch.sqrt(1 - target**2))
                    / (J[j].norm() * torch.sqrt(1 - target**2))
                    * J[j]
                )
            targets[i, j] = (1 - beta) * target + beta * phi
        adjusted.append(g)
    return torch.stack(adjusted).sum(0)


def ref_imtl_g(J: torch.Tensor) -> torch.Tensor:
    units = J / J.norm(dim=1, keepdim=True)
    D = J[0] - J[1:]
    U = units[0] - units[1:]
    alpha = J[0] @ U.T @ torch.linalg.inv(D @ U.T)
    alpha = torch.cat([(1 - alpha.sum()).reshape(1), alpha])
    return alpha @ J


def ref_aligned_mtl(J: torch.Tensor, rtol: float) -> torch.Tensor:
    Q, S, Rt = torch.linalg.svd(J, full_matrices=False)
    keep = rtol * S.max() ** 2 < S**2
    Q, S, Rt = Q[:, keep], S[keep], Rt[keep]
    aligned = S.min() * Q @ Rt  # all singular values equal to σ_min
    return aligned.T @ torch.ones(J.shape[0], dtype=J.dtype)


def ref_config(J: torch.Tensor) -> torch.Tensor:
    units = J / J.norm(dim=1, keepdim=True)
    ones = torch.ones(J.shape[0], dtype=J.dtype)
    best = torch.linalg.pinv(units) @ ones
    if not torch.allclose(units @ best, ones, atol=1e-6):
        # u_iᵀx = 1 for all i has no solution (more tasks than independent gradients): no
        # direction has equal cosines with every task but 0 (the official lstsq would give the
        # least-squares x, which conflicts with some task).
        return torch.zeros(J.shape[1], dtype=J.dtype)
    unit = best / best.norm()
    return (J @ unit).sum() * unit


def ref_db_mtl(
    J: torch.Tensor, losses: torch.Tensor, state: dict, beta: float, eps: float = 1e-8
) -> torch.Tensor:
    """DB-MTL with the documented departure: EMA of the log-gradient norms."""
    log_grads = J / (losses.double()[:, None] + eps)
    norms = log_grads.norm(dim=1)
    state["ema"] = beta * state["ema"] + (1 - beta) * norms
    alpha = state["ema"].max() / state["ema"]
    return (alpha[:, None] * log_grads).sum(0)


def ref_db_mtl_vector_ema(
    J: torch.Tensor, losses: torch.Tensor, state: dict, beta: float, eps: float = 1e-8
) -> torch.Tensor:
    """The paper's (LibMTL's) DB-MTL: EMA of the log-gradient vectors."""
    log_grads = J / (losses.double()[:, None] + eps)
    state["buffer"] = beta * state["buffer"] + (1 - beta) * log_grads
    norms = state["buffer"].norm(dim=1)
    return ((norms.max() / norms)[:, None] * state["buffer"]).sum(0)


class RefGradNorm:
    """GradNorm with autograd: L_grad = Σ|‖w_k g_k‖ − target_k|, torch.optim.Adam on w."""

    def __init__(self, K: int, alpha: float, lr: float) -> None:
        self.w = torch.ones(K, requires_grad=True)
        self.optimiser = torch.optim.Adam([self.w], lr=lr)
        self.alpha = alpha
        self.initial: torch.Tensor | None = None

    def step(self, J: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        used = self.w.detach().clone()
        if self.initial is None:
            self.initial = losses.double()
        weighted = (self.w.double()[:, None] * J).norm(dim=1)
        ratios = losses.double() / self.initial
        target = (weighted.mean() * (ratios / ratios.mean()) ** self.alpha).detach()
        self.optimiser.zero_grad()
        (weighted - target).abs().sum().backward()
        self.optimiser.step()
        with torch.no_grad():
            self.w.clamp_(min=1e-6)
            self.w.mul_(len(self.w) / self.w.sum())
        return used


# ---------------------------------------------------------------------------------------------
# Hand-derived weights.


def test_hand_values_orthogonal_gradients():
    # g1 = (1, 0), g2 = (0, 2): nothing conflicts.
    ones = torch.ones(2)
    expected = {
        "pcgrad": [1.0, 1.0],
        "gradvac": [1.0, 1.0],  # cos = 0 is not below the initial target 0
        "imtl_g": [2 / 3, 1 / 3],  # α ∝ G⁻¹·(‖g_i‖) = (1, 1/2)
        "aligned_mtl": [1.0, 0.5],  # σ_min·diag(1/σ)·1, σ = (1, 2)
        # g_v = u1 + u2 = (1, 1); length (g1 + g2)·ĝ_v = 3/√2 → d = 1.5·(1, 1) = 1.5 g1 + 0.75 g2
        "config": [1.5, 0.75],
        "db_mtl": [2.0, 1.0],  # norms (1, 2), L = 1: α = (2, 1)
        "gradnorm": [1.0, 1.0],  # the weights before the first update
    }
    for name, values in expected.items():
        w = tb.create(name, num_tasks=2).compute_weights(ones, gram=ORTHOGONAL)
        torch.testing.assert_close(w, torch.tensor(values), rtol=1e-6, atol=1e-6, msg=name)


def test_hand_values_conflicting_gradients():
    # g1 = (1, 0), g2 = (−1, 1), g1·g2 = −1, ‖g1‖ = 1, ‖g2‖ = √2.
    ones = torch.ones(2)
    # PCGrad: g1' = g1 + ½g2, g2' = g2 + g1 → w = (2, 1.5), direction (0.5, 1.5).
    # GradVac, first step (targets 0): the same rotation onto the normal plane.
    # IMTL-G: α ∝ G⁻¹(1, √2) = (2 + √2, 1 + √2).
    imtl = torch.tensor([2 + SQRT2, 1 + SQRT2]) / (3 + 2 * SQRT2)
    # Aligned-MTL: G^{-1/2} = [[3, 1], [1, 2]]/√5 and σ_min = (√5 − 1)/2.
    aligned = (SQRT5 - 1) / 2 * torch.tensor([4.0, 3.0]) / SQRT5
    # ConFIG: g_v = (1, 1 + √2) has u_i·g_v = 1; d = (1 + √2)/‖g_v‖²·g_v = w1 g1 + w2 g2.
    scale = (1 + SQRT2) / (4 + 2 * SQRT2)
    config = torch.tensor([scale + scale * (1 + SQRT2), scale * (1 + SQRT2)])
    expected = {
        "pcgrad": torch.tensor([2.0, 1.5]),
        "gradvac": torch.tensor([2.0, 1.5]),
        "imtl_g": imtl,
        "aligned_mtl": aligned,
        "config": config,
    }
    for name, values in expected.items():
        w = tb.create(name, num_tasks=2).compute_weights(ones, gram=CONFLICT)
        torch.testing.assert_close(w, values.float(), rtol=1e-5, atol=1e-6, msg=name)
    # DB-MTL with losses (1, 2): log-gradient norms (1, √2/2), α = (1, √2), w = α / L.
    w = tb.create("db_mtl", num_tasks=2).compute_weights(torch.tensor([1.0, 2.0]), gram=CONFLICT)
    torch.testing.assert_close(w, torch.tensor([1.0, SQRT2 / 2]), rtol=1e-6, atol=1e-6)


def test_imtl_g_projections_are_equal_and_sum_to_one():
    J = CONFLICT_J
    w = tb.create("imtl_g", num_tasks=2).compute_weights(torch.ones(2), gram=CONFLICT).double()
    d = J.T @ w
    units = J / J.norm(dim=1, keepdim=True)
    projections = units @ d
    torch.testing.assert_close(projections[0], projections[1], rtol=1e-6, atol=1e-7)
    assert abs(float(w.sum()) - 1.0) < 1e-6


def test_imtl_g_opposite_gradients_give_zero_direction():
    # g2 = −3 g1: the only equal-projection point of the line is 0 (a pinv-of-G rule is not).
    J = torch.tensor([[1.0, 2.0], [-3.0, -6.0]], dtype=torch.float64)
    w = tb.create("imtl_g", num_tasks=2).compute_weights(torch.ones(2), gram=(J @ J.T).float())
    torch.testing.assert_close(w, torch.tensor([0.75, 0.25]), rtol=1e-5, atol=1e-6)
    assert float((J.T @ w.double()).norm()) < 1e-5


def test_gradvac_skips_a_task_whose_given_gramian_diagonal_is_negative_by_rounding():
    b = tb.create("gradvac", num_tasks=2)
    gram = torch.tensor([[-1e-12, 0.0], [0.0, 1.0]], dtype=torch.float64)
    weights = b.compute_weights(torch.ones(2), gram=gram)
    torch.testing.assert_close(weights, torch.ones(2, dtype=torch.float64))


def test_gradvac_second_step_rotates_to_the_target_cosine():
    b = tb.create("gradvac", num_tasks=2, beta=0.01)
    b.compute_weights(torch.ones(2), gram=CONFLICT)
    # After step 1 the targets are 0.01·cos(g1, g2) = −0.01/√2 for both pairs.
    target = -0.01 / SQRT2
    torch.testing.assert_close(
        b.target_cosines, torch.full((2, 2), target, dtype=torch.float64) * (1 - torch.eye(2))
    )
    w = b.compute_weights(torch.ones(2), gram=CONFLICT).double()
    # For K = 2, w = c_1 + c_2 with c_1 = (1, a), c_2 = (b, 1).
    a, bb = float(w[1]) - 1, float(w[0]) - 1
    g1, g2 = CONFLICT_J
    for adjusted, other in ((g1 + a * g2, g2), (g2 + bb * g1, g1)):
        cosine = adjusted @ other / (adjusted.norm() * other.norm())
        assert abs(float(cosine) - target) < 1e-6


def test_gradnorm_hand_steps():
    b = tb.create("gradnorm", num_tasks=2)  # α = 1.5, lr = 0.025
    # Step 1: L(0) = (1, 1), returns w(0) = 1. G_W = (1, 2), Ḡ = 1.5, r = 1: targets 1.5,
    # gradient (−1, +2); Adam's first step is −lr·sign → w(1) = (1.025, 0.975).
    torch.testing.assert_close(b.compute_weights(torch.ones(2), gram=ORTHOGONAL), torch.ones(2))
    # Step 2 returns w(1). L̃ = (0.5, 1), r = (2/3, 4/3); G_W = (1.025, 1.95), Ḡ = 1.4875;
    # targets Ḡ·r^1.5 = (0.810, 2.290): gradient (+1, −2). Adam step 2: m̂ = (0.0526, −0.1053),
    # v̂ = (1, 4) → Δw = −0.025·(0.0526/1, −0.1053/2) = (−0.0013158, +0.0013158).
    torch.testing.assert_close(
        b.compute_weights(torch.tensor([0.5, 1.0]), gram=ORTHOGONAL), torch.tensor([1.025, 0.975])
    )
    torch.testing.assert_close(
        b.compute_weights(torch.tensor([0.5, 1.0]), gram=ORTHOGONAL),
        torch.tensor([1.025 - 0.025 / 19, 0.975 + 0.025 / 19]),
        rtol=1e-6,
        atol=1e-6,
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 1e3), min_size=3, max_size=3),
    st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3),
    st.floats(0.0, 2000.0),
)
def test_gradnorm_weight_gradient_is_the_formula(norms, losses, alpha):
    """The host arithmetic against the formula in float64 tensors, large alphas included
    (where (r_k)^α overflows: inf, as torch's pow gives; a sign may differ only where the
    gap ``w_k n_k − Ḡ r_k^α`` is within rounding of zero)."""
    weights = [1.0, 0.5, 1.5]
    got = gradnorm_weight_gradient(weights, norms, losses, [1.0, 2.0, 0.5], alpha)
    w, n = torch.tensor(weights).double(), torch.tensor(norms).double()
    rates = torch.tensor(losses).double() / torch.tensor([1.0, 2.0, 0.5]).double()
    gap = w * n - (w * n).mean() * (rates / rates.mean()).pow(alpha)
    expected = torch.sign(gap) * n
    clear = gap.abs() > 1e-9 * (w * n).abs().max().clamp_min(1e-300)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64)[clear], expected[clear])


def test_gradnorm_refuses_a_zero_initial_loss_without_changing_state():
    b = tb.create("gradnorm", num_tasks=2)
    b.compute_weights(torch.ones(2), gram=ORTHOGONAL)
    b.initial_loss_values.zero_()  # as a loaded state, or a loss below float32's range
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(ValueError, match=r"initial_loss_values\[0\]: expected a positive"):
        b.compute_weights(torch.ones(2), gram=ORTHOGONAL)
    after = b.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key


def test_gradnorm_log_c_initial_losses():
    b = tb.create("gradnorm", num_tasks=2, initial_losses="log_c", num_classes=[10, 100])
    torch.testing.assert_close(b.initial_loss_values, torch.tensor([math.log(10), math.log(100)]))
    # L/L(0) = (1, 1) → r = 1 as with "first" on equal losses: same first update.
    b.compute_weights(torch.tensor([math.log(10), math.log(100)]), gram=ORTHOGONAL)
    torch.testing.assert_close(b.task_weights, torch.tensor([1.025, 0.975]))


# ---------------------------------------------------------------------------------------------
# Brute force against the reference implementations.

SHAPES = [(K, P) for K in (2, 3, 5) for P in (3, 10, 50)]


@pytest.mark.parametrize(("K", "P"), SHAPES)
def test_brute_force_stateless(K, P):
    for seed in range(3):
        J = _random_jacobian(K, P, seed)
        G = J @ J.T
        losses = _positive_losses(K, seed)
        rtol = 100 * K * torch.finfo(torch.float64).eps
        checks = {
            "aligned_mtl": ref_aligned_mtl(J, rtol),
            "config": ref_config(J),
        }
        if K <= P:  # the paper's closed form needs D Uᵀ invertible
            checks["imtl_g"] = ref_imtl_g(J)
        for name, direction in checks.items():
            w = tb.create(name, num_tasks=K, gram_dtype=torch.float64).compute_weights(
                losses, gram=G
            )
            torch.testing.assert_close(
                J.T @ w.double(),
                direction,
                rtol=1e-4,
                atol=1e-6 * float(direction.norm()),
                msg=f"{name} K={K} P={P} seed={seed}",
            )


@pytest.mark.parametrize(("K", "P"), SHAPES)
def test_brute_force_stateful(K, P):
    sequence = [_random_jacobian(K, P, 100 * step + K + P) for step in range(4)]
    losses = [_positive_losses(K, 7 * step + P) for step in range(4)]
    pcgrad = tb.create("pcgrad", num_tasks=K, seed=3)
    pcgrad_fixed = tb.create("pcgrad", num_tasks=K, order="fixed")
    gradvac = tb.create("gradvac", num_tasks=K, beta=0.3, seed=5)
    db_mtl = tb.create("db_mtl", num_tasks=K, beta=0.9)
    gradnorm = tb.create("gradnorm", num_tasks=K, alpha=1.5, lr=0.1)
    pc_generator = torch.Generator().manual_seed(3)
    gv_generator = torch.Generator().manual_seed(5)
    targets = torch.zeros(K, K, dtype=torch.float64)
    db_state = {"ema": torch.zeros(K, dtype=torch.float64)}
    gn_reference = RefGradNorm(K, alpha=1.5, lr=0.1)
    fixed = [list(range(K)) for _ in range(K)]
    for J, L in zip(sequence, losses, strict=True):
        G = J @ J.T
        cases = {
            "pcgrad": (pcgrad, ref_pcgrad(J, _other_orders(K, pc_generator))),
            "pcgrad-fixed": (pcgrad_fixed, ref_pcgrad(J, fixed)),
            "gradvac": (
                gradvac,
                ref_gradvac(J, _other_orders(K, gv_generator), targets, beta=0.3),
            ),
            "db_mtl": (db_mtl, ref_db_mtl(J, L, db_state, beta=0.9)),
            "gradnorm": (gradnorm, J.T @ gn_reference.step(J, L).double()),
        }
        for name, (balancer, direction) in cases.items():
            w = balancer.compute_weights(L, gram=G)
            torch.testing.assert_close(
                J.T @ w.double(),
                direction,
                rtol=1e-4,
                atol=1e-5 * float(direction.norm()),
                msg=f"{name} K={K} P={P}",
            )
    torch.testing.assert_close(gradvac.target_cosines, targets, rtol=1e-6, atol=1e-9)


def test_db_mtl_equals_the_vector_ema_when_beta_is_zero():
    K, P = 3, 10
    b = tb.create("db_mtl", num_tasks=K, beta=0.0)
    state = {"buffer": torch.zeros(K, P, dtype=torch.float64)}
    for step in range(3):
        J = _random_jacobian(K, P, step)
        L = _positive_losses(K, step)
        w = b.compute_weights(L, gram=J @ J.T)
        expected = ref_db_mtl_vector_ema(J, L, state, beta=0.0)
        torch.testing.assert_close(J.T @ w.double(), expected, rtol=1e-5, atol=1e-8)


def test_db_mtl_beta_sigma_decays_the_rate():
    K = 2
    b = tb.create("db_mtl", num_tasks=K, beta=0.9, beta_sigma=1.0)
    norms = []
    for step in range(1, 4):
        J = _random_jacobian(K, 5, step)
        L = _positive_losses(K, step)
        b.compute_weights(L, gram=J @ J.T)
        norms.append(J.norm(dim=1) / (L.double() + 1e-8))
    # β_t = 0.9/t: n̂1 = 0.1 n1; n̂2 = 0.45 n̂1 + 0.55 n2; n̂3 = 0.3 n̂2 + 0.7 n3.
    expected = 0.1 * norms[0]
    expected = 0.45 * expected + 0.55 * norms[1]
    expected = 0.3 * expected + 0.7 * norms[2]
    torch.testing.assert_close(b.norm_averages, expected, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis).

finite = st.floats(min_value=-10, max_value=10, allow_nan=False, width=64)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(finite, min_size=3, max_size=3), min_size=2, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_pcgrad_removes_every_conflict_for_two_tasks(rows, seed):
    J = torch.tensor(rows, dtype=torch.float64)
    w = tb.create("pcgrad", num_tasks=2, seed=seed, gram_dtype=torch.float64).compute_weights(
        torch.ones(2), gram=J @ J.T
    )
    w = w.double()
    a, b = float(w[1]) - 1, float(w[0]) - 1  # w = c_1 + c_2, c_1 = (1, a), c_2 = (b, 1)
    g1, g2 = J
    tol = 1e-5 * (1 + float(J.norm()) ** 2)
    assert float((g1 + a * g2) @ g2) >= -tol
    assert float((g2 + b * g1) @ g1) >= -tol
    direction = J.T @ w
    assert float(direction @ g1) >= -tol
    assert float(direction @ g2) >= -tol


@st.composite
def degenerate_jacobians(draw):
    K = draw(st.integers(1, 5))
    P = draw(st.integers(1, 6))
    rows = [draw(st.lists(finite, min_size=P, max_size=P)) for _ in range(K)]
    J = torch.tensor(rows, dtype=torch.float64)
    kind = draw(st.sampled_from(["as_is", "zero_rows", "duplicated", "rank_one", "all_zero"]))
    if kind == "zero_rows":
        J[draw(st.integers(0, K - 1))] = 0.0
    elif kind == "duplicated" and K > 1:
        J[K - 1] = J[0] * draw(st.sampled_from([1.0, -1.0, 2.5, -1e-3]))
    elif kind == "rank_one":
        J = J[:1].repeat(K, 1) * torch.linspace(-2, 3, K, dtype=torch.float64)[:, None]
    elif kind == "all_zero":
        J = torch.zeros_like(J)
    scale = draw(st.sampled_from([1e-6, 1.0, 1e4]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return (J * scale).to(dtype)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(J=degenerate_jacobians())
def test_weights_finite_on_degenerate_gramians(J):
    K = J.shape[0]
    G = J @ J.T
    losses = torch.linspace(0.5, 2.0, K)
    for name in METHODS:
        b = tb.create(name, num_tasks=K)
        for _ in range(3):
            w = b.compute_weights(losses, gram=G)
            assert w.shape == (K,), name
            assert bool(torch.isfinite(w).all()), f"{name}: {w} for G={G}"


# ---------------------------------------------------------------------------------------------
# End to end: one ordinary backward gives Jᵀw.


def _tiny_model(K: int, seed: int):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
    heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(K))
    x = torch.randn(8, 4)
    targets = torch.randn(K, 8, 1)
    targets[1] = -3 * targets[0]  # conflicting tasks
    return trunk, heads, x, targets


def _forward(trunk, heads, x, targets):
    z = trunk(x)
    losses = torch.stack([((h(z) - t) ** 2).mean() for h, t in zip(heads, targets, strict=True)])
    return z, losses


def _flat_jacobian(losses, inputs):
    rows = []
    for k in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[k], inputs, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        (name, mode)
        for name in METHODS
        for mode in ("features", "params")
        if applies_jtw(name, mode)  # the others' own directions: test_directions.py
    ],
)
def test_end_to_end_backward_is_jacobian_transpose_weights(name, mode):
    K = 3
    trunk, heads, x, targets = _tiny_model(K, seed=METHODS.index(name))
    trunk_params = list(trunk.parameters())
    if mode == "params":
        b = tb.create(name, num_tasks=K, params=trunk.parameters())
    else:
        b = tb.create(name, num_tasks=K)
    twin = tb.create(name, num_tasks=K)  # same defaults and seed: same trajectory
    for _ in range(3):
        trunk.zero_grad()
        z, losses = _forward(trunk, heads, x, targets)
        J = _flat_jacobian(losses, trunk_params)
        Jz = _flat_jacobian(losses, [z])
        basis = J if mode == "params" else Jz
        expected_w = twin.compute_weights(losses.detach(), gram=basis @ basis.T)
        objective = b(losses) if mode == "params" else b(losses, features=z)
        # (Not z.retain_grad(): the engine's batched backward would leak into z.grad.)
        (z_grad,) = torch.autograd.grad(objective, z, retain_graph=True)
        objective.backward()
        torch.testing.assert_close(b.weights, expected_w, rtol=1e-4, atol=1e-6)
        trunk_grad = torch.cat([p.grad.reshape(-1) for p in trunk_params])
        torch.testing.assert_close(trunk_grad, J.T @ b.weights, rtol=1e-4, atol=1e-6)
        if mode == "features" or b.heads == "weighted":
            # (in parameters mode with unweighted heads, z carries the plain sum of gradients
            # and only the listed parameters get J^T w)
            torch.testing.assert_close(z_grad.reshape(-1), Jz.T @ b.weights, rtol=1e-4, atol=1e-6)
        with torch.no_grad():  # move the model so the next step differs
            for p in trunk_params:
                p -= 0.05 * p.grad


def test_gradient_methods_need_features_or_params():
    b = tb.create("pcgrad", num_tasks=2)
    snapshot = copy.deepcopy(b.state_dict())
    with pytest.raises(ValueError, match="features"):
        b(torch.ones(2, requires_grad=True))
    assert torch.equal(
        b.state_dict()["_extra_state"]["generator"], snapshot["_extra_state"]["generator"]
    )


# ---------------------------------------------------------------------------------------------
# State: save after 10 steps, load into a fresh balancer, continue: same as 20 uninterrupted.


def _gram_sequence(K: int, steps: int):
    for step in range(steps):
        J = _random_jacobian(K, 6, 1_000 + step)
        yield _positive_losses(K, step) * (1 + 0.1 * step), (J @ J.T).float()


@pytest.mark.parametrize("name", STATEFUL)
def test_state_round_trip(name):
    K = 4
    hparams = {"pcgrad": {"seed": 11}, "gradvac": {"seed": 11, "beta": 0.2}}.get(name, {})
    sequence = list(_gram_sequence(K, 20))
    uninterrupted = tb.create(name, num_tasks=K, **hparams)
    full = [uninterrupted.compute_weights(L, gram=G) for L, G in sequence]
    first = tb.create(name, num_tasks=K, **hparams)
    for L, G in sequence[:10]:
        first.compute_weights(L, gram=G)
    saved = copy.deepcopy(first.state_dict())
    other = {"seed": 99} if "seed" in hparams else {}
    resumed = tb.create(name, num_tasks=K, **{**hparams, **other})
    resumed.load_state_dict(saved)
    rest = [resumed.compute_weights(L, gram=G) for L, G in sequence[10:]]
    for step, (a, b) in enumerate(zip(full[10:], rest, strict=True)):
        assert torch.equal(a, b), f"{name}: step {10 + step}: {a} != {b}"


def test_random_methods_are_seeded():
    J = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    J[1:] -= 0.8 * J[:-1]  # neighbours conflict: the projection order matters
    G = J @ J.T
    for name in ("pcgrad", "gradvac"):
        runs = {
            seed: [
                tb.create(name, num_tasks=5, seed=seed).compute_weights(torch.ones(5), gram=G)
                for _ in range(2)
            ]
            for seed in (1, 2)
        }
        assert torch.equal(runs[1][0], runs[1][1]), name
        assert not torch.allclose(runs[1][0], runs[2][0]), name


# ---------------------------------------------------------------------------------------------
# Hyperparameter checks.


@pytest.mark.parametrize(
    ("name", "hparams", "argument"),
    [
        ("pcgrad", {"order": "sorted"}, "order"),
        ("pcgrad", {"seed": -1}, "seed"),
        ("gradvac", {"beta": 1.5}, "beta"),
        ("gradvac", {"seed": 1.5}, "seed"),
        ("imtl_g", {"rtol": 0.0}, "rtol"),
        ("aligned_mtl", {"scale": "max"}, "scale"),
        ("aligned_mtl", {"rtol": -1.0}, "rtol"),
        ("config", {"rtol": float("nan")}, "rtol"),
        ("db_mtl", {"beta": -0.1}, "beta"),
        ("db_mtl", {"beta_sigma": -1.0}, "beta_sigma"),
        ("db_mtl", {"eps": 0.0}, "eps"),
        ("gradnorm", {"alpha": -1.0}, "alpha"),
        ("gradnorm", {"lr": 0.0}, "lr"),
        ("gradnorm", {"initial_losses": "mean"}, "initial_losses"),
        ("gradnorm", {"initial_losses": "log_c"}, "num_classes"),
        ("gradnorm", {"initial_losses": "log_c", "num_classes": [10]}, "num_classes"),
        ("gradnorm", {"initial_losses": "log_c", "num_classes": [10, 1]}, r"num_classes\[1\]"),
        ("gradnorm", {"num_classes": 10}, "num_classes"),
    ],
)
def test_bad_hyperparameters_name_the_argument(name, hparams, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        tb.create(name, num_tasks=2, **hparams)


def test_registry_and_classes():
    for name, cls in CLASSES.items():
        assert name in tb.available()
        assert tb.method_class(name) is cls
        assert cls.requires_gram


# ---------------------------------------------------------------------------------------------
# GradNorm on the GradNorm paper's synthetic toy (DESIGN.md §6).


def _toy_data(T: int = 10, n: int = 512, seed: int = 0):
    """f_i(x) = σ_i·tanh((B + ε_i)·x), B ~ N(0, 10²), ε_i ~ N(0, 3.5²), 250 → 100.

    x is drawn from N(0, s²) with s = 1/√(250·(10² + 3.5²)) so the tanh is not saturated;
    the network sees the standardised input x/s.
    """
    generator = torch.Generator().manual_seed(seed)
    B = 10.0 * torch.randn(100, 250, generator=generator)
    eps = 3.5 * torch.randn(T, 100, 250, generator=generator)
    sigmas = torch.logspace(0, 2, T)  # 1 … 100, geometric
    scale = 1.0 / math.sqrt(250 * (10.0**2 + 3.5**2))

    def sample(count):
        x = torch.randn(count, 250, generator=generator)
        ys = torch.stack(
            [s * torch.tanh(scale * x @ (B + e).T) for s, e in zip(sigmas, eps, strict=True)]
        )
        return x, ys

    return sigmas, sample(n), sample(n)


def _toy_train(method: str, steps: int = 150, seed: int = 0):
    sigmas, (x_train, y_train), (x_test, y_test) = _toy_data()
    T = len(sigmas)
    torch.manual_seed(seed)
    layers = []
    for fan_in in (250, 100, 100, 100):
        layers += [nn.Linear(fan_in, 100), nn.ReLU()]
    trunk = nn.Sequential(*layers)
    heads = nn.ModuleList(nn.Linear(100, 100) for _ in range(T))
    optimiser = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    if method == "gradnorm":
        balancer = tb.create("gradnorm", num_tasks=T, alpha=0.12, params=trunk[-2].parameters())
    else:
        balancer = tb.create("ew", num_tasks=T)

    def task_losses(x, ys):
        z = trunk(x)
        return torch.stack([((head(z) - y) ** 2).mean() for head, y in zip(heads, ys, strict=True)])

    with torch.no_grad():
        initial = task_losses(x_test, y_test)
    batches = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        index = torch.randint(0, x_train.shape[0], (128,), generator=batches)
        optimiser.zero_grad()
        balancer(task_losses(x_train[index], y_train[:, index])).backward()
        optimiser.step()
    with torch.no_grad():
        final = task_losses(x_test, y_test)
    return sigmas, balancer.weights, float((final / initial).sum())


def test_gradnorm_toy_weights_inverse_to_sigma_and_beats_equal_weights():
    sigmas, weights, gradnorm_score = _toy_train("gradnorm")
    _, _, equal_score = _toy_train("ew")
    correlation = spearmanr(weights.numpy(), sigmas.numpy()).statistic
    assert correlation <= -0.9, (weights, correlation)
    assert gradnorm_score < equal_score, (gradnorm_score, equal_score)
    assert abs(float(weights.sum()) - len(sigmas)) < 1e-4


# ---------------------------------------------------------------------------------------------
# Gradients of very different lengths are still projection targets.

# ‖g_1‖/‖g_2‖ ≈ 5e7: beyond 1/eps of float32, where a cut-off of eps²·max‖g‖² skipped task 2
# and the direction conflicted with it (J d = [1e16, -2e8]).
DISPARATE_ROWS = [[1e8, 0.0], [-2.0, 0.4]]


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
@pytest.mark.parametrize("gram_dtype", [torch.float32, torch.float64])
def test_a_gradient_1e7_times_shorter_is_still_projected_onto(name, gram_dtype):
    J = torch.tensor(DISPARATE_ROWS, dtype=torch.float64)
    b = tb.create(name, num_tasks=2, gram_dtype=gram_dtype)
    w = b.compute_weights(torch.ones(2), gram=(J @ J.T).to(gram_dtype)).double()
    # K = 2: one order, and GradVac's zero targets at its first step are PCGrad's projection
    expected = ref_pcgrad(J, [[1], [0]])
    torch.testing.assert_close(J.T @ w, expected, rtol=1e-6, atol=0)
    assert float(J[1] @ (J.T @ w)) > 0  # no conflict left with the short gradient


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_loss_normalisation_of_a_nearly_solved_task_keeps_the_other_one_a_target(name):
    """``"loss"`` divides by L_k: a task at 1e-8 next to one at 0.5 makes the normalised
    gradients 5e7 apart in length (both gradients themselves equally long)."""
    raw = torch.tensor([[1.0, 0.0], [-1.0, 0.2]], dtype=torch.float64)
    losses = torch.tensor([1e-8, 0.5], dtype=torch.float64)
    normalised = raw / losses[:, None]
    b = tb.create(name, num_tasks=2, normalization="loss")  # float32 Gramian
    w = b.compute_weights(losses.float(), gram=(raw @ raw.T).float()).double()
    direction = raw.T @ w  # weights mapped back to the raw gradients: w = w' / L
    expected = ref_pcgrad(normalised, [[1], [0]])
    torch.testing.assert_close(direction, expected, rtol=1e-6, atol=0)
    assert float(raw[1] @ direction) > 0


def test_pcgrad_skips_a_target_below_2_to_the_minus_64_of_the_largest():
    """Where projecting would need coefficients past 2**64: skipped, weights stay finite."""
    J = torch.tensor([[1.0, 0.0], [-1e-21, 1e-22]], dtype=torch.float64)
    b = tb.create("pcgrad", num_tasks=2, gram_dtype=torch.float64)
    w = b.compute_weights(torch.ones(2), gram=J @ J.T)
    assert float(w[1]) == 1.0  # g_1 not projected onto g_2
    assert bool(torch.isfinite(w).all())


@pytest.mark.parametrize(
    "name", ["nash_mtl", "fairgrad", "imtl_g", "config", "db_mtl", "pcgrad", "gradvac"]
)
def test_a_short_gradient_counts_alike_in_a_float32_and_a_float64_gramian(name):
    """A gradient 1e8 times shorter than another is a task gradient, not rounding noise: the
    float32 Gramian (the default) gives the float64 one's weights. With a cut-off at
    eps(float32)²·max‖g‖², Nash-MTL, FairGrad and ConFIG gave it weight 0 and a direction
    that conflicts with it (cos −0.45); IMTL-G's lost task 1 (cos 0); DB-MTL's α stayed 1."""
    J = torch.tensor([[1e8, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    weights = {}
    for dtype in (torch.float32, torch.float64):
        b = tb.create(name, num_tasks=2, gram_dtype=dtype)
        weights[dtype] = b.compute_weights(torch.ones(2), gram=(J @ J.T).to(dtype)).double()
    torch.testing.assert_close(weights[torch.float32], weights[torch.float64], rtol=1e-5, atol=0)
    direction = J.T @ weights[torch.float32]
    # The short gradient's task does not ascend (PCGrad leaves it orthogonal to g_1': 0 up to
    # the float32 weights' rounding).
    cosine = float(J[1] @ direction) / float(J[1].norm() * direction.norm())
    assert cosine >= -1e-6


@pytest.mark.parametrize("name", ["upgrad", "mgda", "cagrad", "pcgrad"])
def test_l2_normalisation_scales_a_short_gradient_up_rather_than_dropping_it(name):
    J = torch.tensor([[1e8, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    weights = {}
    for dtype in (torch.float32, torch.float64):
        b = tb.create(name, num_tasks=2, gram_dtype=dtype, normalization="l2")
        weights[dtype] = b.compute_weights(torch.ones(2), gram=(J @ J.T).to(dtype)).double()
    torch.testing.assert_close(weights[torch.float32], weights[torch.float64], rtol=1e-5, atol=0)
    assert float(weights[torch.float32][1]) > 0.1  # task 2 counts, at its unit length or more


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "cagrad"])
def test_loss_normalisation_beyond_float32s_range_is_solved_in_float64(name):
    """Losses 1e-30 and 0.5: the normalised gradients are ~1e30 apart in length, their squares
    beyond what float32 holds at once. Cast back to float32, the short one underflowed to a
    zero gradient and was left out (UPGrad's direction then conflicted with its task)."""
    torch.manual_seed(0)
    J = torch.randn(3, 4, dtype=torch.float64)
    J[2] = -J[0] + 0.1 * torch.randn(4, dtype=torch.float64)
    losses = torch.tensor([1e-30, 2e-30, 0.5])
    weights = {}
    for dtype in (torch.float32, torch.float64):
        b = tb.create(name, num_tasks=3, gram_dtype=dtype, normalization="loss")
        weights[dtype] = b.compute_weights(losses, gram=(J @ J.T).to(dtype)).double()
    torch.testing.assert_close(weights[torch.float32], weights[torch.float64], rtol=1e-4, atol=0)


# A task gradient ~5e-23 long next to one of 1e-5 (a saturated logit, say): its squared norm is
# a subnormal float32 number, held to a bit or two.
SUBNORMAL_ROWS = (
    [1e-5, 0.0, 0.0, 0.0],
    [-0.9 * math.sqrt(2.1e-45), math.sqrt(0.19 * 2.1e-45), 0.0, 0.0],
)


@pytest.mark.parametrize("name", ["pcgrad", "nash_mtl", "db_mtl", "config", "upgrad"])
def test_a_gradient_whose_float32_squared_norm_is_subnormal_is_taken_in_float64(name):
    """The engine recomputes such a Gramian in float64, so the default float32 one gives the
    float64 weights; counted from its 1–2 bits, the direction ascended task 1 (PCGrad, DB-MTL,
    Nash-MTL) or vanished (ConFIG)."""
    rows = torch.tensor(SUBNORMAL_ROWS, dtype=torch.float64)
    weights = {}
    for dtype in (torch.float32, torch.float64):
        z = torch.zeros(4, requires_grad=True)
        losses = torch.stack([(z * row.float()).sum() + 1.0 for row in rows])
        b = tb.create(name, num_tasks=2, gram_dtype=dtype)
        b(losses, features=z).backward()
        weights[dtype] = b.weights.double()
        assert float(rows[0] @ z.grad.double()) > 0  # task 1 descends
    torch.testing.assert_close(weights[torch.float32], weights[torch.float64], rtol=1e-5, atol=0)


def test_a_given_float32_gramian_with_a_subnormal_squared_norm_counts_it_as_zero():
    rows = torch.tensor(SUBNORMAL_ROWS, dtype=torch.float64)
    gram = (rows @ rows.T).float()
    assert 0 < float(gram[1, 1]) < torch.finfo(torch.float32).tiny
    w = tb.create("pcgrad", num_tasks=2).compute_weights(torch.ones(2), gram=gram)
    # as for a zero gradient: task 1 is not projected onto it, task 2 keeps weight 1
    assert w.tolist() == [1.0, 1.0]


def test_pcgrad_counts_a_target_at_1e_18_and_skips_one_below_2_to_the_minus_64():
    for ratio, counted in ((1e-18, True), (2.0**-65, False)):
        J = torch.tensor([[1.0, 0.0], [-ratio, 0.1 * ratio]], dtype=torch.float64)
        b = tb.create("pcgrad", num_tasks=2, gram_dtype=torch.float64)
        w = b.compute_weights(torch.ones(2), gram=J @ J.T).double()
        assert bool(torch.isfinite(w).all())
        expected = ref_pcgrad(J, [[1], [0]]) if counted else J.sum(0)
        torch.testing.assert_close(J.T @ w, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("exponent", [-100, -110, -127])
def test_gradvac_cosines_of_two_short_gradients_in_a_tiny_float64_gramian(exponent):
    """G_jj·G_mm of two gradients 2**exponent shorter than the longest, next to a longest at
    2**-499, underflows float64: the cosine divided by 0 (ZeroDivisionError)."""
    big = 2.0**-499
    small = big * 2.0**exponent
    gram = torch.diag(torch.tensor([big, small, small], dtype=torch.float64))
    gram[1, 2] = gram[2, 1] = -0.5 * small  # cosine −1/2
    weights = [
        tb.create("gradvac", num_tasks=3, gram_dtype=torch.float64).compute_weights(
            torch.ones(3), gram=matrix
        )
        for matrix in (gram, gram / small)  # the same cosines, in range
    ]
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-12, atol=0)
