"""Regression tests for the reviewed core defects: partial labels and learned parameters,
loading through a parent module, hyperparameter changes on resume, logging before the first
step, and DDP configuration and presence checks on two real gloo ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

import taskbalance as tb
from conftest import gloo_group, run_ranks
from conftest import value_error_message as _error
from taskbalance.methods._facts import method_facts

# --------------------------------------------------------------------------------------------
# present= and learned parameters


@pytest.mark.parametrize("name", ["uw", "imtl_l"])
def test_absent_task_learned_scale_gets_no_gradient(name):
    b = tb.create(name, num_tasks=2)
    b(torch.tensor([2.0, 5.0], requires_grad=True)).backward()
    b.log_scales.grad = None
    b(torch.tensor([2.0, math.nan], requires_grad=True), present=[True, False]).backward()
    grad = b.log_scales.grad
    assert grad[1] == 0
    # The present task's gradient is the textbook one, as if the absent task did not exist.
    alone = tb.create(name, num_tasks=1)
    alone(torch.tensor([2.0], requires_grad=True)).backward()
    assert grad[0] == pytest.approx(alone.log_scales.grad[0].item())


def test_famo_absent_task_logit_and_moments_do_not_move():
    b = tb.create("famo", num_tasks=3)
    b(torch.tensor([2.0, 5.0, 3.0], requires_grad=True))
    b(torch.tensor([1.0, 4.0, 3.5], requires_grad=True))
    before = {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    b(torch.tensor([0.5, math.nan, 2.0], requires_grad=True), present=[True, False, True])
    after = b.state_dict()
    for key in ("logits", "logit_optimiser.exp_avg", "logit_optimiser.exp_avg_sq"):
        assert after[key][1] == before[key][1], key
        assert not torch.equal(after[key][[0, 2]], before[key][[0, 2]]), key
    assert after["previous_log_losses"][1] == before["previous_log_losses"][1]


def test_famo_present_tasks_learn_through_the_softmax_over_present_tasks():
    """With task 1 absent, the present tasks' logit gradient is that of a 2-task FAMO."""
    three = tb.create("famo", num_tasks=3, weight_decay=0.0)
    two = tb.create("famo", num_tasks=2, weight_decay=0.0)
    three(torch.tensor([2.0, 5.0, 3.0], requires_grad=True))
    two(torch.tensor([2.0, 3.0], requires_grad=True))
    three(torch.tensor([1.0, math.nan, 2.5], requires_grad=True), present=[True, False, True])
    two(torch.tensor([1.0, 2.5], requires_grad=True))
    assert torch.allclose(three.logits[[0, 2]], two.logits)
    assert three.logits[1] == 0


#: Loss-based methods (and hyperparameters) whose rule couples the tasks through the losses or
#: reads each task's own: all but RLW, whose weights are a draw over all K tasks, not a rule of
#: the losses. STCH with nadir= runs its coupled rule from the first step.
NOT_YET_PRESENT_CASES = [
    (name, hyperparameters)
    for name in tb.available()
    if not tb.method_class(name).requires_gram and name != "rlw"
    for hyperparameters in (
        [dict(method_facts(tb.method_class(name)).required_hyperparameters)]
        + ([{"nadir": 0.5}] if name == "stch" else [])
        + ([{"window": 1, "temperature": 0.5}] if name == "dwa" else [])  # ratios from step 3
    )
]


def test_the_not_yet_present_cases_cover_every_loss_based_method_but_rlw():
    loss_based = {name for name in tb.available() if not tb.method_class(name).requires_gram}
    assert {name for name, _ in NOT_YET_PRESENT_CASES} == loss_based - {"rlw"}


@pytest.mark.parametrize(("name", "hyperparameters"), NOT_YET_PRESENT_CASES)
@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e2])
def test_a_task_not_yet_present_does_not_rescale_the_others(name, hyperparameters, scale):
    """Its carried loss was a placeholder 1: at losses ~100 FAMO's present weights came out
    68× too small, at ~0.01 too large (found by a new user), and STCH's (nadir=) 14× too
    small at losses ~0.02. Until the task has a loss, the rule runs over the tasks that have
    one: here the 2-task method's weights, objective value and gradient."""
    three = tb.create(name, num_tasks=3, **hyperparameters)
    two = tb.create(name, num_tasks=2, **hyperparameters)
    needs_kpis = tb.method_class(name).requires_kpis
    for step in range(4):
        values = [2.0 * scale * (1 - 0.1 * step), 1.0 * scale * (1 - 0.2 * step)]
        losses = torch.tensor([values[0], math.nan, values[1]], requires_grad=True)
        kpis = {"kpis": torch.tensor([0.3, 0.5, 0.6])} if needs_kpis else {}
        objective = three(losses, present=[True, False, True], **kpis)
        pair = torch.tensor(values, requires_grad=True)
        expected = two(pair, **({"kpis": torch.tensor([0.3, 0.6])} if needs_kpis else {}))
        torch.testing.assert_close(three.weights[[0, 2]], two.weights)
        assert three.weights[1] == 0
        torch.testing.assert_close(objective, expected)
        objective.backward()
        expected.backward()
        torch.testing.assert_close(losses.grad[[0, 2]], pair.grad)
        assert losses.grad[1] == 0
    assert three.has_loss.tolist() == [True, False, True]
    assert math.isnan(three.log_dict()["balancer/loss/1"])  # not the placeholder 1.0
    assert three.log_dict()["balancer/loss/0"] == pytest.approx(values[0])


@pytest.mark.parametrize(("name", "hyperparameters"), NOT_YET_PRESENT_CASES)
def test_a_task_labelled_only_in_a_windows_later_micro_batch_still_trains(name, hyperparameters):
    """With accumulation the weights are decided at a window's first micro-batch: a task only
    labelled in its second got weight 0 there, and since only that first call recorded
    presence, for good (GLS, FAMO; STCH too once it left the placeholder out). Every call now
    records its present tasks' losses: such a task has its rule's weight from the next window
    on (review)."""
    b = tb.create(name, num_tasks=2, accumulation_steps=2, **hyperparameters)
    head = torch.ones(2, requires_grad=True)  # one parameter per task: its loss is head[k]·x
    needs_kpis = tb.method_class(name).requires_kpis
    trained = []
    for window in range(4):
        head.grad = None
        for k, x in ((0, 2.0 - 0.1 * window), (1, 3.0 - 0.2 * window)):  # task k in micro-batch k
            present = [k == 0, k == 1]
            losses = torch.stack([head[0] * x if k == 0 else head[0] * math.nan,
                                  head[1] * x if k == 1 else head[1] * math.nan])  # fmt: skip
            kpis = {"kpis": torch.tensor([0.4, 0.6])} if needs_kpis else {}
            b(losses, present=present, **kpis).backward()
        trained.append(head.grad[1].item())
        if name in ("dwa", "stch") and "window" not in hyperparameters:
            b.end_epoch()
    assert b.has_loss.tolist() == [True, True]
    assert all(gradient > 0 for gradient in trained[1:]), trained


def test_famo_update_reads_the_presence_of_the_recording_call_under_accumulation():
    """update() read the window's last micro-batch's presence, not the first's, which recorded
    the "before" losses: a task absent from the last micro-batch learned nothing (review)."""

    def run(second_present: list[bool] | None) -> Tensor:
        b = tb.create(
            "famo", num_tasks=3, delta="same_batch", weight_decay=0.0,
            accumulation_steps=1 if second_present is None else 2,
        )  # fmt: skip
        b(torch.tensor([2.0, 5.0, math.nan], requires_grad=True), present=[True, True, False])
        if second_present is not None:
            values = [
                v if p else math.nan for v, p in zip([2.1, 4.9, 3.0], second_present, strict=True)
            ]
            b(torch.tensor(values, requires_grad=True), present=second_present)
        b.update(torch.tensor([1.5, 4.0, math.nan]), present=[True, True, False])
        return b.logits

    alone = run(None)
    assert alone[0] != 0
    for second in ([True, True, True], [True, False, True], [False, False, True]):
        torch.testing.assert_close(run(second), alone)


#: Presence per call of a 3-task loop with windows of 3 calls: tasks new to a window's later
#: calls, absent from its first, and windows with every task.
_PATTERN = [
    [True, False, False], [False, True, True], [True, False, True],
    [True, True, False], [False, True, False], [True, True, True],
    [False, False, True], [True, False, False], [False, True, True],
]  # fmt: skip


def _pattern_call(b: tb.Balancer, i: int) -> Tensor:
    present = _PATTERN[i % len(_PATTERN)]
    values = [1.0 + 0.3 * k + 0.1 * i if present[k] else math.nan for k in range(3)]
    kpis = {"kpis": torch.tensor([0.3 + 0.1 * k + 0.02 * i for k in range(3)])}
    b(torch.tensor(values, requires_grad=True), present=present,
      **(kpis if b.requires_kpis else {})).backward()  # fmt: skip
    return b.weights.clone()


@pytest.mark.parametrize(("name", "hyperparameters"), NOT_YET_PRESENT_CASES)
def test_a_checkpoint_inside_a_window_resumes_exactly(name, hyperparameters):
    """What a window's later calls observe is state: DTP kept which tasks the window had seen
    in a plain attribute, so a resume mid-window observed a task twice, or never (review)."""

    def make() -> tb.Balancer:
        return tb.create(name, num_tasks=3, accumulation_steps=3, **hyperparameters)

    reference = make()
    expected = [_pattern_call(reference, i) for i in range(9)]
    for cut in range(1, 9):
        resumed = make()
        seen = [_pattern_call(resumed, i) for i in range(cut)]
        fresh = make()
        fresh.load_state_dict(resumed.state_dict())
        seen += [_pattern_call(fresh, i) for i in range(cut, 9)]
        for before, after in zip(expected, seen, strict=True):
            assert torch.equal(before, after), cut
        for key, value in reference.state_dict().items():
            if isinstance(value, Tensor):
                assert torch.equal(value, fresh.state_dict()[key]), (cut, key)


def test_stch_warmup_counts_a_task_labelled_only_in_a_windows_later_calls():
    """Its reference loss was measured at windows' first calls only: the warm-up never ended
    (review). Each window counts a task's first presence in it."""
    b = tb.create("stch", num_tasks=2, warmup_epochs=1, accumulation_steps=2)
    for _ in range(3):
        b(torch.tensor([2.0, math.nan], requires_grad=True), present=[True, False])
        b(torch.tensor([math.nan, 4.0], requires_grad=True), present=[False, True])
    b.end_epoch()
    assert b.nadir_count.tolist() == [3, 3]
    assert b.nadir.tolist() == [2.0, 4.0]
    assert bool(b.has_nadir)


@pytest.mark.parametrize("before", [[True, True], [True, False], [False, True]])
def test_a_window_whose_first_call_is_skipped_observes_each_task_at_its_first_presence(before):
    """The skipped first call left the previous window's record: in one call with both tasks
    present, only the task absent from the previous window was counted (third review)."""
    b = tb.create("stch", num_tasks=2, warmup_epochs=1, accumulation_steps=2, on_nonfinite="skip")
    for _ in range(2):  # window 1: presence `before`
        values = [2.0 if before[0] else math.nan, 4.0 if before[1] else math.nan]
        b(torch.tensor(values, requires_grad=True), present=before).backward()
    counted = b.nadir_count.clone()
    b(torch.tensor([math.inf, 4.0], requires_grad=True))  # window 2's first call: skipped
    b(torch.tensor([2.0, 4.0], requires_grad=True)).backward()  # both tasks, first time here
    assert (b.nadir_count - counted).tolist() == [1, 1]


def test_famo_checks_a_later_calls_losses_against_their_bounds():
    """A window's later calls record their losses, which a later window reads for an absent
    task: one below its bound was read as L − min = 1 (review). Refused, state unchanged."""
    b = tb.create("famo", num_tasks=2, min_losses=[0.0, 0.5], accumulation_steps=2)
    b(torch.tensor([2.0, math.nan], requires_grad=True), present=[True, False])
    before = {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, Tensor)}
    with pytest.raises(ValueError, match="every loss must exceed its bound"):
        b(torch.tensor([math.nan, 0.3], requires_grad=True), present=[False, True])
    for key, value in b.state_dict().items():
        if isinstance(value, Tensor):
            assert torch.equal(value, before[key]), key


def _of_format_1(state: dict) -> dict:
    """``state`` as a release before ``has_loss`` saved it."""
    state = dict(state)
    extra = dict(state["_extra_state"])
    del extra["state_format"]
    state["_extra_state"] = extra
    return state


def test_has_loss_of_a_state_saved_before_it_existed():
    """Such a release read every task's carried loss once a step was taken: the loaded state
    goes on doing so (FAMO's own copy, saved under another name, is read back). A state of
    the current format without has_loss is incomplete, and refused."""
    fresh = tb.create("ew", num_tasks=2)
    stepped = tb.create("ew", num_tasks=2)
    stepped(torch.tensor([1.0, math.nan], requires_grad=True), present=[True, False])
    for source, expected in ((fresh, [False, False]), (stepped, [True, True])):
        state = _of_format_1(source.state_dict())
        del state["has_loss"]
        del state["window_present"]
        loaded = tb.create("ew", num_tasks=2)
        loaded.load_state_dict(state)
        assert loaded.has_loss.tolist() == expected
        assert loaded.window_present.tolist() == [True, True]  # nothing left to observe
    state = stepped.state_dict()
    del state["has_loss"]
    with pytest.raises(RuntimeError, match=r"the state lacks the keys \['has_loss'\]"):
        tb.create("ew", num_tasks=2).load_state_dict(state)
    famo = tb.create("famo", num_tasks=3, delta="same_batch")
    famo(torch.tensor([1.0, math.nan, 2.0], requires_grad=True), present=[True, False, True])
    state = _of_format_1(famo.state_dict())
    for key in ("has_loss", "recorded_present", "window_present"):
        del state[key]
    loaded = tb.create("famo", num_tasks=3, delta="same_batch")
    loaded.load_state_dict(state)
    assert loaded.has_loss.tolist() == [True, False, True]  # FAMO's own record, not all
    assert loaded.recorded_present.tolist() == [True, False, True]  # the last call's presence
    # ...and a recorded loss, as that release's update() required (review): a task present
    # at the last call but never at an advancing one has no "before" to learn from
    state = _of_format_1(famo.state_dict())
    for key in ("has_loss", "recorded_present", "window_present"):
        del state[key]
    state["_last_present"] = torch.tensor([False, True, True])
    loaded.load_state_dict(state)
    assert loaded.recorded_present.tolist() == [False, False, True]
    gls = tb.create("gls", num_tasks=3)
    gls(torch.tensor([1.0, math.nan, 2.0], requires_grad=True), present=[True, False, True])
    loaded = tb.create("gls", num_tasks=3)
    loaded(torch.tensor([1.0, 2.0, 3.0], requires_grad=True))  # every task has a loss here
    loaded.load_state_dict(gls.state_dict())
    # ...but not in the loaded state: the next call leaves task 1 out of the geometric mean
    loaded(torch.tensor([1.0, math.nan, 4.0], requires_grad=True), present=[True, False, True])
    torch.testing.assert_close(loaded.weights, torch.tensor([1.0, 0.0, 0.25]))


def test_famo_learns_no_delta_at_a_tasks_first_presence():
    """The previous loss of a task never present was the placeholder: at its first presence
    its logit learned from δ = log 1 − log L, a fall or rise that never happened."""
    b = tb.create("famo", num_tasks=3, weight_decay=0.0)
    for values in ([2.0, 1.5], [1.8, 1.4]):
        b(torch.tensor([values[0], math.nan, values[1]], requires_grad=True),
          present=[True, False, True])  # fmt: skip
    assert b.logits[1] == 0
    assert b.has_previous_loss.tolist() == [True, False, True]
    b(torch.tensor([1.7, 100.0, 1.3], requires_grad=True))  # task 1's first loss
    assert b.logits[1] == 0  # nothing to learn from yet; the others did learn
    assert b.logits[0] != 0
    b(torch.tensor([1.6, 50.0, 1.2], requires_grad=True))
    assert b.logits[1] < 0  # its loss halved, faster than the others: it gives up weight


@pytest.mark.parametrize("scale", [1e-2, 50.0])
@pytest.mark.parametrize("window", [2, None])
def test_dwa_a_task_not_yet_present_makes_no_ratio_of_a_placeholder(scale, window):
    """A task absent for the whole first period got period mean 1 (the placeholder): its
    ratio to its real loss then switched the other task off ([4.6e-11, 2.0] at loss 50)
    or skewed the weights ([1.24, 0.76] at 0.01) though no loss ever changed (new user)."""
    b = tb.create("dwa", num_tasks=2, window=window)
    for period in range(4):  # task 1 absent from the first period only
        for _ in range(2):
            present = torch.tensor([True, period >= 1])
            b(torch.tensor([2.0, scale], requires_grad=True), present=present)
            if period >= 2:  # the ratios exist: every loss constant, every ratio 1
                torch.testing.assert_close(b.weights, torch.ones(2))
        if window is None:
            b.end_epoch()
    # once both periods have its own mean, its real ratio counts: its loss halves
    for _ in range(2):
        b(torch.tensor([2.0, scale / 2], requires_grad=True))
    if window is None:
        b.end_epoch()
    b(torch.tensor([2.0, scale / 2], requires_grad=True))
    assert b.weights[1] < b.weights[0]


def test_famo_same_batch_update_learns_no_delta_for_a_task_never_recorded():
    """With accumulation the last micro-batch's presence is not the recording call's: a task
    absent when the losses were recorded learned from δ = log 1 − log L (review)."""
    b = tb.create("famo", num_tasks=2, delta="same_batch", accumulation_steps=2, weight_decay=0.0)
    b(torch.tensor([2.0, math.nan], requires_grad=True), present=[True, False])
    b(torch.tensor([2.0, 3.0], requires_grad=True))  # the window's second micro-batch
    b.update(torch.tensor([1.9, 3.0]))
    assert b.logits[1] == 0
    assert b.logits[0] == 0  # one task learning alone: the softmax over it has no gradient


def test_famo_a_task_not_yet_present_passes_no_bound_check():
    """min_losses above the placeholder 1 refused the call of a task that was not there."""
    b = tb.create("famo", num_tasks=2, min_losses=5.0)
    b(torch.tensor([7.0, math.nan], requires_grad=True), present=[True, False]).backward()
    assert b.weights.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="must exceed its bound"):
        b(torch.tensor([7.0, 4.0], requires_grad=True))  # a present loss is still checked


# --------------------------------------------------------------------------------------------
# loading through a parent module


class _Net(torch.nn.Module):
    def __init__(self, name: str = "famo", K: int = 2) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(3, 3)
        self.balancer = tb.create(name, num_tasks=K)


def _trained(name: str = "famo", K: int = 2) -> _Net:
    net = _Net(name, K)
    for step in range(3):
        values = torch.rand(K, generator=torch.Generator().manual_seed(step)) + 0.5
        net.balancer(values.requires_grad_())
    return net


def test_backbone_only_checkpoint_loads_with_strict_false():
    net = _trained()
    before = {k: v.clone() for k, v in net.balancer.state_dict().items() if torch.is_tensor(v)}
    backbone = {k: v for k, v in _Net().state_dict().items() if k.startswith("trunk.")}
    result = net.load_state_dict(backbone, strict=False)
    assert torch.equal(net.trunk.weight, backbone["trunk.weight"])
    balancer_keys = {f"balancer.{k}" for k in net.balancer.state_dict()}
    assert set(result.missing_keys) == balancer_keys
    assert len(result.missing_keys) == len(balancer_keys)  # each reported once
    after = net.balancer.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict(backbone)


@pytest.mark.parametrize("other", [("famo", 3), ("dwa", 2)])
def test_mismatched_balancer_in_parent_load_is_listed_and_atomic(other):
    net = _trained()
    before = {k: v.clone() for k, v in net.balancer.state_dict().items() if torch.is_tensor(v)}
    state = _trained(*other).state_dict()
    with pytest.raises(RuntimeError, match="state_dict: cannot load into famo") as caught:
        net.load_state_dict(state, strict=False)
    assert "Missing key" not in str(caught.value)  # present submodule keys are not "missing"
    after = net.balancer.state_dict()
    for key, value in before.items():  # the submodule (Adam moments) is untouched too
        assert torch.equal(value, after[key]), key


def test_direct_load_error_names_the_mismatch():
    b = tb.create("dwa", num_tasks=2, temperature=2.0)
    with pytest.raises(RuntimeError, match=r"temperature: saved 1.0, here 2.0"):
        b.load_state_dict(tb.create("dwa", num_tasks=2, temperature=1.0).state_dict())


def test_allowed_dtype_hyperparameter_change_loads():
    old = tb.create("mgda", num_tasks=2, gram_dtype=torch.float64)
    old.compute_weights(torch.tensor([1.0, 2.0]), gram=torch.eye(2, dtype=torch.float64))
    new = tb.create("mgda", num_tasks=2)
    new.allow_changed_hyperparameters("gram_dtype").load_state_dict(old.state_dict())
    assert new.gram_dtype == torch.float32
    assert int(new.num_steps) == 1


# --------------------------------------------------------------------------------------------
# logging before the first step


@pytest.mark.parametrize("name", ["dwa", "mgda"])
def test_log_dict_reports_no_loss_before_the_first_step(name):
    b = tb.create(name, num_tasks=2)
    logged = b.log_dict()
    assert math.isnan(logged["balancer/loss/0"])
    assert math.isnan(logged["balancer/loss/1"])
    assert not any("/cos/" in key for key in logged)
    b.compute_weights(torch.tensor([2.0, 3.0]), gram=torch.eye(2) if b.requires_gram else None)
    assert b.log_dict()["balancer/loss/1"] == 3.0


# --------------------------------------------------------------------------------------------
# DDP: configuration checks before any K-sized collective, presence over the group


def _ddp_scenarios(rank: int) -> dict:
    out: dict = {}
    K = 3 if rank == 0 else 4
    other_k = tb.create("ew", num_tasks=K)
    out["K"] = _error(lambda: other_k(torch.ones(K, requires_grad=True)))
    kpi_method = tb.create("dtp" if rank == 0 else "ew", num_tasks=2)
    out["kpis"] = _error(
        lambda: kpi_method(torch.ones(2, requires_grad=True), kpis=torch.tensor([0.5, 0.5]))
    )
    # Still in step after both refusals: a well-configured call goes through on both ranks.
    fine = tb.create("ew", num_tasks=2)
    out["after"] = fine(torch.tensor([1.0, 2.0 + rank], requires_grad=True)).item()
    out["after_loss"] = fine.log_dict()["balancer/loss/1"]
    # Rank 1's batch has no labels at all: accepted, task 0 comes from rank 0 alone.
    dwa = tb.create("dwa", num_tasks=2)
    present = [True, False] if rank == 0 else [False, False]
    losses = torch.tensor([2.0, math.nan]) if rank == 0 else torch.full((2,), math.nan)
    out["absent_error"] = _error(lambda: dwa(losses.requires_grad_(True), present=present))
    out["absent_logged"] = dwa.log_dict()
    out["absent_weights"] = dwa.weights
    # The same with a gradient method: rank 1's losses are means over zero samples (NaN).
    mgda = tb.create("mgda", num_tasks=2)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    n = 4 if rank == 0 else 0
    mgda_losses = torch.stack([(z[:n, 0] ** 2).mean(), (z[:n, 1] ** 2).mean()])
    present = [True, True] if rank == 0 else [False, False]
    mgda(mgda_losses, features=z, present=present).backward()
    out["mgda_weights"] = mgda.weights
    out["mgda_grad_finite"] = bool(torch.isfinite(z.grad).all())
    # No rank has any task: refused on every rank, state unchanged.
    out["none"] = _error(lambda: dwa(torch.ones(2, requires_grad=True), present=[False, False]))
    out["none_steps"] = int(dwa.num_steps)
    # DTP's KPIs average over the ranks that have the task, like the losses.
    dtp = tb.create("dtp", num_tasks=2)
    kpis = torch.tensor([0.2, 0.4]) if rank == 0 else torch.tensor([0.6, 0.9])
    dtp(torch.ones(2, requires_grad=True), kpis=kpis, present=[True, rank == 0])
    out["dtp_kpis"] = dtp.smoothed_kpis.clone()
    # FAMO's same-batch update with partial labels: each task's mean over the ranks that have
    # it, as at the call (rank 1 lacks task 1 and passes NaN for it)
    famo = tb.create("famo", num_tasks=2, delta="same_batch", weight_decay=0.0)
    present = [True, rank == 0]
    before = torch.tensor([2.0, 5.0]) if rank == 0 else torch.tensor([4.0, math.nan])
    after = torch.tensor([1.5, 4.0]) if rank == 0 else torch.tensor([3.5, math.nan])
    famo(before.requires_grad_(True), present=present)
    famo.update(after, present=present)
    out["famo_logits"] = famo.logits.clone()
    # A rank whose update is refused (a present loss is NaN): every rank raises, logits kept
    bad = torch.tensor([math.nan, 4.0]) if rank == 1 else torch.tensor([1.0, 3.0])
    out["famo_refused"] = _error(lambda: famo.update(bad, present=[True, True]))
    out["famo_logits_kept"] = famo.logits.clone()
    return out


def _ddp_worker(rank: int, store: str, out_dir: str) -> None:
    with gloo_group(rank, store):
        torch.save(_ddp_scenarios(rank), Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory: pytest.TempPathFactory) -> list:
    return run_ranks(_ddp_worker, tmp_path_factory.mktemp("core_fixes_ddp"))


def test_ddp_famo_same_batch_update_averages_over_the_ranks_that_have_the_task(ddp_ranks):
    """Without present=, rank 1 had to pass some value for a task it lacks, which entered the
    task's mean: δ then came from a loss no batch had (known limit, fixed)."""
    alone = tb.create("famo", num_tasks=2, delta="same_batch", weight_decay=0.0)
    alone(torch.tensor([3.0, 5.0], requires_grad=True))  # the means at the call
    alone.update(torch.tensor([2.5, 4.0]))  # task 1: rank 0's alone
    assert alone.logits[0] != 0
    for rank, seen in enumerate(ddp_ranks):
        torch.testing.assert_close(seen["famo_logits"], alone.logits)
        expected = "losses[0] is nan" if rank == 1 else "a loss on another DDP rank is not finite"
        assert expected in seen["famo_refused"]
        assert torch.equal(seen["famo_logits_kept"], seen["famo_logits"])


def test_famo_same_batch_update_reads_no_absent_entry():
    b = tb.create("famo", num_tasks=3, delta="same_batch", weight_decay=0.0)
    two = tb.create("famo", num_tasks=2, delta="same_batch", weight_decay=0.0)
    b(torch.tensor([2.0, 5.0, 3.0], requires_grad=True))
    two(torch.tensor([2.0, 3.0], requires_grad=True))
    b.update(torch.tensor([1.5, math.nan, 2.0]), present=[True, False, True])
    two.update(torch.tensor([1.5, 2.0]))
    torch.testing.assert_close(b.logits[[0, 2]], two.logits)
    assert b.logits[1] == 0
    with pytest.raises(ValueError, match=r"losses\[1\] is nan"):
        b.update(torch.tensor([1.5, math.nan, 2.0]))  # without present=, every entry is read
    with pytest.raises(ValueError, match=r"present: expected shape \(3,\)"):
        b.update(torch.tensor([1.5, 4.0, 2.0]), present=[True, False])


def test_ddp_other_num_tasks_raises_clearly_on_every_rank(ddp_ranks):
    for rank, seen in enumerate(ddp_ranks):
        assert "DDP ranks disagree on ['num_tasks']" in seen["K"]
        assert f"num_tasks={3 if rank == 0 else 4}" in seen["K"]
        assert seen["after"] == 3.0 + rank  # Σ L with this rank's losses
        assert seen["after_loss"] == 2.5  # reduced over both ranks: they met in step


def test_ddp_method_with_and_without_kpis_raises_clearly_on_every_rank(ddp_ranks):
    for seen in ddp_ranks:
        assert "DDP ranks disagree on" in seen["kpis"]
        assert "'method'" in seen["kpis"]
        assert "'requires_kpis'" in seen["kpis"]


def test_ddp_rank_without_any_label_is_accepted(ddp_ranks):
    for seen in ddp_ranks:
        assert seen["absent_error"] == ""
        assert seen["absent_logged"]["balancer/loss/0"] == 2.0
        assert seen["absent_weights"][1] == 0
    assert torch.equal(ddp_ranks[0]["absent_weights"], ddp_ranks[1]["absent_weights"])
    assert torch.equal(ddp_ranks[0]["mgda_weights"], ddp_ranks[1]["mgda_weights"])
    assert all(seen["mgda_grad_finite"] for seen in ddp_ranks)


def test_ddp_no_task_on_any_rank_raises_on_every_rank(ddp_ranks):
    for seen in ddp_ranks:
        assert "every task is absent on every DDP rank" in seen["none"]
        assert seen["none_steps"] == 1


def test_ddp_kpis_average_over_the_ranks_that_have_the_task(ddp_ranks):
    for seen in ddp_ranks:
        assert torch.allclose(seen["dtp_kpis"], torch.tensor([0.4, 0.4]))


def test_famo_same_batch_update_leaves_an_absent_task_logit():
    b = tb.create("famo", num_tasks=2, delta="same_batch")
    b(torch.tensor([2.0, 5.0], requires_grad=True))
    b.update(torch.tensor([1.5, 4.0]))
    before = b.logits.clone()
    b(torch.tensor([1.0, math.nan], requires_grad=True), present=[True, False])
    b.update(torch.tensor([0.5, 1.0]))  # task 1's value is a placeholder
    assert b.logits[1] == before[1]
    assert b.logits[0] != before[0]
