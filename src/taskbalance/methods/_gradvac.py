"""GradVac: Gradient Vaccine (Wang et al., ICLR 2021)."""

from __future__ import annotations

import math
import sys
from operator import itemgetter, mul
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._distributed import seeded_generator
from taskbalance._registry import register
from taskbalance._validation import check_in_range, check_seed
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import (
    GradientBalancer,
    inverse_norms,
    negligible_squared_norm,
)
from taskbalance.methods._pcgrad import task_orders

#: Floor on ``sqrt(1 − φ̂²)`` in the denominator of the adjustment (a target of ±1 would divide
#: by zero; LibMTL adds 1e-8 to the same denominator).
_MIN_SINE = 1e-8


@register("gradvac")
class GradVac(GradientBalancer):
    """GradVac: pull each task gradient towards an adaptive target cosine similarity.

    Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 1. Targets
    ``φ̂_ij`` start at 0. For each task i, ``g_i' = g_i``; for each other task j in random
    order, with ``φ_ij = cos(g_i', g_j)``:

    - if ``φ_ij < φ̂_ij``: ``g_i' ← g_i' + a·g_j`` with
      ``a = ‖g_i'‖·(φ̂_ij·√(1−φ_ij²) − φ_ij·√(1−φ̂_ij²)) / (‖g_j‖·√(1−φ̂_ij²))``,
      which rotates g_i' in the plane of (g_i', g_j) until its cosine with g_j is φ̂_ij;
    - then, adjusted or not, ``φ̂_ij ← (1−β)·φ̂_ij + β·φ_ij`` with the cosine φ_ij observed
      before the adjustment (EMA of the observed similarity, Eq. 3).

    The direction is ``Σ_i g_i'``. With a constant target of 0 this is PCGrad.

    As ``Jᵀw``: each g_i' is g_i plus multiples of task gradients, ``g_i' = Jᵀc_i``. Every
    quantity above comes from G: ``g_i'·g_j = (G c_i)_j``, ``‖g_i'‖² = c_iᵀ G c_i``,
    ``‖g_j‖² = G_jj``; the adjustment adds ``a`` to ``c_i[j]``. So ``Σ_i g_i' = Jᵀ(Σ_i c_i)``
    and ``w = Σ_i c_i``. (The pass itself runs on the cosines ``G_jm/(‖g_j‖‖g_m‖)``, with each
    ``c_i`` kept in units of the task gradients' lengths: the same numbers to rounding, fewer
    operations.)

    Order: for each task i a fresh random permutation of the other tasks, row i of
    ``torch.rand(K, K − 1, dtype=torch.float64, generator=g).argsort(dim=1)`` (indexing them in
    increasing order), from the balancer's own generator (``seed``; identical on
    every rank; saved in ``state_dict`` with the targets, so a resumed run continues the same
    trajectory). LibMTL and the paper also visit the other tasks in random order.

    Defaults: ``beta = 0.01`` (β = 1e-2, the paper's setting as we read it), targets
    initialised to 0. LibMTL (``GradVac_beta``) and torchjd (``GradVac(beta=0.5)``) both
    default to 0.5, a much faster-moving target.

    The moving average against the references (what was read, and at which commit):

    - the paper's Algorithm 1, as we read it, updates ``φ̂_ij`` after the ``end if``, for
      every visited pair; torchjd's reviewers compared their code with the paper's
      pseudo-code (Appendix E; SimplexLab/TorchJD PR #638) and found only the order of the
      group loop to differ.
    - torchjd, ``aggregation/_gradvac.py`` at ``e626475d`` and ``0b454f12``: every visited
      pair, as here.
    - LibMTL, ``LibMTL/weighting/GradVac.py`` at ``13f5fc7d`` (the one version we could read;
      the same in copies of it in other repositories): the update is inside
      ``if rho_ijk < rho_T``, so a target moves only on steps that adjust, and then only
      down. We found no LibMTL commit or issue that moves it out of the branch, so on this
      point we follow the paper and torchjd, not LibMTL at ``13f5fc7d``.

    Departures:

    - The paper (and LibMTL's ``GradVac_group_type``) can apply the rule per layer or per
      parameter block, with one target per block. By default it is applied to the whole
      shared gradient with one Gramian (LibMTL's ``group_type=0``, "whole model"); in
      parameters mode, ``params=`` as a list (or dict) of layers with
      ``group_aggregation="per_group"`` applies it per layer (``group_type=1``), and
      ``"per_tensor"`` per parameter tensor (``group_type=2``), each group with its own
      targets (``target_cosines`` then has shape ``[num_groups, K, K]``). The task orders of
      all groups come from the one random generator, group after group, so each group has
      its own random order, as in the paper's pseudo-code (groups in the outer loop); LibMTL
      visits the tasks in one order for all groups.
    - A pair where ``g_i'`` or ``g_j`` is zero is skipped (no cosine exists; "zero" means
      ``‖·‖ ≤ 2**-64·max_k ‖g_k‖``, as in PCGrad; and once an adjustment leaves
      ``‖g_i'‖² ≤ eps·(Σ_m |e_m|)²``, where ``g_i' = Σ_m e_m g_m/‖g_m‖``: its rounding
      bound then exceeds it, as when exactly opposite gradients cancel). A cosine within
      ``4·eps·Σ_m |e_m|/‖g_i'‖`` (its rounding) of ±1 is taken as ±1, so that parallel
      gradients meet a target of 1 and opposite ones cancel exactly, where the sine's
      rounding error, ~√eps, would be amplified by ``1/√(1−φ̂²)``. ``√(1−φ̂²)`` is floored
      at 1e-8 in the denominator. eps is that of the Gramian's dtype (float32's for a
      float16 or bfloat16 Gramian, which is solved in float32).
    - Weights and targets are computed in float64 on the CPU (K×K numbers).

    Args:
        num_tasks: K.
        beta: EMA rate β of the targets, in [0, 1].
        seed: seed of the balancer's own random generator.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``,
            ``group_aggregation``, ``reuse_rows``: see :class:`GradientBalancer`; the loop options
            ``accumulation_steps``, ``on_nonfinite``: see :class:`Balancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.create("gradvac", num_tasks=2)
        >>> b.compute_weights(torch.ones(2), gram=torch.tensor([[1.0, -1.0], [-1.0, 2.0]]))
        tensor([2.0000, 1.5000])
    """

    normalization_refused = None
    per_group_refused = None
    group_state = ("target_cosines",)

    signed_weights = True
    claimed_properties = frozenset({"scale_equivariant"})
    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"beta": 0.5},
        {"normalization": "l2"},
        {"normalization": "loss+"},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"beta": 1.5}, ValueError, r"beta: expected a number in \[0.0, 1.0\]"),
    )

    target_cosines: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        beta: float = 0.01,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(num_tasks, **options)
        self.beta = check_in_range("beta", beta, 0.0, 1.0)
        check_seed(seed)
        self.seed = seed
        self.generator = seeded_generator(seed)
        self.register_buffer(
            "target_cosines", torch.zeros(self.num_tasks, self.num_tasks, dtype=torch.float64)
        )

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        saved = self.generator.get_state()
        try:
            orders = task_orders(self.num_tasks, "random", self.generator)
            weights, targets = gradvac_weights(
                gram, orders, self.target_cosines.tolist(), self.beta
            )
        except BaseException:
            self.generator.set_state(saved)
            raise
        self.target_cosines.copy_(torch.tensor(targets, dtype=torch.float64))
        return weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, seed={self.seed}"


def gradvac_weights(
    gram: Tensor, orders: list[list[int]], targets: list[list[float]], beta: float
) -> tuple[Tensor, list[list[float]]]:
    """GradVac's ``w = Σ_i c_i`` and the updated targets (a new nested list; input untouched).

    The pass runs on the task gradients' cosines ``R_jm = G_jm/(‖g_j‖‖g_m‖)``: with
    ``u_m = g_m/‖g_m‖`` and ``g_i' = Σ_m e_m u_m`` (so ``c_i[m] = e_m/‖g_m‖``),
    ``g_i'·u_j = Σ_m e_m R_jm``, an adjustment adds ``a·‖g_j‖`` to ``e_j`` and
    ``‖g_i' + s·u_j‖² = ‖g_i'‖² + s(2 g_i'·u_j + s)``. It is plain Python: ~K² pairs one
    after another (the paper's order), where a torch op per pair would cost more than the pair.
    """
    g = gram.tolist()  # exact: float32 and float64 entries are Python floats
    negligible = negligible_squared_norm(g[k][k] for k in range(len(g)))
    eps = torch.finfo(gram.dtype).eps
    num_tasks = len(g)
    targets = [list(row) for row in targets]
    unit_scales = inverse_norms([g[j][j] for j in range(num_tasks)])  # 1/‖g_j‖, 0: unusable
    usable = [scale > 0.0 for scale in unit_scales]
    # R_jm = G_jm/√(G_jj·G_mm): exactly ±1 for identical or opposite rows (√(fl(x²)) = |x|),
    # which a target of 1 needs to leave them alone (G_jm·(1/‖g_j‖)·(1/‖g_m‖) can be 1 − 2⁻⁵³).
    # GradientBalancer._weights hands on a float64 Gramian whose largest diagonal entry is
    # within 2**±500, but two gradients 2**-64 shorter than the longest can still take
    # G_jj·G_mm below float64's range: there the roots are taken one by one (the ±1 snapping
    # below absorbs their last-bit difference). An unusable task's entries, never read, are 0
    # (its diagonal taken as infinite).
    diagonal = [g[j][j] if usable[j] else math.inf for j in range(num_tasks)]
    # Decided once: a call per pair would cost ~5% of the rule at K = 40.
    underflows = min(diagonal) ** 2 < sys.float_info.min
    cosines = [
        [
            entry
            / (
                _root_of_product(diagonal_j, diagonal_m)
                if underflows
                else math.sqrt(diagonal_j * diagonal_m)
            )
            for entry, diagonal_m in zip(row, diagonal, strict=True)
        ]
        for row, diagonal_j in zip(g, diagonal, strict=True)
    ]
    keep = 1.0 - beta
    total = [0.0] * num_tasks
    for i in range(num_tasks):
        total[i] += 1.0  # c_i[i]
        # ‖g_i'‖² only changes with an adjustment: once negligible, every later pair is skipped
        if not usable[i]:
            continue
        squared_i = g[i][i]
        norm_i = math.sqrt(squared_i)
        row_targets = targets[i]
        # e's non-zero entries; g_i'·u_j is computed when task j comes, over those entries only:
        # O(K·adjustments) per task, where keeping all K products up to date costs O(K²)
        adjusted, units = [i], [norm_i]
        # Σ_m |e_m|: with R known to ~eps, ‖g_i'‖² = eᵀRe is known to eps·spread² and
        # cos(g_i', g_j) to eps·spread/‖g_i'‖ (4× that is taken as its rounding)
        spread = norm_i
        near_one = 1.0 - 4.0 * eps
        pick: itemgetter[Any] | None = None  # e's entries of a row of R, once adjusted
        for j in orders[i]:
            if not usable[j]:
                continue
            if pick is None:  # g_i' = g_i
                cosine = cosines[i][j]
                product = cosine * norm_i
            else:
                product = sum(map(mul, units, pick(cosines[j])))
                cosine = product / norm_i
            # Within its rounding of ±1 (or outside [-1, 1]) a cosine is ±1: parallel rows then
            # meet a target of 1, and opposite ones cancel exactly, where rounding would turn
            # the sine's error, ~√eps, into a step of √eps/√(1 − φ̂²)
            if cosine >= near_one:
                cosine = 1.0
            elif cosine <= -near_one:
                cosine = -1.0
            target = row_targets[j]
            row_targets[j] = keep * target + beta * cosine
            if cosine < target:
                target_sine = math.sqrt(1.0 - target * target) if -1.0 < target < 1.0 else 0.0
                step = (
                    norm_i
                    * (target * math.sqrt(1.0 - cosine * cosine) - cosine * target_sine)
                    / (target_sine if target_sine > _MIN_SINE else _MIN_SINE)
                )
                adjusted.append(j)
                units.append(step)
                pick = itemgetter(*adjusted)
                squared_i += step * (2.0 * product + step)
                spread += abs(step)
                # within rounding of zero (opposite gradients cancel exactly): no cosine exists
                if squared_i <= negligible or squared_i <= eps * spread * spread:
                    break
                norm_i = math.sqrt(squared_i)
                near_one = 1.0 - 4.0 * eps * spread / norm_i
        for m, unit in zip(adjusted[1:], units[1:], strict=True):
            total[m] += unit * unit_scales[m]
    return torch.tensor(total, dtype=torch.float64), targets


def _root_of_product(a: float, b: float) -> float:
    """``√(a·b)`` for ``a, b > 0``, also where the product leaves float64's normal range."""
    product = a * b
    if sys.float_info.min <= product < math.inf:
        return math.sqrt(product)
    return math.sqrt(a) * math.sqrt(b)
