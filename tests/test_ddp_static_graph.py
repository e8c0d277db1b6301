"""DDP(static_graph=True): refused where it would silently stop the gradient averaging.

On its first iteration such a DDP routes its outputs through a node whose backward queues the
step's one all-reduce on the first backward pass that reaches it: a gradient method's first
per-task pass, before any ``.grad`` exists. The ranks then kept their own gradients at every
step (found by a real-loop audit: parameters 8e-2 apart after three steps). The call is now
refused on every rank; called inside the DDP module's forward (as Lightning does), the
balancer's passes do not reach that node and the gradients are averaged.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

import taskbalance as tb
from conftest import gloo_group, run_ranks

K = 2


class _Net(nn.Module):
    def __init__(self, balancer: tb.Balancer | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(K)])
        self.balancer = balancer

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = self.trunk(x)
        self.features = z  # caught inside the forward: DDP's outputs are copies outside it
        losses = torch.stack(
            [((head(z).squeeze(1) - y[:, k]) ** 2).mean() for k, head in enumerate(self.heads)]
        )
        if self.balancer is not None:  # inside the forward, as Lightning's training_step
            return (self.balancer(losses, features=z),)
        return (losses,)


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(10 + rank)
    return torch.randn(6, 3, generator=generator), torch.randn(6, K, generator=generator)


def _gradient(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _worker(rank: int, store: str, out_dir: str) -> None:
    parallel = nn.parallel.DistributedDataParallel
    with gloo_group(rank, store):
        x, y = _batch(rank)
        balancer = tb.create("mgda", num_tasks=K)
        before = copy.deepcopy(balancer.state_dict())  # state_dict() shares the buffers
        net = _Net()
        outside = parallel(net, static_graph=True)
        (losses,) = outside(x, y)
        try:
            balancer(losses, features=net.features)
            message = ""
        except ValueError as error:
            message = str(error)
        after = balancer.state_dict()
        unchanged = before.keys() == after.keys() and all(
            torch.equal(before[key], after[key]) if isinstance(before[key], torch.Tensor)
            else before[key] == after[key]
            for key in before
        )  # fmt: skip
        inside = parallel(_Net(tb.create("mgda", num_tasks=K)), static_graph=True)
        for _ in range(2):  # the first iteration is the one that queues the all-reduce
            inside.zero_grad()
            inside(x, y)[0].backward()
        torch.save(
            {
                "message": message,
                "state_unchanged": unchanged,
                "inside_gradient": _gradient(inside),
            },
            f"{out_dir}/rank{rank}.pt",
        )
        # DDP's all-reduces from a backward can hang gloo's teardown (docs/recipes/ddp.md,
        # "Ending a rank"): every rank has saved its results, so end without one
        torch.distributed.barrier()
        os._exit(0)


def test_static_graph_ddp_is_refused_on_every_rank_and_works_inside_the_forward(tmp_path):
    results = run_ranks(_worker, tmp_path, 2)
    for result in results:
        assert "static_graph=True" in result["message"]
        assert "static_graph=False" in result["message"]
        assert result["state_unchanged"]
    # the gradients differ between the ranks' shards: equal only where DDP averaged them
    assert torch.equal(results[0]["inside_gradient"], results[1]["inside_gradient"])
