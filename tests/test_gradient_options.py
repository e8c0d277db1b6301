"""Gradient normalisation and per-group aggregation (issue 12, item 5).

References are computed independently of the balancer's own path: the normalised Jacobian is
built by dividing the rows of J by hand, and each group's Gramian and gradients come from
plain per-task ``torch.autograd.grad`` calls.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import gloo_group, run_ranks
from taskbalance.methods._facts import method_facts

GRADIENT = [n for n in tb.available() if tb.method_class(n).requires_gram]
NORMALISING = [n for n in GRADIENT if method_facts(tb.method_class(n)).offers_normalization]
NOT_NORMALISING = [n for n in GRADIENT if n not in NORMALISING]
PER_GROUP = [n for n in GRADIENT if method_facts(tb.method_class(n)).offers_per_group]
NOT_PER_GROUP = [n for n in GRADIENT if n not in PER_GROUP]


#: How the README names each gradient method in its lists of options.
README_NAMES = {
    "aligned_mtl": "Aligned-MTL",
    "cagrad": "CAGrad",
    "config": "ConFIG",
    "db_mtl": "DB-MTL",
    "dualproj": "DualProj",
    "excess_mtl": "ExcessMTL",
    "fairgrad": "FairGrad",
    "graddrop": "GradDrop",
    "gradnorm": "GradNorm",
    "gradvac": "GradVac",
    "imtl_g": "IMTL-G",
    "mgda": "MGDA",
    "moco": "MoCo",
    "nash_mtl": "Nash-MTL",
    "pcgrad": "PCGrad",
    "upgrad": "UPGrad",
}


def _readme_names(before: str, after: str) -> set[str]:
    """The comma/"and"-separated method names the README lists between two phrases."""
    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    start = text.index(before) + len(before)
    listed = text[start : text.index(after, start)]
    return {name.strip() for name in re.split(r",| and ", listed) if name.strip()}


def test_the_readme_lists_the_methods_each_option_applies_to():
    assert set(README_NAMES) == set(GRADIENT)
    per_group = _readme_names("the methods whose rule is one Gramian's (", ")")
    assert per_group == {README_NAMES[n] for n in PER_GROUP}
    refusing = _readme_names("pass it); ", " keep state or a direction")
    assert refusing == {README_NAMES[n] for n in NOT_PER_GROUP}
    normalising = _readme_names("where it is meaningful (", ";")
    assert normalising == {README_NAMES[n] for n in NORMALISING}
    unweighted = _readme_names('`"unweighted"` for ', " (every head")
    weighted = _readme_names('`"weighted"` for ', " (backpropagate")
    for name in GRADIENT:
        default = tb.method_class(name).default_heads
        assert README_NAMES[name] in (weighted if default == "weighted" else unweighted), name
    assert len(weighted) + len(unweighted) == len(GRADIENT)


def build(name: str, num_tasks: int, **hparams: Any) -> tb.Balancer:
    facts = method_facts(tb.method_class(name))
    required = dict(facts.required_hyperparameters)
    if facts.requires_params:
        required["params"] = [torch.nn.Parameter(torch.zeros(3))]
    return tb.create(name, num_tasks, **{**required, **hparams})


def test_the_declarations_split_the_gradient_methods_as_documented():
    assert set(NORMALISING) >= {"mgda", "upgrad", "dualproj", "cagrad", "pcgrad", "gradvac"}
    assert {"imtl_g", "config", "nash_mtl", "gradnorm"} <= set(NOT_NORMALISING)
    assert {"db_mtl", "gradnorm"} <= set(NOT_PER_GROUP)
    assert "gradvac" in PER_GROUP  # the paper's per-layer use: one set of targets per group
    for name in GRADIENT:  # every class says why it refuses what it refuses
        cls = tb.method_class(name)
        for reason in (cls.normalization_refused, cls.per_group_refused):
            assert reason is None or "does not declare" not in reason, name


# ---------------------------------------------------------------------------------------------
# Normalisation: the rule applied to D·J, the weights mapped back to J.


@pytest.mark.parametrize("name", NORMALISING)
@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    k=st.integers(2, 4),
    row_scales=st.lists(st.sampled_from([1e-3, 0.5, 1.0, 30.0, 1e3]), min_size=4, max_size=4),
    losses=st.lists(st.floats(0.05, 20.0), min_size=4, max_size=4),
)
def test_normalised_weights_are_the_rule_on_the_normalised_jacobian(
    name, normalization, seed, k, row_scales, losses
):
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(k, 5, generator=generator, dtype=torch.float64)
    J = J * torch.tensor(row_scales[:k], dtype=torch.float64)[:, None]
    L = torch.tensor(losses[:k], dtype=torch.float64)
    norms = torch.linalg.vector_norm(J, dim=1)
    divisor = {"l2": norms, "loss": L, "loss+": L * norms}[normalization]
    J_normalised = J / divisor[:, None]
    # One fresh balancer each: PCGrad's and GradVac's random orders and targets start alike.
    reference = build(name, k, gram_dtype=torch.float64)
    w_normalised = reference.compute_weights(L.float(), gram=J_normalised @ J_normalised.T)
    b = build(name, k, normalization=normalization, gram_dtype=torch.float64)
    w = b.compute_weights(L.float(), gram=J @ J.T)
    # MGDA alone follows its reference code; the test names it rather than reading the flag.
    assert tb.method_class(name).normalization_maps_back == (name != "mgda")
    if name != "mgda":
        got, want = J.T @ w.double(), J_normalised.T @ w_normalised.double()
        size = (w_normalised.double().abs() * J_normalised.norm(dim=1)).sum()
    else:  # MGDA's reference code: the normalised problem's weights act on the raw gradients
        got, want = J_normalised.T @ w.double(), J_normalised.T @ w_normalised.double()
        size = (w_normalised.double().abs() * J_normalised.norm(dim=1)).sum()
    assert (got - want).norm() <= 1e-6 * size + 1e-12, (name, w, w_normalised)


def test_normalisation_hand_values_for_a_method_that_maps_back():
    # g1 = (3, 0), g2 = (0, 1/2) are orthogonal: UPGrad keeps both, w' = (1/2, 1/2) on the unit
    # gradients; mapped back w = w'/‖g‖ = (1/6, 1): the direction (1/2, 1/2).
    b = tb.create("upgrad", num_tasks=2, normalization="l2", gram_dtype=torch.float64)
    w = b.compute_weights(torch.ones(2), gram=torch.tensor([[9.0, 0.0], [0.0, 0.25]]).double())
    torch.testing.assert_close(w, torch.tensor([1 / 6, 1.0], dtype=torch.float64))


def test_loss_normalisations_need_positive_losses():
    b = tb.create("upgrad", num_tasks=2, normalization="loss")
    assert b.requires_positive_losses
    assert not tb.create("upgrad", num_tasks=2).requires_positive_losses
    with pytest.raises(ValueError, match=r"losses"):
        b.compute_weights(torch.tensor([1.0, -1.0]), gram=torch.eye(2))


def test_a_zero_gradient_gets_zero_weight_under_l2():
    b = tb.create("cagrad", num_tasks=2, normalization="l2", gram_dtype=torch.float64)
    w = b.compute_weights(torch.ones(2), gram=torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
    assert torch.isfinite(w).all(), w
    assert w[1] == 0, w


@pytest.mark.parametrize("name", NOT_NORMALISING)
def test_methods_that_do_not_offer_normalisation_refuse_it_saying_why(name):
    reason = tb.method_class(name).normalization_refused
    with pytest.raises(ValueError, match=r"normalization: .* does not offer") as caught:
        build(name, 2, normalization="l2")
    assert reason in str(caught.value)
    build(name, 2, normalization="none")  # the default is accepted


# ---------------------------------------------------------------------------------------------
# Per-group aggregation.

K = 3


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer1 = torch.nn.Linear(3, 4).double()
        self.layer2 = torch.nn.Linear(4, 5).double()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(5, 1).double() for _ in range(K))

    def losses(self, step: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(8, 3, generator=generator, dtype=torch.float64)
        y = torch.randn(8, K, generator=generator, dtype=torch.float64)
        z = torch.tanh(self.layer2(torch.tanh(self.layer1(x))))
        # different scales and targets, so the tasks' gradients conflict and differ in size
        return [
            (k + 1.0) * ((head(z).squeeze(1) - y[:, k]) ** 2).mean()
            for k, head in enumerate(self.heads)
        ]


def _groups(model: _Model, aggregation: str) -> list[list[torch.Tensor]]:
    if aggregation == "per_tensor":
        return [[p] for p in (*model.layer1.parameters(), *model.layer2.parameters())]
    return [list(model.layer1.parameters()), list(model.layer2.parameters())]


def _per_task_gradients(losses: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("aggregation", ["per_group", "per_tensor"])
@pytest.mark.parametrize("name", PER_GROUP)
def test_per_group_weights_and_gradients_match_each_groups_own_rule(name, aggregation):
    model = _Model()
    groups = _groups(model, aggregation)
    b = build(
        name,
        K,
        params=groups,
        group_aggregation=aggregation,
        heads="unweighted",
        gram_dtype=torch.float64,
    )
    assert len(b.group_names) == len(groups)
    losses = model.losses(0)
    jacobians = [_per_task_gradients(losses, group) for group in groups]
    head_grads = [
        torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
        for loss, head in zip(losses, model.heads, strict=True)
    ]
    values = torch.stack([loss.detach() for loss in losses]).float()
    # A fresh reference balancer per group (each group has its own state), the random
    # generator of PCGrad and GradVac handed on from group to group as the balancer's advances.
    expected_rows, drawn = [], None
    for J in jacobians:
        reference = build(name, K, gram_dtype=torch.float64)
        generator = getattr(reference, "generator", None)
        if generator is not None and drawn is not None:
            generator.set_state(drawn)
        expected_rows.append(reference.compute_weights(values, gram=J @ J.T))
        drawn = None if generator is None else generator.get_state()
    expected = torch.stack(expected_rows)

    b(losses).backward()

    torch.testing.assert_close(b.group_weights.double(), expected.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(b.weights, b.group_weights.mean(0))
    # The step applies the rule's float64 weights, which b.group_weights keeps.
    assert b.group_weights.dtype == torch.float64
    for group, J, w in zip(groups, jacobians, expected, strict=True):
        got = torch.cat([p.grad.reshape(-1) for p in group])
        torch.testing.assert_close(got, J.T @ w.double(), rtol=1e-6, atol=1e-10)
    for head, grads in zip(model.heads, head_grads, strict=True):  # heads: unweighted ∇L_k
        for p, g in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, g)


def test_per_group_with_normalisation_normalises_each_group():
    model = _Model()
    groups = {"first": model.layer1.parameters(), "second": model.layer2.parameters()}
    b = tb.create(
        "upgrad",
        K,
        params=groups,
        group_aggregation="per_group",
        normalization="l2",
        gram_dtype=torch.float64,
    )
    assert b.group_names == ("first", "second")
    losses = model.losses(1)
    jacobians = [
        _per_task_gradients(losses, list(layer.parameters()))
        for layer in (model.layer1, model.layer2)
    ]
    b(losses).backward()
    values = torch.stack([loss.detach() for loss in losses]).float()
    for J, w, layer in zip(jacobians, b.group_weights, (model.layer1, model.layer2), strict=True):
        unit = J / J.norm(dim=1, keepdim=True)
        w_unit = tb.create("upgrad", K).compute_weights(values, gram=unit @ unit.T).double()
        want = unit.T @ w_unit
        got = torch.cat([p.grad.reshape(-1) for p in layer.parameters()])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(J.T @ w.double(), want, rtol=1e-5, atol=1e-9)


def test_per_group_state_round_trip_and_reuse_between_refreshes():
    def make(model: _Model) -> tb.Balancer:
        return tb.create(
            "cagrad",
            K,
            params=_groups(model, "per_group"),
            group_aggregation="per_group",
            update_every=2,
        )

    model = _Model()
    b = make(model)
    b(model.losses(0)).backward()
    refreshed = b.group_weights
    assert not torch.allclose(refreshed[0], refreshed[1])  # the groups really differ
    model.zero_grad()
    losses = model.losses(1)
    jacobians = [_per_task_gradients(losses, group) for group in _groups(model, "per_group")]
    resumed = make(model)
    resumed.load_state_dict(b.state_dict())
    resumed(losses).backward()  # not a refresh step: each group's last weights act again
    torch.testing.assert_close(resumed.group_weights, refreshed)
    for group, J, w in zip(_groups(model, "per_group"), jacobians, refreshed, strict=True):
        got = torch.cat([p.grad.reshape(-1) for p in group])
        torch.testing.assert_close(got, J.T @ w.double(), rtol=1e-5, atol=1e-8)
    joint = tb.create("cagrad", K, params=_groups(model, "per_group"), update_every=2)
    with pytest.raises(RuntimeError, match=r"group_aggregation"):
        joint.load_state_dict(b.state_dict())


def test_compute_weights_takes_one_gramian_per_group():
    model = _Model()
    b = tb.create(
        "mgda",
        K,
        params=_groups(model, "per_group"),
        group_aggregation="per_group",
        heads="unweighted",
    )
    grams = torch.stack([torch.diag(torch.tensor([1.0, 4.0, 9.0])), torch.eye(K)])
    w = b.compute_weights(torch.ones(K), gram=grams)
    mgda = tb.create("mgda", K)
    expected = torch.stack([mgda.compute_weights(torch.ones(K), gram=g) for g in grams])
    torch.testing.assert_close(b.group_weights, expected)
    torch.testing.assert_close(w, expected.mean(0))
    with pytest.raises(ValueError, match=r"gram: with group_aggregation='per_group', expected"):
        b.compute_weights(torch.ones(K), gram=torch.eye(K))


def test_joint_mode_reports_one_group():
    b = tb.create("upgrad", 2)
    assert b.group_weights.shape == (1, 2)
    assert b.group_names == ("all",)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_aggregation": "per_group"}, r"group_aggregation: 'per_group' needs parameters"),
        ({"group_aggregation": "by_layer"}, r"group_aggregation: expected one of"),
        (
            {"group_aggregation": "per_group", "heads": "weighted", "params": "groups"},
            r"needs heads='unweighted'",
        ),
        ({"params": {}}, r"params: expected at least one parameter group"),
        ({"params": "mixed"}, r"params: expected parameters or a list of parameter groups"),
        ({"params": {1: "layer"}}, r"params: group names must be str"),
    ],
)
def test_bad_grouping_is_refused_at_construction(kwargs, match):
    model = _Model()
    if kwargs.get("params") == "groups":
        kwargs = {**kwargs, "params": _groups(model, "per_group")}
    elif kwargs.get("params") == "mixed":
        kwargs = {"params": [model.layer1.weight, [model.layer2.weight]]}
    elif kwargs.get("params") == {1: "layer"}:
        kwargs = {"params": {1: model.layer1.parameters()}}
    with pytest.raises((ValueError, TypeError), match=match):
        tb.create("upgrad", K, **kwargs)


@pytest.mark.parametrize("name", NOT_PER_GROUP)
def test_stateful_methods_refuse_per_group_saying_why(name):
    model = _Model()
    reason = tb.method_class(name).per_group_refused
    with pytest.raises(ValueError, match=r"does not offer per-group aggregation") as caught:
        build(
            name,
            K,
            params=_groups(model, "per_group"),
            group_aggregation="per_group",
            heads="unweighted",
        )
    assert reason in str(caught.value)


def test_groups_under_joint_aggregation_are_one_gramian_and_recorded():
    model = _Model()
    flat = tb.create("upgrad", K, params=[*model.layer1.parameters(), *model.layer2.parameters()])
    grouped = tb.create("upgrad", K, params=_groups(model, "per_group"))
    losses = model.losses(2)
    w_flat = flat.compute_weights(torch.ones(K), gram=torch.eye(K))
    w_grouped = grouped.compute_weights(torch.ones(K), gram=torch.eye(K))
    torch.testing.assert_close(w_flat, w_grouped)
    grouped(losses)
    flat(losses)
    torch.testing.assert_close(flat.weights, grouped.weights)
    assert grouped.configuration["params"][0][0] == "0"
    with pytest.raises(RuntimeError, match=r"params"):
        flat.load_state_dict(grouped.state_dict())


def test_a_per_group_balancer_resumes_with_a_changed_hyperparameter():
    model = _Model()
    old = tb.create("cagrad", K, params=_groups(model, "per_group"), group_aggregation="per_group")
    old(model.losses(0))
    new = tb.create(
        "cagrad", K, c=0.9, params=_groups(model, "per_group"), group_aggregation="per_group"
    )
    new.allow_changed_hyperparameters("c").load_state_dict(old.state_dict())
    torch.testing.assert_close(new.group_weights, old.group_weights)
    assert new.c == 0.9


def _ddp_worker(rank: int, store: str, out_dir: str) -> None:
    with gloo_group(rank, store):
        model = _Model()  # the same parameters on both ranks, other data (step = rank)
        b = tb.create(
            "upgrad",
            K,
            params=_groups(model, "per_group"),
            group_aggregation="per_group",
            normalization="l2",
            gram_dtype=torch.float64,
        )
        losses = model.losses(rank)
        jacobians = [_per_task_gradients(losses, group) for group in _groups(model, "per_group")]
        b(losses)
        values = torch.stack([loss.detach() for loss in losses]).float()
        torch.save(
            {"group_weights": b.group_weights, "jacobians": jacobians, "losses": values},
            f"{out_dir}/rank{rank}.pt",
        )


@pytest.mark.slow
def test_per_group_weights_under_ddp_are_those_of_the_rank_averaged_gradients(tmp_path):
    rank0, rank1 = run_ranks(_ddp_worker, tmp_path)
    torch.testing.assert_close(rank0["group_weights"], rank1["group_weights"], rtol=0, atol=0)
    losses = (rank0["losses"] + rank1["losses"]) / 2
    reference = tb.create("upgrad", K, normalization="l2", gram_dtype=torch.float64)
    for g in range(2):
        J = (rank0["jacobians"][g] + rank1["jacobians"][g]) / 2  # ∇ of the rank-averaged loss
        want = reference.compute_weights(losses, gram=J @ J.T)
        torch.testing.assert_close(
            rank0["group_weights"][g].double(), want.double(), rtol=1e-5, atol=1e-8
        )


def test_gradvac_per_layer_keeps_one_set_of_targets_per_layer():
    # K = 2: each task has one other task, so the visiting order is not random and each
    # layer's weights are exactly those of a GradVac of its own fed that layer's Gramians.
    model = _Model()
    model.heads = model.heads[:2]
    groups = _groups(model, "per_group")

    def make() -> tb.Balancer:
        return tb.create(
            "gradvac",
            2,
            beta=0.5,
            params=groups,
            group_aggregation="per_group",
            gram_dtype=torch.float64,
        )

    b = make()
    own = [tb.create("gradvac", 2, beta=0.5, gram_dtype=torch.float64) for _ in groups]
    assert b.target_cosines.shape == (2, 2, 2)
    for step in range(4):
        if step == 2:  # a state round trip mid-run
            resumed = make()
            resumed.load_state_dict(b.state_dict())
            b = resumed
        losses = model.losses(step)[:2]
        grams = [(J @ J.T) for J in (_per_task_gradients(losses, g) for g in groups)]
        values = torch.stack([loss.detach() for loss in losses]).float()
        expected = torch.stack(
            [o.compute_weights(values, gram=G) for o, G in zip(own, grams, strict=True)]
        )
        b(losses)
        torch.testing.assert_close(
            b.group_weights.double(), expected.double(), rtol=1e-6, atol=1e-9
        )
        for g, reference in enumerate(own):
            torch.testing.assert_close(b.target_cosines[g], reference.target_cosines)
    assert not torch.equal(b.target_cosines[0], b.target_cosines[1])
