"""Gradient accumulation: one balancer call per micro-batch, one balancer step per window.

With ``accumulation_steps=N`` the weights are computed at the first call of each window of N
micro-batches and kept for the other N − 1, so the balancer's statistics (here FAMO's loss
differences) count optimiser steps, not micro-batches. The same holds with Lightning's
``accumulate_grad_batches=N`` (one balancer call per ``training_step``). Runs in seconds:

    python examples/loop_accumulation.py
"""

from __future__ import annotations

import torch
from torch import nn

import taskbalance as tb

ACCUMULATION = 4
STEPS = 10


def main() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(2)])
    balancer = tb.create("famo", num_tasks=2, accumulation_steps=ACCUMULATION)
    optimiser = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    directions = torch.randn(6, 2)

    fixed_within_windows = True
    for _ in range(STEPS):
        optimiser.zero_grad()
        window_weights = None
        for _ in range(ACCUMULATION):
            inputs = torch.randn(16, 6)
            targets = inputs @ directions
            features = trunk(inputs)
            losses = torch.stack(
                [
                    ((head(features).squeeze(1) - targets[:, k]) ** 2).mean()
                    for k, head in enumerate(heads)
                ]
            )
            # Divide by N as any accumulation loop does: the gradients add up over the window.
            (balancer(losses) / ACCUMULATION).backward()
            if window_weights is None:
                window_weights = balancer.weights
            fixed_within_windows &= torch.equal(window_weights, balancer.weights)
        optimiser.step()

    print(f"optimiser steps: {STEPS}, balancer calls: {int(balancer.num_calls)}")
    print(f"balancer steps: {int(balancer.num_steps)}")
    print(f"weights fixed within each window: {fixed_within_windows}")
    print(f"final weights: {balancer.weights.tolist()}")


if __name__ == "__main__":
    main()
