"""A balancer under FSDP2 (``fully_shard``), on two CPU processes.

Features mode works under FSDP2 as under DDP: the features ``z`` are an ordinary tensor, the
engine's per-task backward passes run through the heads (FSDP gathers their parameters as for
any backward), and the Gramian is all-reduced over the ranks. Parameters mode needs the task
gradients with respect to the parameters, but FSDP2's parameters are sharded DTensors and the
forward runs on gathered copies: it is refused with a ``ValueError`` naming ``params``. The
script checks both, and that the sharded run's weights and trained model equal a
single-process run on the concatenated data (the model, data and reference of
``ddp_unused_parameters.py``):

    python examples/fsdp.py [method]        # default: mgda
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import taskbalance as tb
from ddp_unused_parameters import (
    STEPS,
    WORLD_SIZE,
    K,
    Model,
    check,
    end_rank,
    shard,
    task_losses,
)


def train_rank(rank: int, method: str, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial model on every rank, then sharded
    model = Model()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    fully_shard(model.trunk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = list(model.trunk.parameters())  # DTensors: what params= would hold

    balancer = tb.create(method, num_tasks=K)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for step in range(STEPS):
        x, targets = shard(rank, step)
        z, outputs = model(x)
        optimizer.zero_grad()
        balancer(task_losses(outputs, targets), features=z).backward()
        optimizer.step()
        history.append(balancer.weights)
    parameters = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])

    # Parameters mode: refused. (After the training: a forward whose backward never runs would
    # upset FSDP's next step.)
    x, targets = shard(rank, 0)
    try:
        tb.gramian(task_losses(model(x)[1], targets), sharded)
        refused = False
    except ValueError as error:
        refused = str(error).startswith("params[0]: a sharded DTensor")
    torch.save(
        {"refused": refused, "weights": torch.stack(history), "parameters": parameters},
        f"{out}/{rank}.pt",
    )
    end_rank()


def main() -> None:
    check(train_rank, "parameters mode with sharded parameters refused")


if __name__ == "__main__":
    main()
