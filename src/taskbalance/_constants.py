"""Small read-only tensors that a training step would otherwise allocate at every call.

Inside a training step each small tensor call costs two to three times its isolated time (the
forward and backward passes have evicted the caches), so the constants a call needs (an
all-True task mask, the engine's backward seed) are made once per value, shape, dtype and
device, and shared.
"""

from __future__ import annotations

import torch
from torch import Tensor

_Key = tuple[float, tuple[int, ...], torch.dtype, torch.device]
#: Each shared tensor with its version counter when it was made (see :func:`constant`).
_SHARED: dict[_Key, tuple[Tensor, int]] = {}
#: Distinct constants kept; beyond that, new ones are made per call (never evicted).
_MAX_SHARED = 256


def constant(
    value: float, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A tensor of ``shape`` filled with ``value``, shared between calls: never modify it.

    Made outside inference mode, so autograd may save it wherever it is read. Only plain
    tensors are shared (one made under a fake-tensor or other dispatch mode is not kept). One
    that was modified in place anyway (its version counter moved: e.g. a custom backward
    that scales its incoming gradient in place) is replaced by a fresh one, so the damage
    cannot outlive the call that did it.
    """
    key = (value, shape, dtype, device)
    shared = _SHARED.get(key)
    if shared is not None and shared[0]._version == shared[1]:
        return shared[0]
    with torch.inference_mode(False):
        tensor = torch.full(shape, value, dtype=dtype, device=device)
    # NaN is never equal to itself: each one would be a new key
    if type(tensor) is Tensor and value == value and (shared or len(_SHARED) < _MAX_SHARED):
        _SHARED[key] = (tensor, tensor._version)
    return tensor
