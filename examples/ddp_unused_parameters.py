"""A balancer under DDP(find_unused_parameters=True), on two CPU processes.

With ``find_unused_parameters=True`` DDP routes every tensor the forward returns through a new
autograd node, so a forward that returns ``(z, head outputs)`` hands back a ``z`` that no loss
reaches: the heads read the ``z`` inside the forward. Passed as ``features=z``, it is refused
with a ``ValueError`` naming ``features`` (before this was checked, the Gramian was silently
zero). The pattern that works: take ``z`` inside the forward, where the heads read it — here a
forward hook on the trunk. The script checks the pitfall raises on both ranks, and that the
pattern's weights and trained model equal a single-process run on the concatenated data:

    python examples/ddp_unused_parameters.py [method]        # default: mgda
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import taskbalance as tb

STEPS = 5
WORLD_SIZE = 2
K = 2
SHARD = 8  # samples per rank


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(K)])
        self.auxiliary = nn.Linear(8, 1)  # not used by this loss: why find_unused_parameters

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x)
        return z, torch.cat([head(z) for head in self.heads], dim=1)


def shard(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(SHARD, 6, generator=data)
    return x, torch.stack([x[:, 0] * 3.0, x[:, 1].sign()], dim=1)


def task_losses(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean(dim=0)  # [K]; equal shards: the mean over ranks


def train_rank(rank: int, method: str, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial model on every rank
    model = nn.parallel.DistributedDataParallel(Model(), find_unused_parameters=True)
    balancer = tb.create(method, num_tasks=K)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    # The pitfall: z from the DDP model's outputs went through DDP's new autograd node.
    x, targets = shard(rank, 0)
    z, outputs = model(x)
    try:
        tb.create(method, num_tasks=K)(task_losses(outputs, targets), features=z)
        refused = False
    except ValueError as error:
        refused = str(error).startswith("features: no task loss reaches it")
    model.zero_grad()  # DDP still expects this forward's backward: give it one, gradient-free
    (outputs.sum() * 0.0).backward()

    # The pattern: the features the heads read, caught inside the forward.
    caught: dict[str, torch.Tensor] = {}
    model.module.trunk.register_forward_hook(lambda module, args, z: caught.update(z=z))
    history = []
    for step in range(STEPS):
        x, targets = shard(rank, step)
        _, outputs = model(x)
        optimizer.zero_grad()
        balancer(task_losses(outputs, targets), features=caught.pop("z")).backward()
        optimizer.step()
        history.append(balancer.weights)
    parameters = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    torch.save(
        {"refused": refused, "weights": torch.stack(history), "parameters": parameters},
        f"{out}/{rank}.pt",
    )
    end_rank()


def train_single_process(method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same steps in one process on both ranks' shards: the reference."""
    torch.manual_seed(0)
    model = Model()
    balancer = tb.create(method, num_tasks=K)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for step in range(STEPS):
        shards = [shard(rank, step) for rank in range(WORLD_SIZE)]
        z, outputs = model(torch.cat([x for x, _ in shards]))
        losses = task_losses(outputs, torch.cat([t for _, t in shards]))
        optimizer.zero_grad()
        balancer(losses, features=z).backward()
        optimizer.step()
        history.append(balancer.weights)
    return torch.stack(history), torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def compare_with_single_process(method: str, ranks: list[dict]) -> bool:
    """Print how the ranks' weights and models compare with the single-process run."""
    weights, parameters = train_single_process(method)
    same_ranks = torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    error = max(
        (ranks[0]["weights"] - weights).abs().max().item(),
        (ranks[0]["parameters"] - parameters).abs().max().item(),
    )
    print(f"{method}: weights of the last step {[round(w, 4) for w in weights[-1].tolist()]}")
    print(f"identical weights on both ranks at every step: {same_ranks}")
    print(f"largest difference from the single-process run: {error:.2e}")
    print(f"weights and model equal the single-process run: {error <= 1e-5}")
    return same_ranks and error <= 1e-5


def end_rank() -> NoReturn:
    """End this rank's process once its results are saved, without tearing torch down.

    torch 2.13 can hang or abort a gloo rank at exit, with or without a balancer: gloo's
    worker thread needs the GIL to free the last DDP all-reduce, whose thread-local state
    holds the Python context ``backward()`` stashes there, while the main thread holds the
    GIL to tear the process group down or to finalize the interpreter (docs/recipes/ddp.md,
    "Ending a rank"; scripts/ddp_teardown.py measures it). Called while the model is still
    alive, so nothing of it is freed; an exception raised before it still propagates.
    """
    os._exit(0)


def spawn(train_rank, method: str) -> list[dict]:
    """Run ``train_rank(rank, method, store, folder)`` on WORLD_SIZE processes; their results."""
    with tempfile.TemporaryDirectory() as folder:
        store = str(Path(folder) / "store")
        mp.spawn(train_rank, args=(method, store, folder), nprocs=WORLD_SIZE)
        return [torch.load(Path(folder) / f"{rank}.pt") for rank in range(WORLD_SIZE)]


def check(train_rank, refusal: str) -> None:
    """Train on both ranks, print that each refused the pitfall and matches the reference."""
    method = sys.argv[1] if len(sys.argv) > 1 else "mgda"
    ranks = spawn(train_rank, method)
    refused = all(rank["refused"] for rank in ranks)
    print(f"{refusal} on every rank: {refused}")
    if not (compare_with_single_process(method, ranks) and refused):
        raise SystemExit(1)


def main() -> None:
    check(train_rank, "z from the DDP outputs refused")


if __name__ == "__main__":
    main()
