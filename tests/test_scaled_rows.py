"""The engine leaves its power-of-two scale in ``step.rows``: every consumer must divide it out.

Checked against an independent reference (per-task ``torch.autograd.grad`` of the same graph):
the shared tensors' gradient with ``heads="unweighted"`` is ``Jᵀw`` and each head gets its own
``∇L_k``, on refresh and non-refresh (``update_every``) steps, at the initial scale 2¹⁶ and
after a float16 overflow retried at 2⁸, under float16 autocast and in float32; the direction
methods' ``d`` is the unscaled one; and under DDP an overflow on one rank only makes every
rank retry (no rank waits alone in a collective).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import taskbalance as tb
from conftest import gloo_group, run_ranks
from taskbalance.methods import _gradient_base as gradient_base
from taskbalance.methods._gradient_base import GradientBalancer

K = 3
BIG = (1.0, 2.0, 3.0)  # float16 head-output gradients ×2¹⁶ overflow: the engine retries at 2⁸
SMALL = tuple(c * 2.0**-10 for c in BIG)  # ×2¹⁶ stays finite: no retry


class InverseNorm(GradientBalancer):
    """``w_k ∝ 1/‖g_k‖`` (sum K), far from 1 for unequal gradients; records each Gramian."""

    def __init__(self, num_tasks: int, **options) -> None:
        super().__init__(num_tasks, **options)
        self.grams: list[Tensor] = []

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        self.grams.append(gram.detach().clone())
        inverse = 1.0 / gram.diagonal().clamp_min(1e-30).sqrt()
        return inverse * self.num_tasks / inverse.sum()


def _model(seed: int = 0) -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    heads = nn.ModuleList([nn.Linear(8, 4) for _ in range(K)])
    return trunk, heads


def _forward(trunk, heads, x, factors, fp16: bool, squared: bool = False):
    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        z = trunk(x)
        outputs = [head(z).float() for head in heads]
        losses = torch.stack(
            [
                ((out**2) if squared else out).sum() * factor
                for out, factor in zip(outputs, factors, strict=True)
            ]
        )
    return z, losses


def _flat(grads) -> Tensor:
    return torch.cat([g.reshape(-1).double() for g in grads])


def _reference(trunk, heads, x, factors, fp16, squared=False):
    """Per-task gradients of the trunk (``J [K, P]``) and of each task's own head."""
    _, losses = _forward(trunk, heads, x, factors, fp16, squared)
    params = list(trunk.parameters())
    J = torch.stack(
        [_flat(torch.autograd.grad(losses[k], params, retain_graph=True)) for k in range(K)]
    )
    own = [
        _flat(torch.autograd.grad(losses[k], list(heads[k].parameters()), retain_graph=True))
        for k in range(K)
    ]
    return J, own


def _recording_scales(monkeypatch) -> list[float]:
    scales: list[float] = []
    original = gradient_base.task_gradients

    def recording(*args, **kwargs):
        grads = original(*args, **kwargs)
        scales.append(grads.scale)
        return grads

    monkeypatch.setattr(gradient_base, "task_gradients", recording)
    return scales


def _relative(got: Tensor, expected: Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("mode", ["features", "params"])
@pytest.mark.parametrize(
    ("fp16", "order", "scales"),
    [
        (True, (BIG, SMALL), [2.0**8, 2.0**16]),
        (True, (SMALL, BIG), [2.0**16, 2.0**8]),
        (False, (BIG, SMALL), [2.0**16, 2.0**16]),
    ],
)
def test_unweighted_heads_trunk_gets_jtw_at_every_scale(monkeypatch, mode, fp16, order, scales):
    trunk, heads = _model()
    params = list(trunk.parameters())
    b = InverseNorm(
        K, heads="unweighted", update_every=2, params=params if mode == "params" else None
    )
    recorded = _recording_scales(monkeypatch)
    tolerance = 2e-2 if fp16 else 1e-5  # float16 mixes the tasks' cotangents in one backward
    torch.manual_seed(1)
    for step, factors in enumerate(order):  # step 0 refreshes, step 1 reuses its weights
        x = torch.randn(32, 8)
        z, losses = _forward(trunk, heads, x, factors, fp16)
        trunk.zero_grad()
        heads.zero_grad()
        objective = b(losses, features=z)
        objective.backward()
        J, own = _reference(trunk, heads, x, factors, fp16)
        w = b.weights.double()
        assert (w - 1).abs().max() > 0.3, w  # the correction term matters
        got = _flat(p.grad for p in params)
        assert _relative(got, J.T @ w) < tolerance, (step, _relative(got, J.T @ w))
        for k in range(K):
            head_grad = _flat(p.grad for p in heads[k].parameters())
            assert _relative(head_grad, own[k]) < tolerance
        if step == 0 and mode == "params":  # the Gramian came back unscaled
            rel = _relative(b.grams[0].double(), J @ J.T)
            assert rel < 2 * tolerance, rel
    assert recorded == scales  # the retry really happened where expected
    assert len(b.grams) == 1  # one refresh


@pytest.mark.parametrize("fp16", [True, False])
@pytest.mark.parametrize("heads_mode", ["weighted", "unweighted"])
@pytest.mark.parametrize("factors", [BIG, SMALL])
def test_db_mtl_parameters_direction_is_unscaled(monkeypatch, fp16, heads_mode, factors):
    """β = 0: d = Jᵀw; the rows it is made from and the shift's own Jᵀc must both be unscaled."""
    trunk, heads = _model(2)
    params = list(trunk.parameters())
    b = tb.create("db_mtl", num_tasks=K, params=params, beta=0.0, heads=heads_mode)
    recorded = _recording_scales(monkeypatch)
    torch.manual_seed(3)
    x = torch.randn(32, 8)
    _, losses = _forward(trunk, heads, x, factors, fp16, squared=True)
    b(losses).backward()
    J, own = _reference(trunk, heads, x, factors, fp16, squared=True)
    w = b.weights.double()
    tolerance = 2e-2 if fp16 else 1e-5
    got = _flat(p.grad for p in params)
    assert _relative(got, J.T @ w) < tolerance, _relative(got, J.T @ w)
    # unweighted: the heads train on log(L_k + ε), as LibMTL's DB-MTL
    log_derivative = 1 / (losses.detach().double() + 1e-8)
    for k in range(K):
        expected = own[k] * (w[k] if heads_mode == "weighted" else log_derivative[k])
        assert _relative(_flat(p.grad for p in heads[k].parameters()), expected) < tolerance
    assert recorded[0] in (2.0**8, 2.0**16)


@pytest.mark.parametrize("fp16", [True, False])
def test_graddrop_features_direction_is_unscaled(fp16):
    """leak = 1 keeps every sign: d = Σ_k ∇_z L_k, whatever the engine's scale."""
    trunk, heads = _model(4)
    b = tb.create("graddrop", num_tasks=K, leak=1.0)
    torch.manual_seed(5)
    x = torch.randn(32, 8)
    z, losses = _forward(trunk, heads, x, BIG, fp16)
    (z_grad,) = torch.autograd.grad(b(losses, features=z), z)
    z_ref, losses_ref = _forward(trunk, heads, x, BIG, fp16)
    expected = _flat(torch.autograd.grad(losses_ref.sum(), z_ref))
    assert _relative(_flat([z_grad]), expected) < (2e-2 if fp16 else 1e-5)


# ---------------------------------------------------------------------------------------------
# DDP: rank 0 overflows at 2¹⁶, rank 1 does not; both must retry (same collectives).


def _ddp_worker(rank: int, store: str, out_dir: str) -> None:
    with gloo_group(rank, store):
        out = {}
        for mode in ("features", "params"):
            trunk, heads = _model()
            params = list(trunk.parameters())
            b = InverseNorm(K, heads="unweighted", params=params if mode == "params" else None)
            scales: list[float] = []
            original = gradient_base.task_gradients

            def recording(*args, _original=original, _scales=scales, **kwargs):
                grads = _original(*args, **kwargs)
                _scales.append(grads.scale)
                return grads

            gradient_base.task_gradients = recording
            try:
                torch.manual_seed(10 + rank)
                x = torch.randn(32, 8)
                z, losses = _forward(trunk, heads, x, BIG if rank == 0 else SMALL, True)
                b(losses, features=z).backward()
            finally:
                gradient_base.task_gradients = original
            out[mode] = {
                "scales": scales,
                "weights": b.weights.clone(),
                "gram": b.grams[0].clone(),
                "grad": _flat(p.grad for p in params),
            }
        torch.save(out, f"{out_dir}/rank{rank}.pt")


def test_ddp_overflow_on_one_rank_retries_on_every_rank(tmp_path):
    rank0, rank1 = run_ranks(_ddp_worker, tmp_path, 2)
    for mode in ("features", "params"):
        assert rank0[mode]["scales"] == [2.0**8] == rank1[mode]["scales"]
        torch.testing.assert_close(rank0[mode]["gram"], rank1[mode]["gram"], rtol=0, atol=0)
        torch.testing.assert_close(rank0[mode]["weights"], rank1[mode]["weights"], rtol=0, atol=0)
        for rank in (rank0, rank1):
            assert torch.isfinite(rank[mode]["grad"]).all()


# ---------------------------------------------------------------------------------------------
# Gradient hooks on the shared tensors see each task's own gradient, not 2¹⁶ times it.


def _clamp(grad: Tensor) -> Tensor:
    return grad.clamp(-0.05, 0.05)


@pytest.mark.parametrize("mode", ["features", "params"])
def test_a_clamp_hook_on_the_shared_tensors_acts_on_each_tasks_own_gradient(mode):
    # A per-parameter clamp hook (or one on the features) saw 2**16 times each task's
    # gradient: every entry was clamped, the Gramian collapsed to ~1e-8 and MGDA's weights
    # were near-uniform, Nash-MTL's 10,000 times too large.
    trunk, heads = _model()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    params = list(trunk.parameters())
    for parameter in params:
        parameter.register_hook(_clamp)
    z, losses = _forward(trunk, heads, x, (1.0, 3.0, 0.3), False, squared=True)
    if mode == "features":
        z.register_hook(_clamp)
    shared = [z] if mode == "features" else params
    # The reference: per-task autograd.grad, whose hooks see each task's own gradient.
    J = torch.stack(
        [_flat(torch.autograd.grad(losses[k], shared, retain_graph=True)) for k in range(K)]
    )
    reference = tb.create("mgda", num_tasks=K, gram_dtype=torch.float64)
    expected = reference.compute_weights(losses.detach(), gram=J @ J.T)
    b = tb.create("mgda", num_tasks=K, params=params if mode == "params" else None)
    b(losses, features=z if mode == "features" else None).backward()
    torch.testing.assert_close(b.weights.double(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(expected, torch.full((K,), 1 / K, dtype=torch.float64), atol=0.02)
