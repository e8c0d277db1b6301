"""Gradient-conflict diagnostics from a Gramian: cosines, norms, norm ratios, conflicts.

Given ``G = J Jᵀ`` of the K task gradients (:func:`taskbalance.gramian`), the cosine of tasks
i and j is ``G_ij / √(G_ii·G_jj)``, the norm of task k's gradient ``√G_kk``, and a pair
*conflicts* when its cosine is negative (the two gradients pull the shared tensor in opposing
directions, the situation PCGrad, CAGrad and MGDA were designed for). The benchmark harness
records these for every run (``diagnostics.csv``); any training loop can do the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GradientDiagnostics:
    """What a Gramian says about the task gradients.

    Args:
        cosines: ``[K, K]`` cosine similarities (0 where a gradient is zero; 1 on the diagonal
            of a non-zero gradient).
        norms: ``[K]`` gradient norms.
        norm_ratios: ``[K]`` each norm over the mean norm.
        conflict_fraction: fraction of the ``K(K−1)/2`` pairs with a negative cosine.
    """

    cosines: Tensor
    norms: Tensor
    norm_ratios: Tensor
    conflict_fraction: float


def gradient_diagnostics(gram: Tensor) -> GradientDiagnostics:
    """Cosines, norms, norm ratios and the fraction of conflicting pairs of a ``K×K`` Gramian.

    Works on any Gramian of task gradients: :func:`taskbalance.gramian` of the losses with
    respect to the shared features or parameters, or one a training loop already has.

    Example:
        >>> import torch, taskbalance as tb
        >>> z = torch.tensor([[1.0, 2.0]], requires_grad=True)
        >>> losses = torch.stack([z.sum(), -z[:, 0].sum()])  # gradients (1, 1) and (-1, 0)
        >>> found = tb.gradient_diagnostics(tb.gramian(losses, z))
        >>> round(found.cosines[0, 1].item(), 4), found.conflict_fraction
        (-0.7071, 1.0)
        >>> [round(n, 4) for n in found.norms.tolist()]
        [1.4142, 1.0]
        >>> [round(r, 4) for r in found.norm_ratios.tolist()]  # norm over the mean norm
        [1.1716, 0.8284]

    Args:
        gram: a symmetric positive semi-definite ``[K, K]`` tensor (K ≥ 1).

    Returns:
        The diagnostics (float64 tensors).

    Raises:
        ValueError: ``gram`` is not square or not finite.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        raise ValueError(f"gram: expected a [K, K] tensor, got shape {tuple(gram.shape)}")
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("gram: expected finite entries")
    gram = gram.detach().to(torch.float64)
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    scale = torch.outer(norms, norms)
    cosines = torch.where(scale > 0, gram / torch.where(scale > 0, scale, 1.0), 0.0)
    cosines = cosines.clamp(-1.0, 1.0)
    mean_norm = norms.mean()
    ratios = norms / mean_norm if mean_norm > 0 else torch.zeros_like(norms)
    count = gram.shape[0]
    pairs = count * (count - 1) // 2
    upper = torch.triu_indices(count, count, offset=1)
    conflicting = int((cosines[upper[0], upper[1]] < 0).sum())
    return GradientDiagnostics(
        cosines=cosines,
        norms=norms,
        norm_ratios=ratios,
        conflict_fraction=conflicting / pairs if pairs else 0.0,
    )
