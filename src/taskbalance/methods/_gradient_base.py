"""The base class of every gradient-based method: weights from the Gramian of task gradients."""

from __future__ import annotations

import itertools
import math
import warnings
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from taskbalance._base import Balancer
from taskbalance._constants import constant
from taskbalance._distributed import all_reduce_sum, is_distributed
from taskbalance._gramian import (
    all_finite,
    complex_tensor_message,
    global_rows,
    gramian_from_rows,
    has_subnormal_norm,
    task_gradients,
)
from taskbalance._reuse_rows import SharedGradient, objective_from_rows
from taskbalance._step import Step
from taskbalance._validation import (
    check_choice,
    check_in_range,
    check_positive_int,
)
from taskbalance._warnings import warn_at_callers_line
from taskbalance.methods._facts import SCALE_EQUIVARIANT

#: Refresh steps in a row without every task after which a gradient method warns.
_ABSENT_REFRESHES_WARNING = 100


class GradientBalancer(Balancer):
    """A balancer whose weights depend on how the task gradients relate.

    Every subclass produces an update direction ``d = Jᵀw`` (J the K×P Jacobian of the task
    losses) from the Gramian ``G = J Jᵀ`` alone, and returns the objective ``Σ_k w_k L_k`` with
    ``w`` detached, whose ordinary backward is exactly ``Jᵀw``.

    Modes:

    - features mode (default): pass ``features=z``, the shared representation the task heads
      consume, at every call; ``G`` is taken with respect to ``z`` (MGDA-UB-style, cheap).
      Several separate shared tensors (two encoders, or feature maps of parallel branches)
      go as a list, ``features=[z1, z2]``: ``G`` is the sum of their Gramians, and with
      ``heads="unweighted"`` each of them receives its own ``J_iᵀw``. None may be computed
      from another (``z2 = stage2(z1)`` would count the path through ``z2`` twice): that is
      refused with a ValueError.
    - parameters mode: give ``params=`` (e.g. ``trunk[-1].parameters()``, or one tensor) at
      construction; ``G`` is the exact Gramian of the gradients with respect to those
      parameters. A deep copy of a model that holds the balancer points the copy's balancer at
      the copied parameters; a balancer deep-copied on its own keeps copies that no loss
      reaches.

    Every Gramian, computed or given to ``compute_weights``, follows one rule: a float, K×K,
    finite matrix, symmetric up to rounding (``(G + Gᵀ)/2`` is used; a larger asymmetry is
    refused). A step with a task absent (``present=``) reuses the last weights for the
    present tasks: the rule needs every task's gradient. With ``on_nonfinite="skip"``, a
    non-finite Gramian (the all-reduced one under DDP, so every rank agrees) skips the step.

    Task heads: each method follows its reference code (class attribute ``default_heads``).

    - ``heads="weighted"``: the objective is ``Σ w_k L_k``, so head k's parameters receive
      ``w_k·∇L_k`` — the reference code of MGDA, Nash-MTL and GradNorm backpropagates the
      weighted loss.
    - ``heads="unweighted"``: only the shared gradient becomes ``Jᵀw``; every head gets its own
      unweighted ``∇L_k`` — what the reference code of PCGrad, GradVac, IMTL-G, CAGrad,
      DB-MTL, Aligned-MTL, ConFIG and FairGrad, LibMTL and torchjd's ``mtl_backward`` do.
      DB-MTL's reference trains on ``log(L_k + ε)``: its heads get that log-loss's gradient,
      ``∇L_k / (L_k + ε)`` (a method's ``c_k`` below, ``_head_coefficients``).
      Still one ordinary backward: the objective is ``Σ_k L_k + Σ_x ⟨x, Σ_k (w_k − 1)·∇_x L_k⟩``
      over the shared tensors x (the features z, or the listed parameters) with the second
      factor detached. Its value is ``Σ L_k``; its gradient at x is ``Σ_k w_k ∇_x L_k``, so the
      trunk below z (or each listed parameter) gets exactly ``Jᵀw``, the heads ``∇L_k``, and in
      parameters mode any shared parameter left out of ``params`` the plain sum. It matters
      most for methods with signed weights (PCGrad, GradVac, IMTL-G, Aligned-MTL, ConFIG),
      whose heads would otherwise be trained to *increase* their loss whenever ``w_k < 0``.
      The task gradients are then needed at every step, ``update_every`` steps included.

    ``b.weights`` are the weights of the shared direction in both cases; the gradient of the
    objective with respect to ``losses[k]`` is ``w_k`` (weighted) or 1 (unweighted; DB-MTL:
    ``1 / (L_k + ε)``).

    Shared direction: a method may instead set the shared tensors' gradient to any direction
    ``d`` it computes from the task gradients (DB-MTL's EMA of gradient vectors, MoCo's
    tracked gradients, GradDrop's sign masks): its rule sets ``step.direction`` on refresh
    steps, and the objective becomes ``Σ_k c_k L_k + Σ_x ⟨x, d_x − Σ_k c_k ∇_x L_k⟩`` with
    the second factor detached and ``c = w`` (weighted heads) or 1, still one ordinary
    backward: each shared tensor gets exactly ``d_x``, head k gets ``c_k ∇L_k``. (A rule that
    computes the second factor itself more cheaply sets ``step.shift`` instead: GradDrop.) In
    parameters mode under DDP the rows are averaged over the ranks first (one all-reduce,
    which also gives the Gramian), so ``d`` is the global batch's on every rank; the
    objective's shift uses this rank's own rows, so DDP's own gradient average leaves ``d``
    unchanged. The other calls (between ``update_every`` refreshes, with an absent task, and
    the micro-batches after the first of an accumulation window) apply ``Jᵀw`` with the
    last weights and leave the method's state alone; ``compute_weights`` (a Gramian only)
    cannot update such a rule where it reads the gradients themselves and refuses it.

    Gradient normalisation (``normalization=``, the normalisers of MGDA's reference code, for
    every method whose class offers it): each task gradient is divided by ``n_k`` before the
    method's rule runs, ``g'_k = g_k / n_k``, i.e. ``J' = D J`` with ``D = diag(1/n_k)``:

    - ``"none"``: ``n_k = 1`` (the default everywhere);
    - ``"l2"``: ``n_k = ‖g_k‖`` (a zero gradient, ``‖g_k‖ ≤ 2**-64·max_j ‖g_j‖``, keeps
      ``1/n_k = 0``: it stays zero rather than becoming an unbounded one);
    - ``"loss"``: ``n_k = L_k``, the (rank-averaged) loss value, which must then be > 0;
    - ``"loss+"``: ``n_k = L_k·‖g_k‖``.

    Only the Gramian is needed: the rule runs on ``G' = D G D`` and gives ``w'``, and the
    weights are mapped back, ``w_k = w'_k / n_k``, so that ``Jᵀw = J'ᵀw'``: the direction is
    the method's direction for the normalised gradients. MGDA follows its reference code
    instead (``normalization_maps_back = False``): ``w'`` multiplies the raw gradients. Methods
    that already remove the gradients' magnitudes (IMTL-G, ConFIG, Aligned-MTL, DB-MTL), or
    whose rule reads the raw magnitudes by design (GradNorm, Nash-MTL, FairGrad, ExcessMTL),
    refuse any value but ``"none"``, saying why (class attribute ``normalization_refused``).

    Per-group aggregation (parameters mode): ``params=`` may list parameter groups, as a
    list of lists (``[list(layer1.parameters()), list(layer2.parameters())]``) or a dict
    ``{name: parameters}``. With ``group_aggregation="per_group"`` each group g gets its own
    Gramian ``G_g = J_g J_gᵀ`` (``J_g`` the task gradients with respect to the group's
    parameters), its own weights ``w_g`` from the method's rule (normalised per group, as
    above), and its parameters the gradient ``J_gᵀw_g``: GradVac's paper applies its rule per
    layer, LibMTL and torchjd offer the same. ``"per_tensor"`` makes each listed tensor its own
    group; ``"joint"`` (default) takes one Gramian over every listed parameter, groups or not.
    Still one ordinary backward; the heads get their own unweighted gradients, so per-group
    aggregation needs ``heads="unweighted"`` (with ``"weighted"`` the heads would get one
    weighting of several: refused). ``b.group_weights`` is the ``[num_groups, K]`` weights of
    the last call, ``b.group_names`` the groups' names (the dict's keys, else ``"0"``, ``"1"``,
    ...), and ``b.weights`` their mean over the groups. ``compute_weights`` then takes a
    ``[num_groups, K, K]`` stack of Gramians. State carried across steps is kept per group
    where the method declares it (class attribute ``group_state``: GradVac's targets get a
    leading group dimension); DB-MTL's averages, GradNorm's learned weights and ExcessMTL's
    sums do not, and those methods refuse per-group aggregation (class attribute
    ``per_group_refused``). Under DDP in parameters mode the engine all-reduces each group's
    Jacobian block separately.

    The loop options every method takes, ``accumulation_steps`` and ``on_nonfinite``: see
    :class:`Balancer`.

    Args:
        num_tasks: K.
        params: shared parameters for parameters mode; None for features mode.
        update_every: recompute the weights every N steps and reuse the last weights in between
            (the Gramian is not even computed then). Nash-MTL's published speed-ups come from
            exactly this. 1 recomputes at every step. Steps are optimiser steps: with
            ``accumulation_steps``, windows of micro-batches.
        gram_dtype: precision of the Gramian, ``torch.float32`` (default) or ``torch.float64``;
            with float64 the kept weights (``weights``, the state) are float64 too. A float32
            Gramian that would fall below float32's normal range (every task gradient's norm
            below ~1e-19) is computed in float64 for that step. Float64 weights that float32
            losses or kept weights cannot hold (Nash-MTL's and FairGrad's grow as 1/‖g‖) are
            refused with a ``ValueError``.
        heads: ``"weighted"`` (objective ``Σ w_k L_k``), ``"unweighted"`` (heads get their own
            unweighted gradients, the shared tensors ``Jᵀw``) or None for the method's
            ``default_heads``.
        normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"`` (see above).
        group_aggregation: ``"joint"``, ``"per_group"`` or ``"per_tensor"`` (see above).
        reuse_rows: parameters mode only. True gives the listed parameters their gradient
            straight from the task-gradient rows the engine has computed (``Jᵀw``, or the
            method's direction), as torchjd's ``jac_to_grad`` does, instead of a second
            backward through them: the objective's backward then runs only through the rest
            of the graph (the heads, parameters left out of ``params``), so a step listing the
            whole trunk costs K backward passes through it instead of K + 1. The gradients are
            the same (to rounding). Not the default because the backward differs from an
            ordinary one: hooks on tensors inside the listed region never see the final
            gradient (they are called with None instead), hooks on the listed parameters and
            listed non-leaf tensors are refused, the graph is freed by the first backward
            whatever ``retain_graph`` says (a second one is refused), a term added to the
            objective that reaches the listed region (an auxiliary loss on the model's
            outputs) is refused in the backward, and ``create_graph=True`` is refused. It
            adds a fixed cost per call (a walk of the graph in Python, one more autograd node),
            so on a trunk whose backward costs less than that it is slower. See
            :mod:`taskbalance._reuse_rows`.

    Example:
        >>> import torch, taskbalance as tb
        >>> layer1, layer2 = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4)
        >>> b = tb.create("upgrad", num_tasks=2, normalization="l2",
        ...               params={"layer1": layer1.parameters(), "layer2": layer2.parameters()},
        ...               group_aggregation="per_group")
        >>> b.group_weights.shape, b.group_names
        (torch.Size([2, 2]), ('layer1', 'layer2'))
    """

    requires_gram = True
    #: What the method's reference code gives the task heads; see "Task heads" above.
    default_heads: ClassVar[str] = "unweighted"
    #: Why the method refuses ``normalization`` other than ``"none"``; None where it offers it.
    normalization_refused: ClassVar[str | None] = "the method does not declare that it offers it"
    #: True where the normalised rule's weights are mapped back (``w = D w'``); MGDA's
    #: reference code applies ``w'`` to the raw gradients instead.
    normalization_maps_back: ClassVar[bool] = True
    #: Why the method refuses per-group aggregation; None where it offers it.
    per_group_refused: ClassVar[str | None] = "the method does not declare that it offers it"

    #: Buffers holding state carried across steps that each parameter group keeps its own
    #: copy of under per-group aggregation (stacked along a leading group dimension; the rule
    #: sees one group's copy at a time).
    group_state: ClassVar[tuple[str, ...]] = ()
    #: Buffers of task-gradient vectors (``[K, P]`` state) kept in the rows' precision: made
    #: at construction in the listed parameters' dtype, widened by :meth:`_keep_rows_state`
    #: when the rows are wider (a model made float64 after the balancer was built, or holding
    #: it: ``.double()`` leaves a balancer's state dtypes alone) and by a checkpoint saved
    #: wider; never narrowed.
    rows_state: ClassVar[tuple[str, ...]] = ()

    _last_group_weights: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        params: Iterable[Tensor] | Tensor | None = None,
        update_every: int = 1,
        gram_dtype: torch.dtype = torch.float32,
        heads: str | None = None,
        normalization: str = "none",
        group_aggregation: str = "joint",
        reuse_rows: bool = False,
    ) -> None:
        super().__init__(num_tasks)
        # Not state: a resumed balancer walks the new DDP's first graph as well.
        self._static_graph_checked = False
        groups = None if params is None else _checked_groups(params)
        # A plain list, so the model's parameters do not become this module's parameters.
        self.shared_params: list[Tensor] | None = (
            None if groups is None else [p for _, group in groups for p in group]
        )
        self.update_every = check_positive_int("update_every", update_every)
        if gram_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"gram_dtype: expected torch.float32 or torch.float64, got {gram_dtype}"
            )
        self.gram_dtype = gram_dtype
        if gram_dtype == torch.float64:
            # Steps that reuse the weights (update_every, accumulation, an absent task) apply
            # the refresh step's float64 weights to float64 losses, not a float32 rounding of
            # them (float32 losses get float32 weights at every step).
            self._last_weights = self._last_weights.double()
        chosen = self.default_heads if heads is None else heads
        self.heads = check_choice("heads", chosen, ("weighted", "unweighted"))
        self.normalization = check_choice("normalization", normalization, _NORMALIZATIONS)
        if self.normalization != "none" and self.normalization_refused is not None:
            raise ValueError(
                f"normalization: {self._method_name} does not offer gradient normalisation "
                f"({self.normalization_refused}); expected 'none', got {normalization!r}"
            )
        if self.normalization in ("loss", "loss+"):
            # The losses divide the gradients: a fact of this instance, not of the class.
            self.requires_positive_losses = True
        self.group_aggregation = check_choice(
            "group_aggregation", group_aggregation, ("joint", "per_group", "per_tensor")
        )
        # The groups' names and sizes (tensors per group) where each gets its own Gramian.
        self._group_sizes: tuple[int, ...] | None = None
        self.group_names: tuple[str, ...] = ("all",)
        # The grouping is part of the method's definition: recorded (as shapes) in the state.
        self._group_shapes = (
            None
            if groups is None or len(groups) == 1
            else [[name, [list(p.shape) for p in group]] for name, group in groups]
        )
        if self.group_aggregation != "joint":
            self._check_per_group(groups)
            assert groups is not None
            if self.group_aggregation == "per_tensor":
                groups = [
                    (f"{name}.{i}" if len(groups) > 1 else str(i), [p])
                    for name, group in groups
                    for i, p in enumerate(group)
                ]
            self._group_sizes = tuple(len(group) for _, group in groups)
            self.group_names = tuple(name for name, _ in groups)
            self.register_buffer(
                "_last_group_weights",
                torch.ones(len(groups), self.num_tasks, dtype=self._last_weights.dtype),
            )
        if not isinstance(reuse_rows, bool):
            raise TypeError(f"reuse_rows: expected True or False, got {reuse_rows!r}")
        if reuse_rows:
            if self.shared_params is None:
                raise ValueError(
                    "reuse_rows=True needs parameters mode (params=): in features mode the "
                    "objective's backward is the only one through the trunk, so there is no "
                    "second pass to save"
                )
            for index, tensor in enumerate(self.shared_params):
                if not tensor.is_leaf:
                    raise ValueError(
                        f"params[{index}]: with reuse_rows=True every listed tensor must be a "
                        f"leaf (a parameter), got one computed by {type(tensor.grad_fn).__name__} "
                        f"(shape {tuple(tensor.shape)}): its gradient would pass on to the "
                        "tensors it is computed from as well. List the parameters themselves, "
                        "or use reuse_rows=False"
                    )
        self.reuse_rows = reuse_rows
        # None until the first call tells whether this graph supports the batched backward.
        self._batched_backward: bool | None = None
        self._warned_tasks_apart = False
        # Refresh steps in a row skipped because a task was absent (a host counter for a
        # warning; not part of the state).
        self._absent_refreshes = 0
        # The Gramian of the last refresh, for log_dict's cosines (None before one).
        self._last_gram: Tensor | None = None

    def _check_per_group(self, groups: list[tuple[str, list[Tensor]]] | None) -> None:
        what = f"group_aggregation: {self.group_aggregation!r}"
        if self.per_group_refused is not None:
            raise ValueError(
                f"{what}: {self._method_name} does not offer per-group aggregation "
                f"({self.per_group_refused}); use group_aggregation='joint'"
            )
        if groups is None:
            raise ValueError(
                f"{what} needs parameters mode: pass params= as a list of parameter groups or "
                "a dict {name: parameters} (features mode has one Gramian per call)"
            )
        if self.heads != "unweighted":
            raise ValueError(
                f"{what} needs heads='unweighted' (got heads={self.heads!r}): the heads get one "
                "weighting of the losses, which cannot be each group's"
            )

    @property
    def group_weights(self) -> Tensor:
        """Detached ``[num_groups, K]`` weights of the last call (``[1, K]`` unless each
        parameter group has its own; see "Per-group aggregation")."""
        if self._group_sizes is None:
            return self.weights[None]
        present = self._last_present[None]
        return torch.where(present, self._last_group_weights, 0).detach().clone()

    def _record_configuration(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super()._record_configuration(args, kwargs)
        # How the backward runs, not what it computes: a checkpoint loads either way.
        self.configuration.pop("reuse_rows", None)
        if self._group_shapes is not None:
            self.configuration["params"] = self._group_shapes

    def _check_gram(self, gram: Tensor | None) -> Tensor:
        if self._group_sizes is None or gram is None or not isinstance(gram, Tensor):
            return super()._check_gram(gram)
        expected = (len(self._group_sizes), self.num_tasks, self.num_tasks)
        if tuple(gram.shape) != expected:
            raise ValueError(
                f"gram: with group_aggregation={self.group_aggregation!r}, expected one Gramian "
                f"per group, shape {expected}, got {tuple(gram.shape)}"
            )
        blocks = []
        for name, block in zip(self.group_names, gram.unbind(0), strict=True):
            try:
                blocks.append(super()._check_gram(block))
            except ValueError as error:
                raise ValueError(f"{error} (the Gramian of group {name!r})") from None
        return torch.stack(blocks)

    def _weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        """The rule on ``G' = D G D`` (``normalization``), its weights mapped back to ``J``."""
        if self.normalization == "none":
            return self._gradient_weights(losses, self._within_range(gram))
        scale = gradient_normalisers(gram, losses, self.normalization)
        # The rule sees the dtype the Gramian was accumulated in: its rounding cut-offs
        # (ranks, eigenvalues) are relative to that precision (except for a G' that float32
        # cannot hold, below, whose float64 cut-offs are then finer than its data). D G D is
        # formed with D scaled by a power of two (exact) so that no product over- or
        # underflows, then scaled back where it fits the dtype: only the methods with
        # w(s²G) = w(G) offer a normalisation, and G' past the dtype's range would give them
        # wrong weights or none.
        exponent = math.frexp(float(scale.abs().max()))[1]
        unit_scale = scale * math.ldexp(1.0, -exponent)
        normalised = gram.double() * torch.outer(unit_scale, unit_scale)
        diagonal = normalised.diagonal().tolist()  # one host copy: the range and the check
        shift = _range_shift(max(diagonal), gram.dtype, 2 * exponent)
        normalised = _times_power_of_two(normalised, shift)
        # Cauchy-Schwarz, |G'_ij| ≤ √(G'_ii·G'_jj), holds for every Gramian, but the scaling's
        # rounding may break it by an ulp (opposite unit gradients give 1 − 2⁻⁵³ on the diagonal
        # next to −1), and a QP solver then follows a negative curvature that does not exist.
        # Off-diagonal entries are kept a few ulps (of the accumulation dtype) inside the
        # bound. Those within the band move too, not only those past the bound: a rank-one G'
        # (every entry at its bound up to rounding) then moves alike and stays positive
        # semi-definite, where moving only some of its entries makes it indefinite.
        roots = normalised.diagonal().clamp_min(0).sqrt()
        bound = torch.outer(roots, roots) * (1 - 4 * torch.finfo(gram.dtype).eps)
        clamped = torch.minimum(torch.maximum(normalised, -bound), bound)
        off_diagonal = ~torch.eye(len(roots), dtype=torch.bool, device=roots.device)
        # A float32 G' whose smallest non-zero norm would be subnormal or 0 there (losses ~1e30
        # apart under "loss") stays float64, as the engine widens a Gramian that underflows:
        # cast back, that task would count as a zero gradient and the rule would leave it out.
        narrow = gram.dtype != torch.float64 and has_subnormal_norm(
            math.ldexp(value, shift)
            for value in diagonal  # exact, as _times_power_of_two
        )
        rule_dtype = torch.float64 if narrow else gram.dtype
        normalised = torch.where(off_diagonal, clamped, normalised).to(rule_dtype)
        weights = self._gradient_weights(losses, normalised)
        if not self.normalization_maps_back:
            return weights
        return (weights.double() * scale.to(weights.device)).to(weights.dtype)

    def _within_range(self, gram: Tensor) -> Tensor:
        """``gram``, or for a rule with ``w(s²G) = w(G)`` a float64 one whose largest diagonal
        entry is beyond ``2**±500`` scaled by a power of two (exact), as the rules' products of
        inverse norms (``1/(‖g_i‖·‖g_j‖)``) overflow float64 below ~1e-308 and lose bits on
        subnormal entries. A float32 Gramian's range cannot reach that."""
        claimed: frozenset[str] = getattr(type(self), "claimed_properties", frozenset())
        if gram.dtype != torch.float64 or SCALE_EQUIVARIANT not in claimed:
            return gram
        shift = _range_shift(float(gram.diagonal().max()), torch.float64, 0)
        return gram if shift == 0 else _times_power_of_two(gram, shift)

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """As :meth:`torch.nn.Module.register_buffer`; a ``group_state`` buffer gets one copy
        per parameter group under per-group aggregation."""
        sizes = getattr(self, "_group_sizes", None)
        if tensor is not None and sizes is not None and name in self.group_state:
            tensor = tensor.unsqueeze(0).repeat(len(sizes), *([1] * tensor.dim()))
        super().register_buffer(name, tensor, persistent)

    def _grouped_weights(self, losses: Tensor, grams: Tensor) -> Tensor:
        """``[num_groups, K]``: the rule on each group's Gramian (and state), all or nothing."""
        generator = getattr(self, "generator", None)
        saved = None if generator is None else generator.get_state()
        stacked: dict[str, Tensor] = {}
        for name in self.group_state:
            buffer = self._buffers[name]
            assert buffer is not None  # registered by the method's __init__
            stacked[name] = buffer
        weights: list[Tensor] = []
        states: list[dict[str, Tensor | None]] = []
        try:
            for g, gram in enumerate(grams.unbind(0)):
                for name, full in stacked.items():
                    self._buffers[name] = full[g].clone()  # the rule updates its own copy
                weights.append(self._weights(losses, gram))
                states.append({name: self._buffers[name] for name in stacked})
        except BaseException:
            if generator is not None:
                generator.set_state(saved)
            raise
        finally:
            self._buffers.update(stacked)
        for g, state in enumerate(states):
            for name, value in state.items():
                assert value is not None
                stacked[name][g].copy_(value)
        return torch.stack(weights)

    def _tensor_weights(self, step: Step, weights: Tensor) -> list[Tensor]:
        """The weights acting on each shared tensor: its group's, or ``weights`` for all."""
        assert step.shared is not None
        if step.group_weights is None or self._group_sizes is None:
            return [weights] * len(step.shared)
        per_group = step.group_weights.to(device=weights.device, dtype=weights.dtype)
        # One view per group, listed once per tensor (the objective computes shifts per view).
        views = [per_group[g] for g in range(len(self._group_sizes))]
        return [
            view for view, size in zip(views, self._group_sizes, strict=True) for _ in range(size)
        ]

    @abstractmethod
    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        """The method's rule: ``[K]`` weights from the mean losses and the Gramian.

        In float64 or the Gramian's dtype, never rounded to float32 first: :meth:`_update`
        casts them to the Gramian's dtype, so a float64 Gramian gets float64-precise weights.
        Must not change any state before it can no longer fail.
        """

    def _rule(self, step: Step, gram: Tensor) -> Tensor:
        """This refresh step's weights; a method whose shared direction is not ``Jᵀw`` also
        sets ``step.direction`` here, from ``step.global_rows`` (None in ``compute_weights``).

        The direction is then applied by :meth:`_objective` in one ordinary backward; the
        other steps (``update_every``, an absent task) apply ``Jᵀw`` with the last weights.
        """
        return self._weights(step.mean_losses, gram)

    def _direction_from_rows(self) -> bool:
        """True when this balancer computes its direction from the rows (see :meth:`_rule`):
        in parameters mode under DDP the rows are then averaged over the ranks once, and the
        Gramian is taken from those averaged rows."""
        return False

    def _refreshes(self, step: Step) -> bool:
        # Every task's gradient is needed to recompute: a step with an absent task reuses the
        # last weights for the present ones, as between two update_every refreshes.
        due = self._steps_taken % self.update_every == 0
        if due and not step.all_present:
            self._absent_refreshes += 1
            if self._absent_refreshes == _ABSENT_REFRESHES_WARNING:
                warnings.warn(
                    f"present: {self._method_name} has not recomputed its weights for "
                    f"{_ABSENT_REFRESHES_WARNING} refresh steps in a row because some task was "
                    "absent each time; its rule needs every task's gradient, so it keeps "
                    "reusing its last weights. If some task is missing from most batches, "
                    "use a loss-based method, or larger batches that hold every task",
                    RuntimeWarning,
                    stacklevel=4,
                )
        elif due and self._absent_refreshes:
            self._absent_refreshes = 0
        return due and step.all_present

    def _update(self, step: Step) -> Tensor:
        if not step.refresh:
            return self._last_weights.clone()
        assert step.gram is not None  # _prepare or compute_weights supplies it on refresh steps
        gram = step.gram.to(step.mean_losses.device)
        if self._group_sizes is None:
            weights = self._rule(step, gram)
            total = gram
        else:
            group_weights = self._grouped_weights(step.mean_losses, gram).to(
                device=step.mean_losses.device, dtype=gram.dtype
            )
            weights, total = group_weights.mean(0), gram.sum(0)
        self._refuse_unfit_weights(
            group_weights if self._group_sizes else weights, gram, step.losses.dtype
        )
        if self._group_sizes is not None:
            self._last_group_weights.copy_(group_weights)
            step.group_weights = group_weights
        # Kept for log_dict's cosines, which are computed only when asked for (a plain
        # attribute: nn.Module.__setattr__'s checks would cost more than the rest). No copy:
        # step.gram is this call's own tensor (never the caller's), and no rule writes to it.
        object.__setattr__(self, "_last_gram", total)
        return weights.to(device=step.mean_losses.device, dtype=gram.dtype)

    def _refuse_unfit_weights(
        self, weights: Tensor, gram: Tensor, losses_dtype: torch.dtype
    ) -> None:
        """Float64 weights (of a float64 Gramian, widened or given) that are kept or applied
        in float32 must fit it (:meth:`_check_weights_fit`). A rule with state calls this
        before it commits, so that the refusal changes nothing."""
        if gram.dtype == torch.float64 and torch.float32 in (
            self._last_weights.dtype,
            losses_dtype,
        ):
            self._check_weights_fit(weights)

    def _check_weights_fit(self, weights: Tensor) -> None:
        """Refuse float64 weights (of a float64 Gramian) that the kept float32 weights or the
        float32 objective cannot hold: Nash-MTL's and FairGrad's grow as 1/‖g‖, past float32's
        range once the task gradients are themselves below its normal range."""
        largest = float(weights.abs().max())
        if largest <= torch.finfo(torch.float32).max:
            return
        raise ValueError(
            f"losses: {self._method_name}'s weights at this step reach {largest:.3g}, beyond "
            "torch.float32's range: its weights grow as the task gradients shrink, "
            "and theirs are below ~1e-38, where float32 holds the gradients themselves only as "
            "subnormal numbers. The call is rejected and the balancer's state is unchanged; "
            "scale the losses up (the weights scale down by the same factor)"
        )

    def _check_call_inputs(
        self, losses: Tensor, features: Tensor | Sequence[Tensor] | None
    ) -> list[Tensor]:
        # Checked on every call, refresh step or not, so a wrong call fails at once rather than
        # only on the next refresh step, and before any DDP collective.
        if not self._static_graph_checked and is_distributed():
            # A walk of the losses' graph in Python: at this object's first call, which is
            # DDP's first iteration (the only one whose graph holds the node it looks for),
            # also after a resume (num_calls then counts the earlier run's calls).
            _refuse_static_graph_ddp(losses)
            self._static_graph_checked = True
        if self.shared_params is not None:
            if self.reuse_rows:
                _refuse_hooked_parameters(self.shared_params)
            return self.shared_params
        if features is None:
            raise ValueError(
                f"features: {self._method_name} is a gradient method and needs the shared "
                "features at each call (b(losses, features=z)) or shared parameters at "
                f"construction (tb.create({self._method_name!r}, num_tasks=..., "
                "params=...)); got neither"
            )
        if isinstance(features, Tensor):
            tensors: list[Tensor] = [features]
        elif isinstance(features, Sequence) and not isinstance(features, str) and features:
            tensors = list(features)
        else:
            raise TypeError(
                f"features: expected a tensor or a non-empty list of tensors, got {features!r}"
            )
        advice = (
            "pass the shared representation the task heads consume (not a detached copy; a "
            "trunk under torch.utils.checkpoint(..., use_reentrant=True) whose input does not "
            "require grad gives an output without grad: pass use_reentrant=False)"
        )
        _check_tensors("features", tensors, isinstance(features, Tensor), advice)
        if len(tensors) > 1:
            # The graph walk costs a pass over the trunk's graph in Python: done at the first
            # call, which fixes how the model produces its features; the identity check is free.
            _check_disjoint(tensors, walk_graph=self._calls_taken == 0)
        return tensors

    def _prepare(self, step: Step) -> None:
        """The task gradients (on refresh steps, or at every step for unweighted heads)."""
        if not step.refresh and self.heads == "weighted":
            return
        assert step.features is not None  # _check_call_inputs returned the shared tensors
        features_mode = self.shared_params is None
        # Rows of the global (rank-averaged) gradients for a direction computed from them in
        # parameters mode under DDP: one all-reduce of the K×P rows serves the direction and
        # the Gramian alike.
        reduce_rows = self._direction_from_rows() and not features_mode and is_distributed()
        averaged: list[list[Tensor]] = []

        def gramian_of(rows: list[Tensor], wide: bool) -> Tensor:
            # wide: float64 for this step only, where a float32 Gramian would underflow (the
            # engine decides; the weights are then float64 too, and kept in gram_dtype).
            dtype = torch.float64 if wide else self.gram_dtype
            if self._group_sizes is not None:
                bounds = [0, *itertools.accumulate(self._group_sizes)]
                return torch.stack(
                    [
                        gramian_from_rows(rows[a:b], features_mode=False, dtype=dtype)
                        for a, b in itertools.pairwise(bounds)
                    ]
                )
            if reduce_rows:
                if not wide:  # the widening pass reuses the last call's rows, averaged there
                    averaged[:] = [global_rows(rows)]
                return gramian_from_rows(
                    averaged[0], features_mode=False, dtype=dtype, reduce=False
                )
            return gramian_from_rows(rows, features_mode=features_mode, dtype=dtype)

        # Absent tasks are not differentiated (their loss may be NaN or a constant outside the
        # graph): the engine gives them zero rows instead of refusing them.
        grads = task_gradients(
            step.graph_losses,
            step.features,
            batched=self._batched_backward,
            features_mode=features_mode,
            present=step.local_present,
            gramian_of=gramian_of if step.refresh else None,
        )
        if features_mode and grads.tasks_apart is not None and not self._warned_tasks_apart:
            warn_at_callers_line(f"{self._method_name}: {grads.tasks_apart}")
            # Once per balancer; after the warning, which -W error turns into the call's error
            self._warned_tasks_apart = True
        # Once a graph needed the loop (path False), stop retrying the batched backward.
        if grads.path is False:
            self._batched_backward = False
        step.shared, step.rows, step.row_scale = step.features, grads.rows, grads.scale
        step.sparse_rows, step.read_rows = grads.sparse, grads.read_rows
        if self._group_sizes is not None:
            # Reused between refreshes (update_every, accumulation, absent tasks).
            step.group_weights = self._last_group_weights.clone()
        if not step.refresh:
            # Between refreshes the rows (unweighted heads) only make the heads' shift, but a
            # non-finite one is the same overflow a refresh step refuses or skips: treated
            # alike. Their check is this rank's own, so the ranks agree on it first.
            if not _finite_on_every_rank(grads.finite, grads.rows[0].device):
                self._nonfinite_gradients(step, features_mode, "the task gradients have")
            return
        if self._direction_from_rows():
            # Scaled as step.rows are: each rule folds 1/row_scale into its K-vectors.
            step.global_rows = averaged[0] if averaged else grads.rows
        gram = grads.gram
        assert gram is not None  # gramian_of was given on a refresh step
        if not grads.finite:
            self._nonfinite_gradients(
                step, features_mode, "the Gramian has", grads.rows, gram.dtype
            )
            return
        step.gram = gram  # symmetrised by the engine

    def _keep_rows_state(self, name: str, value: Tensor) -> None:
        """Store ``value`` in the :attr:`rows_state` buffer ``name``, taking its dtype where
        it is wider (rules compute in the wider of the buffer's and the rows' dtypes)."""
        buffer = self.get_buffer(name)
        if value.dtype == buffer.dtype:
            buffer.copy_(value)
        else:
            self._buffers[name] = value.to(device=buffer.device, copy=True)

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        errors = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if len(error_msgs) > errors:  # refused: nothing was loaded
            return
        for name in self.rows_state:
            saved = state_dict.get(prefix + name)
            buffer = self.get_buffer(name)
            # Loaded by torch as a copy in the buffer's dtype: a wider one is kept instead.
            if (
                isinstance(saved, Tensor)
                and saved.dtype == torch.promote_types(saved.dtype, buffer.dtype) != buffer.dtype
            ):
                self._keep_rows_state(name, saved)

    def _nonfinite_gradients(
        self,
        step: Step,
        features_mode: bool,
        seen_in: str,
        rows: Sequence[Tensor] = (),
        gram_dtype: torch.dtype = torch.float64,
    ) -> None:
        """Refuse the call (``on_nonfinite="raise"``) or mark the step skipped. ``rows`` and
        ``gram_dtype``: those of a Gramian that was not finite, to tell an overflow of finite
        gradients (outside DDP, where the rows are the Gramian's own) from non-finite ones."""
        step.nonfinite = True
        if self.on_nonfinite == "skip":
            return
        source = "features" if features_mode else "params"
        if rows and gram_dtype != torch.float64 and not is_distributed() and all_finite(rows):
            raise ValueError(
                f"{source}: the task gradients are finite but their {gram_dtype} Gramian "
                "overflows (a gradient norm past ~1.8e19); create the balancer with "
                "gram_dtype=torch.float64, which holds it. The call is rejected and the "
                "balancer's state is unchanged"
            )
        where = " on this or another DDP rank" if is_distributed() else ""
        raise ValueError(
            f"{source}: the task gradients are not finite ({seen_in} nan or inf "
            f"entries{where}); the call is rejected and the balancer's state is unchanged. "
            "Under AMP, create the balancer with on_nonfinite='skip' to skip such steps as "
            "GradScaler does"
        )

    def _reuses_rows(self, step: Step) -> bool:
        """Whether this call's listed parameters take their gradient from the rows
        (``reuse_rows``): only where the call took them (every call with unweighted heads,
        refresh steps with weighted ones); otherwise the objective's backward is the only one."""
        return self.reuse_rows and step.rows is not None and step.shared is not None

    def _objective(self, step: Step, weights: Tensor) -> Tensor:
        own = None if self.heads == "weighted" else self._head_coefficients(step)
        if self._reuses_rows(step):
            # The shared gradient comes from the rows (_finish_objective): what is left to
            # backpropagate is the heads' share, Σ_k c_k L_k.
            return self._heads_objective(step, weights, own)
        if step.direction is not None or step.shift is not None:
            return self._direction_objective(step, weights, own)
        if self.heads == "weighted":
            return super()._objective(step, weights)
        assert step.shared is not None  # _prepare took the task gradients
        assert step.rows is not None
        # ⟨x, v⟩ adds Σ_k (w_k − c_k)·∇_x L_k to the shared tensor's gradient only: the heads
        # never see it. The rows are scaled by a power of two: dividing by it is exact.
        per_tensor = self._tensor_weights(step, weights)
        # One K-vector of shifts per weight vector and dtype, not per tensor: parameters mode
        # lists every trunk tensor, and all of them share the weights (without groups).
        shifts_of: dict[tuple[int, torch.dtype], Tensor] = {}
        corrections = []
        for row, tensor_weights in zip(step.rows, per_tensor, strict=True):
            key = (id(tensor_weights), row.dtype)
            shifts = shifts_of.get(key)
            if shifts is None:
                shifts = (tensor_weights - (1 if own is None else own)).to(row.dtype)
                shifts_of[key] = shifts
            # Σ_k shifts_k·row_k / scale, the division folded into the product (exact).
            zero = constant(0.0, (), row.dtype, row.device)
            corrections.append(torch.addmv(zero, row.T, shifts, beta=0, alpha=1 / step.row_scale))
        correction = _gradient_only(step.shared, corrections, step.losses.dtype, step.sparse_rows)
        return self._heads_objective(step, weights, own) + correction

    def _head_coefficients(self, step: Step) -> Tensor | None:
        """With unweighted heads, ``c`` in head k's gradient ``c_k ∇L_k`` (``[K]``, any float
        dtype, on the module's device), or None for ``c = 1``: the heads train on the losses
        as given. A method whose reference trains its heads on transformed losses gives the
        transform's derivative here (DB-MTL: ``log(L_k + ε)``); a rule that sets
        ``step.shift`` must keep ``c = 1``, which its shift is relative to."""
        return None

    def _direction_objective(self, step: Step, weights: Tensor, own: Tensor | None) -> Tensor:
        """``Σ c_k L_k + Σ_x ⟨x, d_x − Σ_k c_k ∇_x L_k⟩`` (second factor detached), with
        ``c = w`` (weighted heads) or ``own`` (unweighted heads; None: 1): the heads get
        ``c_k ∇L_k``, each shared tensor x exactly ``d_x``, still in one ordinary backward.
        ``step.rows`` are this rank's own gradients, which the objective's own backward
        produces and the shift cancels; a method that sets ``step.shift`` has computed the
        second factor itself."""
        weighted = self.heads == "weighted"
        shifts = step.shift
        # A rule's own shift is relative to the heads' Σ_k ∇L_k: unweighted heads, c = 1.
        assert shifts is None or (not weighted and own is None)
        if shifts is None:
            assert step.direction is not None  # _objective calls this for one or the other
            assert step.rows is not None  # _prepare took the task gradients
            shifts = []
            for row, target in zip(step.rows, step.direction, strict=True):
                if weighted:
                    coefficients = weights.to(row.dtype)
                elif own is None:
                    coefficients = constant(1.0, (self.num_tasks,), row.dtype, row.device)
                else:
                    coefficients = own.to(device=row.device, dtype=row.dtype)
                # d_x − Σ_k c_k ∇_x L_k in one call, the rows' scale folded into the product
                shifts.append(
                    torch.addmv(
                        target.to(row.dtype), row.T, coefficients, alpha=-1 / step.row_scale
                    )
                )
        assert step.shared is not None
        objective = self._heads_objective(step, weights, own)
        return objective + _gradient_only(step.shared, shifts, objective.dtype, step.sparse_rows)

    def _heads_objective(self, step: Step, weights: Tensor, own: Tensor | None) -> Tensor:
        """``Σ_k c_k L_k``, ``c = w`` (weighted heads) or ``own`` (None: 1): what the heads
        backpropagate. With unweighted heads its value is ``Σ_k L_k`` whatever ``own`` is."""
        if self.heads == "weighted":
            return torch.dot(weights, step.losses)
        if own is None:
            return step.losses.sum()
        scaled = torch.dot(own.to(device=step.losses.device, dtype=step.losses.dtype), step.losses)
        # the value of Σ L_k (what the unweighted heads' objective reports), the gradient of
        # Σ c_k L_k: a constant added to the value changes no gradient
        return scaled + (step.losses.detach().sum() - scaled.detach())

    def _finish_objective(self, step: Step, weights: Tensor, objective: Tensor) -> Tensor:
        if not self._reuses_rows(step):
            return objective
        assert step.shared is not None  # _reuses_rows checked both
        assert step.rows is not None
        shared = []
        per_tensor = self._tensor_weights(step, weights)
        # One coefficient vector per weight vector and dtype, not per tensor (as _objective).
        coefficients_of: dict[tuple[int, torch.dtype], Tensor] = {}
        for index, (parameter, row) in enumerate(zip(step.shared, step.rows, strict=True)):
            read = step.read_rows[index] if step.read_rows else None
            if step.direction is not None:
                entry = SharedGradient(parameter, step.direction[index], None, None, read)
            else:
                # Jᵀw, or a rule's shift plus the heads' own Σ_k ∇L_k (GradDrop); the rows'
                # power-of-two scale is folded into the K coefficients (exact).
                own = per_tensor[index] if step.shift is None else weights
                base = None if step.shift is None else step.shift[index]
                key = (id(own), row.dtype)
                coefficients = coefficients_of.get(key)
                if coefficients is None:
                    coefficients = (
                        own.to(row.dtype) / step.row_scale
                        if step.shift is None
                        else torch.full_like(own, 1 / step.row_scale, dtype=row.dtype)
                    )
                    coefficients_of[key] = coefficients
                entry = SharedGradient(parameter, base, row, coefficients, read)
            shared.append(entry)
        return objective_from_rows(objective, shared)

    def extra_repr(self) -> str:
        mode = "features" if self.shared_params is None else "params"
        text = (
            f"num_tasks={self.num_tasks}, mode={mode}, update_every={self.update_every}, "
            f"heads={self.heads}"
        )
        if self.normalization != "none":
            text += f", normalization={self.normalization}"
        if self._group_sizes is not None:
            text += f", group_aggregation={self.group_aggregation}, groups={len(self.group_names)}"
        if self.reuse_rows:
            text += ", reuse_rows=True"
        return text


def _refuse_hooked_parameters(params: Sequence[Tensor]) -> None:
    """``reuse_rows=True`` refuses a listed parameter with a gradient hook (``register_hook``):
    the engine's per-task passes run it on each task's gradient, and the rows it returns make
    ``Jᵀw``, which the objective's backward would pass through it a second time (and call it
    with None for the cut edges)."""
    for index, tensor in enumerate(params):
        if tensor._backward_hooks:
            raise ValueError(
                f"params[{index}]: has a gradient hook (register_hook; shape "
                f"{tuple(tensor.shape)}). With reuse_rows=True its gradient is built from the "
                "task gradients the hook already changed, and would go through the hook again: "
                "use register_post_accumulate_grad_hook (it sees the final .grad once) or clip "
                ".grad after the backward, or create the balancer with reuse_rows=False. The "
                "call is rejected and the balancer's state is unchanged"
            )


def _check_disjoint(tensors: Sequence[Tensor], *, walk_graph: bool) -> None:
    """Several shared tensors must be separate: none listed twice, none computed from another.

    The Gramian sums the per-tensor blocks and the unweighted-heads objective adds one
    correction per tensor, so a tensor computed from another (multi-scale features of one
    backbone, ``z2 = stage2(z1)``) would count the path through ``z2`` twice, silently: the
    weights and the trunk's gradient would both be wrong.
    """
    for j, tensor in enumerate(tensors):
        for i in range(j):
            if tensors[i] is tensor:
                raise ValueError(
                    f"features[{j}]: the same tensor as features[{i}]; list each shared tensor once"
                )
    if not walk_graph:
        return
    nodes = {_graph_node(tensor): index for index, tensor in enumerate(tensors)}
    for j, tensor in enumerate(tensors):
        ancestor = _first_listed_ancestor(tensor, nodes, j)
        if ancestor is not None:
            raise ValueError(
                f"features[{j}]: computed from features[{ancestor}], so the path through it "
                "would be counted twice in the Gramian and in the shared gradient; pass "
                "separate tensors (e.g. two encoders' outputs), only the outermost one (the "
                "heads' common input), or use parameters mode (params=)"
            )


def _refuse_static_graph_ddp(losses: Tensor) -> None:
    """Refuse losses computed through ``DistributedDataParallel(static_graph=True)``.

    On its first iteration such a DDP routes its outputs through a node whose backward queues
    the one all-reduce of that step on the first backward pass that reaches it. Here that is
    the balancer's first per-task pass, which runs before any ``.grad`` exists: the all-reduce
    then averages nothing, DDP records the wrong static graph, and at every later step each
    rank keeps its own gradient, silently (the ranks drift apart).
    """
    start = losses.grad_fn
    if start is None:
        return
    seen = {start}
    stack = [start]
    while stack:
        node = stack.pop()
        owner = getattr(node, "ddp_weakref", None)
        ddp = owner() if callable(owner) else None
        if getattr(ddp, "static_graph", False):
            raise ValueError(
                "losses: computed through DistributedDataParallel(static_graph=True), whose "
                "first-iteration all-reduce would run at the balancer's first per-task "
                "backward pass, before any gradient exists, and leave every rank's gradients "
                "un-averaged at every step; create the DDP module with static_graph=False "
                "(the default), or call the balancer inside the DDP module's forward (as "
                "Lightning's training_step does)"
            )
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)


def _graph_node(tensor: Tensor) -> object:
    """The autograd node a tensor's gradient flows into (its AccumulateGrad for a leaf)."""
    if tensor.grad_fn is not None:
        return tensor.grad_fn
    return tensor.view_as(tensor).grad_fn.next_functions[0][0]  # type: ignore[union-attr]


def _first_listed_ancestor(tensor: Tensor, nodes: dict[object, int], own: int) -> int | None:
    """Index of a listed tensor whose node lies below ``tensor``'s in the graph, if any."""
    start = tensor.grad_fn
    if start is None:
        return None
    seen = {start}
    stack = [start]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None or child in seen:
                continue
            index = nodes.get(child)
            if index is not None and index != own:
                return index
            seen.add(child)
            stack.append(child)
    return None


def _finite_on_every_rank(finite: bool, device: torch.device) -> bool:
    """``finite`` on every rank (one all-reduce of a flag); ``finite`` outside a group."""
    if not is_distributed():
        return finite
    flags = torch.tensor([0.0 if finite else 1.0], device=device)
    return bool(all_reduce_sum(flags).item() == 0)


def _gradient_only(
    shared: Sequence[Tensor],
    corrections: Sequence[Tensor],
    dtype: torch.dtype,
    sparse: Sequence[bool],
) -> Tensor:
    """``Σ_x ⟨x, c_x⟩`` minus its own detached value: 0, whose gradient is ``c_x`` at each
    shared tensor x (the heads never see it), in ``dtype``; sparse at the tensors marked in
    ``sparse`` (see :func:`_sparse_inner_product`)."""
    inner: Tensor | None = None
    for tensor, correction, is_sparse in zip(shared, corrections, sparse, strict=True):
        if is_sparse and tensor.dim() == 2:
            term = _sparse_inner_product(tensor, correction)
        else:
            term = _inner_product(tensor, correction)
        inner = term if inner is None else inner + term
    assert inner is not None  # one term per shared tensor, and there is at least one
    return (inner - inner.detach()).to(dtype)


def _inner_product(tensor: Tensor, correction: Tensor) -> Tensor:
    """``⟨x, c⟩`` in the correction's precision (float32 or float64).

    Computed in the tensor's own dtype, a float16 x would receive the objective's upstream
    gradient cast to float16 on the way back, which overflows at GradScaler's initial scale of
    2**16 (float16's largest value is 65504) and turns every step's trunk gradient into inf.
    """
    return torch.dot(tensor.reshape(-1).to(correction.dtype), correction)


def _sparse_inner_product(table: Tensor, correction: Tensor) -> Tensor:
    """``⟨x, c⟩`` for an embedding table whose task gradients were sparse, with a sparse
    gradient: over the rows where ``c`` is non-zero (the rows the batch read), gathered as
    ``embedding(..., sparse=True)`` does, so ``.grad`` stays sparse for an optimiser that
    needs it (``torch.optim.SparseAdam`` refuses a dense one)."""
    values = correction.view(table.shape)
    rows = values.abs().sum(dim=1).nonzero().squeeze(1)
    gathered = torch.nn.functional.embedding(rows, table, sparse=True)
    return (gathered.to(correction.dtype) * values[rows]).sum()


def _check_tensors(name: str, tensors: Sequence[object], single: bool, advice: str) -> None:
    """Each of ``tensors`` is a tensor that requires grad; errors name ``name`` (and index)."""
    for index, tensor in enumerate(tensors):
        label = name if single else f"{name}[{index}]"
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{label}: expected a tensor, got {tensor!r}")
        if not tensor.requires_grad:
            raise ValueError(
                f"{label}: the tensor does not require grad (shape {tuple(tensor.shape)}); {advice}"
            )
        if tensor.is_complex():  # here too: a step that reuses its weights takes no gradient
            raise ValueError(complex_tensor_message(label, tensor))


def _checked(params: Iterable[Tensor] | Tensor, name: str = "params") -> list[Tensor]:
    """``params=`` as a list: one tensor is ``[tensor]``; each must be a tensor needing grad."""
    if isinstance(params, Tensor):
        listed: list[object] = [params]
    elif isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise TypeError(
            f"{name}: expected shared parameters (e.g. trunk[-1].parameters()), got {params!r}"
        )
    else:
        listed = list(params)
    if not listed:
        raise ValueError(f"{name}: expected at least one shared parameter, got an empty list")
    _check_tensors(name, listed, False, "no task gradient reaches it")
    return listed  # type: ignore[return-value]  # _check_tensors checked every item


ParamGroups = Iterable[Tensor] | Tensor | Iterable[Iterable[Tensor]] | Mapping[str, Any]


def _checked_groups(params: ParamGroups) -> list[tuple[str, list[Tensor]]]:
    """``params=`` as named groups (a dict, a list of lists, or one group of tensors), each
    tensor listed once."""
    groups = _groups(params)
    seen: dict[int, str] = {}
    for name, group in groups:
        for index, tensor in enumerate(group):
            where = f"params[{index}]" if len(groups) == 1 else f"params[{name!r}][{index}]"
            first = seen.setdefault(id(tensor), where)
            if first != where:
                # Its gradient would enter the Gramian and the update once per listing.
                raise ValueError(
                    f"{where}: the same tensor as {first} (a tied weight listed through both "
                    "modules?); list each shared parameter once, in one group: "
                    "model.parameters() lists a tied weight once, and "
                    "list(dict.fromkeys(params)) drops repeats"
                )
    return groups


def _groups(params: ParamGroups) -> list[tuple[str, list[Tensor]]]:
    if isinstance(params, Mapping):
        if not params:
            raise ValueError("params: expected at least one parameter group, got an empty dict")
        for key in params:
            if not isinstance(key, str):
                raise TypeError(f"params: group names must be str, got {key!r}")
        return [(key, _checked(group, f"params[{key!r}]")) for key, group in params.items()]
    if isinstance(params, (Tensor, str, bytes)) or not isinstance(params, Iterable):
        return [("all", _checked(params))]  # one tensor, or the TypeError
    listed = list(params)
    nested = [not isinstance(item, Tensor) and isinstance(item, Iterable) for item in listed]
    if listed and all(nested):
        return [(str(i), _checked(group, f"params[{i}]")) for i, group in enumerate(listed)]
    if any(nested):
        raise TypeError(
            "params: expected parameters or a list of parameter groups, got a mix of tensors "
            "and groups"
        )
    return [("all", _checked(listed))]


#: The gradient normalisations of MGDA's reference code (see "Gradient normalisation").
_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


#: A Gramian whose largest diagonal entry lies within 2**±500 of 1 is left at its scale.
_SAFE_EXPONENT = 500


def _range_shift(largest: float, dtype: torch.dtype, exponent: int) -> int:
    """The power of two to scale a Gramian by, given its largest diagonal entry: ``exponent``
    (its true scale is ``gram·2**exponent``) where that puts ``largest`` within the safe range
    of ``dtype`` (``2**±500`` for float64, float32's range less 2**24 either side), else the
    one that puts it in [0.5, 1). An all-zero diagonal keeps ``exponent``."""
    if largest <= 0:
        return exponent
    info = torch.finfo(dtype)
    if dtype == torch.float64:
        low, high = -_SAFE_EXPONENT, _SAFE_EXPONENT
    else:
        low = math.frexp(info.tiny)[1] + 24
        high = math.frexp(info.max)[1] - 24
    position = math.frexp(largest)[1] + exponent
    return exponent if low <= position <= high else -math.frexp(largest)[1]


def _times_power_of_two(tensor: Tensor, shift: int) -> Tensor:
    """``tensor·2**shift``, exact, in two factors: one beyond ``2**±1023`` is not a float."""
    half = shift // 2
    return tensor * math.ldexp(1.0, half) * math.ldexp(1.0, shift - half)


def gradient_normalisers(gram: Tensor, losses: Tensor, normalization: str) -> Tensor:
    """``1/n_k`` for the reference code's normalisers ``n_k`` (float64, ``[K]``).

    A zero gradient stays zero under ``l2`` and ``loss+`` (``1/‖g_k‖`` taken as 0, see
    :func:`inverse_gradient_norms`): its row of the scaled Gramian is then 0, where dividing by
    ``‖g_k‖ = 0`` would give an infinite Gramian.
    """
    g = gram.double()
    if normalization == "none":
        return torch.ones(g.shape[0], dtype=torch.float64, device=g.device)
    if normalization == "loss":
        return 1.0 / losses.double().to(g.device)
    inverse_norms = inverse_gradient_norms(g)
    if normalization == "l2":
        return inverse_norms
    return inverse_norms / losses.double().to(g.device)


#: Squared-norm ratio below which a task gradient counts as zero: ``‖g_k‖ ≤ 2**-64·max_j
#: ‖g_j‖`` (~5e-20). The bound is on the coefficients, not on rounding: each row is its own
#: task's gradient, accurate relative to itself, so a short one is not rounding noise of the
#: long ones, and leaving it out is not free (projecting onto it, normalising it or giving it
#: its bargaining share changes the direction by up to the long gradients' length). An
#: earlier ``eps²·max`` (eps of the Gramian's dtype) left out real gradients ~1e7 times
#: shorter than the longest in float32 (a nearly solved task under ``"loss"``
#: normalisation), and the direction then conflicted with them. The methods' coefficients
#: grow like ``‖g_i‖/‖g_k‖``: bounded by 2**64, they stay finite in float32 with room for
#: sums over tasks and the objective's products.
NEGLIGIBLE_SQUARED_RATIO = 2.0**-128
#: The same bound on norms: ``‖g_k‖ ≤ 2**-64·max_j ‖g_j‖``.
NEGLIGIBLE_RATIO = 2.0**-64


def negligible_squared_norm(squared_norms: Iterable[float]) -> float:
    """``2**-128·max_k ‖g_k‖²`` (see :data:`NEGLIGIBLE_SQUARED_RATIO`): a gradient at or below
    it counts as zero; 0 when every gradient is zero."""
    return NEGLIGIBLE_SQUARED_RATIO * max(max(squared_norms, default=0.0), 0.0)


def inverse_gradient_norms(gram: Tensor) -> Tensor:
    """``1/‖g_i‖`` from a float64 Gramian, for the methods that normalise task gradients.

    A gradient at or below :func:`negligible_squared_norm` counts as zero, with
    ``1/‖g_i‖ = 0``, so the normalised Gramian stays bounded.
    """
    # K numbers: on the host, where each is one float operation rather than a tensor call.
    inverse = inverse_norms(gram.diagonal().tolist())
    return torch.tensor(inverse, dtype=gram.dtype, device=gram.device)


def inverse_norms(squared_norms: list[float]) -> list[float]:
    """:func:`inverse_gradient_norms` from the Gramian's diagonal, already on the host."""
    negligible = negligible_squared_norm(squared_norms)
    return [
        1.0 / max(math.sqrt(max(value, 0.0)), 1e-300) if value > negligible else 0.0
        for value in squared_norms
    ]


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
        self.rtol = (
            None
            if rtol is None
            else check_in_range("rtol", rtol, 0.0, 1.0, low_open=True, high_open=True)
        )
