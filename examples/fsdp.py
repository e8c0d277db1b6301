"""A balancer under FSDP2 (``fully_shard``), on two CPU processes.

Features mode works under FSDP2 as under DDP: the features ``z`` are an ordinary tensor, the
engine's per-task backward passes run through the heads (FSDP gathers their parameters as for
any backward), and the Gramian is all-reduced over the ranks. Parameters mode needs the task
gradients with respect to the parameters, but FSDP2's parameters are sharded DTensors and the
forward runs on gathered copies: it is refused with a ``ValueError`` naming ``params``. The
script checks both, and that the sharded run's weights and trained model equal a
single-process run on the concatenated data:

    python examples/fsdp.py [method]        # default: mgda
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

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
    torch.manual_seed(0)  # same initial model on every rank, then sharded
    model = Model()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    fully_shard(model.trunk, mesh=mesh)
    fully_shard(model, mesh=mesh)

    balancer = tb.create(method, num_tasks=K)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for step in range(STEPS):
        z, outputs, targets = _forward(model, rank, step, keep_features=True)
        optimizer.zero_grad()
        balancer(task_losses(outputs, targets), features=z).backward()
        optimizer.step()
        history.append(balancer.weights)
    full = [p.full_tensor().reshape(-1) for p in model.parameters()]  # gathers the shards
    # Parameters mode: the trunk's parameters are sharded DTensors, and refused. (After the
    # training: a forward whose backward never runs would upset FSDP's next step.)
    sharded = list(model.trunk.parameters())  # what params= would hold from construction
    try:
        tb.gramian(task_losses(*_forward(model, rank, 0)), sharded)
        refused = ""
    except ValueError as error:
        refused = str(error)
    torch.save(
        {"refused": refused, "weights": torch.stack(history), "parameters": torch.cat(full)},
        f"{out}/{rank}.pt",
    )
    dist.destroy_process_group()


def _forward(model: nn.Module, rank: int, step: int, keep_features: bool = False):
    x, targets = shard(rank, step)
    z, outputs = model(x)
    return (z, outputs, targets) if keep_features else (outputs, targets)


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


def main() -> None:
    method = sys.argv[1] if len(sys.argv) > 1 else "mgda"
    with tempfile.TemporaryDirectory() as folder:
        store = str(Path(folder) / "store")
        mp.spawn(train_rank, args=(method, store, folder), nprocs=WORLD_SIZE)
        ranks = [torch.load(Path(folder) / f"{rank}.pt") for rank in range(WORLD_SIZE)]
    weights, parameters = train_single_process(method)
    same_ranks = torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    error = max(
        (ranks[0]["weights"] - weights).abs().max().item(),
        (ranks[0]["parameters"] - parameters).abs().max().item(),
    )
    matches = error <= 1e-5
    print(f"{method}: weights of the last step {[round(w, 4) for w in weights[-1].tolist()]}")
    refused = [rank["refused"].startswith("params[0]: a sharded DTensor") for rank in ranks]
    print(f"parameters mode with sharded parameters refused on every rank: {all(refused)}")
    print(f"identical weights on both ranks at every step: {same_ranks}")
    print(f"largest difference from the single-process run: {error:.2e}")
    print(f"weights and model equal the single-process run: {matches}")
    if not (all(refused) and same_ranks and matches):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
