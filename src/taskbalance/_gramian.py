"""The Gramian engine: ``G = J Jᵀ`` of the task gradients, in one batched backward.

Every gradient method here needs only the K×K Gramian of the task gradients, never the K×P
Jacobian itself: its update is ``Jᵀw`` for a ``w`` computed from ``G`` (and the losses), and
``Jᵀw`` is exactly the gradient of ``Σ w_k L_k``, which the user's ordinary backward computes.

Two ways to say what "the task gradient" is taken with respect to:

- **features mode** (``features=`` one tensor or several, or ``wrt`` a tensor): the gradient of
  each loss with respect to the shared representation ``z`` (the trunk's output). The backward
  runs through the task heads only, which is cheap; ``G`` is the sum over samples of per-sample
  inner products (MGDA-UB, Sener & Koltun 2018, §3.3). With several separate shared tensors (two
  encoders; none computed from another) ``G`` sums over them: ``G = Σ_t J_t J_tᵀ``.
- **parameters mode** (``wrt`` a sequence of parameters): the exact gradient with respect to
  those parameters (the last shared layer, as GradNorm's paper uses, or the whole trunk).

How the K task gradients are computed: when the losses were stacked from K separate losses
(``torch.stack``; a list given to a balancer is stacked too), one backward per task from the
stack's input edge, so task k's backward runs through its own head only. Otherwise the K
backward passes are batched into one call (``is_grads_batched``, i.e. vmap over the backward),
where every head's backward runs for every task; where an operation in the graph has no
batching rule, the engine falls back to a loop of K ordinary backward passes, with a warning
saying so: the result is identical, only slower. Measured on CPU (``benchmarks/overhead.py
--engine``, 3×256 MLP, batch 256), the per-edge loop beats the batched call in both modes:
2-20× in features mode (the batched call pays K² head backward passes), 1.05-1.6× with
respect to the whole trunk (K = 2 to 40). The graph is always kept, so the user's
``objective.backward()`` works afterwards. Tasks marked absent (``present``) are not
differentiated at all: their rows are zero (their loss may be NaN).

Not in the graph is an error, a zero gradient is not: autograd tells an input that no loss
reaches (``None`` under ``allow_unused``) from a gradient that is zero (a dead ReLU region).
A shared tensor or listed parameter that no task reaches, or a task that reaches none of them
(a constant loss), raises a ``ValueError`` naming it, instead of giving a zero Gramian that
would make every method return meaningless weights. The usual causes: a whole-model
``torch.compile`` or ``DDP(find_unused_parameters=True)`` whose forward returns
``(z, head outputs)`` (the returned ``z`` is a new output of the compiled or DDP node, not the
tensor the heads read: compile the trunk and the heads separately, or take ``z`` from inside
the forward; see ``examples/compile_model.py`` and ``examples/ddp_unused_parameters.py``), a
tensor the heads do not read, a task without labels (pass ``present=``). Per-task detection is
exact whenever the losses were stacked (on the batched and looped paths, a task whose rows are
all zero gets one confirming backward from its own edge); for a loss vector made by one
operation a task whose row is all zero cannot be told apart from a zero gradient, and only
inputs that no task reaches are refused.

Precision: each backward's ``grad_outputs`` are scaled by a power of two (``2**16``, as
GradScaler starts, ``2**14`` for float16 losses). Under float16 autocast this keeps small
per-task gradients (a loss averaged over 32k samples, or weighted by 0.01) out of float16's
subnormal range, where half of them would flush to zero and ``G`` would be off by 5%; in
float32, bfloat16 and float64 scaling by a power of two changes no bit (unless a gradient was
subnormal, which then gains precision). The rows are widened to float32 (float64 for float64
graphs) and keep the scale: ``G`` is accumulated from them with autocast disabled (in float32,
or float64 as asked) and divided by the scale's square, and ``Jᵀw`` is taken as ``Jᵀ(w/s)``,
both exact, so no pass over the K×numel rows unscales them. An overflow to inf or NaN shows in
``G`` (or, when no ``G`` is computed, in a sum of the rows): ``G`` of the unscaled rows is
tried first (large float32 gradients overflow only the scaled ``G``), then the backward is
retried at ``2**8``, then at 1. Where a listed parameter or the features tensor has a gradient
hook (``register_hook``: a per-parameter clamp, say), the passes start at scale 1 instead, so
the hook acts on each task's own gradient (float16 graphs then lose the scale's protection). A
hook on a tensor between the losses and the shared tensors (a head's output) cannot be seen
from here: it sees the scaled gradients, and one that is not linear in them (a clamp) makes the
Gramian wrong; clip after the backward instead (``clip_grad_norm_`` on ``.grad``). At the other
end, a float32 ``G`` below float32's normal range (every task gradient's norm below ~1e-19,
or one task's next to larger ones) is recomputed in float64 rather than handed to the methods
as rounding noise or zeros (see :func:`task_gradients`).

DDP: in features mode each rank's ``G`` is a sum over its own samples, and the gradient of the
rank-averaged loss with respect to rank r's features is ``1/R`` times the local one, so the
global Gramian is exactly ``Σ_r G_r / R²``: one all-reduce of K×K numbers. In parameters mode
the global task gradient is the rank average of the local ones, which cannot be recovered from
local Gramians: the engine all-reduces the K×P Jacobian (K times the traffic of one ordinary
DDP gradient all-reduce, for the chosen parameters). Prefer features mode, or a small set of
parameters such as the last shared layer, at scale. FSDP2 (``fully_shard``): features mode
works as under DDP (the features are ordinary tensors); sharded DTensor parameters are refused
in parameters mode, since the forward runs on gathered copies that autograd cannot map back.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.overrides import has_torch_function

from taskbalance._constants import constant
from taskbalance._distributed import all_reduce_mean, all_reduce_sum, is_distributed, world_size
from taskbalance._precision import autocast_off
from taskbalance._validation import as_loss_vector, check_tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed support
    # The name stays bound (to None) so the DTensor check below can skip itself; mypy sees a
    # class rebound to None, which is exactly the intent here.
    DTensor = None  # type: ignore[assignment,misc]


# GradScaler's initial scale; after an overflow the backward is redone at a scale _BACKOFF
# times smaller, down to 1 (a gradient that overflows unscaled is the user's own overflow).
_INITIAL_SCALE = 2.0**16
_BACKOFF = 2.0**8
#: The largest K whose Gramian is unscaled on the host (see :func:`_unscaled_gram`).
_HOST_GRAM_MAX_K = 8
#: The smallest magnitude that rounds to inf in each dtype (round to nearest, ties to even:
#: halfway between the largest finite value and the next power of two). NaN fails ``<`` too.
_ROUNDS_TO_INF = {torch.float32: 2.0**128 - 2.0**103, torch.float64: math.inf}
#: Float32's smallest normal number: below it an entry keeps fewer than float32's 24 bits.
_FLOAT32_TINY = 2.0**-126


def _checked_engine_entry() -> Callable[..., tuple[Tensor | None, ...]] | None:
    """The entry into autograd's engine that ``torch.autograd.grad`` ends in, if this torch
    has it with the arguments the per-task loop passes (tried once, on a 0-d product)."""
    entry = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if entry is None:
        return None
    with torch.enable_grad(), torch.inference_mode(False):
        x = torch.ones((), requires_grad=True)
        try:
            (grad,) = entry((x * 3.0,), (torch.ones(()),), False, False, (x,), True, False)
        except TypeError:  # another signature: the public function, same result
            return None
    return entry if isinstance(grad, Tensor) and grad.item() == 3.0 else None


#: The engine's loop calls this directly for plain tensors: the public function's argument
#: normalisation (shape, dtype and subclass checks of arguments the engine builds itself) costs
#: about a third of a small task's backward, K times per step. None: the public function.
_engine_backward = _checked_engine_entry()


def gramian(
    losses: Tensor | Sequence[Tensor],
    wrt: Tensor | Iterable[Tensor] | None = None,
    *,
    features: Tensor | Sequence[Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    batched: bool | None = None,
) -> Tensor:
    """The K×K Gramian ``G_kl = ⟨∇L_k, ∇L_l⟩`` of the task gradients.

    Args:
        losses: the K task losses, a 1-D tensor or a sequence of 0-d tensors, in the graph.
        wrt: the shared features (a tensor in the graph: features mode) or a sequence of shared
            parameters (parameters mode).
        features: instead of ``wrt``, the shared features as one tensor or a sequence of
            tensors (several shared tensors: ``G`` sums over them), as in
            ``b(losses, features=[z1, z2])``. Give ``wrt`` or ``features``, not both.
        dtype: ``torch.float32`` or ``torch.float64``, the precision of ``G``.
        batched: True to require the batched backward, False to loop over tasks, None (the
            default) to try the batched one and fall back to the loop with a warning.

    Returns:
        ``G`` of shape ``[K, K]``, symmetric positive semi-definite, detached. Under DDP it is
        the Gramian of the global (rank-averaged) losses. A float32 ``G`` below float32's
        normal range is the float64 one rounded to float32 (see :func:`task_gradients`).

    Raises:
        ValueError: naming ``features`` or ``params[i]`` when no loss reaches that tensor, or
            ``losses[k]`` when task k reaches none of them (see the module docstring).

    Example:
        >>> import torch, taskbalance as tb
        >>> z = torch.tensor([[1.0, 2.0]], requires_grad=True)
        >>> losses = torch.stack([z.sum(), (2 * z[:, 0]).sum()])
        >>> tb.gramian(losses, z)
        tensor([[2., 2.],
                [2., 4.]])
        >>> z2 = torch.tensor([[3.0]], requires_grad=True)
        >>> tb.gramian(torch.stack([z.sum() + z2.sum(), z2.sum()]), features=[z, z2])
        tensor([[3., 1.],
                [1., 1.]])
    """
    vector = _loss_vector(losses)
    inputs, features_mode = _inputs(wrt, features)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    grads = task_gradients(
        vector,
        inputs,
        batched=batched,
        features_mode=features_mode,
        gramian_of=lambda rows, wide: gramian_from_rows(
            rows, features_mode=features_mode, dtype=torch.float64 if wide else dtype
        ),
    )
    assert grads.gram is not None  # gramian_of was given
    # The engine widens a float32 Gramian below float32's normal range: rounded back to the
    # dtype asked for, each entry is then the correctly rounded one.
    return grads.gram.to(dtype)


@dataclass(frozen=True)
class TaskGradients:
    """The task gradients of one call, as the engine computed them.

    Attributes:
        rows: per-input Jacobian blocks ``[K, numel]`` (float32, or float64) **times**
            ``scale``: dividing K×numel numbers by a power of two is a pass over memory that
            a consumer can fold into a K-vector (``Jᵀ(w / scale)``) or a K×K matrix.
        scale: the power of two the backward passes were scaled by (see the module docstring).
        path: True for the batched backward, False for a loop over ``losses[k]``, None for
            the per-task loop over the stack's edges.
        gram: the unscaled Gramian made by ``gramian_of``, symmetrised (``(G + Gᵀ)/2``);
            None when none was asked for. Float64 when a float32 one would have fallen below
            float32's normal range (see :func:`task_gradients`).
        finite: whether the rows (with ``gramian_of``: the Gramian) are finite.
        sparse: per input, whether autograd gave its task gradients as sparse tensors (an
            ``nn.Embedding(sparse=True)`` weight); ``rows`` holds them densified.
        read_rows: per input whose task gradients were all sparse (an embedding table read
            only through its lookup), the sorted indices of the table rows they cover (the
            rows the batch read, a zero gradient included), else None.
        tasks_apart: with several inputs, where the passes tell each task's reach (losses
            stacked): a message naming two present tasks that reach no input in common, whose
            Gramian entry is then 0 whatever their gradients; else None.
    """

    rows: list[Tensor]
    scale: float
    path: bool | None
    gram: Tensor | None
    finite: bool
    sparse: tuple[bool, ...]
    read_rows: tuple[Tensor | None, ...] = ()
    tasks_apart: str | None = None


def unscaled_rows(rows: Sequence[Tensor], scale: float) -> list[Tensor]:
    """``rows`` divided by ``scale`` (new tensors; ``rows`` stay as they are)."""
    if scale == 1.0:
        return list(rows)
    return [row / scale for row in rows]


def task_gradients(
    losses: Tensor,
    inputs: Sequence[Tensor],
    *,
    batched: bool | None,
    features_mode: bool | None = None,
    present: Tensor | Sequence[bool] | None = None,
    gramian_of: Callable[[list[Tensor], bool], Tensor] | None = None,
) -> TaskGradients:
    """The K task gradients with respect to ``inputs``, and their Gramian when asked for.

    ``batched=None`` picks the fastest path that works. When ``losses`` was stacked from K
    separate losses (``torch.stack``, which is what a list passed to a balancer becomes), it
    loops over the stack's K input edges: task k's backward then runs through task k's head
    only, where the batched backward (and a loop over ``losses[k]``) runs all K heads for every
    task, K² head backward passes in all (see the module docstring for measured speed-ups).
    Otherwise it tries the batched backward and falls back to a loop with a warning.

    ``features_mode`` only names the inputs in errors (``features`` or ``params[i]``); None
    guesses it (parameters mode when every input is an ``nn.Parameter``). ``present`` (bool
    ``[K]``, default all True) marks the tasks to differentiate; absent tasks get zero rows.

    ``gramian_of(rows, wide)`` gives the Gramian of (scaled) rows, reduced over DDP ranks as
    the caller needs, in the caller's precision, or in float64 when ``wide``; it is unscaled
    and symmetrised here. An overflow at the current scale shows in it as a non-finite entry,
    so the retry is decided on those K² numbers rather than on a pass over the rows.
    ``gramian_of`` must return the same Gramian on every rank (a reduced one, or the one of
    rows that are themselves global): every rank then takes the same retries and issues the
    same collectives. Without ``gramian_of`` a sum of each block decides, locally.

    Underflow: a float32 Gramian whose largest diagonal entry (of some parameter group's
    block) is below float32's smallest normal number, ``2**-126`` (every task gradient's norm
    below ~1e-19), holds its entries only to an absolute ``2**-150``, not to ``2**-24`` of the
    largest, and below ``2**-150`` they are zero: every method would then solve a matrix of
    rounding noise, or of zeros, and return meaningless weights without a sign of it. The same
    holds for one task whose gradient's norm is below ~1e-19 next to larger ones: its row
    carries a few bits, and the methods count any gradient above ``2**-64`` of the longest. Such
    a Gramian is recomputed in float64 (``wide``), which holds the products of any float32 rows,
    and returned in float64. A Gramian that is exactly zero (all task gradients zero) takes
    the same second pass, since underflow cannot be told from it on the K² numbers.

    Raises ``ValueError`` when an input or a present task is outside the graph (see the module
    docstring), and for sharded DTensor inputs.
    """
    inputs = list(inputs)
    num_tasks = losses.shape[0]
    _refuse_sharded(inputs, features_mode)
    _refuse_complex(inputs, features_mode)
    mask = _present_list(present, num_tasks)
    # A non-leaf input with retain_grad() would receive these task gradients in .grad (batched
    # ones as unusable vmap tensors): keep what the user had there and put it back afterwards.
    retained = [(tensor, tensor.grad) for tensor in inputs if tensor.retains_grad]
    try:
        scale = _initial_scale(losses.dtype, inputs)
        rows, path, reached, sparse, read = _rows_by_fastest_path(
            losses, inputs, batched, scale, mask
        )
        _check_reached(reached, inputs, features_mode, mask)
        apart = _tasks_apart(reached, mask) if len(inputs) > 1 else None
        if apart is not None:
            names = _input_names(inputs, features_mode)
            reads = [
                ", ".join(name for name, hit in zip(names, reached[k], strict=True) if hit)
                for k in apart
            ]
            apart_message: str | None = tasks_apart_message(apart, reads)
        else:
            apart_message = None
        while True:
            if gramian_of is None:
                gram, finite, normal = None, all_finite(rows), True
            else:
                gram, finite, normal = _unscaled_gram(gramian_of(rows, False), scale)
            if finite or scale == 1.0 or not _retry_can_help(losses, mask, gram is not None):
                break
            if gramian_of is not None:
                # Float32 rows scaled by 2**16 give a Gramian that overflows once ‖g‖ passes
                # ~1e14 although the rows are finite: one pass over them is cheaper than K
                # backward passes, and the reduced Gramian decides alike on every rank.
                unscaled = unscaled_rows(rows, scale)
                gram, finite, normal = _unscaled_gram(gramian_of(unscaled, False), 1.0)
                if finite:
                    rows, scale = unscaled, 1.0
                    break
            scale = max(scale / _BACKOFF, 1.0)
            if path is not None:  # a fallback to the loop warned once: keep to the loop
                batched = path
            rows, path, _, sparse, read = _rows_by_fastest_path(
                losses, inputs, batched, scale, mask
            )
        if gramian_of is not None and finite and not normal:
            # Decided on the (reduced) Gramian, so every rank takes this second pass alike.
            gram, finite, _ = _unscaled_gram(gramian_of(rows, True), scale)
    except RuntimeError as error:
        if "donated buffers" in str(error):  # torch's own message, kept as the cause
            raise RuntimeError(_DONATED_BUFFERS) from error
        raise
    finally:
        for tensor, grad in retained:
            tensor.grad = grad
    return TaskGradients(rows, scale, path, gram, finite, sparse, read, apart_message)


def jacobian_rows(
    losses: Tensor,
    inputs: Sequence[Tensor],
    *,
    batched: bool | None,
    features_mode: bool | None = None,
    present: Tensor | Sequence[bool] | None = None,
) -> tuple[list[Tensor], bool | None]:
    """Per-input Jacobian blocks ``[K, numel]`` (float32, or float64), unscaled, and the path
    taken: :func:`task_gradients` without a Gramian (see there for the arguments)."""
    grads = task_gradients(
        losses, inputs, batched=batched, features_mode=features_mode, present=present
    )
    return unscaled_rows(grads.rows, grads.scale), grads.path


def gramian_from_rows(
    rows: Sequence[Tensor], *, features_mode: bool, dtype: torch.dtype, reduce: bool = True
) -> Tensor:
    """``Σ_blocks J_b J_bᵀ`` in full precision, reduced over DDP ranks as the mode requires.

    ``reduce=False`` takes rows that are already the global ones (:func:`global_rows`).
    """
    device = rows[0].device
    with autocast_off(device.type):
        distributed = is_distributed()
        if not reduce:
            flat = torch.cat([row.to(dtype) for row in rows], dim=1)
            return flat @ flat.T
        if distributed and not features_mode:
            flat = torch.cat([row.to(dtype) for row in rows], dim=1)
            flat = all_reduce_mean(flat)
            return flat @ flat.T
        first = rows[0].to(dtype)
        gram = first @ first.T
        for row in rows[1:]:
            row = row.to(dtype)
            gram.addmm_(row, row.T)
        if distributed:
            gram = all_reduce_sum(gram) / world_size() ** 2
        return gram


def add_rows_(target: Tensor, rows: Sequence[Tensor], coefficients: Tensor) -> Tensor:
    """``target[:, block] += coefficients ⊙ rows[block]`` for each block of columns, in place.

    ``target`` is ``[K, P]``, ``rows`` its column blocks' ``[K, numel]`` (one per parameter)
    and ``coefficients`` ``[K, 1]``: a K×P update without a K×P copy of the rows.
    """
    blocks = target.split([row.shape[1] for row in rows], dim=1)
    for block, row in zip(blocks, rows, strict=True):
        block.addcmul_(row.to(target.dtype), coefficients)
    return target


def widest_dtype(rows: Sequence[Tensor], state: Tensor) -> torch.dtype:
    """The wider of ``state``'s dtype and the rows': a ``K×P`` state updated from the rows
    (an EMA of them) is computed and kept in it, so that it keeps their precision."""
    dtype = state.dtype
    for row in rows:
        dtype = torch.promote_types(dtype, row.dtype)
    return dtype


def global_rows(rows: Sequence[Tensor]) -> list[Tensor]:
    """Parameters mode: the rank-averaged rows (one all-reduce of K×P numbers under DDP).

    The global task gradient with respect to a replicated parameter is the rank average of the
    local ones; outside a process group the rows are returned as they are.
    """
    if not is_distributed():
        return list(rows)
    sizes = [row.shape[1] for row in rows]
    flat = all_reduce_mean(torch.cat(list(rows), dim=1))
    return list(flat.split(sizes, dim=1))


# Task k's reachability of each input: reached[k][i] is False when autograd found no path from
# task k's loss to input i (an unknown per-task answer counts as reached; see _confirm_reached).
_Reached = list[list[bool]]


def _rows_by_fastest_path(
    losses: Tensor,
    inputs: Sequence[Tensor],
    batched: bool | None,
    scale: float,
    present: Sequence[bool],
) -> tuple[list[Tensor], bool | None, _Reached, tuple[bool, ...], tuple[Tensor | None, ...]]:
    num_tasks = losses.shape[0]
    edges = _per_task_edges(losses, num_tasks)
    if not batched and edges is not None:
        cotangent = constant(scale, tuple(losses.shape[1:]), losses.dtype, losses.device)
        version = cotangent._version
        per_task = [
            _edge_grads(edge, cotangent, inputs) if wanted else None
            for edge, wanted in zip(edges, present, strict=True)
        ]
        if cotangent._version != version:  # the K tasks' seed: the later ones saw another
            raise ValueError(_SEED_MODIFIED)
        reached = [[g is not None for g in grads] for grads in _filled(per_task, inputs)]
        rows, sparse, read = _stack_rows(per_task, inputs)
        return rows, None, reached, sparse, read
    if batched is None or batched:
        try:
            grads = _batched_grads(losses, inputs, scale, present)
        except RuntimeError as error:
            # Only a missing batching rule justifies the loop; running out of memory does not.
            if batched or isinstance(error, torch.OutOfMemoryError):
                raise
            warnings.warn(
                "taskbalance.gramian: the batched backward is not supported by this graph "
                f"({str(error).splitlines()[0][:200]}); computing the {num_tasks} task "
                "gradients with a loop of backward passes instead (same result, slower).",
                RuntimeWarning,
                stacklevel=4,
            )
        else:
            rows = [
                _flat_rows(grad, tensor, num_tasks)
                for grad, tensor in zip(grads, inputs, strict=True)
            ]
            used = [grad is not None for grad in grads]
            reached = _confirm_reached(rows, used, edges, losses, inputs, present)
            dense = (False,) * len(inputs)  # vmap has no sparse backward
            return rows, True, reached, dense, (None,) * len(inputs)
    per_task = [
        _looped_grads(losses[k], inputs, scale) if present[k] else None for k in range(num_tasks)
    ]
    used = [
        any(grads[i] is not None for grads in _filled(per_task, inputs)) for i in range(len(inputs))
    ]
    rows, sparse, read = _stack_rows(per_task, inputs)
    reached = _confirm_reached(rows, used, edges, losses, inputs, present)
    return rows, False, reached, sparse, read


def _batched_grads(
    losses: Tensor, inputs: Sequence[Tensor], scale: float, present: Sequence[bool]
) -> tuple[Tensor | None, ...]:
    num_tasks = losses.shape[0]
    cotangents = torch.eye(num_tasks, dtype=losses.dtype, device=losses.device) * scale
    if not all(present):
        keep = torch.tensor(present, device=losses.device).to(losses.dtype)
        cotangents = cotangents * keep.unsqueeze(1)
    return torch.autograd.grad(
        losses,
        list(inputs),
        grad_outputs=cotangents,
        is_grads_batched=True,
        retain_graph=True,
        allow_unused=True,
    )


def _looped_grads(
    loss: Tensor, inputs: Sequence[Tensor], scale: float
) -> tuple[Tensor | None, ...]:
    cotangent = torch.full_like(loss, scale)
    return torch.autograd.grad(
        loss, list(inputs), grad_outputs=cotangent, retain_graph=True, allow_unused=True
    )


def _edge_grads(
    edge: GradientEdge | None, cotangent: Tensor, inputs: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    """One task's gradients from its edge into the stack; ``cotangent`` is a 0-d tensor."""
    if edge is None:  # a loss that does not require grad (a constant)
        return (None,) * len(inputs)
    if _engine_backward is not None and not has_torch_function(inputs):
        # retain_graph, no create_graph, allow_unused, no accumulation into .grad
        return _engine_backward((edge,), (cotangent,), True, False, tuple(inputs), True, False)
    return torch.autograd.grad(
        [edge], list(inputs), grad_outputs=[cotangent], retain_graph=True, allow_unused=True
    )


def _confirm_reached(
    rows: Sequence[Tensor],
    used: Sequence[bool],
    edges: Sequence[GradientEdge | None] | None,
    losses: Tensor,
    inputs: Sequence[Tensor],
    present: Sequence[bool],
) -> _Reached:
    """Per-task reachability after a batched or looped backward.

    Those backward passes start from the whole loss vector, so autograd only says which inputs
    no task reaches (``used``). A task whose rows are all exactly zero may be a zero gradient
    or no path at all: when the losses were stacked, one backward from that task's own edge
    tells which (rare, so cheap); otherwise it counts as reached.
    """
    num_tasks = losses.shape[0]
    reached = [list(used) for _ in range(num_tasks)]
    if edges is None or not any(used):
        return reached
    # The 2-norm is the fastest row reduction here; one that underflows to 0 on a tiny nonzero
    # row only costs the confirming backward below.
    norms = [torch.linalg.vector_norm(row, 2, dim=1, dtype=torch.float32) for row in rows]
    nonzero = (torch.stack(norms) > 0).any(dim=0).tolist()
    for k in range(num_tasks):
        if present[k] and not nonzero[k]:
            one = torch.ones((), dtype=losses.dtype, device=losses.device)
            grads = _edge_grads(edges[k], one, inputs)
            reached[k] = [grad is not None for grad in grads]
    return reached


def _check_reached(
    reached: _Reached,
    inputs: Sequence[Tensor],
    features_mode: bool | None,
    present: Sequence[bool],
) -> None:
    tasks = [k for k, wanted in enumerate(present) if wanted]
    if not tasks:
        return
    unreached = [i for i in range(len(inputs)) if not any(reached[k][i] for k in tasks)]
    if unreached or not all(any(reached[k]) for k in tasks):
        _refuse_unreached(reached, inputs, features_mode, present, tasks, unreached)


def _tasks_apart(reached: _Reached, present: Sequence[bool]) -> tuple[int, int] | None:
    """The first two present tasks that reach no input in common (their Gramian entry is 0
    whatever the gradients), where the passes tell each task's reach; else None."""
    tasks = [k for k, wanted in enumerate(present) if wanted]
    # Each task's reach as bits; one input that every task reaches (the usual case) settles it
    reach = [sum(1 << i for i, hit in enumerate(reached[k]) if hit) for k in tasks]
    every = ~0
    for bits in reach:
        every &= bits
    if every:
        return None
    for position, first in enumerate(tasks):
        for offset, second in enumerate(tasks[position + 1 :], start=position + 1):
            if not reach[position] & reach[offset]:
                return first, second
    return None


def _refuse_unreached(
    reached: _Reached,
    inputs: Sequence[Tensor],
    features_mode: bool | None,
    present: Sequence[bool],
    tasks: Sequence[int],
    unreached: Sequence[int],
) -> None:
    names = _input_names(inputs, features_mode)  # only to name what is wrong
    if len(unreached) == len(names):
        raise ValueError(
            _nothing_reached_message(names)
            + _compiled_hint(inputs)
            + _computed_hint(inputs, features_mode)
        )
    # With absent tasks an input may be read only by them (a listed head parameter): only an
    # input that no task at all reaches is an error, which the present tasks cannot tell.
    if all(present) and unreached:
        hint = _compiled_hint([inputs[unreached[0]]]) + _computed_hint(
            [inputs[unreached[0]]], features_mode
        )
        raise ValueError(_input_unreached_message(names[unreached[0]]) + hint)
    for k in tasks:
        if not any(reached[k]):
            raise ValueError(_task_unreached_message(k, names))


def tasks_apart_message(pair: tuple[int, int], names: Sequence[str]) -> str:
    """What a balancer says when two tasks reach no listed tensor in common (``names``: the
    listed tensors each of the two reaches)."""
    first, second = pair
    return (
        f"losses[{first}] and losses[{second}] reach no listed tensor in common "
        f"(losses[{first}]: {names[0]}; losses[{second}]: {names[1]}), so their Gramian entry "
        "is exactly 0 and the method sees no conflict between them. That is right where those "
        "tensors share no parameters (separate encoders); where they come from one trunk on "
        "different samples (a batch per task), the conflict lies in the trunk, which features "
        "mode does not see: use parameters mode (params=, the trunk's parameters) there."
    )


_CAUSES = (
    "Common causes: a whole-model torch.compile, or DDP(find_unused_parameters=True), whose "
    "forward returns (z, head outputs): the returned z is a new output of the compiled (or "
    "DDP) node, not the tensor the heads read; a tensor the heads do not read (a copy, or a "
    "second trunk call); a .detach() on the way to the losses."
)
_FEATURES_FIX = (
    "Fix: pass the tensor the task heads consumed, e.g. compile the trunk and the heads "
    "separately, or take z from inside the forward (a forward hook on the trunk) rather than "
    "from the wrapped model's outputs; see examples/compile_model.py and "
    "examples/ddp_unused_parameters.py."
)


def _compiled_hint(inputs: Sequence[Tensor]) -> str:
    """What to do when the unreached tensors are outputs of a graph compiled by AOTAutograd."""
    if not any("CompiledFunction" in type(tensor.grad_fn).__name__ for tensor in inputs):
        return ""
    return (
        " Here they are outputs of a torch.compile'd graph: when one compiled region computes "
        "both these tensors and the losses (a compiled training step that calls the balancer, "
        "or a whole compiled model), autograd sees the region as one node whose outputs are "
        "siblings, with no path between them. Call a gradient method from a compiled step in "
        "parameters mode (params=), or keep the step eager and compile the trunk and the "
        "heads separately."
    )


def _computed_hint(inputs: Sequence[Tensor], features_mode: bool | None) -> str:
    """What to do when an unreached tensor of ``params=`` was computed by an earlier forward
    (features are computed tensors by nature)."""
    computed = [
        tensor
        for tensor in inputs
        if tensor.grad_fn is not None and "CompiledFunction" not in type(tensor.grad_fn).__name__
    ]
    if features_mode is not False or not computed:
        return ""
    return (
        f" It is a computed tensor (grad_fn {type(computed[0].grad_fn).__name__}), which a "
        "later forward replaces with a new one: a parametrized weight (weight_norm, "
        "spectral_norm, torch.nn.utils.parametrize) is recomputed at every access, so list "
        "the module's parameters instead (layer.parameters() holds "
        "parametrizations.weight.original0/original1)."
    )


_DONATED_BUFFERS = (
    "params: the task gradients run one backward per task through a torch.compile'd graph "
    "(retain_graph=True), and this graph's backward was compiled with donated buffers, which "
    "lets it run once. Run `import torch._functorch.config` and set "
    "torch._functorch.config.donated_buffer = False before the first compiled call, or use "
    "features mode (features=z, the compiled trunk's output: the "
    "per-task passes then stop at z); see docs/recipes/compile.md"
)

_SEED_MODIFIED = (
    "losses: a backward function in the graph modified its incoming gradient in place (e.g. a "
    "custom autograd.Function whose backward returns grad_output.mul_(2)); autograd shares "
    "that tensor, so the task gradients cannot be trusted and the call is refused. Make that "
    "backward return a new tensor (grad_output * 2)"
)


def _nothing_reached_message(names: Sequence[str]) -> str:
    if names[0].startswith("params"):
        return (
            f"params: no task loss reaches any of the {len(names)} listed parameters: autograd "
            "finds them outside the graph of every loss (not a zero gradient), so the Gramian "
            "would be exactly zero and the weights meaningless. List the shared parameters "
            "the losses are computed with (e.g. trunk[-1].parameters()) and check that the "
            "losses come from this forward pass without .detach() (a trunk under "
            "torch.utils.checkpoint(..., use_reentrant=True) hides its parameters from the "
            "task gradients: pass use_reentrant=False)."
        )
    what = "features" if len(names) == 1 else "features (every tensor listed)"
    return (
        f"{what}: no task loss reaches it: autograd finds it outside the graph of every loss "
        "(not a zero gradient), so the Gramian would be exactly zero and every gradient "
        f"method would return meaningless weights. {_CAUSES} {_FEATURES_FIX}"
    )


def _input_unreached_message(name: str) -> str:
    if name.startswith("params"):
        return (
            f"{name}: no task loss reaches this parameter (autograd finds it outside the graph "
            "of every loss, not a zero gradient): it would add nothing to the Gramian. Leave "
            "it out of params (list only shared parameters the losses use), or check that the "
            "forward uses it."
        )
    return (
        f"{name}: no task loss reaches this tensor (autograd finds it outside the graph of "
        f"every loss, not a zero gradient). {_CAUSES} {_FEATURES_FIX}"
    )


def _task_unreached_message(task: int, names: Sequence[str]) -> str:
    what = "features" if names[0].startswith("features") else "params"
    return (
        f"losses[{task}]: this task's loss reaches none of the shared tensors ({what}): "
        "autograd finds no path from it to them (not a zero gradient), so its row of the "
        "Gramian would be exactly zero and the weights wrong. Likely a task without labels in "
        "this batch whose loss is a constant (pass present=, a bool mask of the tasks that "
        "have labels, so it gets weight 0), or a head that reads another tensor than the one "
        "given."
    )


def _input_names(inputs: Sequence[Tensor], features_mode: bool | None) -> list[str]:
    if features_mode is None:
        features_mode = not all(isinstance(tensor, nn.Parameter) for tensor in inputs)
    if not features_mode:
        return [f"params[{i}]" for i in range(len(inputs))]
    if len(inputs) == 1:
        return ["features"]
    return [f"features[{i}]" for i in range(len(inputs))]


def _refuse_sharded(inputs: Sequence[Tensor], features_mode: bool | None) -> None:
    if DTensor is None:  # pragma: no cover
        return
    _refuse_first(
        inputs,
        features_mode,
        lambda tensor: isinstance(tensor, DTensor),
        lambda name, tensor: (
            f"{name}: a sharded DTensor (placements {tuple(tensor.placements)}, e.g. a "
            "parameter of a module under FSDP2 fully_shard): the forward runs on gathered "
            "copies, so autograd cannot give the task gradients with respect to the shards. "
            "Use features mode instead (b(losses, features=z), the tensor the heads "
            "consume), which works under FSDP2: see examples/fsdp.py."
        ),
    )


def _refuse_complex(inputs: Sequence[Tensor], features_mode: bool | None) -> None:
    _refuse_first(inputs, features_mode, Tensor.is_complex, complex_tensor_message)


def _refuse_first(
    inputs: Sequence[Tensor],
    features_mode: bool | None,
    refused: Callable[[Tensor], bool],
    message: Callable[[str, Any], str],
) -> None:
    """A ValueError ``message(name, tensor)`` for the first input that is ``refused``."""
    if not any(refused(tensor) for tensor in inputs):  # names only on the error path
        return
    names = _input_names(inputs, features_mode)
    for tensor, name in zip(inputs, names, strict=True):
        if refused(tensor):
            raise ValueError(message(name, tensor))


def complex_tensor_message(name: str, tensor: Tensor) -> str:
    """Why a complex shared tensor is refused, and the real-view fix."""
    # A Gramian of complex gradients needs the real inner product Re<g_i, g_j> on every path
    # (rows, corrections, directions); cast to a real dtype, the imaginary parts were dropped.
    return (
        f"{name}: a complex tensor ({tensor.dtype}, shape {tuple(tensor.shape)}); task "
        "gradients are measured on real tensors only. Fix: share its real view: in features "
        "mode pass zr = torch.view_as_real(z) and let the heads read torch.view_as_complex(zr); "
        "in parameters mode keep the parameter real with a trailing dimension of 2 and use "
        "torch.view_as_complex(p) in forward (or list only real parameters in params=)."
    )


def _present_list(present: Tensor | Sequence[bool] | None, num_tasks: int) -> list[bool]:
    if present is None:
        return [True] * num_tasks
    values = present.tolist() if isinstance(present, Tensor) else list(present)
    if len(values) != num_tasks:
        raise ValueError(f"present: expected {num_tasks} entries, got {len(values)}")
    return [bool(value) for value in values]


def _initial_scale(dtype: torch.dtype, inputs: Sequence[Tensor]) -> float:
    """The backward passes' first scale: ``2**16`` (less for float16 losses), or 1 where an
    input has a gradient hook (``register_hook`` on a listed parameter or on the features).

    A hook sees the gradients of these passes, and one that is not linear in them (a clamp)
    would act on 2**16 times each task's gradient: unscaled, it acts on each task's own, as a
    per-task ``torch.autograd.grad`` shows it. The hooks are registered alike on every rank
    (the same code), so the ranks agree on the scale.
    """
    if any(tensor._backward_hooks for tensor in inputs):
        return 1.0
    return min(_INITIAL_SCALE, _largest_power_of_two(dtype))


@functools.cache
def _largest_power_of_two(dtype: torch.dtype) -> float:
    """The largest power of two that leaves ``dtype`` a factor 2 of headroom."""
    return 2.0 ** (math.floor(math.log2(torch.finfo(dtype).max)) - 1)


def all_finite(rows: Sequence[Tensor]) -> bool:
    # A sum is non-finite when any term is, and is 30× cheaper than isfinite().all(). The rows
    # are float32 at least (see _widened): a float32 sum that overflows on finite terms only
    # costs a needless retry at a smaller scale.
    return bool(torch.isfinite(torch.stack([row.sum() for row in rows])).all())


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _widened(row: Tensor) -> Tensor:
    # Float32 at least, so that unscaling cannot underflow a float16 row again and the
    # Gramian and Jᵀw are accumulated in full precision.
    return row.to(_wide_dtype(row.dtype))


def _unscaled_gram(gram: Tensor, scale: float) -> tuple[Tensor, bool, bool]:
    """``(G + Gᵀ)/2`` of the unscaled Gramian (one of rows scaled by s is s² times theirs),
    whether it is finite, and whether it is in float32's normal range (see below).

    Symmetric to the last bit whatever the matrix product's summation order. Halved and
    unscaled before the sum (a power of two: exact), so entries up to the dtype's maximum
    stay finite. Up to :data:`_HOST_GRAM_MAX_K` tasks this runs on one host copy of the K²
    numbers, which the finite check reads anyway: inside a step, three small-tensor calls cost
    more than K² Python products. The result is the same to the last bit for float64, and for
    float32 wherever the tensor path's halved entries are normal numbers (a float32 sum rounded
    once from float64 is the correctly rounded float32 sum); near float32's subnormal range
    the host path, which halves in float64, is the more exact.

    In the normal range: a float32 Gramian (each block of a stack) whose non-zero diagonal
    entries are all at least ``2**-126`` (see :func:`_normal_diagonal` and
    :func:`task_gradients`); always True for float64. Read off the same host copy.
    """
    half = 0.5 / (scale * scale)
    K = gram.shape[-1]
    narrow = gram.dtype == torch.float32
    if gram.ndim == 2 and K <= _HOST_GRAM_MAX_K:
        raw = gram.tolist()
        symmetric = [[raw[i][j] * half + raw[j][i] * half for j in range(K)] for i in range(K)]
        # An entry past the dtype's range is inf once rounded to it: decided here on the
        # float64 values, so the one host copy (a device sync on a GPU) stays the only one.
        limit = _ROUNDS_TO_INF.get(gram.dtype, math.inf)
        finite = all(abs(value) < limit for row in symmetric for value in row)
        normal = not narrow or _normal_diagonal([symmetric[i][i] for i in range(K)])
        return torch.tensor(symmetric, dtype=gram.dtype, device=gram.device), finite, normal
    halved = gram * half
    gram = torch.add(halved, halved.mT)
    values = gram.reshape(-1).tolist()  # K² numbers: one host copy, checked there
    finite = all(map(math.isfinite, values))
    blocks = range(0, len(values), K * K)
    normal = not narrow or all(
        _normal_diagonal([values[start + i * (K + 1)] for i in range(K)]) for start in blocks
    )
    return gram, finite, normal


def _normal_diagonal(diagonal: list[float]) -> bool:
    """Whether a float32 Gramian's squared norms are held to ``2**-24`` of themselves: the
    largest is a normal number and none is a subnormal one (see :func:`has_subnormal_norm`)."""
    return max(diagonal) >= _FLOAT32_TINY and not has_subnormal_norm(diagonal)


def has_subnormal_norm(squared_norms: Iterable[float]) -> bool:
    """Whether a float32 Gramian's diagonal holds a non-zero squared norm below float32's
    normal range (a gradient below ~1e-19): held to a bit or two, it would give its task,
    counted as a gradient by the rules, a direction of rounding noise."""
    return any(0 < value < _FLOAT32_TINY for value in squared_norms)


def _retry_can_help(losses: Tensor, present: Sequence[bool], decided_globally: bool) -> bool:
    """False when a present loss is itself non-finite: no smaller scale makes it finite.

    When the retry is decided on a Gramian that is the same on every rank (``gramian_of``),
    a rank's own losses must not overrule it under DDP (its peers would then wait in a
    collective it skipped): it always retries.
    """
    if decided_globally and is_distributed():
        return True
    present_losses = losses.detach()[torch.tensor(present, device=losses.device)]
    return bool(torch.isfinite(present_losses).all())


def _per_task_edges(losses: Tensor, num_tasks: int) -> list[GradientEdge | None] | None:
    """The K graph edges into ``torch.stack`` when ``losses`` is one (None for a constant loss).

    None when ``losses`` was not made by stacking K tensors.
    """
    node = losses.grad_fn
    if node is None or type(node).__name__ != "StackBackward0":
        return None
    edges = node.next_functions
    if len(edges) != num_tasks:
        return None
    if any(fn is not None and type(fn).__name__ == "AccumulateGrad" for fn, _ in edges):
        return None  # a loss that is itself a leaf: nothing to gain, keep the general path
    return [None if fn is None else GradientEdge(fn, nr) for fn, nr in edges]


def _filled(
    per_task: Sequence[Sequence[Tensor | None] | None], inputs: Sequence[Tensor]
) -> list[Sequence[Tensor | None]]:
    """``per_task`` with an absent task (None) as no gradient for any input."""
    return [(None,) * len(inputs) if grads is None else grads for grads in per_task]


def _stack_rows(
    per_task: Sequence[Sequence[Tensor | None] | None], inputs: Sequence[Tensor]
) -> tuple[list[Tensor], tuple[bool, ...], tuple[Tensor | None, ...]]:
    """The rows of each input, whether its task gradients were sparse (densified here), and
    for those the table rows they cover (:attr:`TaskGradients.read_rows`)."""
    filled = _filled(per_task, inputs)
    rows = []
    sparse = []
    read: list[Tensor | None] = []
    for index, tensor in enumerate(inputs):
        flat: list[Tensor] = []
        zero: Tensor | None = None  # for a task that does not reach this input
        covered: list[Tensor] = []
        any_sparse = False
        for task_grads in filled:
            grad = task_grads[index]
            if grad is None:
                if zero is None:
                    zero = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
                grad = zero
            any_sparse = any_sparse or grad.layout != torch.strided
            if grad.layout == torch.sparse_coo and tensor.dim() == 2:
                covered.append(grad._indices()[0])
            flat.append(_dense(grad).reshape(-1))
        rows.append(_widened(torch.stack(flat)))
        sparse.append(any_sparse)
        # Only where every task's gradient was sparse: a dense one (a tied output layer, a
        # penalty on the table) may reach every row.
        all_sparse = len(covered) == len(filled)
        read.append(torch.unique(torch.cat(covered)) if all_sparse else None)
    return rows, tuple(sparse), tuple(read)


def _flat_rows(grad: Tensor | None, tensor: Tensor, num_tasks: int) -> Tensor:
    if grad is None:
        wide = _wide_dtype(tensor.dtype)
        return torch.zeros(num_tasks, tensor.numel(), dtype=wide, device=tensor.device)
    return _widened(grad.reshape(num_tasks, -1))  # vmap has no sparse backward


def _dense(grad: Tensor) -> Tensor:
    """A sparse gradient (``nn.Embedding(sparse=True)``) as the dense tensor it stands for."""
    return grad if grad.layout == torch.strided else grad.to_dense()


def _loss_vector(losses: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(losses, Tensor) and losses.dim() != 1:
        raise ValueError(
            f"losses: expected a 1-D tensor of task losses, got shape {tuple(losses.shape)}"
        )
    if isinstance(losses, Sequence) and not isinstance(losses, Tensor) and not losses:
        raise ValueError("losses: expected at least one task loss, got an empty sequence")
    if not isinstance(losses, (Tensor, Sequence)):
        raise TypeError(
            f"losses: expected a 1-D tensor or a list of 0-d tensors, got {type(losses).__name__}"
        )
    count = losses.shape[0] if isinstance(losses, Tensor) else len(losses)
    vector = as_loss_vector(losses, count)
    if not vector.requires_grad:
        raise ValueError(
            "losses: the losses do not require grad, so they have no gradient to measure; "
            "compute them from the model's output without torch.no_grad() or .detach()"
        )
    return vector


def _inputs(
    wrt: Tensor | Iterable[Tensor] | None, features: Tensor | Sequence[Tensor] | None
) -> tuple[list[Tensor], bool]:
    if (wrt is None) == (features is None):
        raise TypeError(
            "wrt, features: expected exactly one: wrt (the shared features, a tensor, or the "
            "shared parameters) or features= (one tensor or a sequence of tensors)"
        )
    if features is not None:
        if isinstance(features, Tensor):
            tensors, names = [features], ["features"]
        elif isinstance(features, Sequence) and features:
            tensors = list(features)
            names = [f"features[{i}]" for i in range(len(tensors))]
        else:
            raise TypeError(
                f"features: expected a tensor or a non-empty sequence of tensors, got {features!r}"[
                    :200
                ]
            )
        for tensor, name in zip(tensors, names, strict=True):
            _check_feature(name, tensor)
        return tensors, True
    if isinstance(wrt, Tensor):
        _check_feature("features", wrt)
        return [wrt], True
    assert wrt is not None
    params = [p for p in wrt]
    if not params:
        raise ValueError("params: expected at least one shared parameter, got none")
    for index, param in enumerate(params):
        if not isinstance(param, Tensor):
            raise TypeError(f"params[{index}]: expected a tensor, got {type(param).__name__}")
        if not param.requires_grad:
            raise ValueError(f"params[{index}]: the parameter does not require grad")
    return params, False


def _check_feature(name: str, value: object) -> None:
    tensor = check_tensor(name, value)
    if not tensor.requires_grad:
        raise ValueError(
            f"{name}: the tensor does not require grad; pass the shared representation "
            "the task heads consume (the trunk's output, not a detached copy)"
        )
