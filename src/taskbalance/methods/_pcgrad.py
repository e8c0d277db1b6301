"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

from operator import mul
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._distributed import seeded_generator
from taskbalance._registry import register
from taskbalance._validation import check_choice, check_seed
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import GradientBalancer, negligible_squared_norm

_ORDERS = ("random", "fixed")


@register("pcgrad")
class PCGrad(GradientBalancer):
    """PCGrad: remove from each task gradient its component along every gradient it conflicts with.

    Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020, Algorithm 1. For each task i, start from ``g_i' = g_i`` and, for each other
    task j in random order, if ``g_i'·g_j < 0``:

    ``g_i' ← g_i' − (g_i'·g_j / ‖g_j‖²)·g_j``

    (always projecting onto the normal plane of the *original* g_j). The update direction is
    ``Σ_i g_i'``.

    As ``Jᵀw``: every g_i' is g_i minus multiples of task gradients, so ``g_i' = Jᵀc_i`` for a
    coefficient vector ``c_i`` (``c_i = e_i`` at the start). The projection subtracts
    ``(g_i'·g_j/‖g_j‖²)`` from ``c_i[j]``, and both numbers come from G:
    ``g_i'·g_j = (G c_i)_j`` and ``‖g_j‖² = G_jj``. Hence ``Σ_i g_i' = Jᵀ(Σ_i c_i)`` and
    ``w = Σ_i c_i``. The direction is exactly the paper's, computed in O(K³) from G.

    Order: ``order="random"`` (default) follows the paper's Algorithm 1: for each task i a
    fresh random permutation of the other tasks (LibMTL shuffles all tasks, i included, where
    projecting g_i' on g_i is a no-op unless it conflicts with itself), drawn for all i at once
    as the rows of ``torch.rand(K, K − 1, dtype=torch.float64, generator=g).argsort(dim=1)``
    from the balancer's own generator (seeded with ``seed``, identical on every rank, saved in
    ``state_dict``). The official TensorFlow code shuffles the losses with
    ``tf.random.shuffle`` but discards the result, so in effect it projects in the fixed order
    ``0, …, K−1`` (including ``j = i``, a no-op unless ``g_i'·g_i < 0``); ``order="fixed"``
    reproduces that. For K = 2 the order does not matter.

    Defaults: ``order="random"``, ``seed=0``.

    Departures: a task gradient with zero (or negligible: ``‖g_j‖ ≤ 2**-64·max_k ‖g_k‖``,
    ~5e-20 of the largest) norm is skipped as a projection target; the reference code divides
    by zero there, and a near-zero g_j would need a coefficient up to ``‖g_i‖/‖g_j‖``: 2**64
    keeps the weights far inside float32's range (2**128). Weights are computed in float64 on
    the CPU (K×K numbers).

    Args:
        num_tasks: K.
        order: ``"random"`` (paper, LibMTL) or ``"fixed"`` (what the official code does).
        seed: seed of the balancer's own random generator.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``,
            ``group_aggregation``, ``reuse_rows``: see :class:`GradientBalancer`; the loop options
            ``accumulation_steps``, ``on_nonfinite``: see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.create("pcgrad", num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.tensor([[1.0, -1.0], [-1.0, 2.0]]))
        tensor([2.0000, 1.5000])
    """

    normalization_refused = None
    per_group_refused = None

    signed_weights = True
    claimed_properties = frozenset({"scale_equivariant"})
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"order": "fixed"},
        {"seed": 3},
        {"normalization": "l2"},
        {"normalization": "loss"},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"order": "sorted"}, ValueError, r"order: expected one of"),
    )

    def __init__(
        self,
        num_tasks: int,
        *,
        order: str = "random",
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        self.order = check_choice("order", order, _ORDERS)
        check_seed(seed)
        self.seed = seed
        self.generator = seeded_generator(seed)

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        saved = self.generator.get_state()
        try:
            orders = task_orders(self.num_tasks, self.order, self.generator)
            weights = pcgrad_weights(gram, orders)
        except BaseException:
            self.generator.set_state(saved)
            raise
        return weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={self.order!r}, seed={self.seed}"


def task_orders(num_tasks: int, order: str, generator: torch.Generator) -> list[list[int]]:
    """For each task i, the order in which the other tasks are visited.

    ``"random"``: row i of ``torch.rand(K, K − 1, dtype=torch.float64,
    generator=generator).argsort(dim=1)``, a uniform random permutation indexing the other
    tasks in increasing order. One draw for all K tasks: K ``randperm`` calls cost ~10 µs each
    inside a training step, 0.4 ms at K = 40. (Ties, which argsort breaks arbitrarily, have
    probability below K³·2⁻⁵³ per call.) At K ≤ 2 there is one order and nothing is drawn:
    the generator does not advance. ``"fixed"``: ``0, …, K−1`` including i itself.
    """
    if order == "fixed":
        return [list(range(num_tasks)) for _ in range(num_tasks)]
    if num_tasks <= 2:  # one other task (or none): a single order, nothing to draw
        return [[j for j in range(num_tasks) if j != i] for i in range(num_tasks)]
    keys = torch.rand(num_tasks, num_tasks - 1, dtype=torch.float64, generator=generator)
    permutations = keys.argsort(dim=1)
    # position p among the other tasks of task i is task p, or p + 1 from i on
    own = torch.arange(num_tasks).unsqueeze(1)
    orders: list[list[int]] = (permutations + (permutations >= own)).tolist()
    return orders


def pcgrad_weights(gram: Tensor, orders: list[list[int]]) -> Tensor:
    """``w = Σ_i c_i`` with ``g_i' = Jᵀc_i`` the projected gradients (float64 ``[K]``)."""
    g = gram.tolist()  # exact: float32 and float64 entries are Python floats
    negligible = negligible_squared_norm(g[k][k] for k in range(len(g)))
    num_tasks = len(g)
    total = [0.0] * num_tasks
    for i in range(num_tasks):
        total[i] += 1.0  # c_i[i]
        # c_i's other entries: -step at each task projected out so far. g_i'·g_j = (G c_i)_j
        # is computed when task j comes, over those entries only: O(K·projections) per task,
        # where keeping all K products up to date cost O(K²) (0.5 ms of 1.4 at K = 40).
        projected: list[int] = []
        steps: list[float] = []
        row_i = g[i]
        for j in orders[i]:
            squared_norm = g[j][j]
            if squared_norm <= negligible:
                continue
            product = row_i[j] - sum(map(mul, steps, map(g[j].__getitem__, projected)))
            if product < 0.0:
                projected.append(j)
                steps.append(product / squared_norm)
        for j, step in zip(projected, steps, strict=True):
            total[j] -= step
    return torch.tensor(total, dtype=torch.float64)
