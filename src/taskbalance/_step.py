"""One balancer call, as the hooks see it: everything local to the call, in one object.

:meth:`Balancer.forward` builds a :class:`Step` and hands the same object to each hook in turn
(``_prepare``, ``_update``, ``_objective``), so no per-call tensor is ever stashed on the
module and no hook needs to know which ran before it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Step:
    """The inputs and decisions of one call (or one ``compute_weights``).

    Attributes:
        losses: the ``[K]`` losses the objective is built from, in the graph, in at least
            float32; an absent task's entry is 0 and passes no gradient.
        graph_losses: the ``[K]`` losses exactly as given (the Gramian engine's input).
        mean_losses: detached float32 ``[K]`` loss values on the module's device: averaged
            over the ranks that have each task (under DDP); an absent task carries its last
            value forward. What the update rules read.
        kpis: rank-averaged KPIs for methods that read them, else None.
        present: bool ``[K]``, True where some rank has the task's labels in this batch.
        local_present: bool ``[K]``, True where this rank has the task's labels; None when
            no ``present=`` mask was given (every task present).
        features: the shared tensors of features mode (a list), or None.
        advances: True when the state advances at this call: the first call of an
            accumulation window. Otherwise the window's weights are reused and the rule's
            state does not change (the base records the call's losses, a method what it
            observes of tasks the window's first call lacked: ``Balancer._observe``).
        refresh: True when the update rule runs (``advances``, and for gradient methods also
            an ``update_every`` refresh step with every task present).
        gram: the ``[K, K]`` Gramian, set by gradient methods' ``_prepare`` on refresh steps
            (``[num_groups, K, K]``, one per parameter group, with per-group aggregation).
        shared: the shared tensors the task gradients were taken with respect to.
        rows: the per-task gradient blocks ``[K, numel]``, one per tensor of ``shared``, times
            ``row_scale``: the engine's power-of-two scale is left in (see
            :class:`taskbalance._gramian.TaskGradients`), so use ``Jᵀ(w / row_scale)``.
        row_scale: the power of two ``rows`` are scaled by.
        sparse_rows: per tensor of ``shared``, whether its task gradients were sparse (an
            ``nn.Embedding(sparse=True)`` weight): its shared gradient is then kept sparse.
        read_rows: per tensor of ``shared`` with sparse task gradients, the table rows they
            cover (a zero gradient included), else None; empty where unknown.
        nonfinite: set by ``_prepare`` when the task gradients are not finite (skip mode).
        all_present: True when every task is present (a host copy of ``present.all()``).
        known: bool ``[K]`` on the module's device, True where ``mean_losses`` holds a loss of
            the task's own (present now or at an earlier call, a window's later micro-batches
            included); an entry of a task never present yet is a placeholder, which a rule
            that couples the tasks through their losses must leave out. None when every task
            has one (the usual call).
        global_rows: on refresh steps, for methods whose direction is computed from the rows,
            the rows (times ``row_scale``, as ``rows``): of the global (rank-averaged) task
            gradients in parameters mode under DDP (``rows`` stay local: the objective cancels
            this rank's own gradients), of this rank's own otherwise (features are this rank's
            own samples). Unscaling them would be a pass over K×P numbers: each method folds
            ``1/row_scale`` into a K-vector instead.
        direction: the shared tensors' gradient, one flat tensor per tensor of ``shared``,
            when the method's ``_update`` sets one other than ``Jᵀw``; None for ``Jᵀw``.
        shift: instead of ``direction``, with unweighted heads, what it adds to the heads'
            own share of the shared gradient, ``d_x − Σ_k ∇_x L_k``, for a method that
            computes it in the pass that computes ``d`` (GradDrop): the objective then needs
            no pass over the rows of its own.
        group_weights: with per-group aggregation, the ``[num_groups, K]`` weights of each
            parameter group's shared gradient (set by ``_prepare``, recomputed by ``_update``
            on refresh steps); None otherwise.
    """

    losses: Tensor
    graph_losses: Tensor
    mean_losses: Tensor
    kpis: Tensor | None
    present: Tensor
    local_present: Tensor | None
    features: list[Tensor] | None
    advances: bool
    refresh: bool
    gram: Tensor | None = None
    shared: list[Tensor] | None = None
    rows: list[Tensor] | None = None
    row_scale: float = 1.0
    sparse_rows: tuple[bool, ...] = ()
    read_rows: tuple[Tensor | None, ...] = ()
    nonfinite: bool = False
    all_present: bool = True
    known: Tensor | None = None
    global_rows: list[Tensor] | None = None
    direction: list[Tensor] | None = None
    shift: list[Tensor] | None = None
    group_weights: Tensor | None = None
