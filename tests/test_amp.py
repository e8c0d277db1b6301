"""Mixed precision: the Gramian under ``torch.autocast`` and the objective under GradScaler.

The forward runs in bfloat16 under CPU autocast; the engine must still return ``G`` in the
requested full precision, close to the float32 reference, and the user's (scaled) backward of
the returned objective must be exactly ``Jᵀw`` once unscaled.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import taskbalance as tb
from conftest import FEATURE_METHODS
from taskbalance._gramian import gramian as _engine_gramian
from taskbalance._gramian import jacobian_rows
from taskbalance.methods._gradient_base import GradientBalancer

gramian = getattr(tb, "gramian", _engine_gramian)
GRADIENT_METHODS = FEATURE_METHODS  # features mode throughout


class Probe(GradientBalancer):
    """A local gradient method whose weights depend on G: 1/‖g_k‖, normalised to sum to K."""

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        inv = 1.0 / gram.diagonal().clamp_min(1e-12).sqrt()
        return (inv * self.num_tasks / inv.sum()).to(torch.float32)


def make_model(K: int, seed: int = 0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(32, 1) for _ in range(K)])
    x = torch.randn(64, 16)
    y = torch.randn(64, K)
    return trunk, heads, x, y


def forward(trunk, heads, x, y, autocast: bool) -> tuple[Tensor, Tensor]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        z = trunk(x)
        losses = torch.stack(
            [
                nn.functional.mse_loss(head(z).squeeze(-1), y[:, k]) * (k + 1)
                for k, head in enumerate(heads)
            ]
        )
    return losses, z


def jacobian(losses: Tensor, inputs: list[Tensor]) -> Tensor:
    rows = []
    for k in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[k], inputs, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1).double() for g in grads]))
    return torch.stack(rows)


def test_autocast_really_runs_in_bfloat16():
    trunk, heads, x, y = make_model(2)
    _, z = forward(trunk, heads, x, y, autocast=True)
    assert z.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["features", "params"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [2, 4])
def test_gramian_under_autocast_is_full_precision_and_close(mode, dtype, K):
    trunk, heads, x, y = make_model(K)
    ref_losses, ref_z = forward(trunk, heads, x, y, autocast=False)
    losses, z = forward(trunk, heads, x, y, autocast=True)
    params = list(trunk.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # called inside the autocast region too
        G = gramian(losses, z if mode == "features" else params, dtype=dtype)
    reference = gramian(ref_losses, ref_z if mode == "features" else params, dtype=torch.float64)
    assert G.dtype == dtype
    assert torch.isfinite(G).all()
    # bfloat16 has an 8-bit mantissa: loose, relative to the largest entry.
    scale = reference.abs().max()
    assert (G.double() - reference).abs().max() <= 0.05 * scale
    # The diagonal (squared gradient norms) within a few percent each.
    torch.testing.assert_close(G.double().diagonal(), reference.diagonal(), rtol=0.05, atol=0)


@pytest.mark.parametrize("mode", ["features", "params"])
def test_balancer_under_autocast_gives_float32_gram(mode):
    K = 3
    trunk, heads, x, y = make_model(K)
    grams = []

    class Recording(Probe):
        def _gradient_weights(self, losses, gram):
            grams.append(gram)
            return super()._gradient_weights(losses, gram)

    b = Recording(K, params=list(trunk.parameters()) if mode == "params" else None)
    losses, z = forward(trunk, heads, x, y, autocast=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        objective = b(losses, features=z)
    assert grams[0].dtype == torch.float32
    assert b.weights.dtype == torch.float32
    assert torch.isfinite(b.weights).all()
    objective.backward()
    assert all(torch.isfinite(p.grad).all() for p in trunk.parameters())


def _scaled_step_grads(mode: str, use_grad_scaler: bool):
    K = 3
    trunk, heads, x, y = make_model(K)
    params = list(trunk.parameters())
    b = Probe(K, params=params if mode == "params" else None)
    losses, z = forward(trunk, heads, x, y, autocast=True)
    expected_jac = jacobian(losses, params)  # from the same bfloat16 graph
    objective = b(losses, features=z)
    w = b.weights.double()
    # The plain, unscaled backward of the same objective, for comparison.
    objective.backward(retain_graph=True)
    plain = torch.cat([p.grad.reshape(-1) for p in params]).double()
    optimizer = torch.optim.SGD([*params, *heads.parameters()], lr=0.0)
    optimizer.zero_grad()
    if use_grad_scaler:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(objective).backward()
        assert params[0].grad.abs().max() > 100 * plain.abs().max()  # really scaled
        scaler.unscale_(optimizer)
        scaler.step(optimizer)  # finite grads: the step is taken
        scaler.update()
        assert scaler.get_scale() == 1024.0  # no overflow was found
    else:
        (objective * 1024.0).backward()
        for p in params:
            p.grad /= 1024.0
    scaled = torch.cat([p.grad.reshape(-1) for p in params]).double()
    return scaled, plain, expected_jac.T @ w


@pytest.mark.parametrize("mode", ["features", "params"])
@pytest.mark.parametrize("use_grad_scaler", [False, True])
def test_scaled_objective_backward_is_jt_w(mode, use_grad_scaler):
    scaled, plain, jt_w = _scaled_step_grads(mode, use_grad_scaler)
    # 1024 is a power of two: scaling then unscaling changes nothing, bit for bit.
    assert torch.equal(scaled, plain)
    # Against Jᵀw assembled in float64 from the K per-task gradients of the same bfloat16
    # graph: the one backward mixes the tasks' cotangents in bfloat16 (8-bit mantissa), so the
    # two agree to bfloat16 precision relative to the gradient's scale, not elementwise.
    error = (scaled - jt_w).norm() / jt_w.norm()
    assert error < 2e-2, f"relative error {error:.3g}"


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_registered_gradient_methods_under_autocast(name):
    from conftest import make_balancer

    K = 3
    trunk, heads, x, y = make_model(K)
    b = make_balancer(name, K)
    losses, z = forward(trunk, heads, x, y, autocast=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        objective = b(losses, features=z)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(objective).backward()
    assert torch.isfinite(b.weights).all()
    assert all(torch.isfinite(p.grad).all() for p in trunk.parameters())


# ---------------------------------------------------------------------------------------------
# float16: the per-task backward is scaled like GradScaler, so small gradients do not flush


def fp16_problem(dtype=torch.float32):
    """Batch 32,768 and loss weights down to 0.01: per-task gradients deep in fp16's subnormals."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()).to(dtype)
    heads = nn.ModuleList([nn.Linear(32, 1) for _ in range(3)]).to(dtype)
    x = torch.randn(32768, 16).to(dtype)
    y = torch.randn(32768, 3).to(dtype)
    return trunk, heads, x, y


def fp16_forward(trunk, heads, x, y, autocast: bool) -> tuple[Tensor, Tensor]:
    weights = (1.0, 0.1, 0.01)
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        z = trunk(x)
        losses = torch.stack(
            [
                nn.functional.mse_loss(head(z).squeeze(-1), y[:, k]) * weights[k]
                for k, head in enumerate(heads)
            ]
        )
    return losses, z


def relative_gram_error(G: Tensor, reference: Tensor) -> float:
    """``max |G − R|_ij / sqrt(R_ii R_jj)``: relative error of the norms and the cosines."""
    norms = reference.diagonal().sqrt()
    return ((G.double() - reference).abs() / torch.outer(norms, norms)).max().item()


def test_cpu_autocast_runs_float16():
    trunk, heads, x, y = fp16_problem()
    losses, z = fp16_forward(trunk, heads, x[:8], y[:8], autocast=True)
    assert z.dtype == torch.float16
    assert losses.dtype == torch.float32  # mse_loss autocasts to float32


@pytest.mark.parametrize("mode", ["features", "params"])
def test_fp16_autocast_gramian_within_one_percent_of_float64(mode):
    trunk, heads, x, y = fp16_problem()
    trunk64, heads64, x64, y64 = fp16_problem(torch.float64)  # the same weights and data
    losses, z = fp16_forward(trunk, heads, x, y, autocast=True)
    losses64, z64 = fp16_forward(trunk64, heads64, x64, y64, autocast=False)
    wrt = z if mode == "features" else list(trunk[2].parameters())
    wrt64 = z64 if mode == "features" else list(trunk64[2].parameters())
    reference = gramian(losses64, wrt64, dtype=torch.float64)
    if mode == "features":
        # The problem is real: unscaled, task 2's fp16 feature gradient is mostly flushed to 0
        # and its Gramian entry is several percent off.
        unscaled = [torch.autograd.grad(losses[k], z, retain_graph=True)[0] for k in range(3)]
        assert (unscaled[2] == 0).float().mean() > 0.3
        jac = torch.stack([g.reshape(-1).double() for g in unscaled])
        assert relative_gram_error(jac @ jac.T, reference) > 0.03
    G = gramian(losses, wrt, dtype=torch.float64)
    assert relative_gram_error(G, reference) < 0.01


def _count_grad_calls(monkeypatch) -> list[int]:
    """Counts the engine's backward passes, by either entry: ``torch.autograd.grad`` and the
    direct engine call of the per-task loop."""
    import taskbalance._gramian as engine

    calls: list[int] = []
    original = torch.autograd.grad
    original_engine = engine._engine_backward
    assert original_engine is not None

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    def counting_engine(*args):
        calls.append(1)
        return original_engine(*args)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    monkeypatch.setattr(engine, "_engine_backward", counting_engine)
    return calls


def test_fp16_overflow_at_the_initial_scale_is_retried_smaller(monkeypatch):
    """A half model whose per-sample gradients are ~1: ×2¹⁶ overflows fp16, ×2⁸ does not."""
    torch.manual_seed(0)
    heads = nn.ModuleList([nn.Linear(8, 4) for _ in range(3)]).half()
    z = torch.randn(64, 8).half().requires_grad_()
    losses = torch.stack([head(z).float().sum() * (k + 1) for k, head in enumerate(heads)])
    # Reference: unscaled backward passes (no overflow at scale 1), products in float64.
    grads = [torch.autograd.grad(losses[k], z, retain_graph=True)[0] for k in range(3)]
    assert all(torch.isfinite(g).all() for g in grads)
    jac = torch.stack([g.reshape(-1).double() for g in grads])
    calls = _count_grad_calls(monkeypatch)
    G = gramian(losses, z, dtype=torch.float64)
    assert len(calls) == 6  # K per-task passes at 2¹⁶ (overflow), K again at 2⁸
    torch.testing.assert_close(G, jac @ jac.T, rtol=1e-12, atol=0)


def test_genuinely_infinite_gradients_stay_infinite_after_the_retries(monkeypatch):
    z = torch.zeros(3, requires_grad=True)
    losses = torch.stack([torch.sqrt(z).sum() + 1.0, z.sum()])  # d sqrt(z)/dz at 0 = inf
    calls = _count_grad_calls(monkeypatch)
    G = gramian(losses, z)
    assert not torch.isfinite(G).all()
    assert len(calls) == 2 * 3  # scales 2¹⁶, 2⁸ and 1, then it gives up


def test_large_float32_gradients_take_no_second_backward(monkeypatch):
    """‖g‖ ≈ 2e15: finite float32 rows whose Gramian overflows only at scale 2¹⁶. The Gramian of
    the unscaled rows settles it, without running the K backward passes again."""
    z = torch.ones(4, requires_grad=True)
    losses = torch.stack([(z * 1e15).sum(), (z * -2e15).sum()])
    calls = _count_grad_calls(monkeypatch)
    G = gramian(losses, z)
    assert len(calls) == 2  # one backward per task
    expected = torch.tensor([[4e30, -8e30], [-8e30, 16e30]])
    torch.testing.assert_close(G, expected, rtol=1e-6, atol=0)


def test_a_non_finite_loss_is_not_retried(monkeypatch):
    z = torch.ones(3, requires_grad=True)
    losses = torch.stack([(z * float("inf")).sum(), z.sum()])
    calls = _count_grad_calls(monkeypatch)
    assert not torch.isfinite(gramian(losses, z)).all()
    assert len(calls) == 2  # one pass: smaller scales cannot make an infinite loss finite


@pytest.mark.parametrize("batched", [None, True, False])
def test_scaling_changes_no_bit_in_float32(batched):
    trunk, heads, x, y = make_model(3)
    losses, z = forward(trunk, heads, x, y, autocast=False)
    rows, _ = jacobian_rows(losses, [z], batched=batched)
    expected = torch.stack(
        [torch.autograd.grad(losses[k], z, retain_graph=True)[0].reshape(-1) for k in range(3)]
    )
    assert rows[0].dtype == torch.float32
    assert torch.equal(rows[0], expected)


def _scaler_run(name: str, batches: list[int], overflow_at: int | None, restore: bool):
    """A GradScaler loop; at batch ``overflow_at`` the trunk's backward overflows (finite
    losses: the balancer cannot see it). ``restore``: the AMP recipe's state restore."""
    import copy

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])
    balancer = tb.create(name, num_tasks=3)
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        x, y = torch.randn(8, 4, generator=generator), torch.rand(8, 3, generator=generator)
        optimizer.zero_grad()
        z = trunk(x)
        if batch == overflow_at:
            z.register_hook(lambda grad: grad * float("inf"))
        losses = torch.stack(
            [((head(z).squeeze(1) - y[:, k]) ** 2).mean() for k, head in enumerate(heads)]
        )
        saved = copy.deepcopy(balancer.state_dict()) if restore else None
        scale = scaler.get_scale()
        scaler.scale(balancer(losses)).backward()
        scaler.step(optimizer)
        scaler.update()
        if saved is not None and scaler.get_scale() < scale:  # the step was skipped
            balancer.load_state_dict(saved)
    return balancer.state_dict(), [p.detach().clone() for p in trunk.parameters()]


@pytest.mark.parametrize("name", ["dwa", "famo", "uw"])
def test_amp_recipe_restores_the_state_of_a_step_gradscaler_skipped(name):
    """docs/recipes/amp.md: a backward that overflows below the losses is skipped by GradScaler
    but not by the balancer, whose state advances; restored as the recipe says, the run equals
    one that never saw the batch (and, without the restore, it does not)."""
    skipped, skipped_trunk = _scaler_run(name, [0, 1, 2, 3, 4], overflow_at=2, restore=True)
    unseen, unseen_trunk = _scaler_run(name, [0, 1, 3, 4], overflow_at=None, restore=False)
    drifted, _ = _scaler_run(name, [0, 1, 2, 3, 4], overflow_at=2, restore=False)
    tensors = [key for key, value in unseen.items() if torch.is_tensor(value)]
    assert all(torch.equal(skipped[key], unseen[key]) for key in tensors)
    # the scale halved at the skip: a power of two, so the unscaled steps are the same bits
    assert all(torch.equal(a, b) for a, b in zip(skipped_trunk, unseen_trunk, strict=True))
    assert not all(torch.equal(drifted[key], unseen[key]) for key in tensors)
