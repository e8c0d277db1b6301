"""Train a small two-task model with uncertainty weighting and print what it learned.

Two regression targets share one trunk; their noise levels differ 16-fold (σ = 0.5 and 2), so
uncertainty weighting should learn noise variances near 0.25 and 4 and down-weight the noisy
task. Runs in a few seconds on a CPU:

    python examples/quickstart.py
"""

from __future__ import annotations

import torch
from torch import nn

import taskbalance as tb


def main() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(4000, 8)
    directions = torch.randn(8, 2)
    noise_std = torch.tensor([0.5, 2.0])
    targets = inputs @ directions + noise_std * torch.randn(4000, 2)

    trunk = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32))
    heads = nn.ModuleList([nn.Linear(32, 1) for _ in range(2)])
    balancer = tb.create("uw", num_tasks=2)
    optimiser = torch.optim.Adam(
        [*trunk.parameters(), *heads.parameters(), *balancer.parameters()], lr=0.02
    )

    for _ in range(600):
        features = trunk(inputs)
        predictions = [head(features).squeeze(1) for head in heads]
        losses = torch.stack(
            [nn.functional.mse_loss(pred, targets[:, k]) for k, pred in enumerate(predictions)]
        )
        objective = balancer(losses)  # one line: weights for this step, objective to backward
        optimiser.zero_grad()
        objective.backward()
        optimiser.step()

    print("task                 : noisy-0.5  noisy-2.0")
    print(f"true noise variance  : {noise_std[0] ** 2:9.3f}  {noise_std[1] ** 2:9.3f}")
    variances = balancer.variances
    print(f"learned exp(s)       : {variances[0]:9.3f}  {variances[1]:9.3f}")
    print(f"loss weights ½e^(-s) : {balancer.weights[0]:9.3f}  {balancer.weights[1]:9.3f}")


if __name__ == "__main__":
    main()
