"""A balancer's collectives carry no Python object into gloo's worker threads.

torch 2.13 can abort (``terminate called without an active exception``) or hang a gloo rank at
exit: each gloo work keeps a copy of the issuing thread's ``at::ThreadLocalState``, gloo's
worker thread frees the work once it completes, and freeing a Python object held there needs
the GIL, which the main thread may be holding while it tears the group down or finalizes the
interpreter. The Python object is the ``contextvars.Context`` that ``backward()`` stashes in
that state, so the works at risk are the ones created during a backward: DDP's gradient
all-reduces (see docs/recipes/ddp.md, "Ending a rank"). These tests pin down that the
balancer adds none: every all-reduce it issues in a DDP training step, in features mode,
parameters mode and for a learned-weights method, sees no Python object in the thread-local
state, while DDP's own all-reduces in the same step do (the control: the probe does see one).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import taskbalance as tb
from conftest import run_ranks

K = 2
STEPS = 2
#: The keys torch 2.13 stashes Python objects under in the thread-local state
#: (torch._C._stash_obj_in_tls: autograd's backward, inductor's CUDA graph trees).
STASHED_KEYS = ("context", "tree_manager_containers", "tree_manager_locks")


def python_objects_in_thread_state() -> list[str]:
    """What of the thread-local state a gloo work copies holds a Python object, by name."""
    held = [f"stash:{key}" for key in STASHED_KEYS if torch._C._is_key_in_tls(key)]
    if torch._C._len_torch_function_stack():
        held.append("torch_function_mode")
    if torch._C._len_torch_dispatch_stack():
        held.append("torch_dispatch_mode")
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        held.append("saved_tensors_hooks")
    return held


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(K)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x)
        return z, torch.cat([head(z) for head in self.heads], dim=1)


@contextlib.contextmanager
def probed_collectives(seen: list[tuple[str, list[str]]], where: list[str]) -> Iterator[None]:
    """Record, for every ``dist.all_reduce``, who issued it and the Python state it captures."""
    original = dist.all_reduce

    def probed(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append((where[-1], python_objects_in_thread_state()))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = probed  # taskbalance._distributed looks it up at each call
    try:
        yield
    finally:
        dist.all_reduce = original


def _train(rank: int, name: str, seen: list[tuple[str, list[str]]], where: list[str]) -> None:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Model())

    # Unannotated: DDP refuses a hook whose annotations are strings (future annotations here).
    def ddp_hook(state, bucket):
        where.append("ddp")  # DDP's default all-reduce, through the probed dist.all_reduce
        try:
            return default_hooks.allreduce_hook(state, bucket)
        finally:
            where.pop()

    model.register_comm_hook(None, ddp_hook)
    options = {"params": list(model.module.trunk.parameters())} if name == "mgda-params" else {}
    balancer = tb.create(name.removesuffix("-params"), num_tasks=K, **options)
    balancer.register_forward_pre_hook(lambda module, args: where.append("balancer"))
    balancer.register_forward_hook(lambda module, args, output: where.remove("balancer"))
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.1)
    for step in range(STEPS):
        data = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(8, 6, generator=data)
        z, outputs = model(x)
        losses = ((outputs - x[:, :K]) ** 2).mean(dim=0)
        optimizer.zero_grad()
        features = z if name == "mgda" else None
        balancer(losses, features=features).backward()
        optimizer.step()


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {}
    for name in ("mgda", "mgda-params", "uw"):
        seen: list[tuple[str, list[str]]] = []
        where = ["outside"]
        with probed_collectives(seen, where):
            _train(rank, name, seen, where)
        results[name] = seen
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    # This rank ran DDP backwards: end it without the gloo teardown torch 2.13 can abort in.
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return run_ranks(_worker, tmp_path_factory.mktemp("ddp_teardown"))


@pytest.mark.parametrize("name", ["mgda", "mgda-params", "uw"])
def test_balancer_collectives_capture_no_python_object(ranks, name):
    for rank in ranks:
        issued = [held for issuer, held in rank[name] if issuer == "balancer"]
        # two all-reduces per call (configuration fingerprint, statistics), plus the
        # Gramian's for gradient methods
        assert len(issued) >= 2 * STEPS
        assert all(held == [] for held in issued), issued


@pytest.mark.parametrize("name", ["mgda", "mgda-params", "uw"])
def test_control_ddp_gradient_all_reduces_capture_the_backward_context(ranks, name):
    # If this fails, torch no longer stashes a Python object during backward: the examples'
    # os._exit ending (and the docs' "Ending a rank") may no longer be needed.
    for rank in ranks:
        issued = [held for issuer, held in rank[name] if issuer == "ddp"]
        assert issued
        assert all(held == ["stash:context"] for held in issued), issued
        assert not [held for issuer, held in rank[name] if issuer == "outside"]
