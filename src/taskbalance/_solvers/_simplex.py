"""Euclidean projection onto the probability simplex (MoCo's λ step), both paths side by side."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_simplex", "project_simplex_py"]


def project_simplex(v: Tensor) -> Tensor:
    r"""Euclidean projection onto the probability simplex along the last dimension.

    Solves :math:`\operatorname{argmin}_{w \ge 0,\ \mathbf 1^\top w = 1} \lVert w - v \rVert_2`
    with the sorting algorithm (Held et al. 1974; Duchi et al. 2008):
    :math:`w = \max(v - \tau, 0)` with :math:`\tau = (\sum_{i \le \rho} u_i - 1) / \rho`, where
    :math:`u` is :math:`v` sorted decreasingly and :math:`\rho` the largest index with
    :math:`u_\rho > (\sum_{i\le\rho} u_i - 1)/\rho`. Fully vectorised, no host synchronisation.

    Args:
        v: Tensor of shape ``[..., K]`` (floating point, finite).

    Returns:
        Tensor of the same shape, dtype and device, each row on the simplex.

    Raises:
        ValueError: If ``v`` is not a floating point tensor with at least one dimension.

    Example:
        >>> project_simplex(torch.tensor([0.5, 0.5, 1.0]))
        tensor([0.1667, 0.1667, 0.6667])
    """
    if not isinstance(v, Tensor) or not v.is_floating_point() or v.ndim == 0 or v.shape[-1] == 0:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"v: expected a floating point tensor of shape [..., K], got {shape}")
    # Shifted by the largest entry (the projection of v − c·1 is that of v): the first prefix
    # then always passes the test below, which rounding cannot break for entries beyond 2**53
    shifted = v - v.amax(dim=-1, keepdim=True)
    u, _ = torch.sort(shifted, dim=-1, descending=True)
    css = torch.cumsum(u, dim=-1) - 1.0
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    cond = u - css / k > 0
    rho = cond.to(torch.int64).cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    tau = torch.gather(css, -1, rho) / (rho + 1).to(v.dtype)
    return torch.clamp(shifted - tau, min=0.0)


def project_simplex_py(v: list[float]) -> list[float]:
    """:func:`project_simplex` of one vector in Python floats, by the same steps (for small K,
    where each of its dozen tensor calls costs more than the arithmetic).

    Example:
        >>> project_simplex_py([0.5, 0.5, 1.0])
        [0.16666666666666663, 0.16666666666666663, 0.6666666666666666]
    """
    if not v:
        raise ValueError("v: expected a non-empty list of floats, got []")
    largest = max(v)
    shifted = [value - largest for value in v]
    total = 0.0
    tau = 0.0
    for count, value in enumerate(sorted(shifted, reverse=True), start=1):
        total += value
        # u_ρ > (Σ_{i≤ρ} u_i − 1)/ρ holds for a prefix of the sorted values: the last ρ wins
        if value - (total - 1.0) / count > 0:
            tau = (total - 1.0) / count
    return [max(value - tau, 0.0) for value in shifted]
