"""The Gramian engine (``taskbalance._gramian``) and the GradientBalancer plumbing around it.

Every test compares against an explicit reference ``J Jᵀ`` built from K separate
``torch.autograd.grad`` calls, so the engine's batching, flattening, precision and DDP
reduction are all checked against the definition rather than against themselves.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

import taskbalance as tb
import taskbalance.methods._gradient_base as gradient_base
from conftest import FEATURE_METHODS, applies_jtw, assert_same_state, snapshot
from taskbalance._gramian import gramian as _engine_gramian
from taskbalance._gramian import gramian_from_rows, jacobian_rows
from taskbalance.methods._gradient_base import GradientBalancer

gramian = getattr(tb, "gramian", _engine_gramian)

KS = [1, 2, 5]
DTYPES = [torch.float32, torch.float64]


# ---------------------------------------------------------------------------------------------
# References and small models


def reference_jacobian(losses: Tensor, inputs: list[Tensor]) -> Tensor:
    """K×P Jacobian in float64 from K separate ``autograd.grad`` calls (unused inputs: zeros)."""
    rows = []
    for k in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[k], inputs, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros(t.numel(), dtype=torch.float64)
                    if g is None
                    else g.reshape(-1).to(torch.float64)
                    for g, t in zip(grads, inputs, strict=False)
                ]
            )
        )
    return torch.stack(rows)


def reference_gramian(losses: Tensor, inputs: list[Tensor]) -> Tensor:
    jac = reference_jacobian(losses, inputs)
    return jac @ jac.T


def assert_gram_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, model_dtype) -> None:
    assert actual.dtype == dtype
    assert actual.shape == expected.shape
    assert not actual.requires_grad
    tol = 1e-10 if model_dtype == torch.float64 and dtype == torch.float64 else 2e-5
    scale = expected.abs().max().item() + 1e-12
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=tol, atol=tol * scale)


class MLP(nn.Module):
    """A small trunk and K heads whose losses differ in shape (so G is not rank one)."""

    def __init__(self, K: int, dim_in: int = 6, width: int = 8, dtype=torch.float32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(dim_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()
        ).to(dtype)
        self.heads = nn.ModuleList([nn.Linear(width, 2) for _ in range(K)]).to(dtype)

    def losses(self, x: Tensor, y: Tensor, source: str = "stack") -> tuple[Tensor, Tensor]:
        """The K losses, ``torch.stack``-ed (``source="stack"``) or as one vector op."""
        z = self.trunk(x)
        K = len(self.heads)
        scale = 1.0 + 0.5 * torch.arange(K, dtype=z.dtype)
        if source == "vector":  # the same values, computed without a stack of K scalars
            out = torch.cat([head(z) for head in self.heads], dim=1).reshape(-1, K, 2)
            return ((out - y.unsqueeze(-1)) ** 2).mean(dim=(0, 2)) * scale, z
        losses = torch.stack(
            [
                ((head(z) - y[:, k : k + 1]) ** 2).mean() * (1.0 + 0.5 * k)
                for k, head in enumerate(self.heads)
            ]
        )
        return losses, z


def mlp_problem(K: int, dtype=torch.float32, seed: int = 0, batch: int = 7):
    torch.manual_seed(seed)
    model = MLP(K, dtype=dtype)
    x = torch.randn(batch, 6, dtype=dtype)
    y = torch.randn(batch, K, dtype=dtype)
    return model, x, y


class Probe(GradientBalancer):
    """A local gradient method: weights that depend on G (1/‖g_k‖, normalised), Gs recorded."""

    def __init__(self, num_tasks: int, **kwargs) -> None:
        super().__init__(num_tasks, **kwargs)
        self.grams: list[Tensor] = []

    def _gradient_weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        self.grams.append(gram.clone())
        inv = 1.0 / gram.diagonal().clamp_min(1e-12).sqrt()
        return (inv * self.num_tasks / inv.sum()).to(torch.float32)


class NumpySquare(torch.autograd.Function):
    """x², with a backward through NumPy, as wrapped external kernels do.

    Under ``is_grads_batched`` its backward receives a vmap BatchedTensor, which has no storage
    for NumPy to read: torch 2.13 raises "Batching rule not implemented for aten::detach".
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.from_numpy(2.0 * x.detach().numpy() * grad.detach().numpy())


# ---------------------------------------------------------------------------------------------
# Features mode


@pytest.mark.parametrize("source", ["stack", "vector"])
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
def test_features_mode_matches_reference(K, dtype, model_dtype, source):
    model, x, y = mlp_problem(K, model_dtype)
    losses, z = model.losses(x, y, source)
    G = gramian(losses, z, dtype=dtype)
    assert_gram_close(G, reference_gramian(losses, [z]), dtype, model_dtype)
    # Symmetric to the last bit (the engine symmetrises), PSD.
    assert torch.equal(G, G.T)
    assert torch.linalg.eigvalsh(G.double()).min() > -1e-6 * G.abs().max()


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_features_mode_conv_feature_map(K, dtype):
    torch.manual_seed(1)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1))
    heads = nn.ModuleList(
        [nn.Sequential(nn.Conv2d(5, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()) for _ in range(K)]
    )
    x = torch.randn(3, 3, 6, 5)
    z = trunk(x)  # [B, C, H, W]
    assert z.dim() == 4
    losses = torch.stack([(head(z) ** 2).sum() + head(z).sum() * k for k, head in enumerate(heads)])
    G = gramian(losses, z, dtype=dtype)
    assert_gram_close(G, reference_gramian(losses, [z]), dtype, torch.float32)


def test_losses_may_be_a_list_of_scalars():
    model, x, y = mlp_problem(3)
    losses, z = model.losses(x, y)
    torch.testing.assert_close(gramian(list(losses.unbind()), z), gramian(losses, z))


# ---------------------------------------------------------------------------------------------
# Parameters mode


@pytest.mark.parametrize("source", ["stack", "vector"])
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", DTYPES)
def test_params_mode_matches_reference(K, dtype, model_dtype, source):
    model, x, y = mlp_problem(K, model_dtype)
    # `partial` is used by task 0 only; `unused` by no task: both still count as shared params.
    partial = nn.Parameter(torch.linspace(0.5, 1.5, 8, dtype=model_dtype))
    unused = nn.Parameter(torch.ones(3, dtype=model_dtype))
    losses, z = model.losses(x, y, source)
    extra = (z * partial).sum().pow(2) * 1e-2
    if source == "stack":
        losses = torch.stack([losses[0] + extra, *losses[1:].unbind()])
    else:
        losses = losses + torch.cat([extra.reshape(1), torch.zeros(K - 1)])
    params = [*model.trunk.parameters(), partial]
    G = gramian(losses, params, dtype=dtype)
    assert_gram_close(G, reference_gramian(losses, params), dtype, model_dtype)
    # A parameter that no loss reaches is an error naming it, not a zero contribution.
    with pytest.raises(ValueError, match=rf"params\[{len(params)}\]: no task loss reaches"):
        gramian(losses, [*params, unused], dtype=dtype)
    # `partial` is reached by task 0 only. Stacked losses: the other tasks reach none of
    # [partial], an error; a loss vector from one op cannot tell that from a zero gradient.
    if K > 1:
        present = None
        if source == "stack":
            with pytest.raises(ValueError, match=r"losses\[1\]: this task's loss reaches none"):
                gramian(losses, [partial], dtype=dtype)
            present = [True] + [False] * (K - 1)
        rows, _ = jacobian_rows(losses, [partial], batched=None, present=present)
        only_partial = gramian_from_rows(rows, features_mode=False, dtype=dtype)
        assert only_partial[0, 0] > 0
        assert torch.all(only_partial[1:] == 0)
        assert torch.all(only_partial[:, 1:] == 0)


def test_params_mode_accepts_a_generator():
    model, x, y = mlp_problem(3)
    losses, _ = model.losses(x, y)
    torch.testing.assert_close(
        gramian(losses, model.trunk.parameters()), gramian(losses, list(model.trunk.parameters()))
    )


# ---------------------------------------------------------------------------------------------
# Batched backward, loop, fallback


@pytest.mark.parametrize("source", ["stack", "vector"])
@pytest.mark.parametrize("mode", ["features", "params"])
@pytest.mark.parametrize("K", [2, 5])
def test_batched_and_loop_agree(mode, K, source):
    model, x, y = mlp_problem(K)
    losses, z = model.losses(x, y, source)
    wrt = z if mode == "features" else list(model.trunk.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no path may warn on a batchable graph
        batched = gramian(losses, wrt, batched=True)
        looped = gramian(losses, wrt, batched=False)
        default = gramian(losses, wrt)
    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-7)
    # The default: the per-task loop over the stack's edges, else the batched backward.
    assert torch.equal(default, looped if source == "stack" else batched)


@pytest.mark.parametrize("mode", ["features", "params"])
def test_default_path_per_loss_source(monkeypatch, mode):
    """Stacked losses take the per-edge loop (one head per task); a vector the batched call."""
    import taskbalance._gramian as engine

    calls: list[bool] = []
    original = torch.autograd.grad
    original_engine = engine._engine_backward
    assert original_engine is not None  # this torch has the engine's entry: the loop uses it

    def spy(*args, **kwargs):
        calls.append(bool(kwargs.get("is_grads_batched", False)))
        return original(*args, **kwargs)

    def engine_spy(*args):
        calls.append(False)  # the per-edge loop's direct engine call: one task, not batched
        return original_engine(*args)

    model, x, y = mlp_problem(4)
    wrt_of = {"features": lambda z: z, "params": lambda z: list(model.trunk.parameters())}
    for source, expected in (("stack", [False] * 4), ("vector", [True])):
        losses, z = model.losses(x, y, source)
        monkeypatch.setattr(torch.autograd, "grad", spy)
        monkeypatch.setattr(engine, "_engine_backward", engine_spy)
        gramian(losses, wrt_of[mode](z))
        monkeypatch.setattr(torch.autograd, "grad", original)
        monkeypatch.setattr(engine, "_engine_backward", original_engine)
        assert calls == expected, source
        calls.clear()


def test_per_edge_loop_handles_constant_and_list_losses():
    model, x, y = mlp_problem(3)
    losses, z = model.losses(x, y)
    constant = torch.tensor(2.0)  # a task whose loss does not depend on anything
    mixed = torch.stack([losses[0], constant, losses[2]])
    with pytest.raises(ValueError, match=r"losses\[1\]: .*reaches none.*present="):
        gramian(mixed, z)
    # Marked absent, it is not differentiated: a zero row, the others exact.
    rows, _ = jacobian_rows(mixed, [z], batched=None, present=torch.tensor([True, False, True]))
    G = gramian_from_rows(rows, features_mode=True, dtype=torch.float32)
    assert torch.all(G[1] == 0)
    assert torch.all(G[:, 1] == 0)
    assert_gram_close(G, reference_gramian(mixed, [z]), torch.float32, torch.float32)
    # A balancer given a list stacks it: the same per-edge path, the same G.
    b = Probe(3)
    b([losses[0], losses[1], losses[2]], features=z)
    assert_gram_close(b.grams[-1], reference_gramian(losses, [z]), torch.float32, torch.float32)


def _unbatchable_problem(K: int = 3, source: str = "vector"):
    model, x, _y = mlp_problem(K)
    z = model.trunk(x)
    h = NumpySquare.apply(z)
    if source == "vector":
        out = torch.cat([head(h) for head in model.heads], dim=1).reshape(-1, K, 2)
        losses = (out**2).mean(dim=(0, 2)) + torch.arange(K)
    else:
        losses = torch.stack([(head(h) ** 2).mean() + k for k, head in enumerate(model.heads)])
    return model, losses, z


@pytest.mark.parametrize("source", ["stack", "vector"])
def test_custom_function_is_really_unbatchable(source):
    _, losses, z = _unbatchable_problem(source=source)
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        torch.autograd.grad(
            losses, [z], grad_outputs=torch.eye(3), is_grads_batched=True, retain_graph=True
        )


@pytest.mark.parametrize("mode", ["features", "params"])
def test_fallback_to_loop_warns_and_is_correct(mode):
    model, losses, z = _unbatchable_problem(source="vector")
    wrt = z if mode == "features" else list(model.trunk.parameters())
    inputs = [z] if mode == "features" else wrt
    with pytest.warns(RuntimeWarning, match="loop of backward passes"):
        G = gramian(losses, wrt)
    assert_gram_close(G, reference_gramian(losses, inputs), torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        gramian(losses, wrt, batched=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(gramian(losses, wrt, batched=False), G)


@pytest.mark.parametrize("mode", ["features", "params"])
def test_stacked_unbatchable_graph_needs_no_fallback(mode):
    model, losses, z = _unbatchable_problem(source="stack")
    wrt = z if mode == "features" else list(model.trunk.parameters())
    inputs = [z] if mode == "features" else wrt
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-edge loop never tries the batched backward
        G = gramian(losses, wrt)
    assert_gram_close(G, reference_gramian(losses, inputs), torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        gramian(losses, wrt, batched=True)


def test_balancer_falls_back_once_and_stops_retrying():
    b = Probe(3)
    for step in range(3):
        _, losses, z = _unbatchable_problem()
        expected = reference_gramian(losses, [z])
        if step == 0:
            with pytest.warns(RuntimeWarning, match="loop of backward passes"):
                objective = b(losses, features=z)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the balancer remembers: no retry, no warning
                objective = b(losses, features=z)
        objective.backward()
        assert_gram_close(b.grams[-1], expected, torch.float32, torch.float32)


# ---------------------------------------------------------------------------------------------
# The graph is kept: the user's backward is exactly Jᵀw


@pytest.mark.parametrize("mode", ["features", "params"])
@pytest.mark.parametrize("K", KS)
def test_objective_backward_gives_jt_w(mode, K):
    model, x, y = mlp_problem(K)
    trunk_params = list(model.trunk.parameters())
    b = Probe(K, params=trunk_params) if mode == "params" else Probe(K)
    losses, z = model.losses(x, y)
    expected_jac = reference_jacobian(losses, trunk_params)
    objective = b(losses, features=z) if mode == "features" else b(losses)
    objective.backward()  # the graph survived the Gramian computation
    w = b.weights.to(torch.float64)
    assert b.grams
    assert b.grams[-1].shape == (K, K)
    expected = expected_jac.T @ w
    actual = torch.cat([p.grad.reshape(-1) for p in trunk_params]).to(torch.float64)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    # The heads got Σ_k w_k ∇L_k as well (head k: w_k ∇L_k).
    assert all(head.weight.grad is not None for head in model.heads)


def test_engine_then_weighted_backward():
    model, x, y = mlp_problem(4)
    losses, z = model.losses(x, y)
    G = gramian(losses, z)
    w = torch.linalg.solve(G.double() + torch.eye(4, dtype=torch.float64), torch.ones(4).double())
    expected = reference_jacobian(losses, list(model.trunk.parameters())).T @ w
    (w.float().detach() * losses).sum().backward()
    actual = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()]).double()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors: clear messages, and a rejected call changes no state


def test_engine_errors():
    model, x, y = mlp_problem(2)
    losses, z = model.losses(x, y)
    with pytest.raises(ValueError, match="features: the tensor does not require grad"):
        gramian(losses, z.detach())
    with pytest.raises(ValueError, match="losses: the losses do not require grad"):
        gramian(losses.detach(), z)
    with pytest.raises(ValueError, match="params: expected at least one shared parameter"):
        gramian(losses, [])
    with pytest.raises(ValueError, match="params: expected at least one shared parameter"):
        gramian(losses, iter(()))
    with pytest.raises(ValueError, match=r"params\[1\]: the parameter does not require grad"):
        gramian(losses, [model.trunk[0].weight, torch.ones(3)])
    with pytest.raises(ValueError, match="losses: expected a 1-D tensor"):
        gramian(losses.reshape(1, 2), z)
    with pytest.raises(ValueError, match=r"dtype: expected torch\.float32 or torch\.float64"):
        gramian(losses, z, dtype=torch.float16)


def test_balancer_construction_errors():
    with pytest.raises(ValueError, match="params: expected at least one shared parameter"):
        Probe(2, params=[])
    with pytest.raises(ValueError, match="update_every"):
        Probe(2, update_every=0)
    with pytest.raises(ValueError, match="gram_dtype"):
        Probe(2, gram_dtype=torch.float16)


@pytest.mark.parametrize("update_every", [1, 3])
def test_rejected_calls_change_no_state(update_every):
    model, x, y = mlp_problem(2)
    b = Probe(2, update_every=update_every)
    losses, z = model.losses(x, y)
    b(losses, features=z).backward()  # one good step, so there is state to preserve
    for _ in range(update_every):  # on refresh steps and on steps that reuse the weights alike
        before = snapshot(b)
        losses, z = model.losses(x, y)
        with pytest.raises(ValueError, match=r"features: Probe is a gradient method.*got neither"):
            b(losses)
        with pytest.raises(ValueError, match="features: the tensor does not require grad"):
            b(losses, features=z.detach())
        with pytest.raises(TypeError, match="features: expected a tensor"):
            b(losses, features="z")
        with pytest.raises(ValueError, match="losses: the losses do not require grad"):
            b(losses.detach(), features=z)
        with pytest.raises(ValueError, match=r"finite"):
            b(losses * float("nan"), features=z)
        assert_same_state(before, snapshot(b))
        assert len(b.grams) == 1
        b(losses, features=z).backward()  # and it still works afterwards


def test_registered_gradient_method_without_features_or_params():
    names = FEATURE_METHODS  # a parameters-only method gets its params at construction
    if not names:
        pytest.skip("no gradient method registered yet")
    from conftest import make_balancer

    model, x, y = mlp_problem(2)
    for name in names:
        b = make_balancer(name, 2)
        before = snapshot(b)
        losses, _ = model.losses(x, y)
        with pytest.raises(ValueError, match="features"):
            b(losses)
        assert_same_state(before, snapshot(b))


# ---------------------------------------------------------------------------------------------
# update_every


@pytest.mark.parametrize("mode", ["features", "params"])
def test_update_every_computes_the_gramian_only_on_refresh_steps(monkeypatch, mode):
    calls = []
    original = gradient_base.task_gradients

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(gradient_base, "task_gradients", counting)
    model, x, y = mlp_problem(3)
    params = list(model.trunk.parameters()) if mode == "params" else None
    b = Probe(3, update_every=3, params=params, heads="weighted")
    history = []
    for step in range(7):
        torch.manual_seed(100 + step)
        x = torch.randn_like(x)
        losses, z = model.losses(x, y)
        objective = b(losses, features=z)
        expected_calls = step // 3 + 1
        assert len(calls) == expected_calls, f"step {step}"
        assert len(b.grams) == expected_calls
        objective.backward()
        history.append(b.weights)
        if step % 3:
            # Reused weights; and the objective is Σ w L with them.
            assert torch.equal(history[-1], history[step - step % 3])
            torch.testing.assert_close(objective, (history[-1] * losses).sum())
        model.zero_grad()
    assert int(b.num_steps) == 7
    assert not torch.equal(history[0], history[3])  # refreshed weights really change


# ---------------------------------------------------------------------------------------------
# DDP: every rank gets the Gramian of the global (rank-averaged) losses


_WORLD = 2


def _ddp_data(rank: int, K: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(5, 6, generator=generator), torch.randn(5, K, generator=generator)


def _ddp_worker(rank: int, init_file: str, out_dir: str, K: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=_WORLD)
    try:
        torch.manual_seed(0)
        model = MLP(K)  # same initial weights on every rank
        x, y = _ddp_data(rank, K)
        losses, z = model.losses(x, y)
        G_features = gramian(losses, z)
        G_params = gramian(losses, list(model.trunk.parameters()))
        # The same features in two pieces the heads read (features=[z_a, z_b]): the same G.
        h = model.trunk(x)
        z_a, z_b = h[:, :3], h[:, 3:]
        split_losses = torch.stack(
            [
                ((head(torch.cat([z_a, z_b], 1)) - y[:, k : k + 1]) ** 2).mean() * (1.0 + 0.5 * k)
                for k, head in enumerate(model.heads)
            ]
        )
        G_list = tb.gramian(split_losses, features=[z_a, z_b])
        b = Probe(K)
        b(losses, features=z).backward()
        torch.save(
            {"features": G_features, "params": G_params, "list": G_list, "weights": b.weights},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_gramian_is_the_global_gramian(tmp_path: Path):
    K = 3
    mp.spawn(
        _ddp_worker,
        args=(str(tmp_path / "init"), str(tmp_path), K),
        nprocs=_WORLD,
        join=True,
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(_WORLD)]

    # Single process, concatenated data: the global loss is the rank average of local losses.
    torch.manual_seed(0)
    model = MLP(K)
    data = [_ddp_data(r, K) for r in range(_WORLD)]
    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    z = model.trunk(x)
    n = data[0][0].shape[0]
    per_rank = []
    for r in range(_WORLD):
        zr, yr = z[r * n : (r + 1) * n], y[r * n : (r + 1) * n]
        per_rank.append(
            torch.stack(
                [
                    ((head(zr) - yr[:, k : k + 1]) ** 2).mean() * (1.0 + 0.5 * k)
                    for k, head in enumerate(model.heads)
                ]
            )
        )
    global_losses = torch.stack(per_rank).mean(0)
    expected_features = reference_gramian(global_losses, [z])
    expected_params = reference_gramian(global_losses, list(model.trunk.parameters()))

    for result in results:
        torch.testing.assert_close(
            result["features"].double(), expected_features, rtol=1e-5, atol=1e-7
        )
        torch.testing.assert_close(result["params"].double(), expected_params, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(result["list"].double(), expected_features, rtol=1e-5, atol=1e-7)
    for key in ("features", "params", "list", "weights"):
        assert torch.equal(results[0][key], results[1][key]), key


# ---------------------------------------------------------------------------------------------
# Every registered gradient method drives the same engine: its backward is Jᵀw in both modes


GRADIENT_METHODS = [n for n in tb.available() if tb.method_class(n).requires_gram]


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        (name, mode)
        for name in GRADIENT_METHODS
        for mode in ("features", "params")
        if applies_jtw(name, mode)  # the others' own directions: test_directions.py
    ],
)
def test_registered_gradient_methods_backward_is_jt_w(name, mode):
    from conftest import make_balancer

    K = 3
    model, x, y = mlp_problem(K)
    trunk_params = list(model.trunk.parameters())
    extra = {"params": trunk_params} if mode == "params" else {}
    b = make_balancer(name, K, **extra)
    for _ in range(2):
        losses, z = model.losses(x, y)
        jac = reference_jacobian(losses, trunk_params)
        objective = b(losses, features=z) if mode == "features" else b(losses)
        model.zero_grad()
        objective.backward()
        w = b.weights.double()
        assert w.shape == (K,)
        assert torch.isfinite(w).all()
        actual = torch.cat([p.grad.reshape(-1) for p in trunk_params]).double()
        torch.testing.assert_close(actual, jac.T @ w, rtol=1e-5, atol=1e-6)


def test_losses_not_made_by_a_stack_take_the_batched_call():
    """Without K stack edges to differentiate one by one, the automatic choice is batched."""
    import taskbalance._gramian as engine

    model, x, y = mlp_problem(3)
    losses, z = model.losses(x, y, source="vector")
    expected = reference_gramian(losses, [z])
    assert engine._per_task_edges(losses, 3) is None
    rows, path = engine.jacobian_rows(losses, [z], batched=None)
    assert path is True
    G = engine.gramian_from_rows(rows, features_mode=True, dtype=torch.float32)
    assert_gram_close(G, expected, torch.float32, torch.float32)


@pytest.mark.parametrize("batched", [None, True, False])
def test_retained_grad_of_features_is_left_alone(batched):
    """A user's z.retain_grad() must see only the objective's gradient, not the task gradients."""
    torch.manual_seed(0)
    x = torch.randn(6, 3)
    weight = torch.randn(3, 4, requires_grad=True)
    z = x @ weight
    z.retain_grad()
    losses = (
        torch.stack([(z**2).sum(), z.sum()])
        if batched is None
        else torch.cat([(z**2).sum().reshape(1), z.sum().reshape(1)])
    )
    tb.gramian(losses, z, batched=batched)
    assert z.grad is None
    losses.sum().backward()
    torch.testing.assert_close(z.grad, 2 * z.detach() + 1)


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_non_finite_task_gradients_are_rejected_without_changing_state(name):
    """AMP routinely produces inf gradients: the call must fail loudly and leave no trace."""
    b = tb.create(name, num_tasks=2)
    z_good = torch.ones(3, requires_grad=True)
    b(torch.stack([(z_good**2).sum(), z_good.sum()]), features=z_good)  # one good step
    before = snapshot(b)
    z = torch.zeros(3, requires_grad=True)
    losses = torch.stack([torch.sqrt(z).sum() + 1.0, z.sum() + 1.0])  # d sqrt(z)/dz at 0 = inf
    with pytest.raises(ValueError, match=r"features: the task gradients are not finite"):
        b(losses, features=z)
    assert_same_state(before, snapshot(b))
    assert getattr(b, "_call_inputs", None) is None  # no graph kept alive by the failed call


@pytest.mark.parametrize(
    ("losses", "error", "match"),
    [
        ([1.0, 2.0], TypeError, r"losses\[0\]: expected a tensor, got float"),
        ([], ValueError, r"losses: expected at least one task loss"),
        (torch.ones(2, 2), ValueError, r"losses: expected a 1-D tensor of task losses"),
        (3.0, TypeError, r"losses: expected a 1-D tensor or a list of 0-d tensors, got float"),
    ],
)
def test_gramian_rejects_malformed_losses_by_name(losses, error, match):
    z = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(error, match=match):
        tb.gramian(losses, z)


# ---------------------------------------------------------------------------------------------
# Unscaling the Gramian: the host path (small K) and the tensor path agree to the last bit


def _tensor_path_unscaled(raw: Tensor, scale: float) -> tuple[Tensor, bool]:
    """The reference: ``(G/2s² + Gᵀ/2s²)`` in ``raw``'s own dtype, checked with torch."""
    halved = raw * (0.5 / (scale * scale))
    gram = halved + halved.mT
    return gram, bool(torch.isfinite(gram).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2, 3, 8])
def test_host_unscaled_gram_is_the_tensor_paths_to_the_last_bit(dtype, K):
    from taskbalance._gramian import _HOST_GRAM_MAX_K, _unscaled_gram

    assert K <= _HOST_GRAM_MAX_K  # the host path is the one under test
    generator = torch.Generator().manual_seed(K)
    for trial in range(20):
        rows = torch.randn(K, 7, generator=generator, dtype=dtype)
        rows = rows * torch.logspace(-6, 6, K, dtype=dtype)[:, None]  # graded norms
        # An unsymmetric product, as a summation order may give: the halves then differ.
        raw = rows @ rows.T + 1e-3 * torch.randn(K, K, generator=generator, dtype=dtype)
        scale = 2.0 ** (16 - 8 * (trial % 3))
        got, finite, _ = _unscaled_gram(raw, scale)
        expected, expected_finite = _tensor_path_unscaled(raw, scale)
        assert got.dtype == dtype
        assert finite == expected_finite
        assert torch.equal(got, expected)
        assert torch.equal(got, got.T)


def test_host_unscaled_gram_reports_a_float32_overflow():
    from taskbalance._gramian import _unscaled_gram

    big = torch.finfo(torch.float32).max
    raw = torch.tensor([[1.0, big], [big, 1.0]], dtype=torch.float32)
    got, finite, _ = _unscaled_gram(raw, 0.5)  # (G + Gᵀ)·2 > float32's maximum off the diagonal
    expected, _ = _tensor_path_unscaled(raw, 0.5)
    assert not finite
    assert torch.equal(got, expected)
    assert got[0, 1] == float("inf")
    nan = torch.tensor([[1.0, float("nan")], [0.0, 1.0]], dtype=torch.float64)
    assert _unscaled_gram(nan, 1.0)[1] is False
    # At the edge of float32's range: 2·(a + b) exactly halfway between its largest value and
    # 2**128 rounds (ties to even) to inf; with b = 0 it is the largest value itself.
    for b, overflows in ((2.0**102, True), (0.0, False)):
        raw = torch.tensor([[1.0, 2.0**127 - 2.0**103], [b, 1.0]], dtype=torch.float32)
        got, finite, _ = _unscaled_gram(raw, 0.5)
        expected, expected_finite = _tensor_path_unscaled(raw, 0.5)
        assert finite is expected_finite is (not overflows)
        assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------
# The per-edge loop calls autograd's engine directly: the same gradients as torch.autograd.grad


@pytest.mark.parametrize("mode", ["features", "params"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_direct_engine_call_gives_autograd_grads_result(monkeypatch, mode, dtype):
    import taskbalance._gramian as engine

    model, x, y = mlp_problem(3, dtype=dtype)
    losses, z = model.losses(x, y)
    wrt = [z] if mode == "features" else list(model.trunk.parameters())
    fast, _ = jacobian_rows(losses, wrt, batched=None)
    monkeypatch.setattr(engine, "_engine_backward", None)  # the public function
    public, _ = jacobian_rows(losses, wrt, batched=None)
    assert all(torch.equal(a, b) for a, b in zip(fast, public, strict=True))


def test_the_engine_entry_is_tried_once_and_refused_when_it_changed(monkeypatch):
    """A torch whose private entry takes other arguments, or computes something else: the
    public function, decided once at import rather than by catching errors at every call."""
    import taskbalance._gramian as engine

    assert engine._checked_engine_entry() is torch.autograd.graph._engine_run_backward

    def changed(*args):
        raise TypeError("_engine_run_backward() takes 1 positional argument")

    monkeypatch.setattr(torch.autograd.graph, "_engine_run_backward", changed)
    assert engine._checked_engine_entry() is None
    monkeypatch.setattr(torch.autograd.graph, "_engine_run_backward", lambda *args: (None,))
    assert engine._checked_engine_entry() is None
    monkeypatch.delattr(torch.autograd.graph, "_engine_run_backward")
    assert engine._checked_engine_entry() is None
    # Without it, the public function: the same Gramian.
    monkeypatch.setattr(engine, "_engine_backward", None)
    model, x, y = mlp_problem(2)
    losses, z = model.losses(x, y)
    assert_gram_close(
        gramian(losses, z), reference_gramian(losses, [z]), torch.float32, torch.float32
    )


def test_direct_engine_call_raises_an_error_of_the_backward_itself_once():
    import taskbalance._gramian as engine

    entry = engine._engine_backward
    calls: list[int] = []

    class Failing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            calls.append(1)
            raise TypeError("a custom backward's own error")

    z = torch.randn(4, 3, requires_grad=True)
    losses = torch.stack([Failing.apply(z).sum(), (2 * z).sum()])
    with pytest.raises(TypeError, match="a custom backward's own error"):
        gramian(losses, z)
    assert calls == [1]  # run once, not retried
    assert engine._engine_backward is entry  # and the direct call stays on
