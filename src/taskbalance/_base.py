"""The one contract every balancer follows.

A balancer turns the K task losses of a step (and, for some methods, per-task KPIs or the K×K
Gramian of the task gradients) into a weight vector ``w ∈ R^K``, and returns an objective whose
gradient with respect to each loss is exactly ``w_k``. The training step then ends with one
ordinary scalar ``objective.backward()``, which is what DDP, AMP's GradScaler, gradient
accumulation, clipping and torch.compile all expect.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from taskbalance._distributed import all_reduce_mean
from taskbalance._validation import (
    as_kpi_vector,
    as_loss_vector,
    check_loss_values,
    check_num_tasks,
)

LossesLike = Tensor | Sequence[Tensor]
KpisLike = Tensor | Sequence[float] | None


class Balancer(nn.Module, ABC):
    """Base class of every balancing method.

    Subclasses implement :meth:`_update`, the pure weight rule, and override :meth:`_objective`
    only when the objective is not ``Σ w_k L_k`` (learned weights with a regulariser, or a method
    defined by its objective such as the geometric mean). The gradient of the returned
    objective with respect to ``losses[k]`` equals ``weights[k]`` (for gradient methods whose
    heads take unweighted gradients, see :class:`GradientBalancer`, it is 1 and the weights act
    on the shared tensors).

    Calling a balancer:

    - ``objective = b(losses, kpis=None, features=None)`` returns the 0-d objective to backward.
      ``features=`` is read by gradient methods in features mode and ignored by the others, and
      ``kpis=`` by methods that read KPIs (DTP), so one training loop can drive any method.
    - ``b.weights`` is the detached ``[K]`` weight vector of the last call.
    - ``b.compute_weights(losses, gram=None, kpis=None)`` applies the update rule to given
      inputs and advances the state exactly like a call does.
    - ``b.end_epoch()`` marks an epoch boundary (a no-op for most methods).

    A call that is rejected (wrong number of tasks, a non-finite loss, KPIs outside [0, 1], ...)
    raises before any state changes.

    Under ``torch.distributed``, the loss statistics and KPIs that drive the weights are
    averaged over the process group (in calls and in ``compute_weights`` alike), so every rank
    computes the same weights. Every input check runs before the first collective: a bad input
    on one rank raises there while the other ranks wait in the all-reduce, exactly as a crash
    in any other DDP step would; the process group's timeout then ends them.

    Args:
        num_tasks: K, the number of task losses every call receives.
    """

    #: Registry name, set by :func:`taskbalance.register`.
    name: ClassVar[str] = ""
    #: True when the method takes logs or ratios of the losses, which must then be > 0.
    requires_positive_losses: ClassVar[bool] = False
    #: True when the method reads per-task KPIs (``kpis=``).
    requires_kpis: ClassVar[bool] = False
    #: True when the weight rule needs the Gramian of the task gradients.
    requires_gram: ClassVar[bool] = False

    _last_weights: Tensor
    num_steps: Tensor

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = check_num_tasks(num_tasks)
        self.register_buffer("_last_weights", torch.ones(self.num_tasks))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        # A host copy of num_steps, so the per-step branches on it need no device sync.
        self._steps_taken = 0

    @property
    def weights(self) -> Tensor:
        """Detached ``[K]`` weights of the last call (the initial weights before any call)."""
        return self._last_weights.detach().clone()

    def forward(
        self,
        losses: LossesLike,
        *,
        kpis: KpisLike = None,
        features: Tensor | None = None,
    ) -> Tensor:
        """Weights for this step and the objective to backward.

        Args:
            losses: the K task losses, a 1-D tensor or a sequence of 0-d tensors, in the graph.
            kpis: per-task KPIs in [0, 1] for methods that read them.
            features: shared features, for gradient methods in features mode.

        Returns:
            The 0-d objective, whose gradient with respect to ``losses[k]`` is ``weights[k]``.
        """
        vector = as_loss_vector(losses, self.num_tasks)
        # Every local check runs before the first collective, so a bad input raises on its
        # rank without leaving the other ranks waiting in a half-finished sequence of them.
        local_losses = self._checked_values(vector)
        local_kpis = self._checked_kpis(kpis, local_losses.device)
        self._check_call_inputs(vector, features)
        statistics, kpi_vector = self._reduced(local_losses, local_kpis)
        gram = self._gram_for_call(vector, features)
        weights = self._advance(statistics, gram, kpi_vector)
        return self._objective(vector, weights.to(vector.device), statistics.to(vector.device))

    def compute_weights(
        self,
        losses: LossesLike,
        gram: Tensor | None = None,
        kpis: KpisLike = None,
    ) -> Tensor:
        """The pure update rule on given inputs; advances state exactly like a call does.

        Args:
            losses: the K task losses (values only are read).
            gram: the K×K Gramian of the task gradients, for gradient methods.
            kpis: per-task KPIs in [0, 1] for methods that read them.

        Returns:
            The ``[K]`` weights of this step (detached).
        """
        vector = as_loss_vector(losses, self.num_tasks).detach()
        local_losses = self._checked_values(vector)
        local_kpis = self._checked_kpis(kpis, local_losses.device)
        checked_gram = self._check_gram(gram) if self.requires_gram else None
        statistics, kpi_vector = self._reduced(local_losses, local_kpis)
        return self._advance(statistics, checked_gram, kpi_vector)

    def end_epoch(self) -> None:
        """Mark an epoch boundary. Methods with per-epoch statistics (DWA) override this."""

    # ----------------------------------------------------------------------------------------
    # Hooks for subclasses.

    @abstractmethod
    def _update(self, losses: Tensor, gram: Tensor | None, kpis: Tensor | None) -> Tensor:
        """Return this step's weights. Must not change any state before it can no longer fail.

        ``losses`` is detached, float32, on this module's device and, under DDP, averaged over
        ranks. ``gram`` is float32 or float64 when the method needs it, else None.
        """

    def _objective(self, losses: Tensor, weights: Tensor, statistics: Tensor) -> Tensor:
        """The objective to backward: ``Σ w_k L_k`` unless the method defines its own."""
        return (weights.to(losses.dtype) * losses).sum()

    def _check_call_inputs(self, losses: Tensor, features: Tensor | None) -> None:
        """Method-specific checks of a call's inputs, run before any collective."""

    def _gram_for_call(self, losses: Tensor, features: Tensor | None) -> Tensor | None:
        """Gradient methods compute the Gramian here; loss-based methods need none."""
        return None

    # ----------------------------------------------------------------------------------------
    # Shared machinery.

    def _advance(self, losses: Tensor, gram: Tensor | None, kpis: Tensor | None) -> Tensor:
        weights = self._update(losses, gram, kpis).detach()
        self._last_weights.copy_(weights)
        self.num_steps.add_(1)
        self._steps_taken += 1
        return weights

    def _checked_values(self, losses: Tensor) -> Tensor:
        """Detached float32 copy of the losses, on their own device, after the value checks.

        One host transfer of K numbers per step: it is what naming the offending task costs.
        """
        values = losses.detach().to(dtype=torch.float32)
        check_loss_values(
            values.tolist(), positive=self.requires_positive_losses, method=self._method_name
        )
        return values

    def _checked_kpis(self, kpis: KpisLike, device: torch.device) -> Tensor | None:
        """Checked KPIs on ``device`` (the losses'), for methods that read them."""
        if not self.requires_kpis:
            return None
        return as_kpi_vector(kpis, self.num_tasks, self._method_name).to(device)

    def _reduced(self, losses: Tensor, kpis: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Rank averages, moved to this module's device.

        Reduced on the losses' device, not the module's: NCCL reduces only CUDA tensors, and a
        balancer without parameters is often left on the CPU while the model trains on a GPU.
        """
        device = self._last_weights.device
        statistics = all_reduce_mean(losses).to(device)
        return statistics, None if kpis is None else all_reduce_mean(kpis).to(device)

    def _check_gram(self, gram: Tensor | None) -> Tensor:
        if gram is None:
            raise ValueError(f"gram: {self._method_name} needs the K×K Gramian, got None")
        if not isinstance(gram, Tensor):
            raise TypeError(f"gram: expected a tensor, got {type(gram).__name__}")
        expected = (self.num_tasks, self.num_tasks)
        if tuple(gram.shape) != expected:
            raise ValueError(f"gram: expected shape {expected}, got {tuple(gram.shape)}")
        if not bool(torch.isfinite(gram).all()):
            raise ValueError("gram: every entry of the Gramian must be finite")
        return gram.detach()

    @property
    def _method_name(self) -> str:
        return self.name or type(self).__name__

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}"

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._steps_taken = int(self.num_steps)

    # nn.Module's hooks for state that is not a tensor: a method that draws random numbers
    # keeps its own torch.Generator as ``self.generator`` (seeded identically on every rank),
    # and its state must travel with state_dict so a resumed run draws the same sequence.
    def get_extra_state(self) -> Any:
        generator = getattr(self, "generator", None)
        return {} if generator is None else {"generator": generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        generator = getattr(self, "generator", None)
        if generator is not None:
            # torch.load(map_location="cuda") moves every tensor; a generator's state is CPU.
            generator.set_state(state["generator"].cpu())
