"""Uncertainty weighting recovers the known noise variances of regression tasks.

Kendall, Gal & Cipolla's regression term ``½·e^{−s}·L + ½·s`` is minimised over ``s`` at
``e^{s} = L``; once the model fits the clean signal, the MSE of each task is its noise variance,
so ``b.variances`` must recover σ_k².
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import taskbalance as tb


@pytest.fixture
def one_thread():
    """A tiny model: threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_uw_recovers_noise_variances():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the layers' initialisation
    sigmas = torch.tensor([0.5, 2.0, 8.0])
    n, d, K = 4000, 5, 3
    x = torch.randn(n, d, generator=generator)
    a = torch.randn(d, K, generator=generator)
    noise = torch.randn(n, K, generator=generator)
    noise = (noise - noise.mean(0)) / noise.std(0, unbiased=False)  # unit sample variance
    y = x @ a + sigmas * noise

    # A shared linear trunk and K linear heads (one Linear with K outputs).
    trunk, heads = nn.Linear(d, 16), nn.Linear(16, K)
    b = tb.create("uw", num_tasks=K)
    optimiser = torch.optim.Adam(
        [
            {"params": [*trunk.parameters(), *heads.parameters()], "lr": 0.02},
            {"params": b.parameters(), "lr": 0.1, "betas": (0.9, 0.99)},
        ]
    )
    # Halve the model's learning rate every 100 steps; keep the log-variances' constant.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, [lambda step: 0.5 ** (step // 100), lambda step: 1.0]
    )
    for _ in range(400):
        optimiser.zero_grad()
        losses = ((heads(trunk(x)) - y) ** 2).mean(0)  # per-task MSE, [K]
        b(losses).backward()
        optimiser.step()
        scheduler.step()

    variances = b.variances
    torch.testing.assert_close(variances, sigmas**2, rtol=0.05, atol=0)
    # The model fits the clean signal: each task's MSE is its noise variance.
    torch.testing.assert_close(losses.detach(), sigmas**2, rtol=0.01, atol=0)
    # The learned variances sit at the optimum of s: e^{s} equals each task's MSE.
    torch.testing.assert_close(variances, losses.detach(), rtol=0.01, atol=0)
    # And the weights are ½/σ²: the noisiest task counts least.
    torch.testing.assert_close(b.weights, 0.5 / variances)
