"""A tensor-only Adam for the few balancers that learn their weights with their own optimiser.

FAMO's task logits and GradNorm's weights are updated inside the balancer, not by the user's
optimiser. Keeping Adam's moments as buffers makes them part of ``state_dict``, so a resumed run
continues the same trajectory, and keeps the update free of Python loops over parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


class AdamState(nn.Module):
    """Adam (Kingma & Ba, 2015) moments for one vector, updated out of place.

    Matches ``torch.optim.Adam`` with L2 ``weight_decay`` added to the gradient.

    The moments stay float32 and the arithmetic runs in float32 whatever ``.half()``,
    ``.to(torch.bfloat16)`` or autocast do to the enclosing model: in float16 ``eps = 1e-8``
    rounds to 0 and the squared gradients underflow, which turns the first step into 0/0.

    Args:
        size: length of the vector being optimised.
        lr: step size.
        betas: decay rates of the first and second moments.
        eps: added to the denominator for stability.
        weight_decay: L2 penalty coefficient.
    """

    exp_avg: Tensor
    exp_avg_sq: Tensor
    step_count: Tensor

    def __init__(
        self,
        size: int,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.register_buffer("exp_avg", torch.zeros(size))
        self.register_buffer("exp_avg_sq", torch.zeros(size))
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> AdamState:
        def keep_float32(tensor: Tensor) -> Tensor:
            moved = fn(tensor)
            if tensor.dtype == torch.float32 and moved.dtype != torch.float32:
                # Convert from the original, not from ``moved``: the values must not pass
                # through the lower precision on the way.
                return tensor.to(device=moved.device)
            return moved

        return super()._apply(keep_float32, recurse)

    def step(self, param: Tensor, grad: Tensor, mask: Tensor | None = None) -> Tensor:
        """Advance the moments by ``grad`` and return the updated copy of ``param``.

        The update is computed in float32 and returned in ``param``'s dtype. With a bool
        ``mask``, only the entries where it is True move: the others keep their value and
        their moments (as ``torch.optim.SparseAdam`` does; the step count is shared).
        """
        beta1, beta2 = self.betas
        original_dtype = param.dtype
        param = param.float()
        grad = grad.float()
        if self.weight_decay != 0:  # as torch.optim.Adam: no add at all without decay
            grad = grad + self.weight_decay * param
        if mask is not None:
            kept = (self.exp_avg.clone(), self.exp_avg_sq.clone())
        # lerp_, as torch.optim.Adam does, for the same rounding (it needs matching dtypes)
        self.exp_avg.lerp_(grad.to(self.exp_avg.dtype), 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if mask is not None:
            mask = mask.to(self.exp_avg.device)
            self.exp_avg.copy_(torch.where(mask, self.exp_avg, kept[0]))
            self.exp_avg_sq.copy_(torch.where(mask, self.exp_avg_sq, kept[1]))
        self.step_count.add_(1)
        # Bias corrections in double precision on the host, as torch.optim.Adam computes them:
        # in float32, 1 − 0.999 carries a relative error of ~3e-5 that shows in the first steps.
        step = int(self.step_count)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denominator = self.exp_avg_sq.sqrt() / math.sqrt(bias_correction2) + self.eps
        updated = param.addcdiv(self.exp_avg, denominator, value=-self.lr / bias_correction1)
        if mask is not None:
            updated = torch.where(mask.to(updated.device), updated, param)
        return updated.to(original_dtype)
