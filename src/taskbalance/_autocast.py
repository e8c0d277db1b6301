"""Leaving autocast for a computation that must run in the dtype it was given."""

from __future__ import annotations

import contextlib

import torch


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast(device_type, enabled=False)`` where autocast is on, else nothing.

    Autocast runs matrix products in float16/bfloat16 whatever their inputs: a Gramian or a
    covariance computed on purpose in float32 would silently lose its precision. Entering
    ``torch.autocast`` costs more than a small Gramian, so only when autocast is on.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
