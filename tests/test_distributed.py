"""Every rank of a 2-process run computes identical weights.

One spawn of two CPU processes (gloo, file:// rendezvous) drives every method with different
local losses, KPIs and (for gradient methods) task gradients on each rank. The weights must
agree across ranks; loss-based methods must also equal a single-process run fed the
rank-averaged losses and KPIs; for the methods with learnable log-scales (UW, IMTL-L) an SGD
step on their parameters each step must keep them identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import taskbalance as tb
from conftest import (
    LEARNED_METHODS,
    LOSS_METHODS,
    coupling,
    directions_for,
    gloo_group,
    kpis_for,
    loss_gradient,
    losses_for,
    make_balancer,
    run_ranks,
    shared_features,
)

K = 3
STEPS = 7
WORLD_SIZE = 2


def _end_epoch_after(step: int) -> bool:
    return step % 2 == 1


def _drive(name: str, local_losses, local_kpis, rank: int = 0):
    """Run one method over STEPS steps; returns weights, objectives' loss-grads and parameters.

    Gradient methods get features whose task gradients differ from rank to rank, so their
    local Gramians differ and only the engine's all-reduce can make the ranks agree."""
    b = make_balancer(name, K)
    params = list(b.parameters())  # stepped by plain SGD (lr 0.3), written out: torch.optim's
    # first step costs seconds of imports in each fresh process
    weights, grads, expected_grads, log_scales = [], [], [], []
    for step in range(STEPS):
        losses = local_losses(step).requires_grad_(True)
        kwargs = {"kpis": local_kpis(step)} if b.requires_kpis else {}
        objective_losses = losses
        if b.requires_gram:
            directions = directions_for(step + 100 * rank, K)
            if b.shared_params is None:
                features = shared_features()
                kwargs["features"] = features
            else:  # a parameters-only method (MoCo): its shared parameter
                features = b.shared_params[0]
            objective_losses = losses + coupling(directions, features)
        for param in params:
            param.grad = None
        objective = b(objective_losses, **kwargs)
        objective.backward()
        if params:
            with torch.no_grad():
                for param in params:
                    param.sub_(0.3 * param.grad)
            log_scales.append(b.log_scales.detach().clone())
        weights.append(b.weights)
        grads.append(losses.grad.clone())
        expected_grads.append(loss_gradient(b))
        if _end_epoch_after(step):
            b.end_epoch()
    return {
        "weights": weights,
        "grads": grads,
        "expected_grads": expected_grads,
        "log_scales": log_scales,
    }


def _worker(rank: int, store: str, out_dir: str) -> None:
    with gloo_group(rank, store, WORLD_SIZE):
        results = {
            name: _drive(
                name,
                lambda step: losses_for(step, K, rank=rank),
                lambda step: kpis_for(step, K, rank=rank),
                rank=rank,
            )
            for name in tb.available()
        }
        for name in LOSS_METHODS:
            b = make_balancer(name, K)
            computed = []
            for step in range(STEPS):
                kpis = kpis_for(step, K, rank=rank) if b.requires_kpis else None
                computed.append(b.compute_weights(losses_for(step, K, rank=rank), kpis=kpis))
                if _end_epoch_after(step):
                    b.end_epoch()
            results[name]["computed"] = computed
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _mean_losses(step: int) -> torch.Tensor:
    return sum(losses_for(step, K, rank=r) for r in range(WORLD_SIZE)) / WORLD_SIZE


def _mean_kpis(step: int) -> torch.Tensor:
    return sum(kpis_for(step, K, rank=r) for r in range(WORLD_SIZE)) / WORLD_SIZE


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory):
    return run_ranks(_worker, tmp_path_factory.mktemp("ddp"), WORLD_SIZE)


@pytest.mark.parametrize("name", tb.available())
def test_ranks_agree(rank_results, name):
    rank0, rank1 = (results[name] for results in rank_results)
    for step, (w0, w1) in enumerate(zip(rank0["weights"], rank1["weights"], strict=True)):
        torch.testing.assert_close(w0, w1, rtol=0, atol=0, msg=f"{name}, step {step}")
    # each rank's own losses get the shared weights as their gradient
    for step, (g0, e0) in enumerate(zip(rank0["grads"], rank0["expected_grads"], strict=True)):
        torch.testing.assert_close(g0, e0, msg=f"{name}, step {step}")
    for step, (s0, s1) in enumerate(zip(rank0["log_scales"], rank1["log_scales"], strict=True)):
        torch.testing.assert_close(s0, s1, rtol=0, atol=0, msg=f"{name}, step {step}")
    if name in LEARNED_METHODS:
        assert len(rank0["log_scales"]) == STEPS
        assert not torch.equal(rank0["log_scales"][-1], rank0["log_scales"][0])


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_ranks_equal_single_process_on_averaged_statistics(rank_results, name):
    reference = _drive(name, _mean_losses, _mean_kpis)
    got = rank_results[0][name]
    for step, (want, have) in enumerate(zip(reference["weights"], got["weights"], strict=True)):
        torch.testing.assert_close(have, want, rtol=1e-6, atol=1e-7, msg=f"{name}, step {step}")
    for step, (want, have) in enumerate(
        zip(reference["log_scales"], got["log_scales"], strict=True)
    ):
        torch.testing.assert_close(have, want, rtol=1e-6, atol=1e-7, msg=f"{name}, step {step}")


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_compute_weights_ranks_agree(rank_results, name):
    rank0, rank1 = (results[name]["computed"] for results in rank_results)
    for step, (w0, w1) in enumerate(zip(rank0, rank1, strict=True)):
        torch.testing.assert_close(w0, w1, rtol=0, atol=0, msg=f"{name}, step {step}")


def test_the_refusal_flag_goes_to_the_first_tensor_of_the_call():
    """A refused call's flag must reach the device the other ranks reduce on (the losses')."""
    from taskbalance._distributed import collective_device, first_tensor

    loss = torch.ones(())
    assert first_tensor([1.0, loss], None) is loss
    assert first_tensor(None, (2.0, loss)) is loss
    assert first_tensor("ab", 3.0) is None
    meta = torch.empty((), device="meta")
    assert collective_device(meta, torch.device("cpu")) == torch.device("meta")
    assert collective_device(None, torch.device("cpu")) == torch.device("cpu")
