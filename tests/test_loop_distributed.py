"""Two real gloo ranks: non-finite skips, present masks and configuration mismatches stay in
step on every rank (issue 8 items 4, 6 and 8).

One spawn of two CPU processes runs every scenario in turn; each scenario records what each
rank saw (weights, objectives, error messages), and the tests compare the two ranks.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import taskbalance as tb
from conftest import gloo_group, run_ranks
from conftest import value_error_message as _error

K = 3
WORLD_SIZE = 2


def _losses(rank: int, step: int) -> torch.Tensor:
    return torch.tensor([1.0 + rank + step, 2.0 + 0.5 * rank, 3.0 - 0.1 * step])


def _skip(rank: int) -> dict:
    out: dict = {}
    for name in ("famo", "rlw", "dwa"):
        b = tb.create(name, num_tasks=K, on_nonfinite="skip")
        b(_losses(rank, 0).requires_grad_(True))
        before = copy.deepcopy(b.state_dict())  # state_dict() aliases the buffers
        losses = _losses(rank, 1)
        if rank == 1:
            losses[2] = math.inf
        objective = b(losses.requires_grad_(True))
        unchanged = all(
            torch.equal(before[k], v)
            for k, v in b.state_dict().items()
            if isinstance(v, torch.Tensor)
        )
        b(_losses(rank, 2).requires_grad_(True))
        out[name] = {"objective": objective.item(), "unchanged": unchanged, "after": b.weights}
    # A gradient method whose task gradients are not finite on one rank only.
    b = tb.create("mgda", num_tasks=2, on_nonfinite="skip")
    z = torch.full((3,), 1.0 + rank, requires_grad=True)
    b(torch.stack([(z**2).sum(), z.sum()]), features=z)
    z = torch.full((3,), float(rank), requires_grad=True)  # sqrt'(0) = inf on rank 0 only
    objective = b(torch.stack([torch.sqrt(z).sum() + 1.0, z.sum() + 1.0]), features=z)
    out["mgda"] = {"objective": objective.item(), "steps": int(b.num_steps)}
    # The same between two refreshes (update_every=2), where only the heads' shift needs the
    # rows (unweighted heads): skipped on every rank alike, or refused on every rank alike.
    for mode in ("skip", "raise"):
        b = tb.create("upgrad", num_tasks=2, update_every=2, on_nonfinite=mode)
        z = torch.full((3,), 1.0 + rank, requires_grad=True)
        b(torch.stack([(z**2).sum(), z.sum()]), features=z)
        before = copy.deepcopy(b.state_dict())
        z = torch.full((3,), float(rank), requires_grad=True)
        losses = torch.stack([torch.sqrt(z).sum() + 1.0, z.sum() + 1.0])
        try:
            seen: object = b(losses, features=z).item()
        except ValueError as error:
            seen = str(error)
        unchanged = all(
            torch.equal(before[k], v)
            for k, v in b.state_dict().items()
            if isinstance(v, torch.Tensor)
        )
        out[f"between_refreshes_{mode}"] = {"seen": seen, "unchanged": unchanged}
    return out


def _raise(rank: int) -> dict:
    b = tb.create("ew", num_tasks=K)
    losses = _losses(rank, 0)
    if rank == 0:
        losses[1] = math.nan
    message = _error(lambda: b(losses.requires_grad_(True)))
    after = b(_losses(rank, 1).requires_grad_(True)).item()  # still in step afterwards
    return {"message": message, "after": after}


def _present(rank: int) -> dict:
    b = tb.create("dwa", num_tasks=K, window=1)
    losses = _losses(rank, 0)
    present = torch.tensor([True, rank == 1, rank == 0])
    losses = torch.where(present, losses, math.nan)
    objective = b(losses.requires_grad_(True), present=present)
    objective.backward()
    return {"logged": b.log_dict(), "grad": losses.grad, "weights": b.weights}


def _present_nan_under_ddp(rank: int) -> dict:
    """DDP without find_unused_parameters, rank 1 without labels for task 1, whose loss is a
    masked mean (0/0 = NaN, NaN backward), against the same loss written to be 0 there."""
    from torch.nn.parallel import DistributedDataParallel

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = torch.nn.Linear(4, 6)
            self.heads = torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(2)])

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            z = torch.relu(self.trunk(x))
            return [head(z).squeeze(1) for head in self.heads]

    out: dict = {}
    for safe in (True, False):
        torch.manual_seed(0)
        model = DistributedDataParallel(Model())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        b = tb.create("famo", num_tasks=2)
        for step in range(3):  # DDP checks at each forward that the last reduction finished
            x = torch.linspace(-1, 1, 12).reshape(3, 4) * (1 + rank + step)
            y = torch.linspace(0, 1, 6).reshape(3, 2)
            labelled = torch.tensor([[True, rank == 0 or step == 0]] * 3)
            optimizer.zero_grad()
            losses = []
            for k, prediction in enumerate(model(x)):
                mask = labelled[:, k].float()
                count = mask.sum().clamp_min(1) if safe else mask.sum()
                losses.append((mask * (prediction - y[:, k]) ** 2).sum() / count)
            b(losses, present=labelled.any(0)).backward()
            optimizer.step()
        out["safe" if safe else "nan"] = {
            name: parameter.detach().clone() for name, parameter in model.named_parameters()
        }
    return out


def _mismatch(rank: int) -> dict:
    hyper = tb.create("dwa", num_tasks=K, temperature=2.0 if rank == 0 else 1.0)
    method = tb.create("ew" if rank == 0 else "gls", num_tasks=K)
    seeded = tb.create("rlw", num_tasks=K, seed=rank)
    # Ranks resumed from checkpoints of different steps (rank 1's is one step behind).
    resumed = tb.create("ew", num_tasks=K)
    state = resumed.state_dict()
    state["num_steps"] = torch.tensor(5 - rank)
    state["num_calls"] = torch.tensor(5 - rank)
    resumed.load_state_dict(state)
    return {
        "hyper": _error(lambda: hyper(_losses(rank, 0).requires_grad_(True))),
        "method": _error(lambda: method(_losses(rank, 0).requires_grad_(True))),
        "seed": _error(lambda: seeded(_losses(rank, 0).requires_grad_(True))),
        "resumed": _error(lambda: resumed(_losses(rank, 1).requires_grad_(True))),
    }


def _refused(rank: int) -> dict:
    """One rank's call fails its own checks: a loss <= 0 for GLS (it takes logs), a KPI
    outside [0, 1] for DTP, a features= that does not require grad for UPGrad."""
    out: dict = {}
    gls = tb.create("gls", num_tasks=K)
    losses = _losses(rank, 0)
    if rank == 1:
        losses[0] = -0.5
    out["gls"] = _error(lambda: gls(losses.requires_grad_(True)))
    dtp = tb.create("dtp", num_tasks=K)
    kpis = torch.tensor([0.5, 1.5 if rank == 0 else 0.5, 0.5])
    out["dtp"] = _error(lambda: dtp(_losses(rank, 0).requires_grad_(True), kpis=kpis))
    upgrad = tb.create("upgrad", num_tasks=2)
    z = torch.ones(3, requires_grad=True)
    features = z if rank == 0 else z.detach()
    out["upgrad"] = _error(lambda: upgrad(torch.stack([(z**2).sum(), z.sum()]), features=features))
    mgda = tb.create("mgda", num_tasks=2)
    gram = torch.tensor([[1.0, 0.5], [-0.5, 1.0]]) if rank == 0 else torch.eye(2)  # asymmetric
    out["mgda"] = _error(lambda: mgda.compute_weights(torch.ones(2), gram=gram))
    out["mgda_after"] = mgda.compute_weights(torch.ones(2), gram=torch.eye(2))
    ew = tb.create("ew", num_tasks=K)
    listed = [1.0, *_losses(rank, 0).requires_grad_(True)] if rank == 0 else None
    try:  # a float first in the list: a TypeError, and no tensor first to take the device from
        ew(listed if listed is not None else _losses(rank, 0).requires_grad_(True))
        out["ew"] = ""
    except (TypeError, ValueError) as error:
        out["ew"] = f"{type(error).__name__}: {error}"
    out["ew_after"] = ew(_losses(rank, 1).requires_grad_(True)).item()
    famo = tb.create("famo", num_tasks=K, delta="same_batch")
    famo(_losses(rank, 0).requires_grad_(True))
    after = _losses(rank, 1)
    if rank == 1:
        after[2] = math.nan
    out["famo"] = _error(lambda: famo.update(after))
    famo.update(_losses(rank, 1))
    out["famo_after"] = famo.weights
    # Still in step afterwards, state unchanged by the refused call.
    out["gls_after"] = gls(_losses(rank, 1).requires_grad_(True)).item()
    out["gls_steps"] = int(gls.num_steps)
    dtp(_losses(rank, 1).requires_grad_(True), kpis=torch.full((K,), 0.5))
    out["dtp_after"] = dtp.weights  # the objective is local; the weights are the same
    z = torch.ones(3, requires_grad=True)
    out["upgrad_after"] = upgrad(torch.stack([(z**2).sum(), z.sum()]), features=z).item()
    out["upgrad_steps"] = int(upgrad.num_steps)
    return out


def _worker(rank: int, store: str, out_dir: str) -> None:
    with gloo_group(rank, store, WORLD_SIZE):
        results = {
            "skip": _skip(rank),
            "raise": _raise(rank),
            "present": _present(rank),
            "present_nan": _present_nan_under_ddp(rank),
            "mismatch": _mismatch(rank),
            "refused": _refused(rank),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory):
    return run_ranks(_worker, tmp_path_factory.mktemp("ddp_loop"), WORLD_SIZE)


@pytest.mark.parametrize("name", ["famo", "rlw", "dwa"])
def test_nonfinite_loss_on_one_rank_skips_on_every_rank(ranks, name):
    for rank in ranks:
        seen = rank["skip"][name]
        assert math.isnan(seen["objective"])
        assert seen["unchanged"]
    assert torch.equal(ranks[0]["skip"][name]["after"], ranks[1]["skip"][name]["after"])


def test_nonfinite_gradients_on_one_rank_skip_on_every_rank(ranks):
    for rank in ranks:
        assert math.isnan(rank["skip"]["mgda"]["objective"])
        assert rank["skip"]["mgda"]["steps"] == 1


def test_nonfinite_gradients_between_refreshes_on_one_rank_skip_on_every_rank(ranks):
    for rank in ranks:
        seen = rank["skip"]["between_refreshes_skip"]
        assert math.isnan(seen["seen"])
        assert seen["unchanged"]


def test_nonfinite_gradients_between_refreshes_on_one_rank_raise_on_every_rank(ranks):
    for rank in ranks:
        seen = rank["skip"]["between_refreshes_raise"]
        assert "task gradients are not finite" in seen["seen"]
        assert "on this or another DDP rank" in seen["seen"]
        assert seen["unchanged"]


def test_nonfinite_loss_in_raise_mode_raises_on_every_rank_in_step(ranks):
    assert "losses[1] is nan" in ranks[0]["raise"]["message"]
    assert "a loss on another DDP rank is not finite" in ranks[1]["raise"]["message"]
    for rank in ranks:
        assert math.isfinite(rank["raise"]["after"])


def test_present_masks_differing_by_rank(ranks):
    """Task 1 only on rank 1, task 2 only on rank 0: both count as present, and each mean
    averages over the ranks that have the task."""
    for r, rank in enumerate(ranks):
        logged = rank["present"]["logged"]
        assert logged["balancer/loss/0"] == pytest.approx(1.5)  # (1 + 2) / 2
        assert logged["balancer/loss/1"] == pytest.approx(2.5)  # rank 1 only
        assert logged["balancer/loss/2"] == pytest.approx(3.0)  # rank 0 only
        assert bool(torch.isfinite(rank["present"]["grad"]).all())
        assert rank["present"]["grad"][1 if r == 0 else 2] == 0
    assert torch.equal(ranks[0]["present"]["weights"], ranks[1]["present"]["weights"])


def test_an_absent_tasks_nan_masked_mean_under_ddp_without_unused_parameters(ranks):
    """The NaN loss passes no gradient, and its head an explicit zero one, so DDP's reducer
    (find_unused_parameters=False) finishes every step; the model ends exactly where the same
    training with the loss written to be 0 there ends, on both ranks."""
    for rank in ranks:
        for name, parameter in rank["present_nan"]["safe"].items():
            assert bool(torch.isfinite(rank["present_nan"]["nan"][name]).all()), name
            torch.testing.assert_close(rank["present_nan"]["nan"][name], parameter, msg=name)
    for name, parameter in ranks[0]["present_nan"]["nan"].items():
        assert torch.equal(parameter, ranks[1]["present_nan"]["nan"][name]), name


@pytest.mark.parametrize(
    ("case", "names"),
    [
        ("hyper", "hyperparameters"),
        ("method", "method"),
        ("seed", "hyperparameters"),
        ("resumed", "num_steps"),
    ],
)
def test_configuration_mismatch_raises_on_every_rank_naming_it(ranks, case, names):
    for rank in ranks:
        message = rank["mismatch"][case]
        assert "DDP ranks disagree on" in message
        assert names in message


@pytest.mark.parametrize(
    ("name", "offender", "own_error"),
    [
        ("gls", 1, "losses[0]"),
        ("dtp", 0, "kpis"),
        ("upgrad", 1, "features"),
        ("mgda", 0, "gram"),  # compute_weights
        ("ew", 0, "TypeError"),
    ],
)
def test_a_call_refused_on_one_rank_raises_on_every_rank_at_once(ranks, name, offender, own_error):
    """Before, the other rank waited in the first all-reduce until the gloo timeout (this test
    would hang); now it raises naming the offending rank, and both stay in step."""
    assert own_error in ranks[offender]["refused"][name]
    other = ranks[1 - offender]["refused"][name]
    assert f"DDP rank {offender} refused its call" in other
    for rank in ranks:
        seen = rank["refused"]
        assert math.isfinite(seen["gls_after"])
        assert seen["gls_steps"] == 1
        assert seen["upgrad_steps"] == 1
        assert math.isfinite(seen["upgrad_after"])
    for key in ("dtp_after", "mgda_after", "famo_after"):
        assert torch.equal(ranks[0]["refused"][key], ranks[1]["refused"][key])
    for rank in ranks:
        assert math.isfinite(rank["refused"]["ew_after"])


def test_famo_update_refused_on_one_rank_raises_on_every_rank(ranks):
    """FAMO.update() has its own all-reduce: the rank with a NaN loss joins it (with NaN) and
    names its loss; the other rank raises too, and both update in step afterwards."""
    assert "losses[2] is nan" in ranks[1]["refused"]["famo"]
    assert "a loss on another DDP rank is not finite" in ranks[0]["refused"]["famo"]
