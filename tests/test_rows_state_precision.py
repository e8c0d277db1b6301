"""State kept in the task gradients' precision: DB-MTL's and MoCo's K×P buffers follow a
model made float64 after the balancer was built, and float64 rules return float64 weights."""

from __future__ import annotations

import pytest
import torch

import taskbalance as tb

ROWS_STATE = {"db_mtl": "grad_averages", "moco": "tracked"}


def _train(method: str, convert_after: bool, steps: int = 4, state=None):
    """A float64 trunk and heads, converted before or after the balancer is built."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 6)
    heads = torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(2)])
    if not convert_after:
        trunk.double(), heads.double()
    b = tb.create(method, num_tasks=2, params=list(trunk.parameters()), gram_dtype=torch.float64)
    if convert_after:
        trunk.double(), heads.double()
    if state is not None:
        trunk.load_state_dict(state["trunk"]), heads.load_state_dict(state["heads"])
        b.load_state_dict(state["balancer"])
    generator = torch.Generator().manual_seed(1 if state is None else 2)
    grads = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator, dtype=torch.float64)
        y = torch.randn(8, 2, generator=generator, dtype=torch.float64)
        z = trunk(x)
        losses = [((heads[k](z).squeeze(1) - y[:, k]) ** 2).mean() for k in range(2)]
        trunk.zero_grad(), heads.zero_grad()
        b(losses).backward()
        grads.append(trunk.weight.grad.clone())
        with torch.no_grad():
            for p in [*trunk.parameters(), *heads.parameters()]:
                p -= 0.1 * p.grad
    return b, grads, {"trunk": trunk.state_dict(), "heads": heads.state_dict()}


@pytest.mark.parametrize("method", sorted(ROWS_STATE))
def test_state_follows_a_model_made_float64_after_the_balancer(method):
    reference, expected, _ = _train(method, convert_after=False)
    b, grads, _ = _train(method, convert_after=True)
    assert b.get_buffer(ROWS_STATE[method]).dtype == torch.float64
    # The same float64 computation: equal, not merely float32-close (it was ~2e-7 apart).
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    torch.testing.assert_close(b.weights, reference.weights, rtol=1e-13, atol=0)


@pytest.mark.parametrize("method", sorted(ROWS_STATE))
def test_a_float64_checkpoint_keeps_its_precision_in_a_float32_balancer(method):
    name = ROWS_STATE[method]
    b, _, models = _train(method, convert_after=True)
    saved = {**models, "balancer": b.state_dict()}
    assert saved["balancer"][name].dtype == torch.float64
    resumed, _, _ = _train(method, convert_after=True, steps=0, state=saved)
    # Built on float32 parameters, the buffer was float32; the checkpoint's float64 is kept.
    assert resumed.get_buffer(name).dtype == torch.float64
    assert torch.equal(resumed.get_buffer(name), saved["balancer"][name])


def test_a_refused_checkpoint_leaves_the_buffer_dtype_alone():
    b, _, models = _train("moco", convert_after=True)
    state = b.state_dict()
    state["lambdas"] = torch.full((2,), float("nan"), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="expected finite floats"):
        _train("moco", convert_after=True, steps=0, state={**models, "balancer": state})
    fresh, _, _ = _train("moco", convert_after=True, steps=0)
    with pytest.raises(RuntimeError, match="expected finite floats"):
        fresh.load_state_dict(state)
    assert fresh.get_buffer("tracked").dtype == torch.float32


@pytest.mark.parametrize("method", ["excess_mtl", "moco"])
def test_float64_gramian_gives_float64_weights(method):
    torch.manual_seed(3)
    trunk = torch.nn.Linear(3, 5).double()
    b = tb.create(method, num_tasks=2, params=list(trunk.parameters()), gram_dtype=torch.float64)
    for _ in range(3):  # ExcessMTL's first weights are all 1
        z = trunk(torch.randn(7, 3, dtype=torch.float64))
        b(torch.stack([z.pow(2).mean(), (z - 1).pow(2).mean() * 3])).backward()
    weights = b.weights
    assert weights.dtype == torch.float64
    # Not a float32 rounding: the weights carry float64 bits beyond float32's.
    assert not torch.equal(weights, weights.float().double())


def test_moco_before_its_first_refresh_applies_its_starting_lambdas():
    """A task absent at the first call: no refresh yet, so the present tasks get the weights
    the balancer starts from, λ = 1/K for MoCo (they were 1, K times λ's scale)."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 4)
    b = tb.create("moco", num_tasks=2, params=list(trunk.parameters()))
    assert torch.equal(b.weights, torch.full((2,), 0.5))
    x = torch.randn(5, 3)
    present_loss = trunk(x).pow(2).mean()
    (expected,) = torch.autograd.grad(present_loss, trunk.weight)
    losses = torch.stack([trunk(x).pow(2).mean(), torch.tensor(float("nan"))])
    b(losses, present=[True, False]).backward()
    assert torch.equal(b.weights, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(trunk.weight.grad, 0.5 * expected)


@pytest.mark.parametrize("mode", ["features", "params"])
def test_db_mtl_refused_for_unfit_weights_changes_no_state(mode):
    """Weights past float32's range (ε = 1e-30, a loss of 1e-39) are refused; the rule used
    to store its EMA (and widen its buffer) before the refusal."""
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    params = {"params": [p]} if mode == "params" else {}
    b = tb.create("db_mtl", num_tasks=2, gram_dtype=torch.float64, eps=1e-30, **params)
    p.data = p.data.double()
    before = {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    losses = torch.stack([1e-30 * (1 + 1e-10 * p.sum()), (p - 3).pow(2).sum()]).float()
    features = {"features": p} if mode == "features" else {}
    with pytest.raises(ValueError, match=r"db_mtl's weights at this step reach"):
        b(losses, **features)
    after = b.state_dict()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key
