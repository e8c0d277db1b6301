"""Shared helpers for the balancer tests.

The generic tests loop over every registered method. A method that needs hyperparameters
without defaults (``fixed``'s ``weights=``) or extra inputs (DTP's ``kpis=``, a gradient
method's ``features=``) gets them here, so a method added to the registry only needs an entry in
:data:`REQUIRED_HPARAMS` if its constructor has a required argument.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import settings

import taskbalance as tb
from taskbalance.methods._facts import method_facts

# CI runs every property test on the same examples (a red CI must be reproducible); local runs
# keep exploring new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

#: Hyperparameters without defaults, per method, as a function of K.
REQUIRED_HPARAMS: dict[str, Any] = {
    "fixed": lambda K: {"weights": [0.5 + 0.25 * k for k in range(K)]},
}

#: Every registered method whose weights need no Gramian.
LOSS_METHODS = [name for name in tb.available() if not tb.method_class(name).requires_gram]
#: Every registered gradient method (features mode through :func:`call`).
GRADIENT_METHODS = [name for name in tb.available() if tb.method_class(name).requires_gram]
#: Gradient methods whose ``compute_weights(gram=...)`` gives a call's weights (GradDrop's and
#: MoCo's rules read the task gradients themselves and refuse it).
GRAM_METHODS = [
    name for name in GRADIENT_METHODS if method_facts(tb.method_class(name)).weights_from_gram
]
#: Gradient methods that work in features mode (MoCo works in parameters mode only).
FEATURE_METHODS = [
    name for name in GRADIENT_METHODS if not method_facts(tb.method_class(name)).requires_params
]


def applies_jtw(name: str, mode: str) -> bool:
    """True when method ``name`` in ``mode`` ("features" or "params") sends the shared tensors
    ``Jᵀw`` (not its own direction: DB-MTL in parameters mode, GradDrop, MoCo), so the tests
    that compare a backward with ``Jᵀw`` apply to it."""
    facts = method_facts(tb.method_class(name))
    if not facts.weights_from_gram or (mode == "features" and facts.requires_params):
        return False
    extra = {"params": [shared_parameter()]} if mode == "params" else {}
    return not make_balancer(name, 3, **extra)._direction_from_rows()


#: Methods with learnable parameters that the user's optimiser steps.
LEARNED_METHODS = ["uw", "imtl_l"]
#: Methods that take logs or ratios of the losses.
POSITIVE_METHODS = [
    name for name in tb.available() if tb.method_class(name).requires_positive_losses
]


def make_balancer(name: str, K: int, **hparams: Any) -> tb.Balancer:
    """``tb.create(name, K)`` with the method's required hyperparameters filled in, and a
    shared parameter (:func:`shared_parameter`) for a method that works in parameters mode
    only."""
    required = REQUIRED_HPARAMS.get(name)
    defaults = required(K) if required is not None else {}
    if method_facts(tb.method_class(name)).requires_params:
        defaults["params"] = shared_parameter()
    defaults.update(hparams)
    return tb.create(name, num_tasks=K, **defaults)


def shared_parameter() -> torch.nn.Parameter:
    """A shared parameter of the features' shape: :func:`call` couples each loss to it."""
    return torch.nn.Parameter(shared_features().detach().clone())


def drives_shared_parameter(b: tb.Balancer) -> bool:
    """True for a parameters-only method built by :func:`make_balancer`: :func:`call` gives
    each loss the gradient :func:`directions_for` with respect to its shared parameter."""
    shared = getattr(b, "shared_params", None)
    return (
        method_facts(type(b)).requires_params
        and shared is not None
        and len(shared) == 1
        and tuple(shared[0].shape) == FEATURE_SHAPE
    )


def kpis_for(step: int, K: int, rank: int = 0) -> torch.Tensor:
    """Deterministic per-task KPIs in (0, 1) that vary with the step (and rank)."""
    k = torch.arange(K, dtype=torch.float32)
    return (0.15 + 0.7 * torch.sigmoid(torch.sin(1.3 * step + 0.7 * k + 0.9 * rank))).clamp(0, 1)


def losses_for(step: int, K: int, rank: int = 0) -> torch.Tensor:
    """Deterministic positive losses that fall over time, different per task (and rank)."""
    k = torch.arange(K, dtype=torch.float64)
    values = (
        (1.0 + k) * torch.exp(-0.05 * (k + 1) * step) * (1.2 + 0.3 * torch.sin(step + k + rank))
    )
    return values.to(torch.float32)


FEATURE_SHAPE = (4, 5)


def directions_for(step: int, K: int) -> torch.Tensor:
    """[K, *FEATURE_SHAPE]: the gradient of each task loss w.r.t. the shared features.

    Gradient methods in features mode need losses that depend on ``features=``. :func:`call`
    gives each loss this gradient without changing its value, so the Gramian is known exactly:
    :func:`gram_for`.
    """
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(K, *FEATURE_SHAPE, generator=generator)


def gram_for(step: int, K: int) -> torch.Tensor:
    """The Gramian of the task gradients that :func:`call` builds at ``step``."""
    rows = directions_for(step, K).flatten(1)
    return rows @ rows.T


def shared_features() -> torch.Tensor:
    """Fixed features of mixed signs (GradDrop reads their signs), requiring grad."""
    return torch.linspace(-1.0, 1.0, 20).reshape(FEATURE_SHAPE).requires_grad_(True)


def coupling(directions: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``[K]`` terms of value exactly 0 whose gradient with respect to ``features`` is
    ``directions[k]``."""
    return (directions * (features - features.detach())).flatten(1).sum(1)


def _attach_features(
    losses: torch.Tensor | list[torch.Tensor],
    step: int,
    K: int,
    features: torch.Tensor | None = None,
) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    features = shared_features() if features is None else features
    coupling_terms = coupling(directions_for(step, K), features)  # value 0, grad = rows
    if (
        isinstance(losses, torch.Tensor)
        and losses.dim() == 1
        and losses.shape[0] == K
        and losses.is_floating_point()
    ):
        return losses + coupling_terms, features
    if (
        isinstance(losses, list)
        and len(losses) == K
        and all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in losses)
    ):
        return [x + c for x, c in zip(losses, coupling_terms, strict=True)], features
    return losses, features  # malformed input: let the balancer reject it


def call(
    b: tb.Balancer,
    losses: torch.Tensor | list[torch.Tensor],
    step: int = 0,
    *,
    kpis: torch.Tensor | None = None,
) -> torch.Tensor:
    """Call ``b`` with whatever extra inputs the method reads (KPIs for DTP, features for
    gradient methods in features mode). The gradient of the result w.r.t. ``losses`` is still
    ``b.weights``: the features enter each loss with value zero."""
    kwargs: dict[str, Any] = {}
    if isinstance(losses, torch.Tensor) and losses.is_floating_point() and not losses.requires_grad:
        losses = losses.clone().requires_grad_()  # values from a table: a training call's losses
    if b.requires_kpis:
        kwargs["kpis"] = kpis if kpis is not None else kpis_for(step, b.num_tasks)
    if b.requires_gram and getattr(b, "shared_params", None) is None:
        losses, kwargs["features"] = _attach_features(losses, step, b.num_tasks)
    elif drives_shared_parameter(b):
        parameter = b.shared_params[0]  # type: ignore[attr-defined]
        losses, _ = _attach_features(losses, step, b.num_tasks, parameter)
    return b(losses, **kwargs)


def loss_gradient(b: tb.Balancer) -> torch.Tensor:
    """The gradient of ``b``'s last objective with respect to each loss: ``b.weights``, or,
    for a gradient method whose heads take unweighted gradients (its weights then act on the
    shared tensors only), ones: DB-MTL's heads train on ``log(L_k + ε)``, as LibMTL's, whose
    derivative is ``1/(L_k + ε)`` at the last call's (rank-averaged) losses."""
    if getattr(b, "heads", "weighted") == "unweighted":
        if isinstance(b, tb.DBMTL):
            return (1 / (b._last_losses.double() + b.eps)).to(b.weights.dtype)
        return torch.ones_like(b.weights)
    return b.weights


def compute(b: tb.Balancer, losses: torch.Tensor, step: int = 0) -> torch.Tensor:
    """``b.compute_weights`` with the extra inputs :func:`call` would pass."""
    kpis = kpis_for(step, b.num_tasks) if b.requires_kpis else None
    gram = gram_for(step, b.num_tasks) if b.requires_gram else None
    return b.compute_weights(losses, gram=gram, kpis=kpis)


def snapshot(b: tb.Balancer) -> dict[str, Any]:
    """A deep copy of everything that makes up a balancer's state."""
    state = {"state_dict": copy.deepcopy(b.state_dict())}
    generator = getattr(b, "generator", None)
    if isinstance(generator, torch.Generator):
        state["generator"] = generator.get_state().clone()
    return state


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Every tensor (and nested value) of two snapshots is equal, bit for bit."""
    _assert_equal(before, after, path="state")


def _assert_equal(a: Any, b: Any, path: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype, path
        assert a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} changed: {a} -> {b}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} -> {sorted(b)}"
        for key in a:
            _assert_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} -> {b!r}"


def value_error_message(action: Any) -> str:
    """The message of the ValueError ``action()`` raises, or "" when it raises none (what a
    rank records, so the test can compare what every rank saw)."""
    try:
        action()
    except ValueError as error:
        return str(error)
    return ""


@contextlib.contextmanager
def gloo_group(rank: int, store: str, world_size: int = 2) -> Iterator[None]:
    """Inside a :func:`run_ranks` worker: this process's gloo group (file:// rendezvous at
    ``store``), one thread per process (the ranks share two cores), torn down on exit."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_ranks(worker: Any, tmp: Any, world_size: int = 2) -> list[Any]:
    """Spawn ``worker(rank, store, out_dir)`` on ``world_size`` CPU processes (gloo, file://
    rendezvous in ``tmp``) and load what each saved as ``rank{r}.pt`` there."""
    import time

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # spawned children re-import the test module; multiprocessing hands them our sys.path
    context = mp.spawn(worker, args=(str(tmp / "store"), str(tmp)), nprocs=world_size, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world_size}-process run did not finish within 120 s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


@pytest.fixture(params=tb.available())
def loss_method(request: pytest.FixtureRequest) -> str:
    return request.param
