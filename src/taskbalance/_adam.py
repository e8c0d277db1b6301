"""Adam on K numbers for the few balancers that learn their weights with their own optimiser.

FAMO's task logits and GradNorm's weights are updated inside the balancer, not by the user's
optimiser. Keeping Adam's moments as buffers makes them part of ``state_dict``, so a resumed run
continues the same trajectory. The arithmetic runs on the host in Python floats: inside a
training step each of the dozen tensor calls an Adam step takes on K numbers costs more than
the whole step does on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

_FLOAT32_MAX = torch.finfo(torch.float32).max


class AdamState(nn.Module):
    """Adam (Kingma & Ba, 2015) moments for one vector, updated out of place.

    Matches ``torch.optim.Adam`` with L2 ``weight_decay`` added to the gradient (to float32
    rounding: the arithmetic runs in float64 on the host, the moments are stored in float32).

    The moments stay float32 whatever ``.half()``, ``.to(torch.bfloat16)`` or autocast do to
    the enclosing model: stored in float16, the squared gradients would underflow to 0. A step
    whose moments would leave float32's range (gradients above ~1e19) is refused with a
    ``ValueError`` before any state changes, where ``torch.optim.Adam`` would store inf.

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

    def step(
        self, param: Sequence[float], grad: Sequence[float], mask: Sequence[bool] | None = None
    ) -> list[float]:
        """Advance the moments by ``grad`` and return the updated copy of ``param``.

        Computed in float64 on the host from the float32 moments, which are stored back
        rounded to float32. With a ``mask``, only the entries where it is True move: the
        others keep their value and their moments (as ``torch.optim.SparseAdam`` does; the step
        count is shared).
        """
        beta1, beta2 = self.betas
        # one host transfer for both moments (a device sync on a GPU)
        exp_avg, exp_avg_sq = torch.stack((self.exp_avg, self.exp_avg_sq)).tolist()
        step = int(self.step_count) + 1
        # Bias corrections in double precision, as torch.optim.Adam computes them.
        bias_correction1 = 1 - beta1**step
        root_bias_correction2 = math.sqrt(1 - beta2**step)
        updated = list(param)
        for k, (value, gradient) in enumerate(zip(param, grad, strict=True)):
            if mask is not None and not mask[k]:
                continue
            if self.weight_decay:  # as torch.optim.Adam: L2 decay added to the gradient
                gradient += self.weight_decay * value
            exp_avg[k] += (1 - beta1) * (gradient - exp_avg[k])
            exp_avg_sq[k] = beta2 * exp_avg_sq[k] + (1 - beta2) * gradient * gradient
            denominator = math.sqrt(exp_avg_sq[k]) / root_bias_correction2 + self.eps
            updated[k] = value - self.lr / bias_correction1 * exp_avg[k] / denominator
        # Stored past float32's range, a moment would be inf and every later step m/inf = 0
        # (or NaN): refused before any state changes
        if not all(abs(value) < _FLOAT32_MAX for value in (*exp_avg, *exp_avg_sq)):
            raise ValueError(
                f"losses: the balancer's Adam moments would leave float32's range at this step "
                f"(gradients {[float(g) for g in grad]}, squared averages {exp_avg_sq}), "
                "which would freeze its weights for good; the call is rejected and the "
                "balancer's state is unchanged. Scale the losses down"
            )
        moments = torch.tensor((exp_avg, exp_avg_sq), dtype=torch.float32)
        self.exp_avg.copy_(moments[0])
        self.exp_avg_sq.copy_(moments[1])
        self.step_count.fill_(step)
        return updated
