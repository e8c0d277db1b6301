"""``reuse_rows=True``: parameters mode without a second backward through the listed parameters.

Every test compares with the same run at ``reuse_rows=False`` (the ordinary objective, whose
backward is the reference): the gradients of every parameter, the balancer's own included,
must agree to rounding, in every heads mode, listing, aggregation, present mask and loop option.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import gloo_group, run_ranks
from taskbalance.methods._facts import method_facts

K = 3
GRADIENT_METHODS = [name for name in tb.available() if tb.method_class(name).requires_gram]


class Model(torch.nn.Module):
    def __init__(self, heads: int = K) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh()
        )
        self.heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(heads)])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.losses(self.trunk(x), y)

    def losses(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The K losses from the trunk's output ``z``."""
        return torch.stack(
            [((head(z).squeeze(1) - y[:, k]) ** 2).mean() for k, head in enumerate(self.heads)]
        )


def _data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(16, 5, generator=generator, dtype=dtype)
    return x, torch.randn(16, K, generator=generator, dtype=dtype)


def _train(
    reuse: bool,
    name: str = "upgrad",
    *,
    listed: Callable[[Model], object] = lambda m: list(m.trunk.parameters()),
    steps: int = 3,
    backward: Callable[[torch.Tensor, Model], None] = lambda objective, _: objective.backward(),
    losses_of: Callable[[Model, torch.Tensor, torch.Tensor, int], dict] | None = None,
    **options: object,
) -> tuple[list[torch.Tensor | None], tb.Balancer]:
    """Gradients of every parameter (the model's, then the balancer's) after ``steps`` calls
    that accumulate into ``.grad``, and the balancer."""
    torch.manual_seed(1)
    model = Model().double()
    hparams = dict(method_facts(tb.method_class(name)).required_hyperparameters)
    hparams.update(options)
    balancer = tb.create(name, num_tasks=K, params=listed(model), reuse_rows=reuse, **hparams)
    x, y = _data()
    for step in range(steps):
        call = (
            {"losses": model(x * (1 + step), y)}
            if losses_of is None
            else losses_of(model, x, y, step)
        )
        backward(balancer(**call), model)
    gradients = [
        None if p.grad is None else p.grad.clone()
        for p in [*model.parameters(), *balancer.parameters()]
    ]
    return gradients, balancer


def _assert_same(expected: list[torch.Tensor | None], actual: list[torch.Tensor | None]) -> None:
    assert len(expected) == len(actual)
    for index, (a, b) in enumerate(zip(expected, actual, strict=True)):
        assert (a is None) == (b is None), index
        if a is not None and b is not None:
            if a.is_sparse:
                assert b.is_sparse, index
                a, b = a.to_dense(), b.to_dense()
            scale = max(a.abs().max().item(), 1e-300)
            assert (a - b).abs().max().item() <= 1e-12 * scale, (index, a, b)


@pytest.mark.parametrize("listing", ["whole trunk", "last layer"])
@pytest.mark.parametrize("heads", ["weighted", "unweighted"])
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradients_equal_the_ordinary_backward(name, heads, listing):
    def listed(model: Model) -> object:
        layer = model.trunk if listing == "whole trunk" else model.trunk[2]
        return list(layer.parameters())

    expected, ordinary = _train(False, name, listed=listed, heads=heads)
    actual, reused = _train(True, name, listed=listed, heads=heads)
    _assert_same(expected, actual)
    torch.testing.assert_close(reused.weights, ordinary.weights, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["upgrad", "gradvac"])
def test_per_group_aggregation(name):
    def groups(model: Model) -> object:
        return {"first": model.trunk[0].parameters(), "second": model.trunk[2].parameters()}

    options = {"listed": groups, "group_aggregation": "per_group"}
    _assert_same(_train(False, name, **options)[0], _train(True, name, **options)[0])


def test_absent_task_with_a_nan_masked_mean():
    def losses_of(model: Model, x: torch.Tensor, y: torch.Tensor, step: int) -> dict:
        z = model.trunk(x)
        labelled = torch.tensor([True, step != 1, True])
        losses = []
        for k, head in enumerate(model.heads):
            mask = torch.full((x.shape[0],), float(labelled[k]), dtype=x.dtype)
            losses.append((mask * (head(z).squeeze(1) - y[:, k]) ** 2).sum() / mask.sum())
        return {"losses": losses, "present": labelled}

    for heads in ("weighted", "unweighted"):
        expected, _ = _train(False, losses_of=losses_of, heads=heads)
        actual, _ = _train(True, losses_of=losses_of, heads=heads)
        _assert_same(expected, actual)
        assert all(g is None or torch.isfinite(g).all() for g in actual)


@pytest.mark.parametrize("heads", ["weighted", "unweighted"])
def test_accumulation_and_update_every(heads):
    # Weighted heads between refreshes take no rows: those calls keep the ordinary objective.
    options = {"heads": heads, "accumulation_steps": 2, "update_every": 2, "steps": 6}
    _assert_same(_train(False, "mgda", **options)[0], _train(True, "mgda", **options)[0])


def test_incoming_gradient_scales_everything_as_gradscaler_needs():
    def scaled(objective: torch.Tensor, _: Model) -> None:
        (objective * 1024.0).backward()

    expected, _ = _train(False)
    actual, _ = _train(True, backward=scaled)
    _assert_same([1024.0 * g for g in expected if g is not None], actual)


def test_a_real_gradscaler_step_equals_the_ordinary_one():
    parameters = []
    for reuse in (False, True):
        torch.manual_seed(1)
        model = Model()
        balancer = tb.create(
            "upgrad", num_tasks=K, params=model.trunk.parameters(), reuse_rows=reuse
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu")
        x, y = _data(torch.float32)
        for _ in range(3):
            optimizer.zero_grad()
            scaler.scale(balancer(model(x, y))).backward()
            scaler.step(optimizer)
            scaler.update()
        parameters.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(parameters[1], parameters[0], rtol=1e-5, atol=1e-6)


def test_a_parameter_regulariser_added_to_the_objective():
    def regularised(objective: torch.Tensor, model: Model) -> None:
        penalty = sum((p**2).sum() for p in model.parameters())
        (objective + 0.01 * penalty).backward()

    _assert_same(_train(False, backward=regularised)[0], _train(True, backward=regularised)[0])


class _CountingIdentity(torch.autograd.Function):
    """Counts the backward calls that receive a gradient (undefined ones are not arithmetic)."""

    calls = 0

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None) -> torch.Tensor | None:
        if grad is not None:
            _CountingIdentity.calls += 1
        return grad


@pytest.mark.parametrize("heads", ["weighted", "unweighted"])
def test_the_listed_region_is_run_backward_once_per_task_only(heads):
    counts = []
    for reuse in (False, True):
        torch.manual_seed(1)
        model = Model().double()
        balancer = tb.create(
            "upgrad", num_tasks=K, params=model.trunk.parameters(), reuse_rows=reuse, heads=heads
        )
        x, y = _data()
        _CountingIdentity.calls = 0
        balancer(model.losses(_CountingIdentity.apply(model.trunk(x)), y)).backward()
        counts.append(_CountingIdentity.calls)
    assert counts == [K + 1, K]


def _reusing_step() -> tuple[Model, tb.Balancer, torch.Tensor, torch.Tensor]:
    """A float32 model, its UPGrad balancer with ``reuse_rows=True``, the trunk's output and
    the losses of one forward."""
    torch.manual_seed(1)
    model = Model()
    balancer = tb.create("upgrad", num_tasks=K, params=model.trunk.parameters(), reuse_rows=True)
    x, y = _data(torch.float32)
    z = model.trunk(x)
    return model, balancer, z, model.losses(z, y)


def test_the_backward_frees_the_graph_and_a_second_one_is_refused():
    model, balancer, z, losses = _reusing_step()
    objective = balancer(losses)
    objective.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"backward ran already.*reuse_rows=False"):
        objective.backward()
    # The listed region ran (with no gradient) and released its saved tensors, as an
    # ordinary backward does: the trunk holds no activations after the step.
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(z.sum(), list(model.trunk.parameters()))


def test_create_graph_is_refused():
    torch.manual_seed(1)
    model = Model()
    balancer = tb.create("mgda", num_tasks=K, params=model.trunk.parameters(), reuse_rows=True)
    objective = balancer(model(*_data(torch.float32)))
    refused = pytest.raises(RuntimeError, match=r"create_graph=True\) with reuse_rows=True")
    with refused, pytest.warns(UserWarning, match="reference cycle"):  # torch's, about .grad
        objective.backward(create_graph=True)


def test_an_auxiliary_loss_through_the_trunk_is_refused_by_name():
    model, balancer, z, losses = _reusing_step()
    refused = r"added to the objective also runs backward through the listed.*reuse_rows=False"
    with pytest.raises(RuntimeError, match=refused):
        (balancer(losses) + 0.1 * z.pow(2).mean()).backward()
    # Refused before anything was freed: an ordinary backward of the same losses still runs.
    losses.sum().backward()
    assert all(p.grad is not None for p in model.trunk.parameters())
    # Two balancers' objectives on one graph: the second to run finds it freed.
    _, first, _, losses = _reusing_step()
    second = tb.create("mgda", num_tasks=K, params=first.shared_params, reuse_rows=True)
    with pytest.raises(RuntimeError, match=r"already freed by another backward.*reuse_rows=False"):
        (first(losses) + second(losses)).backward()


def test_a_sparse_embedding_keeps_a_sparse_gradient():
    class Embedded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Embedding(10, 4, sparse=True)
            self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(2)])

        def forward(self, ids: torch.Tensor) -> list[torch.Tensor]:
            z = self.table(ids).mean(1)
            return [(head(z) ** 2).mean() for head in self.heads]

    grads = []
    for reuse in (False, True):
        torch.manual_seed(0)
        model = Embedded().double()
        balancer = tb.create("upgrad", num_tasks=2, params=[model.table.weight], reuse_rows=reuse)
        balancer(model(torch.tensor([[1, 2], [2, 7]]))).backward()
        grads.append([p.grad for p in model.parameters()])
    assert grads[1][0].is_sparse
    _assert_same(grads[0], grads[1])


def test_a_row_read_with_a_zero_gradient_stays_in_the_sparse_gradient():
    """A token masked out (padding-like) is read by the batch with a zero gradient: it stays
    in ``.grad``'s indices, as the table's own backward keeps it, so SparseAdam moves it."""
    indices = []
    for reuse in (False, True):
        torch.manual_seed(0)
        table = torch.nn.Embedding(10, 4, sparse=True).double()
        heads = [torch.nn.Linear(4, 1).double() for _ in range(2)]
        balancer = tb.create("upgrad", num_tasks=2, params=[table.weight], reuse_rows=reuse)
        masked = table(torch.tensor([[3, 7]] * 4)) * torch.tensor([1.0, 0.0]).view(1, 2, 1)
        z = masked.sum(1)
        balancer([(head(z) ** 2).mean() for head in heads]).backward()
        indices.append(table.weight.grad.coalesce().indices()[0].tolist())
    assert indices == [[3, 7], [3, 7]]


def _sparse_table_gradients(name: str, reuse: bool, tied: bool) -> list[torch.Tensor]:
    """``.grad`` of a listed sparse table over three steps that read different rows; with
    ``tied``, task 1 also reads the table densely (a tied output layer)."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(20, 8, sparse=True).double()
    heads = [torch.nn.Linear(8, 1).double() for _ in range(2)]
    balancer = tb.create(name, num_tasks=2, params=[table.weight], reuse_rows=reuse)
    gradients = []
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 20, (16, 2), generator=generator)
        y = torch.randn(16, 2, generator=generator, dtype=torch.float64)
        z = torch.tanh(table(ids).mean(1))
        losses = [((head(z).squeeze(1) - y[:, k]) ** 2).mean() for k, head in enumerate(heads)]
        if tied:
            losses[1] = losses[1] + torch.nn.functional.cross_entropy(z @ table.weight.T, ids[:, 0])
        balancer(losses).backward()
        gradients.append(table.weight.grad)
        table.weight.grad = None
    return gradients


@pytest.mark.parametrize(("name", "tied"), [("upgrad", True), ("db_mtl", False), ("moco", False)])
def test_a_sparse_table_read_densely_too_or_under_a_carried_direction(name, tied):
    """A table one task also reads densely gets its whole gradient (dense, as the default
    gives it); DB-MTL's and MoCo's averaged directions keep the rows earlier batches read."""
    expected = _sparse_table_gradients(name, False, tied)
    actual = _sparse_table_gradients(name, True, tied)
    for default, reused in zip(expected, actual, strict=True):
        assert default.layout == reused.layout
        if default.is_sparse:
            indices = [g.coalesce().indices()[0].tolist() for g in (default, reused)]
            assert indices[0] == indices[1]
    _assert_same(expected, actual)


def test_a_listed_non_leaf_and_a_hooked_parameter_are_refused():
    raw = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"params\[0\]: with reuse_rows=True .* TBackward0"):
        tb.create("upgrad", num_tasks=2, params=[raw.t()], reuse_rows=True)
    model, balancer, _, losses = _reusing_step()
    model.trunk[2].weight.register_hook(lambda grad: grad.clamp(-1, 1))
    before = {k: v.clone() for k, v in balancer.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=r"params\[2\]: has a gradient hook .* state is unchanged"):
        balancer(losses)
    after = balancer.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())


def test_compiled_trunk():
    results = []
    for reuse in (False, True):
        torch.manual_seed(1)
        model = Model().double()
        trunk = torch.compile(model.trunk, backend="aot_eager")
        balancer = tb.create(
            "upgrad", num_tasks=K, params=model.trunk.parameters(), reuse_rows=reuse
        )
        x, y = _data()
        balancer(model.losses(trunk(x), y)).backward()
        results.append([p.grad.clone() for p in model.parameters()])
    _assert_same(*results)


@settings(max_examples=25, deadline=None)
@given(
    trunk=st.sampled_from([["t0"], ["t2"], ["t0", "t2"]]),
    extra=st.lists(st.sampled_from(["h0", "h1"]), unique=True),
    heads=st.sampled_from(["weighted", "unweighted"]),
    name=st.sampled_from(["upgrad", "mgda", "pcgrad", "db_mtl"]),
)
def test_any_listing_of_layers(trunk, extra, heads, name):
    """Any set of layers, heads included, below or beside one another: the cut stays exact.
    (At least one trunk layer: a listing that one task's loss does not reach is refused.)"""
    listed = [*trunk, *extra]

    def chosen(model: Model) -> object:
        layers = {"t0": model.trunk[0], "t2": model.trunk[2], "h0": model.heads[0]}
        layers["h1"] = model.heads[1]
        return [p for key in listed for p in layers[key].parameters()]

    _assert_same(
        _train(False, name, listed=chosen, heads=heads, steps=2)[0],
        _train(True, name, listed=chosen, heads=heads, steps=2)[0],
    )


def test_options_are_checked_and_not_part_of_the_state():
    model = Model()
    with pytest.raises(TypeError, match="reuse_rows: expected True or False, got 'yes'"):
        tb.create("upgrad", num_tasks=K, params=model.trunk.parameters(), reuse_rows="yes")
    with pytest.raises(ValueError, match=r"reuse_rows=True needs parameters mode \(params=\)"):
        tb.create("upgrad", num_tasks=K, reuse_rows=True)
    reused = tb.create("upgrad", num_tasks=K, params=model.trunk.parameters(), reuse_rows=True)
    assert "reuse_rows=True" in repr(reused)
    assert "reuse_rows" not in reused.configuration
    reused(model(*_data(torch.float32))).backward()
    ordinary = tb.create("upgrad", num_tasks=K, params=model.trunk.parameters())
    ordinary.load_state_dict(reused.state_dict())  # how the backward runs is not state
    torch.testing.assert_close(ordinary.weights, reused.weights, rtol=0, atol=0)


# --- two DDP ranks (gloo) --------------------------------------------------------------------


def _ddp_worker(rank: int, store: str, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, store):
        results = {}
        # db_mtl: a direction computed from the rank-averaged rows (the others: Jᵀw of each
        # rank's own rows, averaged by DDP)
        for name, unused, reuse in itertools.product(["upgrad", "db_mtl"], *[(False, True)] * 2):
            torch.manual_seed(0)
            inner = Model()
            model = DistributedDataParallel(inner, find_unused_parameters=unused)
            balancer = tb.create(
                name, num_tasks=K, params=inner.trunk.parameters(), reuse_rows=reuse
            )
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            x, y = _data(torch.float32)
            for step in range(3):
                optimizer.zero_grad()
                scale = 1.0 + rank + step
                balancer(model(x * scale, y)).backward()
                optimizer.step()
            results[f"{name} unused={unused} reuse={reuse}"] = torch.cat(
                [p.detach().reshape(-1) for p in model.parameters()]
            )
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # DDP's all-reduces from a backward can hang gloo's teardown (docs/recipes/ddp.md,
        # "Ending a rank"): every rank has saved its results, so end without one
        torch.distributed.barrier()
        os._exit(0)


def test_ddp_ranks_agree_and_equal_the_ordinary_backward(tmp_path):
    ranks = run_ranks(_ddp_worker, tmp_path)
    for name, unused in itertools.product(["upgrad", "db_mtl"], (False, True)):
        ordinary = ranks[0][f"{name} unused={unused} reuse=False"]
        torch.testing.assert_close(ranks[1][f"{name} unused={unused} reuse=False"], ordinary)
        for rank in ranks:
            reused = rank[f"{name} unused={unused} reuse=True"]
            torch.testing.assert_close(reused, ordinary, rtol=1e-5, atol=1e-6)


def test_a_lightning_trainer_with_accumulation_trains_as_the_ordinary_backward():
    pl = pytest.importorskip("pytorch_lightning")
    from test_loop_lightning import _trainer

    class Module(pl.LightningModule):
        def __init__(self, reuse: bool) -> None:
            super().__init__()
            self.model = Model()
            self.balancer = tb.create(
                "upgrad",
                num_tasks=K,
                params=self.model.trunk.parameters(),
                reuse_rows=reuse,
                accumulation_steps=2,
            )

        def training_step(self, batch, batch_idx):
            return self.balancer(self.model(*batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    trained = []
    for reuse in (False, True):
        torch.manual_seed(0)
        module = Module(reuse)
        x, y = _data(torch.float32)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
        _trainer(epochs=2, accumulate=2).fit(module, loader)
        assert int(module.balancer.num_steps) == 4
        trained.append(torch.cat([p.detach().reshape(-1) for p in module.model.parameters()]))
    torch.testing.assert_close(trained[1], trained[0], rtol=1e-5, atol=1e-6)
