"""The base class of every gradient-based method: weights from the Gramian of task gradients."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._base import Balancer
from taskbalance._gramian import gramian_from_rows, jacobian_rows
from taskbalance._validation import check_choice, check_positive, check_positive_int


class GradientBalancer(Balancer):
    """A balancer whose weights depend on how the task gradients relate.

    Every subclass produces an update direction ``d = Jᵀw`` (J the K×P Jacobian of the task
    losses) from the Gramian ``G = J Jᵀ`` alone, and returns the objective ``Σ_k w_k L_k`` with
    ``w`` detached, whose ordinary backward is exactly ``Jᵀw``.

    Modes:

    - features mode (default): pass ``features=z``, the shared representation the task heads
      consume, at every call; ``G`` is taken with respect to ``z`` (MGDA-UB-style, cheap).
    - parameters mode: give ``params=`` (e.g. ``trunk[-1].parameters()``) at construction;
      ``G`` is the exact Gramian of the gradients with respect to those parameters.

    Task heads: each method follows its reference code (class attribute ``default_heads``).

    - ``heads="weighted"``: the objective is ``Σ w_k L_k``, so head k's parameters receive
      ``w_k·∇L_k`` — the reference code of MGDA, Nash-MTL and GradNorm backpropagates the
      weighted loss.
    - ``heads="unweighted"``: only the shared gradient becomes ``Jᵀw``; every head gets its own
      unweighted ``∇L_k`` — what the reference code of PCGrad, GradVac, IMTL-G, CAGrad,
      DB-MTL, Aligned-MTL, ConFIG and FairGrad, LibMTL and torchjd's ``mtl_backward`` do.
      Still one ordinary backward: the objective is ``Σ_k L_k + Σ_x ⟨x, Σ_k (w_k − 1)·∇_x L_k⟩``
      over the shared tensors x (the features z, or the listed parameters) with the second
      factor detached. Its value is ``Σ L_k``; its gradient at x is ``Σ_k w_k ∇_x L_k``, so the
      trunk below z (or each listed parameter) gets exactly ``Jᵀw``, the heads ``∇L_k``, and in
      parameters mode any shared parameter left out of ``params`` the plain sum. It matters
      most for methods with signed weights (PCGrad, GradVac, IMTL-G, Aligned-MTL, ConFIG),
      whose heads would otherwise be trained to *increase* their loss whenever ``w_k < 0``.
      The task gradients are then needed at every step, ``update_every`` steps included.

    ``b.weights`` are the weights of the shared direction in both cases; the gradient of the
    objective with respect to ``losses[k]`` is ``w_k`` (weighted) or 1 (unweighted).

    Args:
        num_tasks: K.
        params: shared parameters for parameters mode; None for features mode.
        update_every: recompute the weights every N steps and reuse the last weights in between
            (the Gramian is not even computed then). Nash-MTL's published speed-ups come from
            exactly this. 1 recomputes at every step.
        gram_dtype: precision of the Gramian, ``torch.float32`` (default) or ``torch.float64``.
        heads: ``"weighted"`` (objective ``Σ w_k L_k``), ``"unweighted"`` (heads get their own
            unweighted gradients, the shared tensors ``Jᵀw``) or None for the method's
            ``default_heads``.
    """

    requires_gram = True
    #: What the method's reference code gives the task heads; see "Task heads" above.
    default_heads: ClassVar[str] = "unweighted"

    def __init__(
        self,
        num_tasks: int,
        *,
        params: Iterable[Tensor] | None = None,
        update_every: int = 1,
        gram_dtype: torch.dtype = torch.float32,
        heads: str | None = None,
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
        chosen = self.default_heads if heads is None else heads
        self.heads = check_choice("heads", chosen, ("weighted", "unweighted"))
        # None until the first call tells whether this graph supports the batched backward.
        self._batched_backward: bool | None = None
        # The shared tensors and their per-task gradient rows of the call in progress (heads=
        # "unweighted" only); dropped as soon as the objective is built, so no graph is kept.
        self._call_inputs: list[Tensor] | None = None
        self._call_rows: list[Tensor] | None = None

    @abstractmethod
    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        """The method's rule: ``[K]`` weights from the losses and the Gramian.

        Must not change any state before it can no longer fail.
        """

    def _is_refresh_step(self) -> bool:
        return self._steps_taken % self.update_every == 0

    def _update(self, losses: Tensor, gram: Tensor | None, kpis: Tensor | None) -> Tensor:
        if not self._is_refresh_step():
            return self._last_weights.clone()
        assert gram is not None  # forward and compute_weights both supply it on refresh steps
        weights = self._gradient_weights(losses, gram.to(losses.device))
        return weights.to(device=losses.device, dtype=losses.dtype)

    def _check_call_inputs(self, losses: Tensor, features: Tensor | None) -> None:
        # Checked on every call, refresh step or not, so a wrong call fails at once rather than
        # only on the next refresh step, and before any DDP collective.
        if self.shared_params is None:
            if features is None:
                raise ValueError(
                    f"features: {self._method_name} is a gradient method and needs the shared "
                    "features at each call (b(losses, features=z)) or shared parameters at "
                    f"construction (tb.create({self._method_name!r}, num_tasks=..., "
                    "params=...)); got neither"
                )
            if not isinstance(features, Tensor):
                raise TypeError(f"features: expected a tensor, got {type(features).__name__}")
            if not features.requires_grad:
                raise ValueError(
                    "features: the tensor does not require grad; pass the shared "
                    "representation the task heads consume (not a detached copy)"
                )
        if not losses.requires_grad:
            raise ValueError(
                "losses: the losses do not require grad, so the task gradients cannot be "
                "measured; compute them from the model's output without .detach()"
            )

    def _gram_for_call(self, losses: Tensor, features: Tensor | None) -> Tensor | None:
        refresh = self._is_refresh_step()
        if not refresh and self.heads == "weighted":
            return None
        features_mode = self.shared_params is None
        if self.shared_params is not None:
            inputs = self.shared_params
        else:
            assert features is not None  # _check_call_inputs ran first
            inputs = [features]
        rows, path = jacobian_rows(losses, inputs, batched=self._batched_backward)
        # Once a graph needed the loop (path False), stop retrying the batched backward.
        if path is False:
            self._batched_backward = False
        if self.heads == "unweighted":
            self._call_inputs, self._call_rows = list(inputs), rows
        if not refresh:
            return None
        gram = gramian_from_rows(rows, features_mode=features_mode, dtype=self.gram_dtype)
        if not bool(torch.isfinite(gram).all()):
            self._call_inputs = self._call_rows = None
            source = "features" if features_mode else "params"
            raise ValueError(
                f"{source}: the task gradients are not finite (the Gramian has nan or inf "
                "entries), so no weights can be computed; the call is rejected and the "
                "balancer's state is unchanged. Under AMP, skip this step as GradScaler does"
            )
        return gram

    def _advance(self, losses: Tensor, gram: Tensor | None, kpis: Tensor | None) -> Tensor:
        try:
            return super()._advance(losses, gram, kpis)
        except BaseException:
            # A failed step must not keep the call's graph alive through the stashed tensors.
            self._call_inputs = self._call_rows = None
            raise

    def _objective(self, losses: Tensor, weights: Tensor, statistics: Tensor) -> Tensor:
        if self.heads == "weighted":
            return super()._objective(losses, weights, statistics)
        inputs, rows = self._call_inputs, self._call_rows
        self._call_inputs = self._call_rows = None
        assert inputs is not None
        assert rows is not None
        # ⟨x, v⟩ adds Σ_k (w_k − 1)·∇_x L_k to the shared tensor's gradient only: the heads
        # never see it.
        shifts = (weights - 1).detach()
        inner = losses.new_zeros(())
        for tensor, row in zip(inputs, rows, strict=True):
            correction = torch.mv(row.T, shifts.to(row.dtype)).to(tensor.dtype)
            inner = inner + torch.dot(tensor.reshape(-1), correction).to(losses.dtype)
        return losses.sum() + (inner - inner.detach())

    def extra_repr(self) -> str:
        mode = "features" if self.shared_params is None else "params"
        return (
            f"num_tasks={self.num_tasks}, mode={mode}, update_every={self.update_every}, "
            f"heads={self.heads}"
        )


def inverse_gradient_norms(gram: Tensor, eps: float) -> Tensor:
    """``1/‖g_i‖`` from a float64 Gramian, for the methods that normalise task gradients.

    A gradient with ``‖g_i‖² ≤ eps²·max_j ‖g_j‖²`` (``eps`` the machine epsilon of the dtype
    the Gramian was accumulated in) is rounding noise: it counts as zero, with ``1/‖g_i‖ = 0``,
    so the normalised Gramian stays bounded.
    """
    squared_norms = gram.diagonal()
    negligible = eps**2 * squared_norms.max().clamp_min(0)
    norms = squared_norms.clamp_min(0).sqrt()
    inverse = 1.0 / norms.clamp_min(1e-300)
    return torch.where(squared_norms > negligible, inverse, torch.zeros_like(norms))


def spectral_cutoff(gram: Tensor, rtol: float | None) -> float:
    """Relative eigenvalue cut-off: ``rtol``, or ``100·K·eps`` of the Gramian's dtype.

    The reference codes use ``K·eps``; a Gramian accumulated over 10⁴ coordinates carries
    rounding of about ``K·eps·λ_max``, which that cut would take for a real eigenvalue.
    """
    if rtol is not None:
        return rtol
    return 100 * gram.shape[0] * torch.finfo(gram.dtype).eps


class SpectralGradientBalancer(GradientBalancer):
    """A gradient method that inverts or whitens the Gramian (IMTL-G, ConFIG, Aligned-MTL).

    Args:
        num_tasks: K.
        rtol: relative eigenvalue cut-off below which directions count as rank-deficient;
            None for ``100·K·eps`` of the Gramian's dtype (see :func:`spectral_cutoff`).
        **options: see :class:`GradientBalancer`.
    """

    def __init__(self, num_tasks: int, *, rtol: float | None = None, **options: Any) -> None:
        super().__init__(num_tasks, **options)
        self.rtol = None if rtol is None else check_positive("rtol", rtol)
