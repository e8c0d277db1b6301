"""The base class of every gradient-based method: weights from the Gramian of task gradients."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable

import torch
from torch import Tensor

from taskbalance._base import Balancer
from taskbalance._gramian import gramian_from_rows, jacobian_rows
from taskbalance._validation import check_positive_int


class GradientBalancer(Balancer):
    """A balancer whose weights depend on how the task gradients relate.

    Every subclass produces an update direction ``d = Jᵀw`` (J the K×P Jacobian of the task
    losses) from the Gramian ``G = J Jᵀ`` alone, and returns the objective ``Σ_k w_k L_k`` with
    ``w`` detached, whose ordinary backward is exactly ``Jᵀw``.

    Modes (DESIGN.md §2):

    - features mode (default): pass ``features=z``, the shared representation the task heads
      consume, at every call; ``G`` is taken with respect to ``z`` (MGDA-UB-style, cheap).
    - parameters mode: give ``params=`` (e.g. ``trunk[-1].parameters()``) at construction;
      ``G`` is the exact Gramian of the gradients with respect to those parameters.

    Args:
        num_tasks: K.
        params: shared parameters for parameters mode; None for features mode.
        update_every: recompute the weights every N steps and reuse the last weights in between
            (the Gramian is not even computed then). Nash-MTL's published speed-ups come from
            exactly this. 1 recomputes at every step.
        gram_dtype: precision of the Gramian, ``torch.float32`` (default) or ``torch.float64``.
    """

    requires_gram = True

    def __init__(
        self,
        num_tasks: int,
        *,
        params: Iterable[Tensor] | None = None,
        update_every: int = 1,
        gram_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(num_tasks)
        # A plain list, so the model's parameters do not become this module's parameters.
        self.shared_params: list[Tensor] | None = None if params is None else list(params)
        if self.shared_params is not None and not self.shared_params:
            raise ValueError("params: expected at least one shared parameter, got an empty list")
        self.update_every = check_positive_int("update_every", update_every)
        if gram_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"gram_dtype: expected torch.float32 or torch.float64, got {gram_dtype}"
            )
        self.gram_dtype = gram_dtype
        # None until the first call tells whether this graph supports the batched backward.
        self._batched_backward: bool | None = None

    @abstractmethod
    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        """The method's rule: ``[K]`` weights from the losses and the Gramian.

        Must not change any state before it can no longer fail.
        """

    def _is_refresh_step(self) -> bool:
        return int(self.num_steps) % self.update_every == 0

    def _update(self, losses: Tensor, gram: Tensor | None, kpis: Tensor | None) -> Tensor:
        if not self._is_refresh_step():
            return self._last_weights.clone()
        assert gram is not None  # forward and compute_weights both supply it on refresh steps
        weights = self._gradient_weights(losses, gram.to(losses.device))
        return weights.to(device=losses.device, dtype=losses.dtype)

    def _gram_for_call(self, losses: Tensor, features: Tensor | None) -> Tensor | None:
        # The inputs are checked on every call, refresh step or not, so a wrong call fails at
        # once rather than only on the next refresh step.
        if self.shared_params is not None:
            inputs, features_mode = self.shared_params, False
        elif features is not None:
            if not isinstance(features, Tensor):
                raise TypeError(f"features: expected a tensor, got {type(features).__name__}")
            if not features.requires_grad:
                raise ValueError(
                    "features: the tensor does not require grad; pass the shared "
                    "representation the task heads consume (not a detached copy)"
                )
            inputs, features_mode = [features], True
        else:
            raise ValueError(
                f"features: {self._method_name} is a gradient method and needs the shared "
                "features at each call (b(losses, features=z)) or shared parameters at "
                f"construction (tb.create({self._method_name!r}, num_tasks=..., params=...)); "
                "got neither"
            )
        if not losses.requires_grad:
            raise ValueError(
                "losses: the losses do not require grad, so the task gradients cannot be "
                "measured; compute them from the model's output without .detach()"
            )
        if not self._is_refresh_step():
            return None
        rows, path = jacobian_rows(losses, inputs, batched=self._batched_backward)
        # Once a graph needed the loop (path False), stop retrying the batched backward.
        if path is False:
            self._batched_backward = False
        return gramian_from_rows(rows, features_mode=features_mode, dtype=self.gram_dtype)

    def extra_repr(self) -> str:
        mode = "features" if self.shared_params is None else "params"
        return f"num_tasks={self.num_tasks}, mode={mode}, update_every={self.update_every}"
