"""Partially labelled data: tasks without labels in a batch are left out with ``present=``.

Each sample carries labels for a random subset of the three tasks. A task with no labelled
sample in a batch has a NaN loss (the mean over zero samples); ``present=`` marks it absent, so
it gets weight 0 and no gradient, and its statistics see no new value (a gradient method such
as MGDA reuses its last weights for the present tasks). Under DDP a task is present where any
rank has it. Runs in seconds:

    python examples/loop_partial_labels.py
"""

from __future__ import annotations

import torch
from torch import nn

import taskbalance as tb

K = 3
STEPS = 150
LABEL_RATE = 0.2  # a batch of 8 misses some task's labels about 43% of the time


def main() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(K)])
    balancer = tb.create("mgda", num_tasks=K)
    optimiser = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=0.02)
    directions = torch.randn(6, K)
    test_inputs = torch.randn(512, 6)

    def test_errors() -> list[float]:
        with torch.no_grad():
            features = trunk(test_inputs)
            targets = test_inputs @ directions
            return [
                round(((head(features).squeeze(1) - targets[:, k]) ** 2).mean().item(), 3)
                for k, head in enumerate(heads)
            ]

    before = test_errors()
    absent_batches = 0
    for _ in range(STEPS):
        inputs = torch.randn(8, 6)
        targets = inputs @ directions
        labelled = torch.rand(8, K) < LABEL_RATE
        features = trunk(inputs)
        losses = torch.stack(
            [
                ((head(features).squeeze(1) - targets[:, k])[labelled[:, k]] ** 2).mean()
                for k, head in enumerate(heads)
            ]
        )
        present = labelled.any(dim=0)
        if not present.any():
            continue  # nothing labelled at all: no step
        absent_batches += int(not present.all())
        objective = balancer(losses, features=features, present=present)
        optimiser.zero_grad()
        objective.backward()
        optimiser.step()

    after = test_errors()
    print(f"batches with an absent task: {absent_batches} of {STEPS}")
    print(f"test errors before: {before}")
    print(f"test errors after : {after}")
    print(f"every task improved: {all(a < b for a, b in zip(after, before, strict=True))}")


if __name__ == "__main__":
    main()
