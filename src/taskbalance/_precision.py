"""Precision rules shared by the losses, the samplers and the Gramian engine: compute half
precision in float32, and leave autocast where a computation must keep its dtype."""

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


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute with ``dtype`` inputs in: float32 for float16/bfloat16, else
    ``dtype`` (torch's own kernels' "opmath").

    Half-precision sums over an image overflow float16 (65504) and lose bfloat16's 8-bit
    mantissa, ``exp`` overflows float16 at 11.1, and float16 (bfloat16) uniforms have only
    2¹¹ (2⁸) values below 1, which cuts a Gumbel tail off at 7.6 (5.5).
    """
    return torch.promote_types(dtype, torch.float32)
