"""Parameters mode without a second backward through the listed parameters (``reuse_rows``).

In parameters mode the engine has already run one backward per task through the listed
parameters (the trunk) to get the task-gradient rows ``J``; the ordinary objective then runs
one more, whose only use there is to compute ``Jᵀw`` again. With ``reuse_rows=True`` the
balancer returns an objective whose backward:

1. runs the ordinary objective's backward as a separate, inner backward in which every edge
   from the rest of the graph (the heads, the loss, any parameter left out of ``params``) into
   the *listed region* is cut: the nodes from which only listed parameters can be reached.
   Those nodes still run, with no gradient (an undefined one, on which autograd's formulas do
   no arithmetic), so their saved activations are freed as an ordinary backward frees them;
2. hands each listed parameter its shared gradient from the rows, ``Jᵀw`` (or the method's
   own direction), times the objective's incoming gradient (GradScaler's scale), and every
   other leaf the inner backward's result.

Both reach the parameters through one autograd node of the objective, so ``.grad``
accumulation, DDP's gradient hooks, GradScaler and ``torch.autograd.grad(objective, ...)``
see an ordinary backward. What differs from one (the reasons the option is not the default):

- a hook on a tensor inside the listed region (``z.register_hook`` on the trunk's output) is
  called with the engine's per-task gradients (scaled by its power of two) and then, in the
  objective's backward, with None (the cut gradient), never with the final gradient; so it
  must accept None; so must a custom ``autograd.Function`` there that turns off
  ``ctx.set_materialize_grads`` (its ``backward`` is handed None). ``retain_grad()`` on such a
  tensor keeps no gradient, and a module backward hook on a head whose input comes from the
  region sees a zero gradient for that input. A gradient hook on a listed parameter itself is
  refused at the call (it would run on the shared gradient twice), and every listed tensor
  must be a leaf (refused at construction);
- the inner backward frees the graph whatever ``retain_graph`` the outer one was given: a
  second backward of the objective is refused, and a term added to the objective that also
  reaches the listed region (an auxiliary loss on the model's outputs, another balancer's
  objective on the same graph) is refused in the backward, with a ``RuntimeError`` that says
  so (a regulariser on the parameters themselves, ``λ·‖θ‖²``, reaches no node of the region and
  is fine);
- the objective's gradient is defined for the graph's leaves only: ``torch.autograd.grad(
  objective, z)`` for an activation ``z`` is refused by autograd;
- ``create_graph=True`` (a gradient penalty through the objective) is refused: the rows are
  constants.

The cut is exact: a listed parameter's row is its whole gradient (every path from the loss to
it), so it must get nothing else, and a node outside the region computes its own gradients as
in an ordinary backward, so the parameters left out of ``params`` (a trunk below a listed last
layer) get ``Σ c_k ∇L_k`` as the ordinary objective gives them. The cut hooks act only inside
the inner backward (matched by its graph task), never in another backward through the same
nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["SharedGradient", "objective_from_rows"]


@dataclass
class SharedGradient:
    """A listed parameter's gradient per unit of the objective's incoming gradient:
    ``base + rowsᵀ·coefficients`` (flat), either term optional; sparse over ``read_rows``
    (an embedding table's rows the batch read) where given, as the table's own backward
    gives it."""

    parameter: Tensor
    base: Tensor | None
    rows: Tensor | None
    coefficients: Tensor | None
    read_rows: Tensor | None

    def times(self, incoming: Tensor, scaled_of: dict[int, Tensor]) -> Tensor:
        """The gradient for the objective's ``incoming`` gradient; ``scaled_of`` keeps each
        coefficient vector times ``incoming`` (one per vector: the listed tensors share one
        unless each group has its own weights)."""
        flat: Tensor | None = None
        if self.base is not None:
            flat = self.base * incoming.to(self.base.dtype)
        if self.rows is not None:
            assert self.coefficients is not None  # made in the rows' dtype
            scaled = scaled_of.get(id(self.coefficients))
            if scaled is None:
                scaled = self.coefficients * incoming.to(self.coefficients.dtype)
                scaled_of[id(self.coefficients)] = scaled
            flat = (
                torch.mv(self.rows.T, scaled)
                if flat is None
                else torch.addmv(flat, self.rows.T, scaled)
            )
        assert flat is not None
        gradient = flat.view(self.parameter.shape).to(self.parameter.dtype)
        if self.read_rows is None:
            return gradient
        rows = self.read_rows  # sorted and distinct
        if self.base is not None:
            # A direction carried across steps (DB-MTL's, MoCo's averages) also reaches rows
            # earlier batches read.
            nonzero = gradient.abs().sum(dim=1).nonzero().squeeze(1)
            rows = torch.unique(torch.cat([rows, nonzero]))
        return torch.sparse_coo_tensor(
            rows[None], gradient[rows], gradient.shape, check_invariants=False, is_coalesced=True
        )


class _Plan:
    """What the objective's backward needs; dropped after its first backward."""

    def __init__(
        self,
        root: Tensor,
        leaves: list[Tensor],
        shared: dict[int, SharedGradient],
        cuts: list[tuple[Any, frozenset[int]]],
        root_in_region: bool,
    ) -> None:
        self.root: Tensor | None = root
        self.leaves = leaves
        self.shared = shared
        self.cuts = cuts
        self.root_in_region = root_in_region

    def gradients(self, incoming: Tensor) -> tuple[Tensor | None, ...]:
        if self.root is None:
            raise RuntimeError(
                "objective: its backward ran already. With reuse_rows=True the first backward "
                "frees the task graph whatever retain_graph says; create the balancer with "
                "reuse_rows=False to backward through the objective twice"
            )
        if torch.is_grad_enabled():
            raise RuntimeError(
                "objective: backward(create_graph=True) with reuse_rows=True: the listed "
                "parameters' gradients come from the task-gradient rows, which are constants; "
                "create the balancer with reuse_rows=False for a higher-order gradient"
            )
        # The region is this backward's to free: a term added to the objective that runs
        # through it (an auxiliary loss on the outputs) would meet a freed graph in torch's
        # own words; say why instead, before anything is freed.
        for node, edges in self.cuts:
            for index in edges:
                child = node.next_functions[index][0]
                if type(child) is not _ACCUMULATE_GRAD and torch._C._will_engine_execute_node(
                    child
                ):
                    raise RuntimeError(
                        "objective: something added to the objective also runs backward "
                        f"through the listed parameters' part of the graph ({type(child).__name__}"
                        "; an auxiliary loss on the model's outputs, or another balancer's "
                        "objective on the same graph). With reuse_rows=True the objective's "
                        "backward frees that part without running it, so it cannot serve both: "
                        "add the term as a task of the balancer, or create the balancer with "
                        "reuse_rows=False"
                    )
        root = self.root
        task: list[int] = []  # the inner backward's graph task, set by its first node's hook

        def note_task(grad_outputs: tuple[Tensor, ...]) -> tuple[Tensor | None, ...] | None:
            task.append(torch._C._current_graph_task_id())
            return (None,) * len(grad_outputs) if self.root_in_region else None

        def cut(edges: frozenset[int]) -> Callable[..., Any]:
            def hook(grad_inputs: tuple[Tensor | None, ...], _: object) -> Any:
                if not task or torch._C._current_graph_task_id() != task[0]:
                    return None  # another backward through this node: left alone
                return tuple(None if i in edges else g for i, g in enumerate(grad_inputs))

            return hook

        assert root.grad_fn is not None
        handles = [root.grad_fn.register_prehook(note_task)]
        handles += [node.register_hook(cut(edges)) for node, edges in self.cuts]
        try:
            inner = torch.autograd.grad(
                root, self.leaves, incoming.to(root.dtype), allow_unused=True
            )
        except RuntimeError as error:
            if "second time" not in str(error):
                raise
            raise RuntimeError(
                "objective: the step's graph was already freed by another backward through "
                "it (another balancer's objective on the same graph, or a backward of the "
                "losses before this one). With reuse_rows=True the objective's backward needs "
                "the graph it was made from, once: backward each graph once, or create the "
                "balancer with reuse_rows=False"
            ) from error
        finally:
            for handle in handles:
                handle.remove()
        self.root = None  # only once it ran: a failed backward reports its own error again
        result: list[Tensor | None] = []
        scaled_of: dict[int, Tensor] = {}
        for leaf, gradient in zip(self.leaves, inner, strict=True):
            shared = self.shared.get(id(leaf))
            if shared is None:
                result.append(gradient)
                continue
            # A listed parameter gets nothing through the region but undefined gradients; a
            # compiled or custom region turns them into zeros, which change nothing.
            own = shared.times(incoming, scaled_of)
            result.append(own if gradient is None else own + gradient)
        # Nothing of the step outlives its backward: the rows and the graph's nodes go.
        self.shared, self.cuts = {}, []
        return tuple(result)


class _FromRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, value: Tensor, plan: _Plan, *leaves: Tensor) -> Tensor:
        ctx.plan = plan
        return value.clone()

    @staticmethod
    def backward(ctx: Any, incoming: Tensor) -> tuple[Tensor | None, ...]:
        return (None, None, *ctx.plan.gradients(incoming))


def objective_from_rows(objective: Tensor, shared: Sequence[SharedGradient]) -> Tensor:
    """The objective of ``reuse_rows=True``: ``objective``'s value, and a backward that gives
    each listed parameter its :class:`SharedGradient` and every other leaf what
    ``objective``'s own backward gives it, without that backward's pass through the listed
    region (see the module docstring)."""
    listed = {id(entry.parameter): entry for entry in shared}
    assert objective.grad_fn is not None
    leaves, cuts, root_in_region = _region_cuts(objective.grad_fn, listed.keys())
    # A listed parameter the objective does not reach (only an absent task's loss does) still
    # gets its gradient from the rows: an input of the objective's node all the same.
    found = {id(leaf) for leaf in leaves}
    leaves += [entry.parameter for key, entry in listed.items() if key not in found]
    plan = _Plan(objective, leaves, listed, cuts, root_in_region)
    result: Tensor = _FromRows.apply(objective.detach(), plan, *leaves)
    return result


#: What a node of the graph reaches: a listed parameter, another leaf, or both.
_LISTED, _OTHER = 1, 2
_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad  # type: ignore[attr-defined]


def _region_cuts(
    root: Any, listed: Any
) -> tuple[list[Tensor], list[tuple[Any, frozenset[int]]], bool]:
    """The graph's leaves, and the edges from outside the listed region into it.

    The region: the nodes from which listed parameters, and nothing else, can be reached.
    One post-order walk (a node is left on the stack until its children are done), which runs
    at every call: the graph is the step's own. It costs about 0.7 µs per node in Python
    (measured on one CPU thread: 0.6 ms for the 826 nodes of a 100-layer, width-64 MLP whose
    backward alone takes 5 ms), well below the backward pass it saves.
    """
    reaches: dict[Any, int] = {}
    children_of: dict[Any, tuple[Any, ...]] = {}
    leaves: list[Tensor] = []
    pending = [root]
    while pending:
        node = pending[-1]
        if node in reaches:
            pending.pop()
        elif type(node) is _ACCUMULATE_GRAD:
            variable = node.variable
            reaches[node] = _LISTED if id(variable) in listed else _OTHER
            leaves.append(variable)
            pending.pop()
        elif node not in children_of:
            children = tuple(child for child, _ in node.next_functions)
            children_of[node] = children
            pending.extend(c for c in children if c is not None and c not in reaches)
        else:  # back from its children
            flags = 0
            for child in children_of[node]:
                if child is not None:
                    flags |= reaches[child]
            reaches[node] = flags
            pending.pop()
    cuts = []
    for node, children in children_of.items():
        if reaches[node] == _LISTED:
            continue
        edges = frozenset(
            index
            for index, child in enumerate(children)
            if child is not None and reaches[child] == _LISTED
        )
        if edges:
            cuts.append((node, edges))
    return leaves, cuts, reaches[root] == _LISTED
