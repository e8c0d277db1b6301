"""A state saved mid-run and loaded into a fresh balancer continues the same trajectory."""

from __future__ import annotations

import io

import pytest
import torch

import taskbalance as tb
from conftest import LEARNED_METHODS, call, losses_for, make_balancer
from taskbalance._solvers import _dual_cone as dual_cone

K = 3


def _optimiser(b: tb.Balancer) -> torch.optim.Optimizer | None:
    params = list(b.parameters())
    return torch.optim.Adam(params, lr=0.05) if params else None


def _run(b: tb.Balancer, optimiser, steps: range) -> list[torch.Tensor]:
    trajectory = []
    for step in steps:
        losses = losses_for(step, K).requires_grad_(True)
        if optimiser is not None:
            optimiser.zero_grad()
        objective = call(b, losses, step)
        objective.backward()
        if optimiser is not None:
            optimiser.step()
        trajectory.append(b.weights)
        if step % 3 == 1:  # epochs of 3 steps, closed mid-way through the save point too
            b.end_epoch()
    return trajectory


def _check_same_trajectory(name: str, save_load) -> None:
    reference = make_balancer(name, K)
    expected = _run(reference, _optimiser(reference), range(20))

    first = make_balancer(name, K)
    first_optimiser = _optimiser(first)
    got = _run(first, first_optimiser, range(10))
    state = save_load(first.state_dict())
    optimiser_state = save_load(first_optimiser.state_dict()) if first_optimiser else None
    del first, first_optimiser

    resumed = make_balancer(name, K)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.weights, got[-1], rtol=0, atol=0)
    resumed_optimiser = _optimiser(resumed)
    if resumed_optimiser is not None:
        resumed_optimiser.load_state_dict(optimiser_state)
    got += _run(resumed, resumed_optimiser, range(10, 20))
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        torch.testing.assert_close(have, want, rtol=0, atol=0, msg=f"{name}, step {step}")
    if name in LEARNED_METHODS:
        torch.testing.assert_close(resumed.log_scales, reference.log_scales, rtol=0, atol=0)


@pytest.mark.parametrize("name", tb.available())
def test_resume_from_state_dict_continues_the_trajectory(name):
    _check_same_trajectory(name, lambda state: state)


def _through_bytes(weights_only: bool):
    def save_load(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=weights_only)

    return save_load


@pytest.mark.parametrize("name", tb.available())
def test_resume_through_torch_save_weights_only(name):
    """``torch.load(..., weights_only=True)`` suffices: the state holds only tensors and dicts
    (RLW's generator state is a uint8 tensor in ``_extra_state``)."""
    _check_same_trajectory(name, _through_bytes(weights_only=True))


def test_resume_through_torch_save_full_pickle():
    _check_same_trajectory("rlw", _through_bytes(weights_only=False))


def test_learned_methods_expose_their_parameters():
    for name in tb.available():
        b = make_balancer(name, K)
        params = list(b.parameters())
        if name in LEARNED_METHODS:
            assert len(params) == 1
            assert params[0].shape == (K,)
        else:
            assert params == [], f"{name} has unexpected learnable parameters"


def test_dwa_window_resumes_mid_window():
    def run(b, steps):
        out = []
        for step in steps:
            b(losses_for(step, K).requires_grad_())
            out.append(b.weights)
        return out

    reference = tb.create("dwa", num_tasks=K, window=4)
    expected = run(reference, range(17))
    first = tb.create("dwa", num_tasks=K, window=4)
    got = run(first, range(7))  # mid-way through the second window
    resumed = tb.create("dwa", num_tasks=K, window=4)
    resumed.load_state_dict(first.state_dict())
    got += run(resumed, range(7, 17))
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=0)


def test_rlw_state_dict_carries_the_generator():
    b = tb.create("rlw", num_tasks=4, seed=3)
    for _ in range(3):
        b(torch.ones(4, requires_grad=True))
    state = b.state_dict()
    assert "_extra_state" in state
    other = tb.create("rlw", num_tasks=4, seed=99)  # a different seed is overwritten by the state
    other.load_state_dict(state)
    b(torch.ones(4, requires_grad=True))
    other(torch.ones(4, requires_grad=True))
    assert torch.equal(b.weights, other.weights)


def test_state_dict_of_a_different_size_is_refused():
    b = tb.create("dwa", num_tasks=3)
    with pytest.raises(RuntimeError, match="saved with num_tasks=2"):
        b.load_state_dict(tb.create("dwa", num_tasks=2).state_dict())


@pytest.mark.parametrize("name", ["upgrad", "gradvac", "pcgrad"])
def test_params_may_change_on_resume_when_no_state_follows_them(name):
    """params= is saved as shapes: after allow_changed_hyperparameters('params') a method whose
    state does not depend on them loads, and continues exactly as the saved balancer."""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))
    saved = tb.create(name, num_tasks=2, params=list(trunk[2].parameters()))
    z = trunk(torch.randn(3, 4))
    saved(torch.stack([(z**2).mean(), z.mean() ** 2])).backward()
    resumed = tb.create(name, num_tasks=2, params=list(trunk.parameters()))
    with pytest.raises(RuntimeError, match=r"allow_changed_hyperparameters\('params'\)"):
        resumed.load_state_dict(saved.state_dict())
    resumed.allow_changed_hyperparameters("params").load_state_dict(saved.state_dict())
    assert torch.equal(resumed.weights, saved.weights)
    assert int(resumed.num_steps) == int(saved.num_steps) == 1


def test_params_change_is_refused_for_state_shaped_by_them():
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))
    saved = tb.create("db_mtl", num_tasks=2, params=list(trunk[2].parameters()))
    resumed = tb.create("db_mtl", num_tasks=2, params=list(trunk.parameters()))
    resumed.allow_changed_hyperparameters("params")
    before = {
        key: value.clone() for key, value in resumed.state_dict().items() if torch.is_tensor(value)
    }
    with pytest.raises(
        RuntimeError,
        match=r"'grad_averages' has shape \(2, 35\), expected \(2, 65\): its shape follows",
    ):
        resumed.load_state_dict(saved.state_dict())
    after = resumed.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())


def test_upgrad_resumes_exactly_where_its_solver_starts_from_the_last_steps_active_sets(
    monkeypatch,
):
    """At K = 12 UPGrad's K problems go to the batched solver, which starts each step from the
    last one's active sets (not state): a resumed balancer starts cold, and must still give the
    uninterrupted run's weights bit for bit."""
    K12 = 12
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(K12, 30, generator=generator, dtype=torch.float64)
    drift = torch.randn(20, K12, 30, generator=generator, dtype=torch.float64) * 0.05
    grams = [(jacobian + drift[: t + 1].sum(0)) @ (jacobian + drift[: t + 1].sum(0)).T
             for t in range(20)]  # fmt: skip
    losses = torch.ones(K12)
    solves = []
    batched = dual_cone._nnqp_batched
    monkeypatch.setattr(
        dual_cone, "_nnqp_batched", lambda *args: solves.append(args[-1]) or batched(*args)
    )
    reference = tb.create("upgrad", num_tasks=K12)
    expected = [reference.compute_weights(losses, gram=gram) for gram in grams]
    # one batched solve per step, none started over cold: every started solve was kept
    assert len(solves) == 20

    first = tb.create("upgrad", num_tasks=K12)
    got = [first.compute_weights(losses, gram=gram) for gram in grams[:10]]
    resumed = tb.create("upgrad", num_tasks=K12)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.compute_weights(losses, gram=gram) for gram in grams[10:]]
    for step, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(have, want), step
