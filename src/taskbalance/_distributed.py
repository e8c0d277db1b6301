"""The distributed rule: every rank computes identical weights.

When ``torch.distributed`` is initialised, loss statistics that drive weights are averaged over
the default process group, so ranks that see different local batches still agree. Outside a
process group every function here is the identity and costs nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group exists with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks in the default process group (1 outside one)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over all ranks; returns ``tensor`` itself outside a process group.

    The input is never modified in place: a reduced copy is returned.
    """
    if not is_distributed():
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over all ranks; returns ``tensor`` itself outside a process group."""
    if not is_distributed():
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded identically on every rank, so random draws agree across ranks."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator
