"""Hardening of inputs, precision and state loading (issue 9), and the two property tests:
mixed call sequences leave the state of the good calls alone, and a corrupted state is refused
without touching the balancer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from conftest import (
    GRADIENT_METHODS,
    GRAM_METHODS,
    LOSS_METHODS,
    POSITIVE_METHODS,
    assert_same_state,
    call,
    gram_for,
    losses_for,
    make_balancer,
    snapshot,
)

K = 3
CALL_KINDS = ["good", "rejected", "skipped", "eval", "no_grad"]


def _good(b: tb.Balancer, step: int) -> None:
    call(b, losses_for(step, K).requires_grad_(True), step).backward()


def _other(b: tb.Balancer, kind: str, step: int) -> None:
    losses = losses_for(step, K).requires_grad_(True)
    if kind == "rejected":
        with pytest.raises((ValueError, TypeError)):
            call(b, losses[:2], step)
    elif kind == "skipped":
        bad = losses.detach().clone()
        bad[step % K] = math.nan
        objective = call(b, bad.requires_grad_(True), step)
        assert math.isnan(objective.item())
    elif kind == "eval":
        b.eval()
        b(losses)
        b.train()
    else:
        with torch.no_grad():
            b(losses)


@pytest.mark.parametrize("name", tb.available())
@settings(max_examples=8, deadline=None)
@given(kinds=st.lists(st.sampled_from(CALL_KINDS), min_size=1, max_size=12))
def test_property_only_good_calls_change_state(name, kinds):
    mixed = make_balancer(name, K, on_nonfinite="skip")
    clean = make_balancer(name, K, on_nonfinite="skip")
    step = 0
    for kind in kinds:
        if kind == "good":
            _good(mixed, step)
            _good(clean, step)
            step += 1
        else:
            _other(mixed, kind, step)
    assert_same_state(snapshot(clean), snapshot(mixed))


def _corruptions(name: str, state: dict) -> list[tuple[str, dict]]:
    other_method = "upgrad" if name != "upgrad" else "mgda"
    cases = [
        ("other K", make_balancer(name, K + 1).state_dict()),
        ("other method", make_balancer(other_method, K).state_dict()),
    ]
    for key in list(state):
        missing = dict(state)
        del missing[key]
        cases.append((f"missing {key}", missing))
        value = state[key]
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            poisoned = dict(state)
            poisoned[key] = value.clone().view(-1).index_fill(0, torch.tensor([0]), math.nan)
            cases.append((f"NaN in {key}", {**poisoned, key: poisoned[key].view(value.shape)}))
        if isinstance(value, torch.Tensor) and value.dtype == torch.long:
            cases.append((f"negative {key}", {**state, key: value - 10**6}))
            cases.append((f"fractional {key}", {**state, key: value.double() + 0.5}))
    return cases


@pytest.mark.parametrize("name", tb.available())
def test_corrupted_state_is_refused_and_changes_nothing(name):
    b = make_balancer(name, K)
    for step in range(3):
        _good(b, step)
    source = make_balancer(name, K)
    for step in range(5):
        _good(source, step)
    saved = source.state_dict()
    before = snapshot(b)
    for what, state in _corruptions(name, saved):
        with pytest.raises(RuntimeError, match="state_dict"):
            b.load_state_dict(state)
        assert_same_state(before, snapshot(b)), what
    b.load_state_dict(saved)  # the intact state still loads
    assert torch.equal(b.weights, source.weights)


def test_other_hyperparameters_are_refused_by_name_unless_allowed():
    saved = tb.create("dwa", num_tasks=K, temperature=2.0)
    _good(saved, 0)
    b = tb.create("dwa", num_tasks=K, temperature=1.0)
    with pytest.raises(RuntimeError, match=r"temperature: saved 2.0, here 1.0"):
        b.load_state_dict(saved.state_dict())
    b.allow_changed_hyperparameters("temperature").load_state_dict(saved.state_dict())
    assert b.temperature == 1.0
    assert int(b.num_steps) == 1
    with pytest.raises(ValueError, match=r"names: \['tempo'\] are not hyperparameters of dwa"):
        b.allow_changed_hyperparameters("tempo")


def test_missing_generator_state_is_a_clear_error():
    b = tb.create("rlw", num_tasks=K)
    state = b.state_dict()
    extra = dict(state["_extra_state"])
    del extra["generator"]
    with pytest.raises(RuntimeError, match=r"no valid random generator state \('generator'\)"):
        b.load_state_dict({**state, "_extra_state": extra})


def test_state_records_method_and_hyperparameters():
    extra = tb.create("famo", num_tasks=2, lr=0.1).state_dict()["_extra_state"]
    assert extra["method"] == "famo"
    assert extra["hyperparameters"]["lr"] == 0.1
    assert extra["hyperparameters"]["accumulation_steps"] == 1


# ------------------------------------------------------------------------------------------
# Item 1: params=.


def test_params_one_tensor_is_a_list_of_one():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 3)
    losses = torch.stack([((x @ weight.T) ** 2).mean(), (x @ weight.T).sum() ** 2 / 100])
    single = tb.create("mgda", num_tasks=2, params=weight)
    listed = tb.create("mgda", num_tasks=2, params=[weight])
    single(losses)
    listed(losses)
    assert torch.equal(single.weights, listed.weights)
    assert not torch.equal(single.weights, torch.ones(2))


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ("trunk", TypeError, r"params: expected shared parameters"),
        ([1.0], TypeError, r"params\[0\]: expected a tensor, got 1.0"),
        ([torch.ones(2)], ValueError, r"params\[0\]: the tensor does not require grad \(shape"),
        (3, TypeError, r"params: expected shared parameters"),
    ],
)
def test_bad_params_are_refused_at_construction(params, error, match):
    with pytest.raises(error, match=match):
        tb.create("upgrad", num_tasks=2, params=params)


def test_a_tied_weight_listed_twice_is_refused():
    # [*enc.parameters(), *dec.parameters()] holds a tied weight twice: its gradient entered
    # the Gramian and the update twice (UPGrad's weights 0.55/0.37/0.59 for 0.41/0.37/0.57).
    enc, dec = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    dec.weight = enc.weight
    listed = [*enc.parameters(), *dec.parameters()]
    with pytest.raises(ValueError, match=r"^params\[2\]: the same tensor as params\[0\]"):
        tb.create("upgrad", num_tasks=2, params=listed)
    groups = {"enc": enc.parameters(), "dec": dec.parameters()}
    with pytest.raises(
        ValueError, match=r"^params\['dec'\]\[0\]: the same tensor as params\['enc'\]\[0\]"
    ):
        tb.create(
            "upgrad", num_tasks=2, params=groups, heads="unweighted", group_aggregation="per_group"
        )
    # Listed once (model.parameters() deduplicates), it is accepted.
    tb.create("upgrad", num_tasks=2, params=list(dict.fromkeys(listed)))


def test_deepcopy_of_a_model_holding_a_parameters_mode_balancer_follows_the_copy():
    """Documented behaviour: a deep copy of a model that holds its balancer points the copy's
    balancer at the copied parameters (deepcopy's memo), so the copy trains on its own."""
    model = torch.nn.Module()
    model.trunk = torch.nn.Linear(3, 4)
    model.balancer = tb.create("mgda", num_tasks=2, params=model.trunk.parameters())
    twin = copy.deepcopy(model)
    assert twin.balancer.shared_params[0] is twin.trunk.weight
    assert model.balancer.shared_params[0] is model.trunk.weight


# ------------------------------------------------------------------------------------------
# Items 2 and 4: precision.


@pytest.mark.parametrize("name", ["si", "db_mtl", "nash_mtl", "fairgrad", "ew"])
def test_float16_losses_give_a_float32_objective_that_does_not_overflow(name):
    z = torch.ones(4, requires_grad=True)
    losses = torch.stack([(z * 1e-5).sum(), (z * 2e-5).sum()]).half()
    b = tb.create(name, num_tasks=2)
    kwargs = {"features": z} if b.requires_gram else {}
    objective = b(losses, **kwargs)
    assert objective.dtype == torch.float32
    assert math.isfinite(objective.item())


@pytest.mark.parametrize("name", ["famo", "gradnorm", "uw", "db_mtl", "dwa"])
def test_half_and_double_leave_the_state_dtypes_alone(name):
    b = make_balancer(name, K)
    dtypes = {key: t.dtype for key, t in b.state_dict().items() if isinstance(t, torch.Tensor)}
    b.half()
    b.double()
    assert {k: t.dtype for k, t in b.state_dict().items() if isinstance(t, torch.Tensor)} == dtypes
    for step in range(4):
        _good(b, step)
    assert bool(torch.isfinite(b.weights).all())


# ------------------------------------------------------------------------------------------
# Item 6: one rule for the Gramian.


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_integer_gramian_is_a_clear_error(name):
    b = make_balancer(name, K)
    with pytest.raises(TypeError, match=r"gram: expected a float32 or float64 Gramian"):
        b.compute_weights(losses_for(0, K), gram=torch.eye(K, dtype=torch.long))


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_asymmetric_gramian_is_refused_by_every_method(name):
    b = make_balancer(name, K)
    before = snapshot(b)
    gram = torch.tensor([[2.0, 5.0, 0.0], [-3.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match=r"gram: a Gramian G = J Jᵀ is symmetric"):
        b.compute_weights(losses_for(0, K), gram=gram)
    assert_same_state(before, snapshot(b))


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gramian_beyond_float64_headroom_is_refused(name):
    # Entries past 2**1000: the rules' sums of entries would overflow float64 (at 1.7e308
    # ConFIG returned w = 0 and Aligned-MTL equal weights, others NaN or no convergence).
    b = make_balancer(name, K)
    before = snapshot(b)
    gram = gram_for(0, K).double() * 1e301
    with pytest.raises(ValueError, match=r"gram: entries up to \d\.\d+e\+30[12] leave the weight"):
        b.compute_weights(losses_for(0, K), gram=gram)
    assert_same_state(before, snapshot(b))


@pytest.mark.parametrize("name", ["mgda", "gradvac", "upgrad", "aligned_mtl", "config"])
def test_float32_gramian_near_its_largest_value_is_symmetrised_without_overflow(name):
    # (G + Gᵀ)/2 in float32 overflowed to inf for entries above 1.7e38 and the weights came out
    # as if G were 1 (MGDA, GradVac: equal weights); a quarter of G has the same weights.
    gram = torch.tensor([[3e38, -1e38], [-1e38, 2e38]], dtype=torch.float32)
    near_max = make_balancer(name, 2).compute_weights(torch.ones(2), gram=gram)
    quarter = make_balancer(name, 2).compute_weights(torch.ones(2), gram=gram / 4)
    torch.testing.assert_close(near_max, quarter)


@pytest.mark.parametrize("name", ["pcgrad", "gradvac", "mgda", "upgrad", "dualproj", "cagrad"])
@pytest.mark.parametrize("normalization", ["loss", "loss+"])
def test_normalised_gramian_beyond_the_dtype_range_keeps_the_weights(name, normalization):
    # Losses of 2**-64 make G/(L_i·L_j) ~ 2**128, past float32: PCGrad and GradVac skipped
    # every projection (comparisons with inf), the others raised about a non-finite G. The
    # rules offered a normalisation have w(s²G) = w(G): the same weights as at 2**-8, which
    # map back to J through the normalisers (×2**56 here; MGDA keeps the normalised ones).
    gram = torch.tensor([[1.0, -1.0], [-1.0, 2.0]])
    balancer = make_balancer(name, 2, normalization=normalization)
    tiny = balancer.compute_weights(torch.full((2,), 2.0**-64), gram=gram)
    moderate = make_balancer(name, 2, normalization=normalization).compute_weights(
        torch.full((2,), 2.0**-8), gram=gram
    )
    mapped_back = 2.0**-56 if type(balancer).normalization_maps_back else 1.0
    torch.testing.assert_close(tiny * mapped_back, moderate, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("name", "exponent"), [("config", -1024), ("config", -1060), ("aligned_mtl", -1070)]
)
def test_subnormal_float64_gramian_gives_the_weights_of_its_scaled_copy(name, exponent):
    # Products of inverse norms overflow below ~1e-308 (ConFIG returned w = 0) and subnormal
    # entries lose bits (Aligned-MTL: [0.12, 0.32, 1.24] for [0.90, 0.67, -0.20]): a rule with
    # w(s²G) = w(G) runs on the Gramian scaled by a power of two.
    gram = torch.tensor([[5.0, -6.0, 2.0], [-6.0, 9.0, 2.0], [2.0, 2.0, 12.0]], dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    expected = make_balancer(name, 3).compute_weights(ones, gram=gram)
    scaled = make_balancer(name, 3).compute_weights(
        ones, gram=gram * 2.0 ** (exponent // 2) * 2.0 ** (exponent - exponent // 2)
    )
    torch.testing.assert_close(scaled, expected, rtol=1e-12, atol=0)


def test_gradnorm_refuses_a_step_that_would_overflow_its_float32_adam_moments():
    # Task gradients of norm ~1e21 square to ~1e42, past float32: the second moment was
    # stored as inf and every later step moved the weights by m/inf = 0, for good.
    gram = torch.tensor([[4.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)
    balancer = make_balancer("gradnorm", 2, gram_dtype=torch.float64)
    balancer.compute_weights(ones, gram=gram)
    before = snapshot(balancer)
    with pytest.raises(ValueError, match=r"losses: the balancer's Adam moments would leave"):
        balancer.compute_weights(ones, gram=gram * 2.0**140)
    assert_same_state(before, snapshot(balancer))
    first = balancer.compute_weights(ones, gram=gram)
    second = balancer.compute_weights(ones, gram=gram)
    assert not torch.equal(first, second)  # still learning


@pytest.mark.parametrize("name", GRAM_METHODS)
def test_rounding_asymmetry_is_symmetrised(name):
    gram = gram_for(0, K)
    nudged = gram.clone()
    nudged[0, 1] *= 1 + 1e-7
    a = make_balancer(name, K).compute_weights(losses_for(0, K), gram=nudged)
    b = make_balancer(name, K).compute_weights(losses_for(0, K), gram=(nudged + nudged.T) / 2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", GRAM_METHODS)
def test_compute_weights_keeps_a_float64_gramian_in_float64(name):
    b = make_balancer(name, K)
    weights = b.compute_weights(losses_for(0, K), gram=gram_for(0, K).double())
    assert weights.dtype == torch.float64
    assert b.weights.dtype == torch.float32


# Their weights are their own float32 state (learned logits, task weights, tracked λ); GradDrop
# refuses a Gramian (its direction is not Jᵀw: test_directions.py).
_NOT_FROM_THE_GRAMIAN = {"excess_mtl", "gradnorm", "moco", "graddrop"}


@pytest.mark.parametrize("name", [n for n in GRAM_METHODS if n not in _NOT_FROM_THE_GRAMIAN])
def test_float64_weights_are_not_float32_weights_in_disguise(name):
    """A float64 Gramian gives weights with float64 precision, not float32 ones cast up (that
    costs up to 5e-4 relative error in Jᵀw where it nearly cancels)."""
    b = make_balancer(name, K)
    weights = b.compute_weights(losses_for(0, K), gram=gram_for(0, K).double())
    assert not torch.equal(weights, weights.float().double()), weights


# The bfloat16 Gramian of five collinear gradients (one zero) is indefinite by its rounding:
# eigenvalue −2e-2 for λ_max = 34. As float32, that was beyond float32's rounding, and UPGrad
# and DualProj refused it ("not positive semi-definite") or hit their iteration cap.
_COLLINEAR = [[-1.253854064937262], [0.0], [-0.3107709425987801], [1.660490043177783], [5.404297]]


@pytest.mark.parametrize("name", [n for n in GRAM_METHODS if n != "graddrop"])
def test_a_half_precision_gramian_indefinite_by_its_rounding_gives_weights(name):
    J = torch.tensor(_COLLINEAR, dtype=torch.float64)
    G = (J @ J.T).to(torch.bfloat16)
    assert float(torch.linalg.eigvalsh(G.double())[0]) < -1e-3
    b = make_balancer(name, 5)
    weights = b.compute_weights(losses_for(0, 5), gram=G)
    assert weights.dtype == torch.float32
    assert bool(torch.isfinite(weights).all()), weights
    if name in ("upgrad", "dualproj"):
        # no conflict beyond bfloat16's rounding (√ε = 1/16) of the terms of d = Jᵀw (d is 0
        # here: the dual cone of opposite gradients is {0})
        w, norms = weights.double(), J.norm(dim=1)
        products = J @ (J.T @ w)
        assert float(products.min()) >= -(2**-4) * float(norms.max() * (w.abs() @ norms))


@st.composite
def _collinear_jacobians(draw):
    """Zero rows, and rows parallel or nearly opposite to the first (a 1e-3 part of another
    row added): the float32 Gramian of such rows is indefinite at its rounding level. Up to
    K = 14: UPGrad's solver takes its torch path from K = 9 and CAGrad's from K = 13."""
    K = draw(st.integers(2, 14))
    n = draw(st.integers(1, 3))
    # 0 or 1e-3 <= |x| <= 3: no entries whose squares underflow the Gramian's dtype
    entry = st.one_of(st.just(0.0), st.floats(1e-3, 3), st.floats(-3, -1e-3))
    first = torch.tensor(draw(st.lists(entry, min_size=n, max_size=n)), dtype=torch.float64)
    rows = [first]
    for _ in range(K - 1):
        kind = draw(st.sampled_from(["zero", "opposed", "parallel", "other"]))
        other = torch.tensor(draw(st.lists(entry, min_size=n, max_size=n)), dtype=torch.float64)
        factor = draw(st.floats(0.1, 5.0))
        if kind == "zero":
            rows.append(torch.zeros(n, dtype=torch.float64))
        elif kind == "opposed":
            rows.append(-factor * first + 1e-3 * other)
        elif kind == "parallel":
            rows.append(first * 10.0 ** draw(st.integers(-3, 2)))
        else:
            rows.append(other)
    return torch.stack(rows)


@settings(max_examples=60, deadline=None)
@given(_collinear_jacobians(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_gramians_of_collinear_gradients_give_finite_weights(J, dtype):
    """Found by a fuzz: CAGrad raised on 29 of 6,000 such float32 Gramians, and UPGrad and
    DualProj refused 15% of the bfloat16 ones. UPGrad's and DualProj's directions conflict
    with no task beyond the Gramian's rounding: √ε of the size of the terms of g_iᵀJᵀw (a
    review measured at most 1.1e-5 in float32)."""
    G = (J @ J.T).to(dtype)
    if not bool(torch.isfinite(G).all()):
        return
    K = J.shape[0]
    norms = J.norm(dim=1)
    for name in GRAM_METHODS:
        weights = make_balancer(name, K).compute_weights(losses_for(0, K), gram=G)
        assert bool(torch.isfinite(weights).all()), (name, weights)
        if name in ("upgrad", "dualproj"):
            w = weights.double()
            terms = float(norms.max() * (w.abs() @ norms))
            conflict = float((J @ (J.T @ w)).min())
            assert conflict >= -(torch.finfo(dtype).eps ** 0.5) * terms, (name, conflict, terms)


@pytest.mark.parametrize(
    ("computed", "given"), [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)]
)
def test_a_gramian_computed_in_a_coarser_precision_than_its_dtype_gives_weights(computed, given):
    """A float32 Gramian cast to float64 (for float64 weights), or a bfloat16 one from autocast
    cast to float32: indefinite beyond its dtype's rounding, within its own. Found by review:
    the first version of the refusal took these for matrices that are no Gramians."""
    generator = torch.Generator().manual_seed(1)
    J = (torch.randn(8, 3, generator=generator) @ torch.randn(3, 4096, generator=generator)).to(
        computed
    )
    G = (J @ J.T).to(given)  # rank 3 of 8
    eigenvalues = torch.linalg.eigvalsh(G.double())
    own = torch.finfo(given).eps ** 0.5 * float(eigenvalues[-1])
    assert float(eigenvalues[0]) < -own  # beyond its dtype's rounding
    for name in GRAM_METHODS:
        weights = make_balancer(name, 8).compute_weights(losses_for(0, 8).to(given), gram=G)
        assert weights.dtype == given
        assert bool(torch.isfinite(weights).all()), (name, weights)


def test_a_per_group_gramian_that_is_no_gramian_names_its_group():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    balancer = tb.create(
        "upgrad", num_tasks=2, params={"trunk": [a], "head": [b]}, group_aggregation="per_group"
    )
    gram = torch.stack([torch.eye(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]])])
    with pytest.raises(
        ValueError, match=r"not positive semi-definite .* \(the Gramian of group 'head'\)"
    ):
        balancer.compute_weights(losses_for(0, 2), gram=gram)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["upgrad", "mgda"])
def test_a_matrix_that_is_no_gramian_is_refused_and_changes_nothing(name, dtype):
    # UPGrad's closed form at K = 2 gave [[1, 2], [2, 1]] the weights (1/2, 1/2), silently
    b = make_balancer(name, 2)
    before = snapshot(b)
    for G, match in (
        ([[1.0, 2.0], [2.0, 1.0]], r"smallest eigenvalue -1.000e\+00"),
        ([[0.0, 1.0], [1.0, 0.0]], r"a row with a zero diagonal entry"),
        ([[1.0, 0.0], [0.0, -1.0]], r"a diagonal entry, a squared norm, is -1.000e\+00"),
    ):
        with pytest.raises(ValueError, match=rf"gram: G is not positive semi-definite \(.*{match}"):
            b.compute_weights(losses_for(0, 2), gram=torch.tensor(G, dtype=dtype))
    assert_same_state(before, snapshot(b))


@pytest.mark.parametrize("name", ["mgda", "upgrad", "imtl_g", "nash_mtl"])
def test_steps_between_refreshes_reuse_the_float64_weights(name):
    """With gram_dtype=float64, an update_every step applies the refresh step's float64
    weights, not their float32 rounding (the kept weights were a float32 buffer)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 4).double()
    x = torch.randn(8, 3, dtype=torch.float64)

    def balancer():
        return tb.create(
            name,
            num_tasks=2,
            params=list(layer.parameters()),
            gram_dtype=torch.float64,
            update_every=2,
            heads="weighted",
        )

    def losses():
        z = layer(x)
        return torch.stack([(z[:, :3] - 1).pow(2).mean(), (z[:, 1:] + 2).pow(2).mean()])

    b = balancer()
    b(losses()).backward()
    refreshed = b.weights
    assert refreshed.dtype == torch.float64
    assert not torch.equal(refreshed, refreshed.float().double()), refreshed
    reused = losses()
    objective = b(reused)
    assert torch.equal(b.weights, refreshed)
    assert objective.item() == torch.dot(refreshed, reused.detach()).item()
    restored = balancer()
    restored.load_state_dict(b.state_dict())
    assert torch.equal(restored.weights, refreshed)


# ------------------------------------------------------------------------------------------
# Item 8: messages.


def test_float64_loss_outside_float32_is_named_as_such():
    b = tb.create("ew", num_tasks=2)
    with pytest.raises(ValueError, match=r"losses\[1\] = 1e\+300 does not fit in float32"):
        b(torch.tensor([1.0, 1e300], dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("name", POSITIVE_METHODS)
def test_float64_loss_rounding_to_zero_is_named_as_such(name):
    b = make_balancer(name, K)
    losses = torch.tensor([1.0, 1e-50, 2.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"losses\[1\] = 1e-50 does not fit in float32"):
        call(b, losses)


def test_string_kpis_are_a_clear_error():
    b = tb.create("dtp", num_tasks=2)
    with pytest.raises(TypeError, match=r"kpis: expected a tensor or a sequence of 2 numbers"):
        b(torch.ones(2, requires_grad=True), kpis="abc")


def test_losses_on_two_devices_are_a_clear_error():
    b = tb.create("ew", num_tasks=2)
    with pytest.raises(ValueError, match=r"losses: expected every loss on one device"):
        b([torch.ones((), requires_grad=True), torch.ones((), device="meta")])


# ------------------------------------------------------------------------------------------
# log_dict.


def test_log_dict_names_weights_losses_and_cosines():
    b = tb.create("mgda", num_tasks=2)
    z = torch.tensor([1.0, 0.0], requires_grad=True)
    losses = torch.stack(
        [(z * torch.tensor([1.0, 0.0])).sum() + 2, (z * torch.tensor([1.0, 1.0])).sum() + 3]
    )
    b(losses, features=z)
    logged = b.log_dict(prefix="train/")
    assert logged["train/loss/0"] == 3.0
    assert logged["train/loss/1"] == 4.0
    assert logged["train/cos/0_1"] == pytest.approx(1 / math.sqrt(2))
    assert [logged[f"train/weight/{k}"] for k in range(2)] == b.weights.tolist()
    assert set(tb.create("ew", num_tasks=2).log_dict()) == {
        "balancer/weight/0",
        "balancer/weight/1",
        "balancer/loss/0",
        "balancer/loss/1",
    }


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_loop_options_are_hyperparameters_of_every_method(name):
    assert tb.hyperparameters(name)["accumulation_steps"] == 1
    assert tb.hyperparameters(name)["on_nonfinite"] == "raise"


def test_famo_negative_loss_points_to_min_losses():
    with pytest.raises(ValueError, match=r"losses\[1\] = -1.0: famo .* set min_losses= below"):
        tb.create("famo", num_tasks=2)(torch.tensor([1.0, -1.0], requires_grad=True))


@pytest.mark.parametrize("name", ["famo", "gradnorm", "upgrad", "dwa"])
def test_autocast_does_not_change_the_rule(name):
    """The weight rule runs in the balancer's own precision under a bf16 autocast step."""
    plain, cast = make_balancer(name, K), make_balancer(name, K)
    for step in range(4):
        _good(plain, step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _good(cast, step)
        assert torch.equal(plain.weights, cast.weights)


@pytest.mark.parametrize(
    ("name", "key", "old", "new", "attribute"),
    [
        ("fixed", "weights", [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], "fixed_weights"),
        ("dtp", "gamma", 2.0, 1.0, "gamma"),
        ("famo", "min_losses", 0.0, -1.0, "min_losses"),
    ],
)
def test_an_allowed_hyperparameter_change_takes_the_new_value(name, key, old, new, attribute):
    """Buffers that hold a hyperparameter keep the new value; the learned state is loaded."""
    saved = tb.create(name, num_tasks=K, **{key: old})
    for step in range(3):
        _good(saved, step)
    b = tb.create(name, num_tasks=K, **{key: new})
    expected = getattr(b, attribute).clone()
    b.allow_changed_hyperparameters(key).load_state_dict(saved.state_dict())
    assert torch.equal(getattr(b, attribute), expected)
    assert int(b.num_steps) == 3


def test_fixed_reports_its_new_weights_at_once_after_a_changed_resume():
    saved = tb.create("fixed", num_tasks=K, weights=[1.0, 2.0, 3.0])
    _good(saved, 0)
    b = tb.create("fixed", num_tasks=K, weights=[3.0, 2.0, 1.0])
    b.allow_changed_hyperparameters("weights").load_state_dict(saved.state_dict())
    assert b.weights.tolist() == [3.0, 2.0, 1.0]
    with torch.no_grad():  # an eval call uses the reported weights
        assert b(torch.tensor([1.0, 0.0, 0.0])).item() == 3.0


@pytest.mark.parametrize("name", ["uw", "imtl_l"])
def test_a_changed_init_keeps_the_learned_scales_weights(name):
    """init only sets the first log-scales, which the checkpoint replaces: the weights reported
    (and used by eval calls) stay those of the learned scales, not f(new init)."""
    saved = tb.create(name, num_tasks=K)
    optimiser = torch.optim.SGD(saved.parameters(), lr=0.5)
    for step in range(4):
        optimiser.zero_grad()
        _good(saved, step)
        optimiser.step()
    _good(saved, 4)  # weights of the current scales
    b = tb.create(name, num_tasks=K, init=0.5)
    b.allow_changed_hyperparameters("init").load_state_dict(saved.state_dict())
    assert torch.equal(b.log_scales.detach(), saved.log_scales.detach())
    assert torch.equal(b.weights, saved.weights)
    torch.testing.assert_close(b.weights, b.loss_factors(b.log_scales.detach()))
    losses = losses_for(5, K)
    with torch.no_grad():
        assert torch.equal(b(losses), saved(losses))


def test_uw_with_changed_kinds_reports_the_new_factors_on_the_loaded_scales():
    saved = tb.create("uw", num_tasks=K, kinds="regression")
    optimiser = torch.optim.SGD(saved.parameters(), lr=0.5)
    for step in range(3):
        optimiser.zero_grad()
        _good(saved, step)
        optimiser.step()
    b = tb.create("uw", num_tasks=K, kinds="classification")
    b.allow_changed_hyperparameters("kinds").load_state_dict(saved.state_dict())
    expected = torch.exp(-saved.log_scales.detach())  # factor 1 for classification
    torch.testing.assert_close(b.weights, expected)
    _good(b, 3)  # the next call's weights are the same
    torch.testing.assert_close(b.weights, expected)


def test_dtp_with_a_changed_gamma_reports_the_new_rule_on_the_loaded_kpis():
    saved = tb.create("dtp", num_tasks=K, gamma=2.0)
    for step in range(3):
        _good(saved, step)
    b = tb.create("dtp", num_tasks=K, gamma=1.0)
    b.allow_changed_hyperparameters("gamma").load_state_dict(saved.state_dict())
    smoothed = saved.smoothed_kpis.clamp(min=b.eps, max=1.0)
    torch.testing.assert_close(b.weights, -(1 - smoothed) * torch.log(smoothed))


def test_dtp_with_a_changed_eps_or_before_a_call_reports_what_the_next_call_uses():
    saved = tb.create("dtp", num_tasks=2)
    saved(torch.ones(2, requires_grad=True), kpis=torch.tensor([0.0, 0.5]))
    b = tb.create("dtp", num_tasks=2, eps=1e-2)  # eps is no buffer: the rule reads it
    b.allow_changed_hyperparameters("eps").load_state_dict(saved.state_dict())
    expected = -((1 - torch.tensor([1e-2, 0.5])) ** 2) * torch.log(torch.tensor([1e-2, 0.5]))
    torch.testing.assert_close(b.weights, expected)
    unused = tb.create("dtp", num_tasks=2)  # saved before its first call: initial weights
    b = tb.create("dtp", num_tasks=2, gamma=1.0)
    b.allow_changed_hyperparameters("gamma").load_state_dict(unused.state_dict())
    assert b.weights.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("name", ["pcgrad", "mgda"])
def test_two_threads_sharing_a_balancer_keep_their_calls_apart(name):
    """Item 9: per-call tensors live in the call's Step, not on the module, so concurrent calls
    cannot read each other's task gradients."""
    import threading

    b = tb.create(name, num_tasks=2)
    errors: list[Exception] = []

    def work(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        try:
            for _ in range(20):
                z = torch.randn(5, 3, generator=generator, requires_grad=True)
                losses = torch.stack([(z**2).sum(), (z[:, 0] * 3).sum()])
                objective = b(losses, features=z)
                objective.backward()
                assert z.grad is not None
                assert bool(torch.isfinite(z.grad).all())
        except Exception as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


@pytest.mark.parametrize("name", POSITIVE_METHODS)
def test_tiny_positive_float32_loss_is_refused_before_an_inf_weight(name):
    b = make_balancer(name, K)
    before = snapshot(b)
    with pytest.raises(ValueError, match=r"losses\[1\] = 1e-40: .* 1/L overflows float32"):
        call(b, torch.tensor([1.0, 1e-40, 2.0], requires_grad=True))
    assert_same_state(before, snapshot(b))


def test_signature_shows_the_method_keywords_and_the_loop_options():
    import inspect

    parameters = inspect.signature(tb.DWA).parameters
    assert list(parameters) == [
        "num_tasks",
        "temperature",
        "window",
        "accumulation_steps",
        "on_nonfinite",
    ]


def test_state_loads_with_weights_only(tmp_path):
    import numpy as np

    b = tb.create("fixed", num_tasks=2, weights=[np.float64(0.5), 2], accumulation_steps=2)
    _ = b(torch.ones(2, requires_grad=True))
    torch.save(b.state_dict(), tmp_path / "state.pt")
    other = tb.create("fixed", num_tasks=2, weights=[0.5, 2.0], accumulation_steps=2)
    other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert int(other.num_calls) == 1
