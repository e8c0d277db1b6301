"""The Gramian engine: ``G = J Jᵀ`` of the task gradients, in one batched backward.

Every gradient method here needs only the K×K Gramian of the task gradients, never the K×P
Jacobian itself: its update is ``Jᵀw`` for a ``w`` computed from ``G`` (and the losses), and
``Jᵀw`` is exactly the gradient of ``Σ w_k L_k``, which the user's ordinary backward computes.

Two ways to say what "the task gradient" is taken with respect to:

- **features mode** (``wrt`` a tensor): the gradient of each loss with respect to the shared
  representation ``z`` (the trunk's output). The backward runs through the task heads only,
  which is cheap; ``G`` is the sum over samples of per-sample inner products (MGDA-UB, Sener &
  Koltun 2018, §3.3).
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
``objective.backward()`` works afterwards.

Precision: gradients are cast to float32 (or float64, as asked) before the products, and
autocast is disabled for them, so ``G`` is accumulated in full precision even when the forward
ran under ``torch.autocast`` in bfloat16 or float16.

DDP: in features mode each rank's ``G`` is a sum over its own samples, and the gradient of the
rank-averaged loss with respect to rank r's features is ``1/R`` times the local one, so the
global Gramian is exactly ``Σ_r G_r / R²``: one all-reduce of K×K numbers. In parameters mode
the global task gradient is the rank average of the local ones, which cannot be recovered from
local Gramians: the engine all-reduces the K×P Jacobian (K times the traffic of one ordinary
DDP gradient all-reduce, for the chosen parameters). Prefer features mode, or a small set of
parameters such as the last shared layer, at scale.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from taskbalance._distributed import all_reduce_mean, all_reduce_sum, is_distributed, world_size
from taskbalance._validation import as_loss_vector

try:
    from torch.autograd.graph import GradientEdge
except ImportError:  # pragma: no cover
    GradientEdge = None  # type: ignore[assignment,misc]

_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# torch.autograd.grad takes GradientEdge *outputs* from torch 2.5 on (pytorch#127766).
_EDGE_OUTPUTS = GradientEdge is not None and tuple(
    int(part) for part in torch.__version__.split("+")[0].split(".")[:2]
) >= (2, 5)


def gramian(
    losses: Tensor | Sequence[Tensor],
    wrt: Tensor | Iterable[Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    batched: bool | None = None,
) -> Tensor:
    """The K×K Gramian ``G_kl = ⟨∇L_k, ∇L_l⟩`` of the task gradients.

    Args:
        losses: the K task losses, a 1-D tensor or a sequence of 0-d tensors, in the graph.
        wrt: the shared features (a tensor in the graph: features mode) or a sequence of shared
            parameters (parameters mode).
        dtype: ``torch.float32`` or ``torch.float64``, the precision of ``G``.
        batched: True to require the batched backward, False to loop over tasks, None (the
            default) to try the batched one and fall back to the loop with a warning.

    Returns:
        ``G`` of shape ``[K, K]``, symmetric positive semi-definite, detached. Under DDP it is
        the Gramian of the global (rank-averaged) losses.

    Example:
        >>> import torch, taskbalance as tb
        >>> z = torch.tensor([[1.0, 2.0]], requires_grad=True)
        >>> losses = torch.stack([z.sum(), (2 * z[:, 0]).sum()])
        >>> tb.gramian(losses, z)
        tensor([[2., 2.],
                [2., 4.]])
    """
    vector = _loss_vector(losses)
    inputs, features_mode = _inputs(wrt)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    rows, _ = jacobian_rows(vector, inputs, batched=batched)
    return gramian_from_rows(rows, features_mode=features_mode, dtype=dtype)


def jacobian_rows(
    losses: Tensor, inputs: Sequence[Tensor], *, batched: bool | None
) -> tuple[list[Tensor], bool | None]:
    """Per-input Jacobian blocks ``[K, numel]`` and the path taken.

    The path is True for the batched backward, False for a loop over ``losses[k]`` (asked for,
    or the fallback), None for the per-task loop over the stack's edges.

    ``batched=None`` picks the fastest path that works. When ``losses`` was stacked from K
    separate losses (``torch.stack``, which is what a list passed to a balancer becomes), it
    loops over the stack's K input edges: task k's backward then runs through task k's head
    only, where the batched backward (and a loop over ``losses[k]``) runs all K heads for every
    task, K² head backward passes in all (see the module docstring for measured speed-ups).
    Otherwise it tries the batched backward and falls back to a loop with a warning.
    """
    # A non-leaf input with retain_grad() would receive these task gradients in .grad (batched
    # ones as unusable vmap tensors): keep what the user had there and put it back afterwards.
    retained = [(tensor, tensor.grad) for tensor in inputs if tensor.retains_grad]
    try:
        return _rows_by_fastest_path(losses, inputs, batched=batched)
    finally:
        for tensor, grad in retained:
            tensor.grad = grad


def _rows_by_fastest_path(
    losses: Tensor, inputs: Sequence[Tensor], *, batched: bool | None
) -> tuple[list[Tensor], bool | None]:
    num_tasks = losses.shape[0]
    if not batched:
        edges = _per_task_edges(losses, num_tasks)
        if edges is not None:
            return _edge_rows(edges, losses, inputs), None
    if batched is None or batched:
        try:
            return _batched_rows(losses, inputs, num_tasks), True
        except RuntimeError as error:
            # Only a missing batching rule justifies the loop; running out of memory does not.
            if batched or isinstance(error, _OUT_OF_MEMORY):
                raise
            warnings.warn(
                "taskbalance.gramian: the batched backward is not supported by this graph "
                f"({str(error).splitlines()[0][:200]}); computing the {num_tasks} task "
                "gradients with a loop of backward passes instead (same result, slower).",
                RuntimeWarning,
                stacklevel=3,
            )
    return _looped_rows(losses, inputs, num_tasks), False


def gramian_from_rows(rows: Sequence[Tensor], *, features_mode: bool, dtype: torch.dtype) -> Tensor:
    """``Σ_blocks J_b J_bᵀ`` in full precision, reduced over DDP ranks as the mode requires."""
    device = rows[0].device
    with torch.autocast(device_type=device.type, enabled=False):
        if is_distributed() and not features_mode:
            flat = torch.cat([row.to(dtype) for row in rows], dim=1)
            flat = all_reduce_mean(flat)
            return flat @ flat.T
        gram = torch.zeros(rows[0].shape[0], rows[0].shape[0], dtype=dtype, device=device)
        for row in rows:
            row = row.to(dtype)
            gram.addmm_(row, row.T)
        if is_distributed():
            gram = all_reduce_sum(gram) / world_size() ** 2
        return gram


def _batched_rows(losses: Tensor, inputs: Sequence[Tensor], num_tasks: int) -> list[Tensor]:
    identity = torch.eye(num_tasks, dtype=losses.dtype, device=losses.device)
    grads = torch.autograd.grad(
        losses,
        list(inputs),
        grad_outputs=identity,
        is_grads_batched=True,
        retain_graph=True,
        allow_unused=True,
    )
    return [_flat_rows(grad, tensor, num_tasks) for grad, tensor in zip(grads, inputs, strict=True)]


def _looped_rows(losses: Tensor, inputs: Sequence[Tensor], num_tasks: int) -> list[Tensor]:
    per_task = [
        torch.autograd.grad(losses[k], list(inputs), retain_graph=True, allow_unused=True)
        for k in range(num_tasks)
    ]
    return _stack_rows(per_task, inputs)


def _per_task_edges(losses: Tensor, num_tasks: int) -> list[GradientEdge | None] | None:
    """The K graph edges into ``torch.stack`` when ``losses`` is one (None for a constant loss).

    None when ``losses`` was not made by stacking K tensors, or this torch is older than 2.5.
    """
    node = losses.grad_fn
    if not _EDGE_OUTPUTS or node is None or type(node).__name__ != "StackBackward0":
        return None
    edges = node.next_functions
    if len(edges) != num_tasks:
        return None
    if any(fn is not None and type(fn).__name__ == "AccumulateGrad" for fn, _ in edges):
        return None  # a loss that is itself a leaf: nothing to gain, keep the general path
    return [None if fn is None else GradientEdge(fn, nr) for fn, nr in edges]


def _edge_rows(
    edges: Sequence[GradientEdge | None], losses: Tensor, inputs: Sequence[Tensor]
) -> list[Tensor]:
    one = torch.ones(losses.shape[1:], dtype=losses.dtype, device=losses.device)
    unused: tuple[None, ...] = (None,) * len(inputs)
    per_task = [
        unused
        if edge is None
        else torch.autograd.grad(
            [edge], list(inputs), grad_outputs=[one], retain_graph=True, allow_unused=True
        )
        for edge in edges
    ]
    return _stack_rows(per_task, inputs)


def _stack_rows(
    per_task: Sequence[Sequence[Tensor | None]], inputs: Sequence[Tensor]
) -> list[Tensor]:
    rows = []
    for index, tensor in enumerate(inputs):
        blocks = [
            torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
            if grads[index] is None
            else grads[index].reshape(-1)
            for grads in per_task
        ]
        rows.append(torch.stack(blocks))
    return rows


def _flat_rows(grad: Tensor | None, tensor: Tensor, num_tasks: int) -> Tensor:
    if grad is None:
        return torch.zeros(num_tasks, tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    return grad.reshape(num_tasks, -1)


def _loss_vector(losses: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(losses, Tensor) and losses.dim() != 1:
        raise ValueError(
            f"losses: expected a 1-D tensor of task losses, got shape {tuple(losses.shape)}"
        )
    if isinstance(losses, Sequence) and not isinstance(losses, Tensor) and not losses:
        raise ValueError("losses: expected at least one task loss, got an empty sequence")
    if not isinstance(losses, (Tensor, Sequence)):
        raise TypeError(
            "losses: expected a 1-D tensor or a list of 0-d tensors, "
            f"got {type(losses).__name__}"
        )
    count = losses.shape[0] if isinstance(losses, Tensor) else len(losses)
    vector = as_loss_vector(losses, count)
    if not vector.requires_grad:
        raise ValueError(
            "losses: the losses do not require grad, so they have no gradient to measure; "
            "compute them from the model's output without torch.no_grad() or .detach()"
        )
    return vector


def _inputs(wrt: Tensor | Iterable[Tensor]) -> tuple[list[Tensor], bool]:
    if isinstance(wrt, Tensor):
        if not wrt.requires_grad:
            raise ValueError(
                "features: the tensor does not require grad; pass the shared representation "
                "the task heads consume (the trunk's output, not a detached copy)"
            )
        return [wrt], True
    params = [p for p in wrt]
    if not params:
        raise ValueError("params: expected at least one shared parameter, got none")
    for index, param in enumerate(params):
        if not isinstance(param, Tensor):
            raise TypeError(f"params[{index}]: expected a tensor, got {type(param).__name__}")
        if not param.requires_grad:
            raise ValueError(f"params[{index}]: the parameter does not require grad")
    return params, False
