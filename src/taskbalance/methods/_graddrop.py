"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._distributed import all_reduce_sum, seeded_generator
from taskbalance._registry import register
from taskbalance._step import Step
from taskbalance._validation import check_in_range, check_seed
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import GradientBalancer


@register("graddrop")
class GradDrop(GradientBalancer):
    """GradDrop: per coordinate, keep only the task gradients of one randomly chosen sign.

    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing
    Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020, Algorithm 1. At the
    shared activation layer A (the features, features mode):

    - ``G_k = Σ_batch sign(A) ⊙ ∇_A L_k`` (the batch dimension summed out);
    - the sign purity per coordinate ``P = ½·(1 + Σ_k G_k / Σ_k |G_k|)`` in [0, 1];
    - one uniform ``U`` per coordinate, shared by the tasks, and the masks
      ``M_k = [P > U]·[G_k > 0] + [P < U]·[G_k < 0]``: with probability P the positive
      gradients pass, otherwise the negative ones;
    - the shared gradient ``d = Σ_k (ℓ + (1 − ℓ)·M_k) ⊙ ∇_A L_k`` (each sample's gradient
      masked by its coordinate's mask), ℓ the leak.

    ``d`` is not ``Jᵀw``: it is set on the features (or the listed parameters) in the one
    ordinary backward (see "shared direction" in :class:`GradientBalancer`), the heads get
    their own unweighted gradients (as in LibMTL). A coordinate where the activation is
    exactly 0 adds nothing to ``G_k`` (``sign(0) = 0``), as in the paper and LibMTL, so where
    every sample's activation is 0 every task's gradient there is dropped. ``b.weights``
    report, per task, the share of its squared gradient that passes:
    ``w_k = Σ (ℓ + (1 − ℓ) M_k) G_k² / Σ G_k²`` (ℓ when ``G_k = 0``), in [ℓ, 1].

    Defaults: ``leak = 0`` (the paper's pure GradDrop and LibMTL's default), ``seed = 0``.

    Departures:

    - the first dimension of each feature tensor is the batch dimension (a 0-d tensor has
      none); under DDP ``G_k`` is summed over every rank's samples (one all-reduce of the
      per-coordinate sums) and ``U`` comes from the balancer's own generator, seeded alike on
      every rank (saved in ``state_dict``), so the masks are those of the global batch;
    - parameters mode (``params=``), which the paper does not define and LibMTL refuses,
      masks the parameter entries themselves: ``G_k`` is the (global) task gradient, with no
      ``sign(A)`` factor and no batch;
    - P is exact (``P = ½`` where every ``G_k`` is 0, where no mask passes anyway); LibMTL adds
      1e-7 to the denominator. One leak for all tasks (the paper allows one per task); the
      paper's monotone transfer ``f(P)`` is the identity, as in its experiments;
    - ``compute_weights`` is refused (the masks need the gradients, not their Gramian); steps
      between ``update_every`` refreshes apply ``Jᵀw`` with the last weights, drawing nothing.

    Args:
        num_tasks: K.
        leak: ℓ in [0, 1], the share of each dropped gradient that still passes.
        seed: seed of the balancer's own random generator.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``: see
            :class:`GradientBalancer`.

    Example:
        >>> import torch, taskbalance as tb
        >>> b = tb.create("graddrop", num_tasks=2)
        >>> z = torch.ones(1, 2, requires_grad=True)  # one sample, two coordinates
        >>> losses = torch.stack([(z * torch.tensor([1.0, -1.0])).sum(), (3 * z).sum()])
        >>> z_grad, = torch.autograd.grad(b(losses, features=z), z)
        >>> bool(z_grad[0, 0] == 4.0)  # coordinate 0: both tasks agree, P = 1
        True
        >>> z_grad[0, 1].item() in (-1.0, 3.0)  # P = 3/4: task 2 with probability 3/4
        True
    """

    example_hyperparameters: ClassVar[tuple[dict[str, Any], ...]] = (
        {"leak": 0.5},
        {"seed": 3},
    )
    bad_hyperparameters: ClassVar[BadHyperparameters] = (
        ({"leak": 1.5}, ValueError, r"leak: expected a number in \[0.0, 1.0\]"),
        ({"seed": -1}, ValueError, r"seed: expected an int in \[0, 2\*\*64\)"),
    )
    weights_from_gram = False
    normalization_refused = (
        "its direction is computed from the task gradients themselves, which the normalisation "
        "(applied to the Gramian) does not reach"
    )
    per_group_refused = "its state and direction are kept for the listed tensors as a whole"

    def __init__(self, num_tasks: int, *, leak: float = 0.0, seed: int = 0, **options: Any):
        super().__init__(num_tasks, **options)
        self.leak = check_in_range("leak", leak, 0.0, 1.0)
        check_seed(seed)
        self.seed = seed
        self.generator = seeded_generator(seed)

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        raise ValueError(
            "gram: graddrop drops gradient coordinates by their sign, which the Gramian does "
            "not carry; compute_weights cannot apply it: call the balancer with the losses"
        )

    def _direction_from_rows(self) -> bool:
        return True

    def _rule(self, step: Step, gram: Tensor) -> Tensor:
        if step.global_rows is None or step.shared is None:
            return self._gradient_weights(step.mean_losses, gram)
        features_mode = self.shared_params is None
        # Unweighted heads get Σ_k ∇L_k from the objective's own backward: the masks then
        # give the shift d − Σ_k ∇L_k directly, in the pass that would compute d. Not from
        # rank-averaged rows (parameters mode under DDP): the shift cancels this rank's own.
        unweighted = self.heads == "unweighted" and step.global_rows is step.rows
        saved = self.generator.get_state()
        try:
            weights, vectors = graddrop_direction(
                step.shared,
                step.global_rows,
                features_mode,
                self.leak,
                self.generator,
                row_scale=step.row_scale,
                minus_sum=unweighted,
            )
        except BaseException:
            self.generator.set_state(saved)
            raise
        if unweighted:
            step.shift = vectors
        else:
            step.direction = vectors
        return weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, leak={self.leak}, seed={self.seed}"


def graddrop_direction(
    shared: list[Tensor],
    rows: list[Tensor],
    features_mode: bool,
    leak: float,
    generator: torch.Generator,
    *,
    row_scale: float = 1.0,
    minus_sum: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """The kept shares ``w`` (float64 ``[K]``) and ``d``, one flat tensor per shared tensor.

    ``rows`` are this rank's rows in features mode (the masks come from the global sums) and
    the global rows in parameters mode, times ``row_scale`` (a power of two: the masks and
    shares do not depend on it, and ``d`` takes ``1/row_scale`` with the masks); one
    ``torch.rand`` per tensor is drawn from ``generator``, in the order of ``shared``.
    ``minus_sum`` gives ``d − Σ_k g_k`` instead of ``d`` (``rows`` are then this rank's own),
    in the same pass: the masks minus one weigh the rows.
    """
    kept: Tensor | None = None  # Σ_c keep·G_k², summed over the shared tensors
    total: Tensor | None = None  # Σ_c G_k²
    direction = []
    for tensor, row in zip(shared, rows, strict=True):
        num_tasks = row.shape[0]
        batched = features_mode and tensor.dim() >= 1
        samples = tensor.shape[0] if batched else 1
        per_sample = row.reshape(num_tasks, samples, -1)
        if features_mode:
            signs = torch.sign(tensor.detach()).reshape(1, samples, -1).to(row.dtype)
            signed = (per_sample * signs).sum(dim=1).to(torch.float64)
            signed = all_reduce_sum(signed)
        else:
            signed = per_sample[:, 0].to(torch.float64)
        # ℓ + (1 − ℓ)·M: 1 where the gradient passes, ℓ where it is dropped. In parameters mode
        # these are K×P tensors: each temporary costs a pass over memory (and page faults),
        # so there are few of them.
        keep = sign_dropout_mask(signed, generator).to(torch.float64)
        if leak:
            keep.mul_(1 - leak).add_(leak)
        squared = signed.square()
        tensor_kept, tensor_total = torch.linalg.vecdot(keep, squared, dim=1), squared.sum(dim=1)
        kept = tensor_kept if kept is None else kept + tensor_kept
        total = tensor_total if total is None else total + tensor_total
        # d = Σ_k keep_k ⊙ g_k (or d − Σ_k g_k), accumulated in place; the rows' scale goes
        # with the masks (exact: a power of two)
        scaled_keep = (keep - 1 if minus_sum else keep).to(row.dtype).div_(row_scale)
        shared_direction = per_sample[0] * scaled_keep[0]
        for k in range(1, num_tasks):
            shared_direction.addcmul_(per_sample[k], scaled_keep[k])
        direction.append(shared_direction.reshape(-1))
    assert kept is not None  # at least one shared tensor
    assert total is not None
    weights = torch.where(total > 0, kept / total.clamp_min(1e-300), leak)
    return weights, direction


def sign_dropout_mask(signed: Tensor, generator: torch.Generator) -> Tensor:
    """``M_k = [P > U]·[G_k > 0] + [P < U]·[G_k < 0]`` (bool ``[K, C]``) for ``G = signed``.

    ``P = ½(1 + Σ_k G_k / Σ_k |G_k|)``, ½ where every ``G_k`` is 0; ``U`` is one
    ``torch.rand(C)`` draw from ``generator``, shared by the tasks.
    """
    absolute = signed.abs().sum(dim=0)
    ratio = torch.where(absolute > 0, signed.sum(dim=0) / absolute.clamp_min(1e-300), 0.0)
    purity = 0.5 * (1 + ratio)
    uniform = torch.rand(signed.shape[1], generator=generator, dtype=torch.float64)
    uniform = uniform.to(signed.device)
    positive = (purity > uniform) & (signed > 0)
    negative = (purity < uniform) & (signed < 0)
    return positive | negative
