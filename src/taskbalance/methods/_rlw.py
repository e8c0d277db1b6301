"""Random loss weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._base import Balancer
from taskbalance._distributed import seeded_generator
from taskbalance._registry import register
from taskbalance._step import Step
from taskbalance._validation import check_seed
from taskbalance.methods._facts import BadHyperparameters


@register("rlw")
class RLW(Balancer):
    """Random loss weighting: fresh random weights every step.

    Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR 2022: ``z ~ N(0, I)``, ``w = softmax(z)``; here ``w = K·softmax(z)``
    (so ``Σ w = K``, see Departures).

    Defaults: standard normal logits (LibMTL's default ``dist='Normal'``), ``seed = 0``.

    Departures: the paper and LibMTL use ``softmax(z)`` (weights summing to 1); we multiply by K
    so that the weights sum to K like equal weighting's, which keeps the learning rate tuned for
    ``ew`` meaningful. Divide the learning rate by K to reproduce the paper's runs. The draws
    come from a generator owned by the balancer, seeded identically on every rank, so DDP ranks
    agree; its state is saved in ``state_dict`` so a resumed run draws the same sequence.

    The loop options every method takes, ``accumulation_steps`` and ``on_nonfinite``: see
    :class:`Balancer`.

    Args:
        num_tasks: K.
        seed: seed of the balancer's own random generator.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.RLW(num_tasks=3, seed=0)
        >>> _ = b(torch.ones(3, requires_grad=True))
        >>> float(b.weights.sum())
        3.0
    """

    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = ({"seed": 7},)
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"seed": -1}, ValueError, r"seed: expected an int in \[0, 2\*\*64\)"),
    )

    def __init__(self, num_tasks: int, *, seed: int = 0) -> None:
        super().__init__(num_tasks)
        check_seed(seed)
        self.seed = seed
        self.generator = seeded_generator(seed)

    def _update(self, step: Step) -> Tensor:
        losses = step.mean_losses
        logits = torch.randn(self.num_tasks, generator=self.generator)
        return self.num_tasks * torch.softmax(logits, dim=0).to(losses.device)
