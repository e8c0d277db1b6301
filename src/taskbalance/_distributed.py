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


#: Fingerprint entries are reduced modulo this, so their squares sum exactly in float64.
_FINGERPRINT_MODULUS = 2**16


def fingerprint_value(value: object) -> int:
    """A small integer standing for ``value`` (an int, or anything with a stable ``repr``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value % _FINGERPRINT_MODULUS
    return zlib.crc32(repr(value).encode()) % _FINGERPRINT_MODULUS


def all_reduce_packed(payload: Tensor, fingerprint: dict[str, int]) -> tuple[Tensor, list[str]]:
    """Sum ``payload`` over ranks and compare ``fingerprint`` across ranks in the same call.

    Each fingerprint entry travels as ``(v, v²)``: after the sum, the entry agrees on every
    rank exactly when ``R·Σv² = (Σv)²`` (Cauchy–Schwarz; integers below 2¹⁶, so the float64
    sums are exact and the test runs on Python ints).
    One all-reduce of ``len(payload) + 2·len(fingerprint)`` float64 numbers per call.

    Returns:
        The summed payload (``payload`` itself outside a process group) and the names of the
        fingerprint entries that differ between ranks (every rank gets the same list).
    """
    if not is_distributed():
        return payload, []
    codes = torch.tensor(
        [float(v) for v in fingerprint.values()], dtype=torch.float64, device=payload.device
    )
    packed = torch.cat([payload.detach().to(torch.float64), codes, codes * codes])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    size = payload.numel()
    count = len(fingerprint)
    ranks = dist.get_world_size()
    sums = [int(v) for v in packed[size : size + count].tolist()]
    squares = [int(v) for v in packed[size + count :].tolist()]
    differing = [
        name
        for name, total, square in zip(fingerprint, sums, squares, strict=True)
        if ranks * square != total * total
    ]
    return packed[:size], differing
