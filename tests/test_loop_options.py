"""The training-loop options every method takes: eval calls, accumulation, non-finite skips,
present masks and several shared tensors (issue 8 items 2, 3, 6, 8, 9)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import taskbalance as tb
from conftest import (
    FEATURE_METHODS,
    LOSS_METHODS,
    assert_same_state,
    call,
    kpis_for,
    loss_gradient,
    losses_for,
    make_balancer,
    snapshot,
)

K = 3


def _run(b: tb.Balancer, steps: range) -> list[torch.Tensor]:
    out = []
    for step in steps:
        call(b, losses_for(step, K).requires_grad_(True), step).backward()
        out.append(b.weights)
    return out


# ------------------------------------------------------------------------------------------
# Item 3: eval() and no_grad calls change no state.


def test_eval_and_no_grad_calls_change_no_state(loss_method):
    b = make_balancer(loss_method, K)
    _run(b, range(3))
    before = snapshot(b)
    weights = b.weights
    losses = losses_for(7, K)
    b.eval()
    objective = b(losses.clone().requires_grad_(True))  # no features needed: nothing measured
    torch.testing.assert_close(objective, (weights * losses).sum())
    assert_same_state(before, snapshot(b))
    b.train()
    with torch.no_grad():
        objective = b(losses, kpis=kpis_for(0, K))
    torch.testing.assert_close(objective, (weights * losses).sum())
    assert_same_state(before, snapshot(b))


def test_a_backward_through_an_eval_mode_objective_warns():
    """model.eval() (to freeze BatchNorm, say) also puts a balancer the model holds in eval
    mode, whose calls then train on fixed weights without advancing. Only a backward tells
    that from a validation call: it warns there, and validation calls stay silent."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {"trunk": torch.nn.Linear(4, 3), "balancer": tb.create("mgda", num_tasks=2)}
    )
    balancer = model["balancer"]
    x = torch.randn(8, 4)

    def losses_and_features() -> tuple[torch.Tensor, torch.Tensor]:
        z = model["trunk"](x)
        return torch.stack([z[:, 0].pow(2).mean(), (z[:, 1] - 1).pow(2).mean()]), z

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses, z = losses_and_features()
        balancer(losses, features=z)  # validation with autograd on, no backward
        with torch.no_grad():
            balancer(*losses_and_features()[:1])
    losses, z = losses_and_features()
    objective = balancer(losses, features=z)
    with pytest.warns(
        RuntimeWarning, match=r"mgda: an objective the balancer returned in eval"
    ) as record:
        objective.backward()
    assert record[0].filename == __file__  # the call's line, not the library's
    assert int(balancer.num_steps) == 0
    for constant in (tb.create("ew", num_tasks=2), tb.create("fixed", num_tasks=2, weights=2.0)):
        constant.eval()  # weights that never change: eval mode trains on the same ones
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            constant(losses_and_features()[0]).backward()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses, z = losses_and_features()
        balancer(losses, features=z).backward()
    assert int(balancer.num_steps) == 1


# ------------------------------------------------------------------------------------------
# Item 2: accumulation_steps.


@pytest.mark.parametrize("N", [2, 3])
def test_accumulation_window_equals_one_step_per_window(loss_method, N):
    """Weights are fixed within a window; the state advances once per window, from the
    window's first call, exactly as a balancer called once per window."""
    plain = make_balancer(loss_method, K)
    accumulated = make_balancer(loss_method, K, accumulation_steps=N)
    for window in range(5):
        call(plain, losses_for(window, K).requires_grad_(True), window).backward()
        for micro in range(N):
            step = window if micro == 0 else 100 + 7 * window + micro  # others: unread
            losses = losses_for(step, K).requires_grad_(True)
            call(accumulated, losses, window).backward()
            assert torch.equal(accumulated.weights, plain.weights), (window, micro)
            torch.testing.assert_close(losses.grad, loss_gradient(accumulated))
    assert int(accumulated.num_steps) == int(plain.num_steps) == 5
    assert int(accumulated.num_calls) == 5 * N


@pytest.mark.parametrize("loss_method", ["famo", "rlw", "dwa"])
def test_end_window_starts_a_new_window_at_the_next_call(loss_method):
    """Windows of 3, the optimiser stepping after 3, 3 and 1 calls with end_window() at each
    step, are the windows of a balancer fed one call per window: the short window's call
    computes new weights, and the next window starts afresh instead of sharing its weights."""
    N = 3
    ended = make_balancer(loss_method, K, accumulation_steps=N)
    reference = make_balancer(loss_method, K)
    calls = 0
    for window, size in enumerate([3, 3, 1, 3, 1]):
        for position in range(size):
            call(ended, losses_for(window, K).requires_grad_(True), calls)
            calls += 1
            if position == 0:
                call(reference, losses_for(window, K).requires_grad_(True), window)
            torch.testing.assert_close(ended.weights, reference.weights)
        ended.end_window()
        assert int(ended.num_calls) % N == 0
        assert int(ended.num_steps) == window + 1


def test_end_window_after_a_full_window_or_without_accumulation_does_nothing():
    b = tb.create("famo", num_tasks=2, accumulation_steps=2)
    for _ in range(2):
        b(torch.tensor([1.0, 2.0], requires_grad=True))
    before = snapshot(b)
    b.end_window()
    assert_same_state(before, snapshot(b))
    plain = tb.create("famo", num_tasks=2)
    plain(torch.tensor([1.0, 2.0], requires_grad=True))
    before = snapshot(plain)
    plain.end_window()
    assert_same_state(before, snapshot(plain))


def test_end_window_is_saved_and_restored():
    b = tb.create("famo", num_tasks=2, accumulation_steps=4)
    b(torch.tensor([1.0, 2.0], requires_grad=True))
    b.end_window()
    restored = tb.create("famo", num_tasks=2, accumulation_steps=4)
    restored.load_state_dict(b.state_dict())
    for balancer in (b, restored):
        before = balancer.weights
        balancer(torch.tensor([3.0, 1.0], requires_grad=True))  # a new window: new weights
        assert not torch.equal(balancer.weights, before)
    torch.testing.assert_close(b.weights, restored.weights)


def test_accumulation_resumes_mid_window():
    reference = tb.create("dwa", num_tasks=K, window=2, accumulation_steps=3)
    expected = _run(reference, range(14))
    first = tb.create("dwa", num_tasks=K, window=2, accumulation_steps=3)
    got = _run(first, range(7))
    resumed = tb.create("dwa", num_tasks=K, window=2, accumulation_steps=3)
    resumed.load_state_dict(first.state_dict())
    got += _run(resumed, range(7, 14))
    for want, have in zip(expected, got, strict=True):
        assert torch.equal(want, have)


def test_changed_accumulation_steps_on_resume_starts_a_new_window():
    # Saved after two windows of 4 calls, resumed with windows of 3: each optimiser step's
    # micro-batches (3 calls) share one weight vector, set by the window's first call.
    first = tb.create("rlw", num_tasks=K, accumulation_steps=4, seed=0)
    _run(first, range(8))
    resumed = tb.create("rlw", num_tasks=K, accumulation_steps=3, seed=0)
    resumed.allow_changed_hyperparameters("accumulation_steps").load_state_dict(first.state_dict())
    assert int(resumed.num_calls) == 9
    assert int(resumed.num_steps) == 2
    for window in range(3):
        weights = _run(resumed, range(8 + 3 * window, 11 + 3 * window))
        assert all(torch.equal(w, weights[0]) for w in weights)
        assert int(resumed.num_steps) == 3 + window


def test_changed_accumulation_steps_is_refused_mid_window():
    first = tb.create("rlw", num_tasks=K, accumulation_steps=4, seed=0)
    _run(first, range(6))  # the second window holds 2 of its 4 calls
    resumed = tb.create("rlw", num_tasks=K, accumulation_steps=3, seed=0)
    before = snapshot(resumed)
    with pytest.raises(RuntimeError, match=r"middle of an accumulation window \(call 2 of "):
        resumed.allow_changed_hyperparameters("accumulation_steps").load_state_dict(
            first.state_dict()
        )
    assert_same_state(before, snapshot(resumed))
    first.end_window()  # the remedy the message names
    resumed.load_state_dict(first.state_dict())
    assert int(resumed.num_calls) == 9


def test_a_state_without_a_newer_option_loads_when_the_option_may_change():
    """A state saved before a loop option existed has no value for it: it counts as the
    option's default (windows of 1 call before accumulation_steps), not a KeyError."""
    first = tb.create("rlw", num_tasks=K, seed=0)
    _run(first, range(3))
    state = first.state_dict()
    del state["_extra_state"]["hyperparameters"]["accumulation_steps"]
    same = tb.create("rlw", num_tasks=K, seed=0)
    same.load_state_dict(state)
    assert int(same.num_calls) == 3
    resumed = tb.create("rlw", num_tasks=K, seed=0, accumulation_steps=2)
    with pytest.raises(RuntimeError, match=r"accumulation_steps: saved 1, here 2"):
        resumed.load_state_dict(state)
    resumed.allow_changed_hyperparameters("accumulation_steps").load_state_dict(state)
    assert int(resumed.num_calls) == 4
    assert int(resumed.num_steps) == 3


def test_a_state_without_a_newer_method_option_is_refused_unless_allowed():
    """A method option's default need not be how the method acted before the option existed
    (UPGrad regularised its Gramian before norm_eps, whose default is now exact): a state
    without it is refused by name, and loads once the change is allowed."""
    saved = make_balancer("upgrad", K)
    _run(saved, range(2))
    state = saved.state_dict()
    del state["_extra_state"]["hyperparameters"]["norm_eps"]
    resumed = make_balancer("upgrad", K)
    before = snapshot(resumed)
    with pytest.raises(
        RuntimeError, match=r"norm_eps: not in the state \(saved before the option existed\)"
    ):
        resumed.load_state_dict(state)
    assert_same_state(before, snapshot(resumed))
    resumed.allow_changed_hyperparameters("norm_eps").load_state_dict(state)
    assert int(resumed.num_steps) == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_accumulation_steps(bad):
    error = TypeError if isinstance(bad, (bool, float)) else ValueError
    with pytest.raises(error, match=r"accumulation_steps: expected an int >= 1"):
        tb.create("ew", num_tasks=2, accumulation_steps=bad)


def test_bad_on_nonfinite():
    with pytest.raises(ValueError, match=r"on_nonfinite: expected one of \['raise', 'skip'\]"):
        tb.create("mgda", num_tasks=2, on_nonfinite="ignore")


# ------------------------------------------------------------------------------------------
# Item 6: on_nonfinite="skip".


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_skip_returns_nan_objective_and_changes_no_state(loss_method, bad):
    b = make_balancer(loss_method, K, on_nonfinite="skip")
    _run(b, range(2))
    before = snapshot(b)
    losses = losses_for(5, K)
    losses[1] = bad
    losses.requires_grad_(True)
    objective = call(b, losses, 5)
    assert not math.isfinite(objective.item())
    objective.backward()
    assert not bool(torch.isfinite(losses.grad).all()), "GradScaler must see non-finite grads"
    assert_same_state(before, snapshot(b))
    assert torch.isnan(b.compute_weights(losses.detach(), **_extras(b))).all()
    assert_same_state(before, snapshot(b))


def _extras(b: tb.Balancer) -> dict:
    from conftest import gram_for

    kwargs = {}
    if b.requires_kpis:
        kwargs["kpis"] = kpis_for(0, K)
    if b.requires_gram:
        kwargs["gram"] = gram_for(0, K)
    return kwargs


@pytest.mark.parametrize("between_refreshes", [False, True])
@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_skip_on_nonfinite_task_gradients(name, between_refreshes):
    """Skipped (or refused) with no state change. Between refreshes (``update_every=2``'s
    second call), unweighted heads take the rows too, for their shift: a non-finite one is
    treated alike, so the refresh schedule does not move (num_steps counted it before)."""
    options = {"update_every": 2, "heads": "unweighted"} if between_refreshes else {}
    b = tb.create(name, num_tasks=2, on_nonfinite="skip", **options)
    z_good = torch.ones(3, requires_grad=True)
    b(torch.stack([(z_good**2).sum(), z_good.sum()]), features=z_good)  # a refresh step
    before = snapshot(b)
    z = torch.zeros(3, requires_grad=True)
    losses = torch.stack([torch.sqrt(z).sum() + 1.0, z.sum() + 1.0])  # d sqrt(z)/dz at 0 = inf
    objective = b(losses, features=z)
    assert math.isnan(objective.item())
    assert_same_state(before, snapshot(b))
    b.on_nonfinite = "raise"
    with pytest.raises(ValueError, match=r"features: the task gradients are not finite"):
        b(losses, features=z)
    assert_same_state(before, snapshot(b))


def test_finite_gradients_whose_float32_gramian_overflows_say_so():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    b = tb.create("upgrad", num_tasks=2, params=[p])
    losses = torch.stack([(p * 1e20).sum(), (p * -3e20).sum()])
    before = snapshot(b)
    with pytest.raises(
        ValueError,
        match=r"params: the task gradients are finite but their torch.float32 Gramian "
        r"overflows .* gram_dtype=torch.float64",
    ):
        b(losses)
    assert_same_state(before, snapshot(b))
    wide = tb.create("upgrad", num_tasks=2, params=[p], gram_dtype=torch.float64)
    wide(losses).backward()
    assert bool(torch.isfinite(p.grad).all())


def test_raise_mode_still_names_the_task():
    b = tb.create("ew", num_tasks=3)
    with pytest.raises(ValueError, match=r"losses\[2\] is nan.*on_nonfinite='skip'"):
        b(torch.tensor([1.0, 2.0, math.nan], requires_grad=True))


# ------------------------------------------------------------------------------------------
# Item 8: present masks.


def _nan_loss_of_absent_task(x: torch.Tensor) -> torch.Tensor:
    """The mean over zero labelled samples: NaN, with a graph."""
    return x[torch.zeros_like(x, dtype=torch.bool)].mean()


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_absent_task_gets_weight_zero_and_no_gradient(name):
    b = make_balancer(name, K)
    _run(b, range(2))
    x = torch.tensor([0.5, 1.0], requires_grad=True)
    head = [(x * (1 + k)).sum().abs() + 0.5 for k in range(K)]
    head[1] = _nan_loss_of_absent_task(x)
    kwargs = {"kpis": kpis_for(0, K)} if b.requires_kpis else {}
    present = torch.tensor([True, False, True])
    objective = b(torch.stack(head), present=present, **kwargs)
    assert math.isfinite(objective.item())
    assert b.weights[1] == 0
    objective.backward()
    assert bool(torch.isfinite(x.grad).all())
    assert b.log_dict()["balancer/loss/1"] == pytest.approx(losses_for(1, K)[1].item())


class _MaskedMeanModel(torch.nn.Module):
    """A trunk and two heads whose losses are masked means: ``(m · err).sum() / m.sum()``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(6, 8)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(2)])

    def losses(self, labelled: torch.Tensor, safe: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``safe``: divide by ``count.clamp_min(1)`` (0, with a finite backward, on a batch
        without labels) rather than by the count (0/0 = NaN, and a NaN backward)."""
        x, y = torch.linspace(-1, 1, 24).reshape(4, 6), torch.linspace(0, 1, 8).reshape(4, 2)
        z = torch.relu(self.trunk(x))
        losses = []
        for k, head in enumerate(self.heads):
            mask = labelled[:, k].to(z.dtype)
            count = mask.sum().clamp_min(1) if safe else mask.sum()
            losses.append((mask * (head(z).squeeze(1) - y[:, k]) ** 2).sum() / count)
        return torch.stack(losses), z


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("ew", {}),
        ("famo", {}),
        ("uw", {}),
        ("mgda", {}),
        ("upgrad", {}),  # unweighted heads
        ("graddrop", {}),  # the rule's own shift
        ("upgrad", {"params": "trunk"}),
        ("db_mtl", {"params": "trunk"}),  # its own direction, in parameters mode
    ],
)
def test_an_absent_tasks_nan_masked_mean_passes_no_gradient(name, options):
    """A masked mean over a batch without labels is 0/0 = NaN, and so is its backward for a
    zero weight: the model must get exactly the gradients it gets from the same loss written
    to be 0 there (the absent task contributes nothing either way), its head a zero one."""
    labelled = torch.tensor([[True, False]] * 4)
    present = torch.tensor([True, False])
    grads = {}
    for safe in (True, False):
        model = _MaskedMeanModel()
        if "params" in options:
            b = tb.create(name, num_tasks=2, params=list(model.trunk.parameters()))
        else:
            b = tb.create(name, num_tasks=2)
        for step in range(2):  # a first call with every task, then the absent one
            model.zero_grad()
            losses, z = model.losses(
                torch.ones(4, 2, dtype=torch.bool) if step == 0 else labelled, safe
            )
            kwargs = {"features": z} if b.requires_gram and "params" not in options else {}
            b(losses, present=None if step == 0 else present, **kwargs).backward()
        assert math.isnan(losses[1].item()) != safe
        grads[safe] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, grad in grads[True].items():
        assert bool(torch.isfinite(grads[False][n]).all()), n
        torch.testing.assert_close(grads[False][n], grad, rtol=1e-6, atol=1e-7, msg=n)
    assert torch.all(grads[False]["heads.1.weight"] == 0)
    assert torch.all(grads[False]["heads.1.bias"] == 0)


def test_an_absent_tasks_nan_loss_in_eager_mode_warns_nothing():
    model = _MaskedMeanModel()
    losses, _ = model.losses(torch.tensor([[True, False]] * 4), safe=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tb.create("ew", num_tasks=2)(losses, present=torch.tensor([True, False])).backward()


def test_an_absent_tasks_nan_loss_from_one_shared_node_warns():
    """K losses split from one tensor (or a compiled region's outputs): the node that computes
    them runs its whole backward, so the NaN cannot be kept out, and the call says so."""
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    per_task = (mask * x[:, None]).sum(0) / mask.sum(0)  # [K], NaN where no labels
    with pytest.warns(RuntimeWarning, match=r"losses\[1\] is nan .* one graph node"):
        tb.create("ew", num_tasks=2)(list(per_task), present=torch.tensor([True, False]))
    # Turned into an error (-W error), it refuses the call before any state changes.
    b = tb.create("famo", num_tasks=2)
    before = snapshot(b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="one graph node"):
            b(list(per_task), present=torch.tensor([True, False]))
    assert_same_state(before, snapshot(b))


def test_an_absent_tasks_nan_loss_gives_sparse_and_complex_parameters_their_zero_gradient():
    """What a finite loss gives: a sparse (empty) gradient to an embedding read with
    sparse=True, which SparseAdam takes, and a complex zero to a complex parameter."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 4)
    table = torch.nn.Embedding(5, 4, sparse=True)  # task 1's own
    rotation = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))  # task 1's own
    z = trunk(torch.randn(6, 3))
    labelled = torch.zeros(6)
    own = table(torch.tensor([1, 2])).sum() + (rotation * z[0].to(torch.complex64)).real.sum()
    losses = [(z**2).mean(), (labelled * own).sum() / labelled.sum()]  # 0/0 for task 1
    tb.create("ew", num_tasks=2)(losses, present=[True, False]).backward()
    assert table.weight.grad.is_sparse
    assert table.weight.grad.coalesce().values().numel() == 0
    torch.optim.SparseAdam(table.parameters()).step()
    assert rotation.grad is not None
    assert torch.all(rotation.grad == 0)
    assert bool(torch.isfinite(trunk.weight.grad).all())


def test_a_stack_behind_another_op_keeps_the_gradients_of_its_other_uses():
    """torch.where(present, stacked, nan) over finite losses: the stack is the user's, used
    elsewhere too; the balancer cuts only a bare stack, so those uses keep their gradient
    (a hook on that stack would drop it), and the call warns, as it cannot tell."""
    torch.manual_seed(0)
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(3)])
    z = torch.randn(6, 4)
    stacked = torch.stack([head(z).pow(2).mean() for head in heads])  # all finite
    present = torch.tensor([True, True, False])
    with pytest.warns(RuntimeWarning, match=r"losses\[2\] is nan .* the output of Where"):
        objective = tb.create("ew", num_tasks=3)(
            torch.where(present, stacked, math.nan), present=present
        )
    (objective + 0.1 * stacked.sum()).backward()
    expected = torch.autograd.grad(0.1 * heads[2](z).pow(2).mean(), heads[2].weight)[0]
    torch.testing.assert_close(heads[2].weight.grad, expected)


def test_an_absent_tasks_nan_loss_computed_in_one_piece_is_not_split():
    """Not stacked from K losses: nothing to cut, the zero weight runs through the vector's
    own backward, finite here (NaN put in by torch.where), NaN for a masked mean over no
    labels: the call warns, at the user's line, as it cannot tell the two apart."""
    b = tb.create("ew", num_tasks=2)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = torch.where(torch.tensor([True, False]), x * 3, math.nan)
    with pytest.warns(RuntimeWarning, match=r"losses\[1\] is nan .* the output of Where"):
        b(losses, present=torch.tensor([True, False])).backward()
    assert x.grad.tolist() == [3.0, 0.0]
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x.grad = None
    masked_means = (mask * x[:, None]).sum(0) / mask.sum(0)  # the molecule loop's [K] losses
    with pytest.warns(RuntimeWarning, match=r"clamp_min\(1\)") as record:
        b(masked_means, present=torch.tensor([True, False])).backward()
    assert record[0].filename == __file__
    assert not bool(torch.isfinite(x.grad).all())  # what the warning is about


@pytest.mark.parametrize("name", ["dwa", "gls", "si", "ew"])
def test_absent_task_statistics_see_no_new_value(name):
    """A loss-based rule reads the absent task's last mean loss again. (FAMO goes further:
    only the present tasks' logits learn, see tests/test_core_fixes.py.)"""
    masked = make_balancer(name, K)
    filled = make_balancer(name, K)
    _run(masked, range(2))
    _run(filled, range(2))
    losses = losses_for(2, K)
    carried = losses.clone()
    carried[1] = losses_for(1, K)[1]
    absent = torch.tensor([losses[0], math.nan, losses[2]], requires_grad=True)
    masked(absent, present=[True, False, True])
    filled(carried.requires_grad_())
    expected = filled.weights
    expected[1] = 0
    torch.testing.assert_close(masked.weights, expected)


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_gradient_methods_reuse_last_weights_with_an_absent_task(name):
    b = make_balancer(name, K)
    _run(b, range(2))
    last = b.weights
    z = torch.randn(4, 5, requires_grad=True)
    losses = [(z * (k + 1)).sum() ** 2 for k in range(K)]
    losses[1] = losses[1] * math.nan  # the absent task's loss: NaN, kept out of the backward
    b(losses, features=z, present=torch.tensor([True, False, True])).backward()
    expected = last.clone()
    expected[1] = 0
    torch.testing.assert_close(b.weights, expected)
    assert bool(torch.isfinite(z.grad).all())


@pytest.mark.parametrize(
    ("present", "error", "match"),
    [
        ([True, False], ValueError, r"present: expected shape \(3,\)"),
        (torch.tensor([1, 0, 1]), TypeError, r"present: expected a bool tensor"),
        ([False, False, False], ValueError, "every task is absent"),
        ("abc", TypeError, "present: expected a bool tensor"),
    ],
)
def test_bad_present_mask(present, error, match):
    b = tb.create("ew", num_tasks=3)
    with pytest.raises(error, match=match):
        b(torch.ones(3, requires_grad=True), present=present)


# ------------------------------------------------------------------------------------------
# Item 9: several shared tensors.


@pytest.mark.parametrize("name", ["mgda", "upgrad", "pcgrad", "cagrad"])
def test_features_list_gramian_sums_over_the_tensors(name):
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 4, generator=generator, requires_grad=True)
    z2 = torch.randn(6, 3, generator=generator, requires_grad=True)
    heads = [torch.randn(4, generator=generator) for _ in range(K)]
    heads2 = [torch.randn(3, generator=generator) for _ in range(K)]
    losses = torch.stack(
        [((z1 @ heads[k]) ** 2).mean() + ((z2 @ heads2[k]) ** 2).mean() for k in range(K)]
    )
    expected = tb.gramian(losses, z1) + tb.gramian(losses, z2)
    b = tb.create(name, num_tasks=K)
    b(losses, features=[z1, z2]).backward(retain_graph=True)
    reference = tb.create(name, num_tasks=K)
    torch.testing.assert_close(b.weights, reference.compute_weights(losses.detach(), gram=expected))
    # The unweighted-heads correction reaches both tensors: z_i.grad = J_iᵀ w.
    w = b.weights
    for z in (z1, z2):
        rows = torch.stack(
            [torch.autograd.grad(losses[k], z, retain_graph=True)[0] for k in range(K)]
        )
        torch.testing.assert_close(z.grad, torch.einsum("k,k...->...", w, rows))


def test_features_list_with_a_detached_tensor_names_it():
    b = tb.create("mgda", num_tasks=2)
    z = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"features\[1\]: the tensor does not require grad"):
        b(torch.stack([z.sum(), (2 * z).sum()]), features=[z, z.detach()])


@pytest.mark.parametrize("name", ["mgda", "upgrad", "pcgrad"])
def test_tasks_that_share_no_listed_tensor_are_named_in_features_mode(name):
    """Each task's batch through the trunk on its own (features=[za, zb]): the Gramian's cross
    entry is 0 whatever the gradients, which erases the conflict in the trunk (PCGrad and
    UPGrad become a plain sum). Correct for encoders that share nothing, so a warning (once
    per balancer) rather than a refusal; the engine tells each task's reach where the losses
    were stacked."""
    torch.manual_seed(0)
    trunk, head_a, head_b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)

    def losses_and_features() -> tuple[torch.Tensor, list[torch.Tensor]]:
        z_a, z_b = trunk(torch.randn(8, 4)), trunk(torch.randn(8, 4))
        return torch.stack([head_a(z_a).pow(2).mean(), head_b(z_b).pow(2).mean()]), [z_a, z_b]

    losses, features = losses_and_features()
    gram = tb.gramian(losses, features=features)
    assert gram[0, 1] == 0
    b = tb.create(name, num_tasks=2)
    apart = r"losses\[0\] and losses\[1\] reach no listed tensor in common \(losses\[0\]: "
    with pytest.warns(RuntimeWarning, match=apart + r"features\[0\]; losses\[1\]: features\[1\]\)"):
        b(losses, features=features).backward()
    torch.testing.assert_close(
        b.weights, tb.create(name, num_tasks=2).compute_weights(losses.detach(), gram=gram)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses, features = losses_and_features()
        b(losses, features=features).backward()  # once per balancer
        # A task absent from the batch does not count.
        losses, features = losses_and_features()
        tb.create(name, num_tasks=2)(losses, features=features, present=[True, False])
    # Turned into the call's error (-W error), it is said again at the next call.
    strict = tb.create(name, num_tasks=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses, features = losses_and_features()
        with pytest.raises(RuntimeWarning, match=apart):
            strict(losses, features=features)
    losses, features = losses_and_features()
    with pytest.warns(RuntimeWarning, match=apart):
        strict(losses, features=features)
    # Three tasks, the middle one reading both tensors: only the outer two are apart.
    z_a, z_b = trunk(torch.randn(8, 4)), trunk(torch.randn(8, 4))
    three = torch.stack(
        [head_a(z_a).mean(), (head_a(z_a) + head_b(z_b)).mean(), head_b(z_b).mean()]
    )
    with pytest.warns(RuntimeWarning, match=r"losses\[0\] and losses\[2\] reach no listed"):
        tb.create(name, num_tasks=3)(three, features=[z_a, z_b])


def test_a_skipped_micro_batch_keeps_the_windows_aligned():
    """A GradScaler skip inside a window must not shift every later window by one call."""
    b = tb.create("dwa", num_tasks=K, window=1, accumulation_steps=3, on_nonfinite="skip")
    reference = tb.create("dwa", num_tasks=K, window=1, accumulation_steps=3)
    for window in range(4):
        for micro in range(3):
            losses = losses_for(10 * window + micro, K)
            reference(losses.clone().requires_grad_(True))
            if window == 1 and micro == 1:
                losses[0] = math.inf
            b(losses.requires_grad_(True))
            assert torch.equal(b.weights, reference.weights), (window, micro)
    assert int(b.num_steps) == int(reference.num_steps) == 4


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_absent_task_outside_the_graph_is_not_refused(name):
    """An absent task's loss may be a constant (no labels, no head call): the engine must not
    take it for a task that reaches no shared tensor."""
    b = make_balancer(name, K)
    z = torch.randn(4, 5, requires_grad=True)
    losses = [(z * (k + 1)).sum() ** 2 for k in range(K)]
    losses[1] = torch.tensor(math.nan)
    b(losses, features=z, present=torch.tensor([True, False, True])).backward()
    assert b.weights[1] == 0
    assert bool(torch.isfinite(z.grad).all())
    # Without the mask the same constant is refused, naming the task.
    losses = [(z * (k + 1)).sum() ** 2 for k in range(K)]
    losses[1] = torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"losses\[1\]"):
        make_balancer(name, K)(losses, features=z)
