"""The distributed rule: every rank computes identical weights.

When ``torch.distributed`` is initialised, loss statistics that drive weights are averaged over
the default process group, so ranks that see different local batches still agree. Outside a
process group every function here is the identity and costs nothing.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group exists with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks in the default process group (1 outside one)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default process group (0 outside one)."""
    return dist.get_rank() if is_distributed() else 0


def first_tensor(*arguments: object) -> Tensor | None:
    """The first tensor among ``arguments`` or inside the first sequence that holds one."""
    for argument in arguments:
        if isinstance(argument, Tensor):
            return argument
        if isinstance(argument, (list, tuple)):
            for item in argument:
                if isinstance(item, Tensor):
                    return item
    return None


def collective_device(tensor: Tensor | None, fallback: torch.device) -> torch.device:
    """The device a collective of a call runs on: that of ``tensor`` (the call's losses, where
    the other ranks reduce), else the current CUDA device under NCCL, else ``fallback``."""
    if tensor is not None:
        return tensor.device
    nccl = dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend())
    if nccl and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


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


def fingerprint_value(value: object) -> int:
    """An integer standing for ``value``: an int itself, anything else the CRC-32 of its repr."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return zlib.crc32(repr(value).encode())


def differing_entries(
    fingerprint: dict[str, int], device: torch.device
) -> dict[str, tuple[int, int]]:
    """The ``fingerprint`` entries that differ between ranks, with their lowest and highest value.

    One all-reduce (MAX) of ``[v, −v]``, int64, whose size depends only on how many entries
    there are, never on the data: ranks configured differently (another K, a method that
    sends KPIs) still meet in it and all learn what differs, before any collective whose size
    depends on the configuration. An entry agrees exactly when its max equals its min.

    Returns:
        The same ``{name: (lowest, highest)}`` on every rank; empty outside a process group.
    """
    if not is_distributed():
        return {}
    codes = torch.tensor(list(fingerprint.values()), dtype=torch.int64, device=device)
    packed = torch.cat([codes, -codes])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    count = len(fingerprint)
    highest = packed[:count].tolist()
    lowest = [-value for value in packed[count:].tolist()]
    return {
        name: (low, high)
        for name, high, low in zip(fingerprint, highest, lowest, strict=True)
        if high != low
    }
