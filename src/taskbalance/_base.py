"""The one contract every balancer follows.

A balancer turns the K task losses of a step (and, for some methods, per-task KPIs or the K×K
Gramian of the task gradients) into a weight vector ``w ∈ R^K``, and returns an objective whose
gradient with respect to each loss is exactly ``w_k``. The training step then ends with one
ordinary scalar ``objective.backward()``, which is what DDP, AMP's GradScaler, gradient
accumulation, clipping and torch.compile all expect.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from taskbalance._absent import absent_losses_cut
from taskbalance._constants import constant
from taskbalance._distributed import (
    all_reduce_sum,
    collective_device,
    differing_entries,
    fingerprint_value,
    first_tensor,
    is_distributed,
    rank,
    world_size,
)
from taskbalance._gramian import has_subnormal_norm
from taskbalance._solvers._common import SolverError, nearest_psd, psd_rounding
from taskbalance._step import Step
from taskbalance._validation import (
    as_kpi_vector,
    as_loss_vector,
    as_present_mask,
    check_choice,
    check_loss_values,
    check_num_tasks,
    check_positive_int,
)
from taskbalance._warnings import Location, callers_location, warn_at, warn_at_callers_line

LossesLike = Tensor | Sequence[Tensor]
KpisLike = Tensor | Sequence[float] | None
PresentLike = Tensor | Sequence[bool] | None

#: Constructor keywords every method accepts; the metaclass takes them off before ``__init__``.
LOOP_OPTIONS: dict[str, Any] = {"accumulation_steps": 1, "on_nonfinite": "raise"}
# The fingerprint entry by which a rank whose call failed its local checks tells the others
# (its rank + 1; 0 on a rank whose call passed them).
_REFUSED_BY = "refused_by"


def constructor_defaults(cls: type) -> dict[str, Any]:
    """The keyword hyperparameters of ``cls`` with their defaults (bases' too via ``**options``)."""
    found: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters
        for key, parameter in parameters.items():
            keyword = parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
            if keyword and key not in ("self", "num_tasks") and key not in found:
                found[key] = parameter.default
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break
    found.update(LOOP_OPTIONS)
    return found


def _canonical(value: Any) -> Any:
    """A plain, comparable form of a hyperparameter value (for state and the DDP check)."""
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    # numpy scalars and the like: plain numbers, so a checkpoint loads with weights_only=True
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


#: The saved value of a hyperparameter that a state (older than the option) does not hold.
_UNSAVED: Any = object()


def _decoded(value: Any) -> Any:
    """A constructor argument from its :func:`_canonical` form (a dtype was saved as its str)."""
    if isinstance(value, str) and value.startswith("torch."):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return value


#: The dtypes a step's objective and statistics keep (a narrower one is promoted to float32).
_FULL_PRECISION = (torch.float32, torch.float64)
#: Largest |G_ij| a given Gramian may hold: 2**1000 leaves the rules' float64 sums and
#: products of entries 2**23 of headroom (float32 Gramians never come near).
_LARGEST_GRAM_ENTRY = 2.0**1000

#: Training steps without an ``end_epoch()`` after which a method that waits for one warns.
EPOCHLESS_STEPS = 10_000


def _own_precision(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast off for the balancer's own arithmetic (a no-op when autocast is off)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _BalancerMeta(ABCMeta):
    """Takes the loop options off the constructor call, so every method accepts them."""

    def __init__(cls, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # What inspect.signature (help(), IDEs, the docs) shows: the method's own __init__
        # plus the loop options, rather than this metaclass's (*args, **kwargs).
        # mypy calls reading __init__ off an instance unsound; cls is a class here, not one.
        init = inspect.signature(cls.__init__)  # type: ignore[misc]
        own = list(init.parameters.values())[1:]
        names = {parameter.name for parameter in own}
        loop = [
            inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default)
            for key, default in LOOP_OPTIONS.items()
            if key not in names
        ]
        variadic = [p for p in own if p.kind is inspect.Parameter.VAR_KEYWORD]
        fixed = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
        cls.__signature__ = init.replace(
            parameters=fixed + loop + variadic, return_annotation=inspect.Signature.empty
        )

    def __call__(
        cls,
        *args: Any,
        accumulation_steps: int = 1,
        on_nonfinite: str = "raise",
        **kwargs: Any,
    ) -> Any:
        steps = check_positive_int("accumulation_steps", accumulation_steps)
        mode = check_choice("on_nonfinite", on_nonfinite, ("raise", "skip"))
        instance = super().__call__(*args, **kwargs)
        instance.accumulation_steps = steps
        instance.on_nonfinite = mode
        instance._record_configuration(args, kwargs)
        # Kept to rebuild the method on a resume that changes a hyperparameter; the shared
        # parameters (often a one-shot generator) are the model's and hold no hyperparameter,
        # and without them there are no parameter groups to aggregate per group.
        unused = ("params", "group_aggregation")
        instance._init_arguments = (args, {k: v for k, v in kwargs.items() if k not in unused})
        return instance


class Balancer(nn.Module, ABC, metaclass=_BalancerMeta):
    """Base class of every balancing method.

    Subclasses implement :meth:`_update`, the weight rule, and override :meth:`_objective`
    only when the objective is not ``Σ w_k L_k`` (learned weights with a regulariser, or a method
    defined by its objective such as the geometric mean). The gradient of the returned
    objective with respect to ``losses[k]`` equals ``weights[k]`` (for gradient methods whose
    heads take unweighted gradients, see :class:`GradientBalancer`, it is 1 and the weights act
    on the shared tensors). Each call builds one :class:`~taskbalance._step.Step` and hands it
    to the hooks in turn: ``_prepare(step)`` (gradient methods take the task gradients),
    ``_update(step)`` (the rule, from ``step.mean_losses``, ``step.kpis``, ``step.gram``) and
    ``_objective(step, weights)``.

    Calling a balancer:

    - ``objective = b(losses, kpis=None, features=None, present=None)`` returns the 0-d
      objective to backward. ``features=`` (a tensor or a list of tensors) is read by gradient
      methods in features mode and ignored by the others (loss-based methods, and gradient
      methods in parameters mode, whose Gramian is of ``params=``), and ``kpis=`` by methods
      that read KPIs (DTP), so one training loop can drive any method in any mode. ``present=``
      is a bool ``[K]`` mask of the tasks with labels in this batch: an absent task gets weight
      0 and no gradient (its loss may be NaN), and its statistics see no new value: loss-based
      rules read its last mean loss again, and gradient methods reuse the last weights for the
      present tasks (they need every task's gradient to recompute). A task that has not been
      present at any call yet has no loss to read: ``has_loss`` (a bool ``[K]`` buffer) marks
      the tasks that have one, and the rules that couple the tasks through their losses (FAMO,
      GLS, DWA, STCH) run over those until it is first present. Every call records its present
      tasks' losses, an accumulation window's later calls included (whose weights stay the
      window's). Under DDP a task is present where any rank has it, and its mean loss averages
      over the ranks that have it.
    - In ``eval()`` mode or under ``torch.no_grad()`` a call returns ``Σ w_k L_k`` with the
      current weights and changes no state (no collective either).
    - ``b.weights`` is the detached ``[K]`` weight vector of the last call.
    - ``b.compute_weights(losses, gram=None, kpis=None)`` applies the update rule to given
      inputs and advances the state exactly like a call does.
    - ``b.end_epoch()`` marks an epoch boundary (a no-op for most methods).
    - ``b.log_dict(prefix="balancer/")`` is a flat dict of the last step's numbers to log.

    A call that is rejected (wrong number of tasks, KPIs outside [0, 1], ...) raises before any
    state changes.

    Precision: the objective is built in float32 at least (a float16 objective overflows once a
    weight passes 65504), the rule runs outside autocast, and ``.half()``/``.double()`` on a
    model holding the balancer leave the balancer's own state in its dtypes (``.to(device)``
    moves it as usual).

    State: ``state_dict()`` carries the method name, K and the hyperparameters
    (``b.configuration``); ``load_state_dict`` checks all of it, and every tensor's shape,
    dtype and values, before copying anything, and refuses a mismatch naming it. To change a
    hyperparameter on resume, call :meth:`allow_changed_hyperparameters` first.

    Under ``torch.distributed``, the loss statistics and KPIs that drive the weights are
    averaged over the process group (in calls and in ``compute_weights`` alike), each over the
    ranks that have the task, so every rank computes the same weights. A call runs two
    all-reduces. The first has a fixed size and carries a fingerprint of each rank's
    configuration (method, K, hyperparameters, whether KPIs are sent, step and call counts):
    ranks configured differently, or out of step because one skipped a call, raise a
    ValueError naming what differs on every rank, before any collective whose size depends on
    the configuration. The second carries the loss sums, presence counts, KPIs and whether the
    losses were finite: a non-finite loss on any rank raises (or is skipped) on every rank, all
    in step. A rank whose batch has no labels may pass ``present=[False] * K``; the call is
    refused, on every rank, only when no rank has any task.

    The checks of a call's own arguments (losses, ``present=``, ``kpis=``, ``features=``,
    positive losses for the methods that take logs) run before the first all-reduce; a rank
    whose call fails them joins that all-reduce with a flag and raises its own error, and
    every other rank raises a ValueError naming that rank, at once, with every state
    unchanged. A rank that stops calling altogether leaves the others waiting in the first
    all-reduce until the process group's timeout. Gradient methods take the task gradients
    after both all-reduces, on their refresh steps: an error there on one rank only
    (typically a task loss that reaches none of the shared tensors, such as a constant loss
    for a batch without that task's labels) leaves the other ranks waiting in the Gramian's
    all-reduce until the timeout, so mark such tasks absent with ``present=``. The weight
    rules read only reduced values, so an error in a rule raises on every rank together.

    Loop options, keyword arguments of every method (and of :func:`taskbalance.create`):

    - ``accumulation_steps``: with gradient accumulation over N micro-batches, N: the weights
      are computed at the first call of each window of N calls (from that call's losses and,
      for gradient methods, its Gramian) and reused for the other N − 1, which do not step
      the rule, so every statistic (``num_steps``, ``update_every``, DWA's periods, FAMO's
      loss differences, RLW's draws) counts optimiser steps, not micro-batches. Those N − 1
      calls record their present tasks' losses, and a task's first presence in the window
      when the first call lacked it (``window_present``; DTP's KPI, STCH's reference loss).
    - ``on_nonfinite``: ``"raise"`` (default) refuses a call whose losses or task gradients
      are not finite; ``"skip"`` returns a NaN objective instead (its backward gives NaN
      gradients, so GradScaler skips the step) and changes no state, on every rank (with
      ``accumulation_steps > 1`` the call still takes its place in its window, so the windows
      stay aligned with the optimiser steps). Gradient methods see the task gradients where
      they take them: on refresh steps, and on every step with ``heads="unweighted"``;
      between ``update_every`` refreshes with weighted heads none is taken, so a step whose
      backward overflows there counts like any other (the loop's GradScaler skips it).

    Args:
        num_tasks: K, the number of task losses every call receives.
    """

    #: Registry name, set by :func:`taskbalance.register`.
    name: ClassVar[str] = ""
    #: True when the method takes logs or ratios of the losses, which must then be > 0. The class
    #: value describes the default configuration; an instance whose hyperparameters change the
    #: answer (FAMO's ``min_losses=`` below 0, MGDA's loss normalisations) sets its own, so the
    #: attribute is per instance, not a ``ClassVar``.
    requires_positive_losses: bool = False
    #: Appended to the error that refuses a loss <= 0: how this method could accept one.
    positive_losses_hint: ClassVar[str] = ""
    #: True when the method reads per-task KPIs (``kpis=``).
    requires_kpis: ClassVar[bool] = False
    #: True when the weight rule needs the Gramian of the task gradients.
    requires_gram: ClassVar[bool] = False
    #: False for a method whose weights never change (``ew``, ``fixed``): a training step in
    #: eval mode then trains on its own weights, and a backward there needs no warning.
    weights_change: ClassVar[bool] = True
    #: Method options added after states were saved without them, each with the value every
    #: call acted with before it existed: such a state loads as having that value. (Not a
    #: default for every new option: UPGrad regularised before ``norm_eps`` existed.)
    options_acting_before_they_existed: ClassVar[dict[str, Any]] = {}

    _last_weights: Tensor
    _last_losses: Tensor
    _last_present: Tensor
    has_loss: Tensor
    window_present: Tensor
    num_steps: Tensor
    num_calls: Tensor

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = check_num_tasks(num_tasks)
        self.accumulation_steps = 1
        self.on_nonfinite = "raise"
        self.configuration: dict[str, Any] = {}
        self._allowed_changes: frozenset[str] = frozenset()
        self._steps_before_first_epoch = 0  # for the missing end_epoch() warning only
        self.register_buffer("_last_weights", torch.ones(self.num_tasks))
        self.register_buffer("_last_losses", torch.ones(self.num_tasks))
        self.register_buffer("_last_present", torch.ones(self.num_tasks, dtype=torch.bool))
        # Which tasks have been present at some step: the others' entry of _last_losses is a
        # placeholder, which no rule may read as a loss (see Step.known).
        self.register_buffer("has_loss", torch.zeros(self.num_tasks, dtype=torch.bool))
        # The tasks present at some call of the current accumulation window (see _observe);
        # True before the first call: nothing to observe
        self.register_buffer("window_present", torch.ones(self.num_tasks, dtype=torch.bool))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_calls", torch.zeros((), dtype=torch.long))
        # Host copies of the counters, so the per-call branches on them need no device sync.
        self._steps_taken = 0
        self._calls_taken = 0
        self._every_task_has_loss = False  # host copy of has_loss.all()
        self._window_complete = True  # host copy of window_present.all()

    def _record_configuration(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The method's hyperparameters as given, defaults filled in (stored in the state)."""
        bound = inspect.signature(type(self).__init__).bind(self, *args, **kwargs)
        given = dict(bound.arguments)
        given.pop("self", None)
        given.pop("num_tasks", None)
        for key, parameter in inspect.signature(type(self).__init__).parameters.items():
            if parameter.kind is parameter.VAR_KEYWORD:
                given.update(given.pop(key, {}))
        configuration = constructor_defaults(type(self))
        configuration.update(given)
        configuration.update(
            accumulation_steps=self.accumulation_steps, on_nonfinite=self.on_nonfinite
        )
        shared = getattr(self, "shared_params", None)
        if shared is not None:  # the parameters themselves are the model's: keep their shapes
            configuration["params"] = [list(p.shape) for p in shared]
        self.configuration = {key: _canonical(value) for key, value in configuration.items()}

    @property
    def weights(self) -> Tensor:
        """Detached ``[K]`` weights of the last call (the initial weights before any call)."""
        return torch.where(self._last_present, self._last_weights, 0).detach().clone()

    # The call runs eagerly inside a compiled training step: it branches on host copies of its
    # counters and reads K loss values on the host, which under torch.compile would guard on
    # a new step count (a recompile) at every call. One graph break per call instead.
    @torch.compiler.disable
    def forward(
        self,
        losses: LossesLike,
        *,
        kpis: KpisLike = None,
        features: Tensor | Sequence[Tensor] | None = None,
        present: PresentLike = None,
    ) -> Tensor:
        """Weights for this step and the objective to backward.

        Args:
            losses: the K task losses, a 1-D tensor or a sequence of 0-d tensors, in the graph.
            kpis: per-task KPIs in [0, 1] for methods that read them.
            features: shared features (a tensor or a list of tensors), for gradient methods in
                features mode.
            present: optional bool ``[K]`` mask of the tasks with labels in this batch.

        Returns:
            The 0-d objective, whose gradient with respect to ``losses[k]`` is ``weights[k]``.
        """
        if not (self.training and torch.is_grad_enabled()):  # no collective: no refusal
            objective = self._frozen_objective(*self._loss_vector_and_mask(losses, present))
            if objective.requires_grad and self.weights_change:
                # Eval mode with autograd on: a validation call, or a training step run in
                # eval mode (model.eval() to freeze BatchNorm), which only a backward tells
                location = callers_location()
                objective.register_hook(lambda grad: self._warn_backward_in_eval_mode(location))
            return objective
        # Every local check runs before the first collective, which a refused call still joins.
        try:
            vector, mask = self._loss_vector_and_mask(losses, present)
            values, nonfinite, absent_nonfinite = self._checked_values(vector, mask)
            local_kpis = self._checked_kpis(kpis, values.device)
            _refuse_losses_without_grad(losses, vector, mask)
            shared = self._check_call_inputs(vector, features)
            # Before any state changes: its warning may be an error (-W error). (0 · NaN is
            # NaN: see taskbalance._absent.)
            orphans = absent_losses_cut(vector, absent_nonfinite) if absent_nonfinite else None
        except Exception:  # re-raised: the other ranks only learn that this call failed
            self._refuse_on_every_rank(losses, kpis, features)
            raise
        step = self._step(vector, values, mask, local_kpis, nonfinite, shared)
        if step.nonfinite:
            return self._skipped_objective(vector, mask)
        self._prepare(step)
        if step.nonfinite:
            return self._skipped_objective(vector, mask)
        weights = self._advance(step).to(device=vector.device, dtype=step.losses.dtype)
        with _own_precision(vector.device.type):  # Jᵀw in full precision
            objective = self._objective(step, weights)
        if orphans is not None:
            objective = objective + orphans.to(objective.dtype)
        return self._finish_objective(step, weights, objective)

    def compute_weights(
        self,
        losses: LossesLike,
        gram: Tensor | None = None,
        kpis: KpisLike = None,
        present: PresentLike = None,
    ) -> Tensor:
        """The pure update rule on given inputs; advances state exactly like a call does.

        Args:
            losses: the K task losses (values only are read).
            gram: the K×K Gramian of the task gradients, for gradient methods: symmetric and
                positive semi-definite to the rounding of the precision it was computed in (one
                indefinite beyond bfloat16's rounding is refused), with no entry beyond
                ``2**1000`` (≈ 1.07e301); a float16 or bfloat16 one is solved in float32.
            kpis: per-task KPIs in [0, 1] for methods that read them.
            present: optional bool ``[K]`` mask of the tasks present in this batch.

        Returns:
            The ``[K]`` weights of this step (detached), in float64 for a float64 Gramian.
        """
        try:
            vector, mask = self._loss_vector_and_mask(losses, present)
            vector = vector.detach()
            values, nonfinite, _ = self._checked_values(vector, mask)
            local_kpis = self._checked_kpis(kpis, values.device)
            checked_gram = self._check_gram(gram) if self.requires_gram else None
        except Exception:  # re-raised: the other ranks only learn that this call failed
            self._refuse_on_every_rank(losses, kpis, gram)
            raise
        step = self._step(vector, values, mask, local_kpis, nonfinite, None)
        if step.nonfinite:
            self._count_skipped_call()
            return torch.full((self.num_tasks,), math.nan)
        step.gram = None if checked_gram is None else checked_gram.to(step.mean_losses.device)
        return self._advance(step)

    def end_epoch(self) -> None:
        """Mark an epoch boundary. Methods with per-epoch statistics (DWA) override this."""

    def _count_step_before_first_epoch(self, consequence: str, alternative: str) -> None:
        """For a method whose weights wait for ``end_epoch()``, called on each step while no
        epoch has ended: warns once, at the ``EPOCHLESS_STEPS``-th (the three-line recipe never
        calls it). ``consequence`` says what the weights do meanwhile, ``alternative`` what
        else the user can pass. A host counter (no device read per step), not saved state;
        called before the step changes any, so a warning turned into an error (``-W error``)
        changes none."""
        self._steps_before_first_epoch += 1
        steps = self._steps_before_first_epoch
        if steps == EPOCHLESS_STEPS:
            warn_at_callers_line(
                f"{type(self).__name__}: {steps} training steps and no end_epoch() yet; "
                f"{consequence}. Call balancer.end_epoch() at each epoch boundary, or "
                f"{alternative}."
            )

    def end_window(self) -> None:
        """End the current accumulation window: the next call starts a new one.

        With ``accumulation_steps=N``, call it whenever the optimiser steps, or at least when
        it steps on fewer than N calls: Lightning does at the end of each epoch whose batches
        N does not divide (``on_before_optimizer_step`` is the place), as does a loop that
        steps on an epoch's last micro-batches. The call counter skips the window's unused
        places, so the next window starts with the next optimiser step instead of straddling
        it. After a full window (or with ``accumulation_steps=1``) it does nothing.

        Example:
            >>> import torch, taskbalance as tb
            >>> b = tb.create("rlw", num_tasks=2, accumulation_steps=4)
            >>> _ = b(torch.ones(2, requires_grad=True))  # one call of a short last window
            >>> b.end_window()
            >>> int(b.num_calls), int(b.num_steps)
            (4, 1)
        """
        unused = -self._calls_taken % self.accumulation_steps
        if unused:
            self.num_calls.add_(unused)
            object.__setattr__(self, "_calls_taken", self._calls_taken + unused)

    def log_dict(self, prefix: str = "balancer/") -> dict[str, float]:
        """The last step's weights, each task's latest mean loss and (gradient methods) the
        task-gradient cosines of the last Gramian.

        A flat ``{name: float}`` dict for Lightning's ``self.log_dict`` or TensorBoard's
        ``add_scalars``: ``{prefix}weight/{k}``, ``{prefix}loss/{k}`` and, once a Gramian was
        computed, ``{prefix}cos/{i}_{j}`` for ``i < j``. A task's loss is NaN until it has
        been present at a call (none was observed yet); before a Gramian, no cosines.

        Example:
            >>> import torch, taskbalance as tb
            >>> b = tb.create("ew", num_tasks=2)
            >>> _ = b(torch.tensor([1.0, 3.0], requires_grad=True))
            >>> b.log_dict()["balancer/loss/1"]
            3.0
        """
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
        logged = {f"{prefix}weight/{k}": w for k, w in enumerate(self.weights.tolist())}
        # A task not present at any step yet has no loss: NaN, not the buffer's placeholder
        # 1.0 (the keys stay the same from the first log on).
        losses = self._last_losses.tolist()
        for k, (value, observed) in enumerate(zip(losses, self.has_loss.tolist(), strict=True)):
            logged[f"{prefix}loss/{k}"] = value if observed else math.nan
        gram = getattr(self, "_last_gram", None)  # gradient methods, once they refreshed
        cosines = None
        if gram is not None:
            norms = gram.diagonal().clamp_min(0).sqrt()
            cosines = (gram / (norms[:, None] * norms[None, :])).cpu()
        if cosines is not None and bool(torch.isfinite(cosines).all()):
            table = cosines.tolist()
            for i in range(self.num_tasks):
                for j in range(i + 1, self.num_tasks):
                    logged[f"{prefix}cos/{i}_{j}"] = table[i][j]
        return logged

    def allow_changed_hyperparameters(self, *names: str) -> Balancer:
        """Let :meth:`load_state_dict` accept a state saved with other values of ``names``.

        Loading refuses a state whose hyperparameters differ from this balancer's; to change
        one on resume, create the balancer with the new value and call this first. The
        balancer keeps its own (new) values; the learned state comes from the checkpoint.
        A new ``accumulation_steps`` needs a state saved at an optimiser step (a window's
        end); the next call then starts a window of the new length.

        Example:
            >>> import taskbalance as tb
            >>> old = tb.create("dwa", num_tasks=2, temperature=2.0)
            >>> new = tb.create("dwa", num_tasks=2, temperature=1.0)
            >>> _ = new.allow_changed_hyperparameters("temperature").load_state_dict(
            ...     old.state_dict())
        """
        unknown = sorted(set(names) - set(self.configuration))
        if unknown:
            raise ValueError(
                f"names: {unknown} are not hyperparameters of {self._method_name}; expected "
                f"some of {sorted(self.configuration)}"
            )
        self._allowed_changes = frozenset(names)
        return self

    # ----------------------------------------------------------------------------------------
    # Hooks for subclasses.

    @abstractmethod
    def _update(self, step: Step) -> Tensor:
        """Return this step's weights. Must not change any state before it can no longer fail.

        Reads ``step.mean_losses`` (detached float32, on this module's device, averaged over
        ranks), ``step.kpis`` and, for gradient methods, ``step.gram`` (float32 or float64).
        """

    def _observe(self, step: Step, new: Tensor | None) -> None:
        """At a call that does not advance (a window's later micro-batch): ``new`` (bool
        ``[K]``) marks the present tasks that no earlier call of the window had, whose first
        observation of the window a method records as a window's first call records its
        present ones (DTP's KPIs, STCH's reference losses); None when the window has had
        every task. Also a place to check the call's values (FAMO's bounds). The weights stay
        the window's; the base records every call's losses itself. Raising here leaves the
        state unchanged."""

    def _prepare(self, step: Step) -> None:
        """Gradient methods take the task gradients here; loss-based methods need nothing."""

    def _objective(self, step: Step, weights: Tensor) -> Tensor:
        """The objective to backward: ``Σ w_k L_k`` unless the method defines its own."""
        return torch.dot(weights, step.losses)

    def _finish_objective(self, step: Step, weights: Tensor, objective: Tensor) -> Tensor:
        """The objective handed back, built from the complete ``objective`` (absent tasks'
        zeros included): itself, unless a method changes how its backward runs."""
        return objective

    def _check_call_inputs(
        self, losses: Tensor, features: Tensor | Sequence[Tensor] | None
    ) -> list[Tensor] | None:
        """Method-specific checks of a call's inputs, run before any collective."""
        return None

    def _refreshes(self, step: Step) -> bool:
        """Whether the rule runs at a step that advances (gradient methods: ``update_every``)."""
        return True

    def _weights_after_changed_hyperparameters(self) -> Tensor | None:
        """The weights to report after a resume with changed hyperparameters (``fixed``'s
        new weights, UW's factors on the loaded log-scales, DTP's rule on its loaded KPI
        averages): those the next call starts from. None keeps the checkpoint's, where the
        weights are the last step's result of a rule on that step's inputs."""
        return None

    # ----------------------------------------------------------------------------------------
    # Shared machinery.

    def _step(
        self,
        vector: Tensor,
        values: Tensor,
        mask: Tensor | None,
        kpis: Tensor | None,
        nonfinite: dict[int, float],
        shared: list[Tensor] | None,
    ) -> Step:
        """Reduce the call's statistics over ranks (one all-reduce) and decide the step."""
        device = self._last_weights.device
        local_present = (
            constant(True, (self.num_tasks,), torch.bool, values.device)
            if mask is None
            else mask.to(values.device)
        )
        if is_distributed():
            any_nonfinite, mean, present, all_present, kpis = self._reduced(
                values, local_present, kpis, bool(nonfinite)
            )
        else:  # this rank's own numbers: no packing, no device sync
            any_nonfinite, all_present = bool(nonfinite), mask is None or bool(mask.all())
            present = local_present.to(device)
            mean = values.to(device)
            if not all_present:
                mean = torch.where(present, mean, self._last_losses)
            kpis = None if kpis is None else kpis.to(device)
        # None where every task has a loss of its own in `mean` (the usual call: no tensor op)
        known = None
        if not all_present and not self._every_task_has_loss:
            known = present.to(device) | self.has_loss
        if any_nonfinite:
            self._nonfinite_losses(nonfinite)
            return Step(
                losses=vector,
                graph_losses=vector,
                mean_losses=values,
                kpis=None,
                present=local_present,
                local_present=local_present,
                features=None,
                advances=False,
                refresh=False,
                nonfinite=True,
            )
        # float32 at least: a float16 objective overflows once a weight passes 65504.
        losses = vector if vector.dtype in _FULL_PRECISION else vector.float()
        step = Step(
            losses=losses if mask is None else torch.where(local_present, losses, 0),
            mean_losses=mean,
            kpis=kpis,
            present=present,
            features=shared,
            advances=self._calls_taken % self.accumulation_steps == 0,
            refresh=False,
            graph_losses=vector,
            local_present=None if mask is None else local_present,
            all_present=all_present,
            known=known,
        )
        step.refresh = step.advances and self._refreshes(step)
        return step

    def _reduced(
        self, values: Tensor, local_present: Tensor, kpis: Tensor | None, nonfinite: bool
    ) -> tuple[bool, Tensor, Tensor, bool, Tensor | None]:
        """Two all-reduces: the configuration fingerprint (fixed size, checked first), then
        loss sums and counts of the ranks that have each task, the non-finite flag and KPIs."""
        differing = differing_entries({**self._fingerprint(), _REFUSED_BY: 0}, values.device)
        refused = differing.pop(_REFUSED_BY, None)
        if refused is not None:
            raise ValueError(
                f"DDP rank {refused[1] - 1} refused its call to the balancer (its own error "
                "says why, e.g. a loss or KPI value of that rank's batch); this rank's call is "
                "refused with it rather than left waiting for that rank until the process "
                "group's timeout. Every rank's state is unchanged"
            )
        if differing:
            fields = self._fingerprint_fields()
            raise ValueError(
                f"DDP ranks disagree on {list(differing)}: on this rank "
                + ", ".join(f"{name}={fields[name]!r}" for name in differing)
                + ". Every rank must create the balancer with the same method, num_tasks and "
                "hyperparameters (and load the same state), and call it at every step"
            )
        K = self.num_tasks
        present_here = local_present.double()
        payload = [
            torch.where(local_present & torch.isfinite(values), values, 0).double(),
            present_here,
            values.new_tensor([float(nonfinite)], dtype=torch.float64),
        ]
        if kpis is not None:  # over the ranks that have the task, as the losses; else all
            payload += [kpis.double() * present_here, kpis.double()]
        summed = all_reduce_sum(torch.cat(payload)).to(self._last_weights.device)
        sums, counts = summed[:K], summed[K : 2 * K]
        host = counts.tolist()
        if not any(count > 0 for count in host):
            raise ValueError(
                "present: every task is absent on every DDP rank; skip the call on every rank "
                "instead"
            )
        present = counts > 0
        mean = torch.where(present, sums / counts.clamp_min(1), self._last_losses.double())
        reduced_kpis = None
        if kpis is not None:
            kpi_sums, kpi_totals = summed[2 * K + 1 : 3 * K + 1], summed[3 * K + 1 :]
            ranks = world_size()
            reduced_kpis = torch.where(
                present, kpi_sums / counts.clamp_min(1), kpi_totals / ranks
            ).to(torch.float32)
        return (
            float(summed[2 * K]) > 0,
            mean.to(torch.float32),
            present,
            all(count > 0 for count in host),
            reduced_kpis,
        )

    def _loss_vector_and_mask(
        self, losses: LossesLike, present: PresentLike
    ) -> tuple[Tensor, Tensor | None]:
        vector = as_loss_vector(losses, self.num_tasks)
        if present is None:  # every task present: the usual call
            return vector, None
        mask = as_present_mask(
            present, self.num_tasks, vector.device, allow_all_absent=is_distributed()
        )
        return vector, mask

    def _refuse_on_every_rank(self, *arguments: object) -> None:
        """Tell the other ranks, in the collective they wait in, that this rank's call failed.

        They are in the first collective of the step (:meth:`_reduced`'s fingerprint), on the
        losses' device: meeting them there with a flag lets every rank raise at once. (A
        try/except at the call site rather than a context manager: nothing on the hot path.)
        Outside a process group, nothing.
        """
        if not is_distributed():
            return
        device = collective_device(first_tensor(*arguments), self._last_weights.device)
        differing_entries({**self._fingerprint(), _REFUSED_BY: rank() + 1}, device)

    def _advance(self, step: Step) -> Tensor:
        # Reading a buffer as an attribute is a call to nn.Module.__getattr__: the dict instead
        # (these buffers are registered in __init__, never None).
        state = cast(dict[str, Tensor], self._buffers)
        if step.advances:
            # The rule's arithmetic is the balancer's own: float32 or better, whatever autocast
            # the training step runs under.
            with _own_precision(step.mean_losses.device.type):
                weights = self._update(step)
            if weights.requires_grad:  # a rule computed from learned parameters
                weights = weights.detach()
            state["_last_weights"].copy_(weights)
            self._start_window(state["window_present"], step)
            state["num_steps"].add_(1)
            # Plain attributes: nn.Module.__setattr__'s checks cost more than the rest of a step.
            object.__setattr__(self, "_steps_taken", self._steps_taken + 1)
        else:
            weights = state["_last_weights"].clone()
            if self._window_complete:
                self._observe(step, None)
            else:
                seen = state["window_present"]
                new = step.present.to(seen.device) & ~seen
                self._observe(step, new)
                seen |= new
        # At every call, the window's later micro-batches included: a task first present in
        # one of them then has a loss for the next window's rule (its weight in this window
        # was decided without it), and an absent task's carried loss is its latest.
        state["_last_losses"].copy_(step.mean_losses)
        if not self._every_task_has_loss:
            self._record_tasks_with_loss(state["has_loss"], step.known)
        state["_last_present"].copy_(step.present)
        state["num_calls"].add_(1)
        object.__setattr__(self, "_calls_taken", self._calls_taken + 1)
        if step.all_present:
            return weights
        return torch.where(step.present.to(weights.device), weights, 0)

    def _start_window(self, window_present: Tensor, step: Step) -> None:
        """At an advancing call: the window's present tasks so far are this call's."""
        if step.all_present:
            if not self._window_complete:
                window_present.fill_(True)
                object.__setattr__(self, "_window_complete", True)
        else:
            window_present.copy_(step.present)
            object.__setattr__(self, "_window_complete", False)

    def _record_tasks_with_loss(self, has_loss: Tensor, known: Tensor | None) -> None:
        """``has_loss`` after a call: ``known``, or every task (``None``)."""
        if known is None:
            has_loss.fill_(True)
            every = True
        else:
            has_loss.copy_(known)
            every = bool(known.all())  # only until every task has been present once
        object.__setattr__(self, "_every_task_has_loss", every)

    def _checked_values(
        self, losses: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, dict[int, float], list[int]]:
        """Detached float32 copy of the losses after the value checks, the non-finite ones of
        present tasks, and the absent tasks whose loss is not finite.

        One host transfer of K numbers per step: it is what naming the offending task costs.
        Non-finite losses of present tasks are returned, not raised: whether to raise or skip
        is decided on every rank at once, after the all-reduce.
        """
        host = losses.tolist()
        if mask is None:
            present, absent_nonfinite = [True] * self.num_tasks, []
        else:
            present = mask.tolist()
            absent_nonfinite = [
                i for i, v in enumerate(host) if not present[i] and not math.isfinite(v)
            ]
        nonfinite = {i: v for i, v in enumerate(host) if present[i] and not math.isfinite(v)}
        checked = [v if present[i] and i not in nonfinite else 1.0 for i, v in enumerate(host)]
        check_loss_values(
            checked,
            positive=self.requires_positive_losses,
            method=self._method_name,
            hint=self.positive_losses_hint,
        )
        return losses.detach().to(dtype=torch.float32), nonfinite, absent_nonfinite

    def _mean_over_ranks(
        self, losses: LossesLike, present: PresentLike = None
    ) -> tuple[Tensor, Tensor]:
        """Checked float32 values of ``losses`` on this module's device, each task's averaged
        over the ranks that have it (``present``: this rank's mask; None: every task), and
        where some rank has it (bool ``[K]``). A task no rank has keeps its last mean loss.

        A rank whose arguments fail the checks still joins the all-reduce, with NaN, so that
        every rank raises at once instead of the others waiting there for it.
        """
        K = self.num_tasks
        try:
            vector, mask = self._loss_vector_and_mask(losses, present)
            values, nonfinite, _ = self._checked_values(vector.detach(), mask)
        except Exception:  # re-raised after the collective the other ranks are waiting in
            if is_distributed():
                device = collective_device(first_tensor(losses, present), self._last_weights.device)
                all_reduce_sum(torch.full((2 * K,), math.nan, device=device))
            raise
        here = torch.ones(K, device=values.device) if mask is None else mask.to(values.dtype)
        # An absent task's value may be NaN: where(), not a product, leaves it out
        payload = torch.cat([torch.where(here > 0, values, 0.0), here])
        summed = all_reduce_sum(payload).to(self._last_weights.device)
        for i, value in nonfinite.items():
            raise ValueError(f"losses[{i}] is {value}: every task loss must be finite")
        if is_distributed() and not bool(torch.isfinite(summed).all()):
            raise ValueError(
                "losses: a loss on another DDP rank is not finite or was refused there (its own "
                "error says why); every rank's state is unchanged"
            )
        sums, counts = summed[:K], summed[K:]
        anywhere = counts > 0
        return torch.where(anywhere, sums / counts.clamp_min(1), self._last_losses), anywhere

    def _nonfinite_losses(self, nonfinite: dict[int, float]) -> None:
        """Raise in ``"raise"`` mode (every rank at once); nothing to do in ``"skip"`` mode."""
        if self.on_nonfinite == "skip":
            return
        where = (
            " and ".join(f"losses[{i}] is {v}" for i, v in nonfinite.items())
            if nonfinite
            else "a loss on another DDP rank is not finite"
        )
        raise ValueError(
            f"{where}: every task loss must be finite; the call is rejected and "
            "the balancer's state is unchanged. Under AMP, create the balancer with "
            "on_nonfinite='skip' to skip such steps as GradScaler does, or pass present= "
            "to leave out tasks without labels"
        )

    def _checked_kpis(self, kpis: KpisLike, device: torch.device) -> Tensor | None:
        """Checked KPIs on ``device`` (the losses'), for methods that read them."""
        if not self.requires_kpis:
            return None
        return as_kpi_vector(kpis, self.num_tasks, self._method_name).to(device)

    def _warn_backward_in_eval_mode(self, location: Location) -> None:
        """At the call that returned the objective: a hook has no frame of the user's."""
        warn_at(
            location,
            f"{self._method_name}: an objective the balancer returned in eval mode is being "
            "backpropagated. In eval mode (b.training is False, which model.eval() sets on "
            "every submodule) a call returns Σ w_k L_k with the last weights and its state "
            "does not advance, so this training step uses fixed weights. Call b.train() for "
            "training steps (e.g. after model.eval() to freeze BatchNorm); to train with "
            "fixed weights on purpose, use tb.create('fixed', ...).",
        )

    def _frozen_objective(self, vector: Tensor, mask: Tensor | None) -> Tensor:
        """``Σ w_k L_k`` with the current weights: eval calls and calls under no_grad."""
        dtype = torch.promote_types(vector.dtype, torch.float32)
        weights = self._last_weights.to(device=vector.device, dtype=dtype)
        if mask is None:
            return (weights * vector.to(dtype)).sum()
        return (torch.where(mask, weights, 0) * torch.where(mask, vector, 0).to(dtype)).sum()

    def _count_skipped_call(self) -> None:
        """With accumulation, a skipped call still takes its place in the window (nothing else
        changes), so the windows stay aligned with the optimiser steps of the user's loop. A
        window whose first call is skipped has seen no task yet: its later calls observe each
        at its first presence (not against the previous window's record)."""
        if self.accumulation_steps > 1:
            if self._calls_taken % self.accumulation_steps == 0:
                self.window_present.fill_(False)
                object.__setattr__(self, "_window_complete", False)
            self.num_calls.add_(1)
            object.__setattr__(self, "_calls_taken", self._calls_taken + 1)

    def _skipped_objective(self, vector: Tensor, mask: Tensor | None) -> Tensor:
        """A NaN objective in the graph: its backward gives NaN gradients, which GradScaler
        (or any finite check) skips; every rank returns one, so all ranks skip together."""
        self._count_skipped_call()
        kept = vector if mask is None else torch.where(mask, vector, 0)
        return kept.to(torch.promote_types(vector.dtype, torch.float32)).sum() * math.nan

    def _fingerprint_fields(self) -> dict[str, Any]:
        return {
            "method": self._method_name,
            "num_tasks": self.num_tasks,
            "hyperparameters": sorted(self.configuration.items()),
            "requires_kpis": self.requires_kpis,  # whether the call's payload carries KPIs
            "num_steps": self._steps_taken,
            "num_calls": self._calls_taken,
        }

    def _fingerprint(self) -> dict[str, int]:
        return {key: fingerprint_value(v) for key, v in self._fingerprint_fields().items()}

    def _check_gram(self, gram: Tensor | None) -> Tensor:
        """One rule for every method: a float, K×K, finite and symmetric Gramian, with no
        entry beyond ``2**1000`` (float64 headroom for the rules).

        An asymmetry beyond rounding (``|G − Gᵀ| > 1e-5·max|G|``) is refused; rounding-level
        asymmetry is removed by using ``(G + Gᵀ)/2``. A Gramian is PSD to the rounding of
        the precision it was computed in, which may be coarser than its dtype (a float32
        Gramian cast to float64, a bfloat16 one under autocast): one indefinite beyond
        bfloat16's rounding (an eigenvalue below ``−√ε·λ_max``, ``√ε = 1/16``) is refused as
        no Gramian, and one indefinite beyond its own dtype's (or a float16/bfloat16 one, which
        is solved in float32) is replaced by its nearest PSD matrix. In a float32 one, a task
        whose squared norm is a non-zero subnormal number next to normal ones counts as a zero
        gradient (see :func:`_without_subnormal_norms`).
        """
        if gram is None:
            raise ValueError(f"gram: {self._method_name} needs the K×K Gramian, got None")
        if not isinstance(gram, Tensor):
            raise TypeError(f"gram: expected a tensor, got {type(gram).__name__}")
        if not gram.is_floating_point():
            raise TypeError(f"gram: expected a float32 or float64 Gramian, got dtype {gram.dtype}")
        expected = (self.num_tasks, self.num_tasks)
        if tuple(gram.shape) != expected:
            raise ValueError(f"gram: expected shape {expected}, got {tuple(gram.shape)}")
        gram = gram.detach()
        given_dtype = gram.dtype
        if gram.dtype not in (torch.float32, torch.float64):
            gram = gram.to(torch.float32)
        if not bool(torch.isfinite(gram).all()):
            raise ValueError("gram: every entry of the Gramian must be finite")
        peak = float(gram.abs().max())
        if peak > _LARGEST_GRAM_ENTRY:
            # The rules' sums and products of entries (K·max|G| and more) would overflow
            # float64 and give wrong weights or none: refused, rather than scaled per method.
            raise ValueError(
                f"gram: entries up to {peak:.3e} leave the weight rules no headroom in float64 "
                f"(expected at most 2**1000 ≈ {_LARGEST_GRAM_ENTRY:.3e}); scale the losses "
                "down, which scales G by the square of the factor"
            )
        asymmetry = float((gram - gram.T).abs().max())
        if asymmetry > 1e-5 * peak:
            raise ValueError(
                f"gram: a Gramian G = J Jᵀ is symmetric; got max |G − Gᵀ| = {asymmetry:.3g} "
                f"for max |G| = {peak:.3g}"
            )
        # (G + Gᵀ)/2 summed in float64 as halves, which no entry near the dtype's largest value
        # overflows (a float32 entry halves exactly there)
        halved = gram.double() * 0.5
        symmetric = (halved + halved.T).to(gram.dtype)
        if symmetric.dtype == torch.float32:
            symmetric = _without_subnormal_norms(symmetric)
        wide = symmetric.double()
        eigenvalues = torch.linalg.eigvalsh(wide)
        lowest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
        if lowest >= 0:
            return symmetric
        if given_dtype == gram.dtype and lowest >= -psd_rounding(given_dtype, largest, len(wide)):
            return symmetric  # the solvers repair a float32 or float64 one themselves
        # Computed in a coarser precision than its dtype says (a float32 Gramian cast to
        # float64, a bfloat16 one under autocast cast to float32, or a half-precision one,
        # solved in float32): the solvers would judge it by its dtype's rounding.
        try:
            repaired = nearest_psd(wide, torch.bfloat16, "gram")
        except SolverError as error:
            raise ValueError(
                f"{error} of any floating precision, down to bfloat16's (√ε·λ_max = "
                f"{psd_rounding(torch.bfloat16, largest, len(wide)):.3e}): pass the "
                "Gramian of the task gradients, G = J Jᵀ"
            ) from None
        return repaired.to(gram.dtype)

    @property
    def _method_name(self) -> str:
        return self.name or type(self).__name__

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}"

    # ----------------------------------------------------------------------------------------
    # Precision and state.

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Balancer:
        """``.to(device)`` moves the state; ``.half()``/``.double()`` leave its dtypes alone.

        The state (Adam moments with eps = 1e-8, counters, EMAs) needs float32 or better:
        ``model.half()`` on a model holding a balancer must not turn it into NaN.
        """
        dtypes = {name: t.dtype for name, t in self._state_tensors()}
        super()._apply(fn, recurse)
        for name, tensor in self._state_tensors():
            if tensor.dtype != dtypes[name]:
                module_name, _, attr = name.rpartition(".")
                module = self.get_submodule(module_name)
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.to(dtypes[name])
                    if tensor.grad is not None:
                        tensor.grad = tensor.grad.to(dtypes[name])
                else:
                    module._buffers[attr] = tensor.to(dtypes[name])
        return self

    def _state_tensors(self) -> Iterable[tuple[str, Tensor]]:
        yield from self.named_parameters()
        yield from self.named_buffers()

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
        # torch's protocol, all or nothing for this balancer: missing keys go to missing_keys
        # (torch then honours strict=), a mismatch to error_msgs (torch raises a RuntimeError
        # listing every module's errors once all were tried); either way nothing of this
        # balancer, its submodules included, is copied.
        # A checkpoint without this balancer (a backbone's) misses every key: missing keys.
        # One that has some of them is this balancer's state, and must be whole and fit.
        _add_has_loss_of_older_state(state_dict, prefix, self.num_tasks)
        expected = [prefix + key for key in self.state_dict()]
        missing = [key for key in expected if key not in state_dict]
        kept: dict[str, Tensor] = {}
        changed: dict[str, Any] = {}
        refused = bool(missing)
        if len(missing) == len(expected):
            # Our own keys are reported here, the submodules' by the submodules themselves.
            missing_keys.extend(key for key in missing if "." not in key[len(prefix) :])
        else:
            try:
                self._check_loadable(state_dict, prefix, missing)
                changed = self._changed_hyperparameters(state_dict[prefix + "_extra_state"])
                kept = self._hyperparameter_buffers(changed)
            except (TypeError, ValueError) as error:
                error_msgs.append(str(error))
                refused = True
        if refused:
            # torch loads the submodules after this, from the same dict (which torch copies so
            # that this hook may edit it): they get their current values back, a no-op.
            current = self.state_dict(prefix=prefix, keep_vars=False)
            for key in expected:
                if key in state_dict and "." in key[len(prefix) :]:
                    state_dict[key] = current[key].detach().clone()
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for name, value in kept.items():
            self.get_buffer(name).copy_(value)
        self._steps_taken = int(self.num_steps)
        self._calls_taken = int(self.num_calls)
        self._every_task_has_loss = bool(self.has_loss.all())
        self._window_complete = bool(self.window_present.all())
        if changed:
            weights = self._weights_after_changed_hyperparameters()
            if weights is not None:
                self._last_weights.copy_(weights)
        if "accumulation_steps" in changed:
            # Saved at an optimiser step (_check_loadable): the next call starts a window of
            # the new length, as it would have started one of the old.
            self.end_window()

    def _saved_hyperparameters(self, state: dict[str, Any]) -> dict[str, Any]:
        """A checked state's hyperparameters. One it lacks (an option newer than the state) is
        absent, except the loop options, whose defaults are how every call acted before them,
        and the method's ``options_acting_before_they_existed`` (a method option's default
        may not be how it acted: UPGrad regularised before ``norm_eps``)."""
        older = {
            key: _canonical(value) for key, value in self.options_acting_before_they_existed.items()
        }
        return {**LOOP_OPTIONS, **older, **state.get("hyperparameters", {})}

    def _changed_hyperparameters(self, state: dict[str, Any]) -> dict[str, Any]:
        """The allowed hyperparameters whose saved values differ from this balancer's, with
        the saved values (as constructor arguments; ``_UNSAVED`` for one the state lacks)."""
        saved = self._saved_hyperparameters(state)
        return {
            key: _decoded(saved[key]) if key in saved else _UNSAVED
            for key in self._allowed_changes
            if saved.get(key, _UNSAVED) != self.configuration.get(key)
        }

    def _hyperparameter_buffers(self, changed: dict[str, Any]) -> dict[str, Tensor]:
        """This balancer's buffers that hold a hyperparameter allowed to change on resume.

        They are found by building the method twice, with the saved and with the new values:
        the buffers that differ hold them (fixed weights, DTP's γ, FAMO's bounds, ...), and
        keep the new values rather than the checkpoint's.
        """
        # params= is saved as its tensors' shapes, which no buffer holds as values (a buffer
        # whose shape follows them was already refused by _check_loadable's shape check).
        # A value the state lacks cannot be rebuilt with: the new one stands.
        changed = {
            key: value
            for key, value in changed.items()
            if key != "params" and value is not _UNSAVED
        }
        if not changed:
            return {}
        args, kwargs = getattr(self, "_init_arguments", ((), {}))
        new = dict(kwargs)
        shared = getattr(self, "shared_params", None)
        if shared is not None:  # the same mode (and buffer shapes) as this balancer's
            new["params"] = shared
        try:
            fresh_new = type(self)(*args, **new)
            fresh_saved = type(self)(*args, **{**new, **changed})
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"state_dict: cannot rebuild {self._method_name} with the saved values "
                f"{changed} to tell which buffers hold them: {error}"
            ) from error
        saved_buffers = dict(fresh_saved.named_buffers(recurse=False))
        # The reported weights are state even where the initial ones follow a hyperparameter
        # (UW's init): the method derives them from the new values and the loaded state
        # (_weights_after_changed_hyperparameters), or the checkpoint's stay.
        return {
            name: buffer.detach().clone()
            for name, buffer in fresh_new.named_buffers(recurse=False)
            if name != "_last_weights"
            and not torch.equal(buffer, saved_buffers[name])
            # this balancer may live on another device (the rebuilt ones are on the host)
            and torch.equal(buffer, self.get_buffer(name).to(buffer.device))
        }

    def _check_loadable(self, state_dict: Any, prefix: str, missing: Sequence[str]) -> None:
        """Refuse (ValueError/TypeError) a state this balancer cannot take."""
        what = f"state_dict: cannot load into {self._method_name} (num_tasks={self.num_tasks})"
        own = self.state_dict()
        extra = prefix + "_extra_state"
        if extra not in state_dict:
            raise ValueError(f"{what}: the key {extra!r} is missing")
        # Method and num_tasks first: they explain every other mismatch.
        self._check_extra_state(state_dict[extra], what)
        if missing:
            raise ValueError(f"{what}: the state lacks the keys {list(missing)}")
        for key, current in own.items():
            full = prefix + key
            given = state_dict[full]
            if key.endswith("_extra_state"):
                continue
            if not isinstance(given, Tensor):
                raise TypeError(f"{what}: {full!r} is a {type(given).__name__}, not a tensor")
            if given.shape != current.shape:
                # num_tasks matched (_check_extra_state): the shape follows another setting.
                raise ValueError(
                    f"{what}: {full!r} has shape {tuple(given.shape)}, expected "
                    f"{tuple(current.shape)}: its shape follows the configuration (such as "
                    "the sizes of the params= tensors), so this state cannot be carried over "
                    "to this one"
                )
            if current.is_floating_point():
                if not given.is_floating_point() or not bool(torch.isfinite(given).all()):
                    raise ValueError(f"{what}: {full!r}: expected finite floats, got {given}")
            elif given.is_floating_point() or given.is_complex():
                raise ValueError(f"{what}: {full!r}: expected integers, got {given}")
            elif current.dtype != torch.bool and bool((given < 0).any()):
                raise ValueError(f"{what}: {full!r} counts something, got {given}")
        saved_steps = int(self._saved_hyperparameters(state_dict[extra])["accumulation_steps"])
        calls = int(state_dict[prefix + "num_calls"])
        if saved_steps != self.accumulation_steps and calls % saved_steps:
            raise ValueError(
                f"{what}: the state was saved in the middle of an accumulation window (call "
                f"{calls % saved_steps} of accumulation_steps={saved_steps}), so it cannot "
                f"go on with accumulation_steps={self.accumulation_steps}: save it right "
                "after an optimiser step (or call b.end_window() before saving)"
            )

    def _check_extra_state(self, state: Any, what: str) -> None:
        if not isinstance(state, dict) or "method" not in state:
            raise ValueError(
                f"{what}: the state carries no method name and hyperparameters (saved by an "
                "older taskbalance?)"
            )
        if state["method"] != self._method_name:
            raise ValueError(f"{what}: the state was saved by method {state['method']!r}")
        if state.get("num_tasks") != self.num_tasks:
            raise ValueError(f"{what}: the state was saved with num_tasks={state.get('num_tasks')}")
        saved = self._saved_hyperparameters(state)
        # The seed only sets the generator's first state, which the saved state replaces.
        allowed = self._allowed_changes | {"seed"}
        differing = sorted(
            key
            for key in set(saved) | set(self.configuration)
            if key not in allowed and saved.get(key, _UNSAVED) != self.configuration.get(key)
        )
        if differing:
            detail = ", ".join(
                (
                    f"{key}: saved {saved[key]!r}"
                    if key in saved
                    else f"{key}: not in the state (saved before the option existed)"
                )
                + f", here {self.configuration.get(key)!r}"
                for key in differing
            )
            raise ValueError(
                f"{what}: other hyperparameters ({detail}); to change them on resume, call "
                f"b.allow_changed_hyperparameters({', '.join(map(repr, differing))}) first"
            )
        generator = getattr(self, "generator", None)
        if generator is not None:
            saved_generator = state.get("generator")
            if not isinstance(saved_generator, Tensor) or (
                saved_generator.numel() != generator.get_state().numel()
            ):
                raise ValueError(
                    f"{what}: the state has no valid random generator state ('generator'), "
                    f"which {self._method_name} needs to continue the same draws"
                )

    # nn.Module's hooks for state that is not a tensor: the method name and hyperparameters
    # (checked on load), and the torch.Generator of a method that draws random numbers
    # (``self.generator``, seeded identically on every rank), so a resumed run draws the same
    # sequence.
    def get_extra_state(self) -> Any:
        state: dict[str, Any] = {
            "method": self._method_name,
            "num_tasks": self.num_tasks,
            "hyperparameters": dict(self.configuration),
            # 2: has_loss. A state without the field is of format 1, and loads (see
            # _add_has_loss_of_older_state)
            "state_format": 2,
        }
        generator = getattr(self, "generator", None)
        if generator is not None:
            state["generator"] = generator.get_state()
        return state

    def set_extra_state(self, state: Any) -> None:
        generator = getattr(self, "generator", None)
        if generator is not None:
            # torch.load(map_location="cuda") moves every tensor; a generator's state is CPU.
            generator.set_state(state["generator"].cpu())


def _refuse_losses_without_grad(losses: LossesLike, vector: Tensor, mask: Tensor | None) -> None:
    """Refuse a training call whose losses (or a present task's loss) are outside the graph.

    The objective would move no model parameter through them (a learned-weights method's own
    would still train): the loop would run and the model, or that task's head, learn nothing.
    The entries of one tensor share its graph; a list's are checked one by one (Python
    attributes: nothing on the hot path unless one fails).
    """
    advice = (
        "build them from the model's outputs without .item(), .detach() or torch.tensor([...]) "
        "(pass the list of loss tensors, or torch.stack it)"
    )
    if not vector.requires_grad:
        raise ValueError(
            "losses: the losses do not require grad, so the objective would pass no gradient "
            f"to the model; {advice}. To evaluate, call under torch.no_grad() or after "
            "b.eval(); compute_weights takes plain values"
        )
    if isinstance(losses, Tensor):
        return
    cut = [i for i, loss in enumerate(losses) if not loss.requires_grad]
    present = None if mask is None or not cut else mask.tolist()
    cut = [i for i in cut if present is None or present[i]]
    if cut:
        raise ValueError(
            f"losses[{cut[0]}]: this task's loss does not require grad, so the task would pass "
            f"no gradient to the model; {advice}, or mark the task absent with present= if "
            "it has no labels in this batch"
        )


def _without_subnormal_norms(gram: Tensor) -> Tensor:
    """A float32 Gramian with the tasks whose squared norm is subnormal
    (:func:`~taskbalance._gramian.has_subnormal_norm`) taken as zero gradients (row and column
    zeroed), where the largest squared norm is normal.

    The rules count any gradient above ``2**-64`` of the longest: they would weigh rounding
    noise. The balancer's own Gramians are recomputed in float64 in that case instead (see
    :func:`taskbalance._gramian.task_gradients`); a given one has lost the bits already.
    """
    diagonal = gram.diagonal().tolist()  # K numbers: one host copy
    if max(diagonal) < torch.finfo(torch.float32).tiny or not has_subnormal_norm(diagonal):
        return gram
    kept = [0.0 if has_subnormal_norm([value]) else 1.0 for value in diagonal]
    mask = torch.tensor(kept, dtype=gram.dtype, device=gram.device)
    return gram * torch.outer(mask, mask)


def saved_before_has_loss(state_dict: Any, prefix: str) -> bool:
    """Whether ``state_dict`` holds a balancer state of format 1 (no ``has_loss`` buffer)."""
    extra = state_dict.get(prefix + "_extra_state")
    return isinstance(extra, dict) and "state_format" not in extra


def _add_has_loss_of_older_state(state_dict: Any, prefix: str, num_tasks: int) -> None:
    """Give a state of format 1 the ``has_loss`` and ``window_present`` its release acted on:
    every task counted as having a loss once a step was taken (the placeholder was read as
    one), and a window's later calls observed nothing. A state of the current format
    without them is incomplete, and refused as such."""
    steps = state_dict.get(prefix + "num_steps")
    if not isinstance(steps, Tensor) or not saved_before_has_loss(state_dict, prefix):
        return
    state_dict.setdefault(
        prefix + "has_loss", torch.full((num_tasks,), bool(steps > 0), dtype=torch.bool)
    )
    state_dict.setdefault(prefix + "window_present", torch.ones(num_tasks, dtype=torch.bool))
