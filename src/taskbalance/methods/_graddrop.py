"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._constants import constant
from taskbalance._distributed import all_reduce_sum, seeded_generator
from taskbalance._registry import register
from taskbalance._step import Step
from taskbalance._validation import check_in_range, check_seed
from taskbalance.methods._facts import BadHyperparameters
from taskbalance.methods._gradient_base import GradientBalancer

#: Up to this many task-coordinate entries (K × the features' width) the masks are computed
#: in the fewest tensor calls; above it, with the fewest float temporaries.
_FEW_COORDINATES = 2**16


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
    - P is not formed: ``P > U`` is decided as ``Σ_k G_k + Σ_k |G_k| > 2U·Σ_k |G_k|``, with
      no division and no epsilon (where every ``G_k`` is 0, or at an exact tie ``P = U``, no
      mask passes); LibMTL adds 1e-7 to P's denominator. Features mode decides in float64;
      parameters mode as ``(1 − U)·Σ_k max(G_k, 0) > U·Σ_k max(−G_k, 0)`` in the rows'
      dtype, with ``U`` drawn in it (float32 for float32 parameters: the draw, one per
      parameter entry, is the largest part of the rule's cost, and a float64 one costs about
      twice a float32 one), exact to rounding where those sums are normal numbers;
      One leak for all tasks (the paper allows one per task); the paper's monotone transfer
      ``f(P)`` is the identity, as in its experiments;
    - ``compute_weights`` is refused (the masks need the gradients, not their Gramian); steps
      between ``update_every`` refreshes apply ``Jᵀw`` with the last weights, drawing nothing.

    Args:
        num_tasks: K.
        leak: ℓ in [0, 1], the share of each dropped gradient that still passes.
        seed: seed of the balancer's own random generator.
        **options: ``params``, ``update_every``, ``gram_dtype``, ``heads``, ``normalization``
            (``"none"`` only), ``group_aggregation`` (``"joint"`` only), ``reuse_rows``: see
            :class:`GradientBalancer`; the loop options ``accumulation_steps``, ``on_nonfinite``:
            see :class:`Balancer`.

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
                norm_dtype=gram.dtype,  # float64 where the engine widened the Gramian
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
    norm_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, list[Tensor]]:
    """The kept shares ``w`` (float64 ``[K]``) and ``d``, one flat tensor per shared tensor.

    ``rows`` are this rank's rows in features mode (the masks come from the global sums) and
    the global rows in parameters mode, times ``row_scale`` (a power of two: the masks and
    shares do not depend on it, and ``d`` takes ``1/row_scale`` with the masks); one
    ``torch.rand`` per tensor is drawn from ``generator``, in the order of ``shared``.
    ``minus_sum`` gives ``d − Σ_k g_k`` instead of ``d`` (``rows`` are then this rank's own),
    in the same pass: the masks minus one weigh the rows. ``norm_dtype`` is the Gramian's
    dtype, in which parameters mode sums the rows' squares (see :func:`_parameters_direction`).
    """
    passed: Tensor | None = None  # Σ_c M_k·G_k², summed over the shared tensors
    total: Tensor | None = None  # Σ_c G_k²
    direction = []
    for tensor, row in zip(shared, rows, strict=True):
        if features_mode:
            tensor_passed, tensor_total, shared_direction = _features_direction(
                tensor, row, leak, generator, row_scale, minus_sum
            )
        else:
            tensor_passed, tensor_total, shared_direction = _parameters_direction(
                row, leak, generator, row_scale, minus_sum, norm_dtype
            )
        passed = tensor_passed if passed is None else passed + tensor_passed
        total = tensor_total if total is None else total + tensor_total
        direction.append(shared_direction)
    assert passed is not None  # at least one shared tensor
    assert total is not None
    # w_k = ℓ + (1 − ℓ)·Σ M_k G_k² / Σ G_k²: passed ≤ total (to rounding, hence the clamp),
    # so the only non-number is 0/0 (no gradient at all), which keeps ℓ; an infinite total
    # cannot come here: the Gramian of the same rows overflows first and refuses the call
    weights = torch.div(passed, total).nan_to_num_(nan=0.0).clamp_max_(1.0)
    if leak:
        weights.mul_(1 - leak).add_(leak)
    return weights, direction


def _features_direction(
    tensor: Tensor,
    row: Tensor,
    leak: float,
    generator: torch.Generator,
    row_scale: float,
    minus_sum: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Features mode: ``Σ_c M_k G_k²``, ``Σ_c G_k²`` (float64 ``[K]``) and the flat ``d``.

    The masks are decided per coordinate on the batch-summed ``G_k`` and applied to every
    sample's gradient, so each task's coefficients weigh its own per-sample rows.
    """
    num_tasks = row.shape[0]
    samples = tensor.shape[0] if tensor.dim() >= 1 else 1
    per_sample = row.reshape(num_tasks, samples, -1)
    # sign(A) is 0 or ±1: the products are exact; a half-precision batch sum would overflow
    # (the rows carry the engine's 2**16 scale), so those sum in float32
    signs = torch.sign(tensor.detach()).reshape(samples, -1)
    # One task at a time through one buffer, which then holds d: a K×S×C product would cost
    # a fresh allocation (page faults on the host) and a pass over memory per step (the
    # product, measured in the step: 0.02 ms faster at K = 2 and 4, 0.06 and 0.36 ms slower
    # at K = 8 and 16)
    buffer = torch.empty_like(per_sample[0])
    summed = torch.empty(
        num_tasks, buffer.shape[1], dtype=_accumulation_dtype(row.dtype), device=row.device
    )
    for k in range(num_tasks):
        torch.sum(torch.mul(per_sample[k], signs, out=buffer), 0, dtype=summed.dtype, out=summed[k])
    signed = all_reduce_sum(summed.to(torch.float64))
    passes = sign_dropout_mask(signed, generator)
    # Σ_c G_k² summed directly: a norm's square root would only be squared back
    squares = signed.square()
    total = squares.sum(1)
    passed = squares.mul_(passes).sum(1)
    coefficients = _coefficients(passes, row.dtype, leak, minus_sum, row_scale)
    direction = torch.mul(per_sample[0], coefficients[0], out=buffer)
    for k in range(1, num_tasks):
        direction.addcmul_(per_sample[k], coefficients[k])
    return passed, total, direction.reshape(-1)


def _parameters_direction(
    row: Tensor,
    leak: float,
    generator: torch.Generator,
    row_scale: float,
    minus_sum: bool,
    norm_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Parameters mode: ``Σ_c M_k G_k²``, ``Σ_c G_k²`` (float64 ``[K]``) and ``d``.

    ``G_k`` are the rows themselves, so the gradients kept at a coordinate are those of one
    sign ``s`` (+1, −1, or 0 for none): ``M_k G_k = s·max(s·G_k, 0)``. Each K×P temporary
    costs a pass over memory, and there is one; ``U`` is drawn in the rows' dtype (the draw
    is the largest part of the rule's cost, and a float64 one costs twice a float32 one).
    The squares are summed in ``norm_dtype``, the Gramian's: the engine hands on no rows whose
    Gramian overflows, so a float32 sum of their squares is finite where the Gramian is
    (a float64 one, three times dearer, is taken only with a float64 Gramian).
    """
    # Sums over the tasks as matrix-vector products: reducing the first dimension of a K×P
    # tensor with .sum(0) is measured two to three times slower
    ones = constant(1.0, (row.shape[0],), row.dtype, row.device)
    summed = torch.mv(row.T, ones)  # Σ_k G_k
    kept = row.clamp_min(0)
    positive = torch.mv(kept.T, ones)  # Σ_k max(G_k, 0)
    negative = positive - summed  # Σ_k max(−G_k, 0)
    # Drawn where the generator lives (the balancer's own, on the host), then moved
    uniform = torch.rand(row.shape[1], generator=generator, dtype=row.dtype).to(row.device)
    # P = positive / (positive + negative), so P > U ⟺ (1 − U)·positive − U·negative > 0:
    # neither product can overflow (1 − U is exact), and the sign of a difference is exact;
    # 0 at a tie or where every G_k is 0
    sign = torch.rsub(uniform, 1.0).mul_(positive).sub_(uniform.mul_(negative)).sign_()
    torch.mul(row, sign, out=kept).clamp_min_(0)  # |G_k|·M_k
    widen = norm_dtype == torch.float64 and row.dtype != torch.float64
    wide = torch.float64 if widen else None
    passed = torch.linalg.vector_norm(kept, dim=1, dtype=wide).to(torch.float64).square_()
    total = torch.linalg.vector_norm(row, dim=1, dtype=wide).to(torch.float64).square_()
    direction = torch.mv(kept.T, ones).mul_(sign)  # Σ_k M_k G_k
    if leak:
        direction.mul_(1 - leak).add_(summed, alpha=leak)
    if minus_sum:
        direction.sub_(summed)
    if row_scale != 1.0:
        direction.mul_(1 / row_scale)  # exact: the scale is a power of two
    return passed, total, direction


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _coefficients(
    passes: Tensor, dtype: torch.dtype, leak: float, minus_sum: bool, row_scale: float
) -> Tensor:
    """``ℓ + (1 − ℓ)·M_k`` (minus 1 for the shift) over the rows' scale, in ``dtype``."""
    high = (0.0 if minus_sum else 1.0) / row_scale  # exact: the scale is a power of two
    low = (leak - 1.0 if minus_sum else leak) / row_scale
    # Without a leak, M·(high − low) + low is exact in any dtype (one of the two is 0, the
    # other ±1/scale): two in-place passes, where() broadcasting two scalars being slow per
    # entry for wide features' many coordinates
    if passes.numel() > _FEW_COORDINATES and not leak:
        return passes.to(dtype).mul_(high - low).add_(low)
    return torch.where(
        passes, constant(high, (), dtype, passes.device), constant(low, (), dtype, passes.device)
    )


def sign_dropout_mask(signed: Tensor, generator: torch.Generator) -> Tensor:
    """``M_k = [P > U]·[G_k > 0] + [P < U]·[G_k < 0]`` (bool ``[K, C]``) for ``G = signed``.

    ``P = ½(1 + Σ_k G_k / Σ_k |G_k|)``, ½ where every ``G_k`` is 0; ``U`` is one
    ``torch.rand(C)`` draw from ``generator``, shared by the tasks.
    """
    absolute = signed.abs().sum(dim=0)
    uniform = torch.rand(signed.shape[1], generator=generator, dtype=torch.float64)
    # Where Σ_k |G_k| > 0: P > U ⟺ Σ_k G_k + Σ_k |G_k| − 2U·Σ_k |G_k| > 0 (and < for P < U),
    # so M_k = [G_k·sign(t) > 0] with t that threshold; where every G_k is 0, no M_k passes.
    threshold = torch.addcmul(
        signed.sum(dim=0).add_(absolute), uniform.to(signed.device), absolute, value=-2
    )
    if signed.numel() <= _FEW_COORDINATES:
        return (signed * threshold.sign_()) > 0
    # Wide features: K×C float temporaries cost a pass over memory each; boolean ones an
    # eighth of that.
    positive, negative = signed > 0, signed < 0
    positive &= threshold > 0
    negative &= threshold < 0
    return positive.logical_or_(negative)
