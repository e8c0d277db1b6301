"""A balancer inside a DDP + autocast training loop, on two CPU processes.

Each rank trains the same two-task model on its own shard with DistributedDataParallel (gloo)
under bfloat16 autocast, balancing the tasks with a gradient method in features mode. The
script checks what a user would worry about: both ranks compute identical weights at every
step and their models stay identical. Runs in a few seconds:

    python examples/ddp_amp.py [method]        # default: nash_mtl
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import taskbalance as tb

STEPS = 20
WORLD_SIZE = 2


class TwoTaskModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32))
        self.classify = nn.Linear(32, 4)
        self.regress = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.trunk(x)
        return z, self.classify(z), self.regress(z).squeeze(1)


def train(rank: int, method: str, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial model on every rank
    model = nn.parallel.DistributedDataParallel(TwoTaskModel())
    balancer = tb.create(method, num_tasks=2)
    optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=1e-2)

    shard = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    history = []
    for _ in range(STEPS):
        x = torch.randn(64, 16, generator=shard)
        label = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
        target = 100.0 * x[:, 2]  # a regression in large raw units
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, logits, prediction = model(x)
            losses = torch.stack(
                [
                    nn.functional.cross_entropy(logits.float(), label),
                    nn.functional.mse_loss(prediction.float(), target),
                ]
            )
        optimizer.zero_grad()
        balancer(losses, features=z).backward()  # one ordinary backward: DDP all-reduces it
        optimizer.step()
        history.append(balancer.weights)
    parameters = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.save({"weights": torch.stack(history), "parameters": parameters}, f"{out}/{rank}.pt")
    # End without tearing torch down: torch 2.13 can hang or abort a gloo rank at exit (see
    # end_rank in examples/ddp_unused_parameters.py, and docs/recipes/ddp.md).
    os._exit(0)


def main() -> None:
    method = sys.argv[1] if len(sys.argv) > 1 else "nash_mtl"
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(train, args=(method, str(Path(folder) / "store"), folder), nprocs=WORLD_SIZE)
        ranks = [torch.load(Path(folder) / f"{rank}.pt") for rank in range(WORLD_SIZE)]
    same_weights = torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    same_models = torch.equal(ranks[0]["parameters"], ranks[1]["parameters"])
    print(f"{method}: weights of the last step {ranks[0]['weights'][-1].tolist()}")
    print(f"identical weights on both ranks at every step: {same_weights}")
    print(f"identical models on both ranks after {STEPS} steps: {same_models}")
    if not (same_weights and same_models):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
