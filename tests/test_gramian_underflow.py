"""Task gradients below float32's range: a float32 Gramian would be rounding noise or zeros.

Every task gradient's norm below ~1e-19 puts ``G = J Jᵀ`` below float32's smallest normal
number (``2**-126``), and below ~1e-23 to zero: before the engine recomputed such a Gramian in
float64, most gradient methods silently returned equal, zero or one-hot weights there (MGDA,
UPGrad, CAGrad, PCGrad, GradVac, DB-MTL and Aligned-MTL equal ones, ConFIG, Nash-MTL and
FairGrad zeros, IMTL-G one-hot). Checked here against ``gram_dtype=torch.float64``, against
the same gradients at ordinary scale (scale-equivariant methods, on a well-conditioned
problem: a float64 Gramian's rank cut-offs are finer than a float32 one's), in parameters mode
and under per-group aggregation, under DDP (every rank widens alike), and the refusal of
weights that float32 cannot hold.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import taskbalance as tb
from conftest import assert_same_state, gloo_group, run_ranks, shared_parameter, snapshot
from taskbalance._gramian import _HOST_GRAM_MAX_K, _unscaled_gram
from taskbalance.methods._facts import SCALE_EQUIVARIANT, method_facts

K = 3
TINY = 2.0**-126
#: Scales the losses exactly (a power of two): the float32 task gradients are then exactly
#: 2**-90 times the ordinary ones (~1e-27, normal numbers) and G 2**-180 times (~1e-54).
UNDERFLOW = 2.0**-90
FACTS = {name: method_facts(tb.method_class(name)) for name in tb.available()}
GRADIENT = [
    name
    for name in tb.available()
    if tb.method_class(name).requires_gram and not FACTS[name].requires_params
]
EQUIVARIANT = [name for name in GRADIENT if SCALE_EQUIVARIANT in FACTS[name].claimed_properties]


def _problem(seed: int = 0) -> tuple[nn.Module, nn.ModuleList, torch.Tensor]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(K)])
    return trunk, heads, torch.randn(16, 6)


def _losses(
    trunk, heads, x, factor: float, values_too: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K losses times ``factor``, or (``values_too=False``) their gradients only."""
    z = trunk(x)
    targets = torch.linspace(-1.0, 1.0, K)
    losses = torch.stack(
        [((head(z).squeeze(1) - t) ** 2).mean() for head, t in zip(heads, targets, strict=True)]
    )
    if values_too:
        return z, losses * factor
    return z, losses.detach() + factor * (losses - losses.detach())


def _weights(
    name: str, factor: float, gram_dtype: torch.dtype, values_too: bool = True
) -> torch.Tensor:
    trunk, heads, x = _problem()
    torch.manual_seed(1)  # the same draws for the random methods (GradDrop)
    b = tb.create(name, num_tasks=K, gram_dtype=gram_dtype)
    z, losses = _losses(trunk, heads, x, factor, values_too)
    b(losses, features=z).backward()
    return b.weights.double()


# ---------------------------------------------------------------------------------------------
# The flag itself.


@pytest.mark.parametrize("num_tasks", [2, _HOST_GRAM_MAX_K + 1])
def test_unscaled_gram_flags_a_float32_gramian_below_the_normal_range(num_tasks):
    eye = torch.eye(num_tasks, dtype=torch.float64)
    scale = 2.0**16
    for others, largest, normal in (
        (0.0, TINY, True),
        (TINY, TINY, True),
        (TINY / 4, TINY, False),  # a non-zero subnormal norm next to a normal one
        (TINY / 4, 1.0, False),
        (TINY / 8, TINY / 2, False),
        (0.0, 0.0, False),
        (0.25, 1.0, True),
    ):
        diagonal = torch.full((num_tasks,), others, dtype=torch.float64)
        diagonal[-1] = largest
        raw = (torch.diag(diagonal) * scale**2).float()
        gram, finite, got = _unscaled_gram(raw, scale)
        assert finite
        assert got is normal, (others, largest, got)
        assert gram.dtype == torch.float32
        # Float64 holds far smaller entries: never flagged.
        assert _unscaled_gram(raw.double(), scale)[2] is True
    # A stack of per-group Gramians: one block below the range is enough.
    stack = torch.stack([eye, eye * TINY / 2]).float()
    assert _unscaled_gram(stack, 1.0)[2] is False
    assert _unscaled_gram(torch.stack([eye, eye]).float(), 1.0)[2] is True


# ---------------------------------------------------------------------------------------------
# tb.gramian and the balancers.


def test_gramian_below_float32s_range_is_the_float64_one_rounded():
    trunk, heads, x = _problem()
    z, losses = _losses(trunk, heads, x, UNDERFLOW)
    rows = torch.stack(
        [
            torch.autograd.grad(losses[k], z, retain_graph=True)[0].flatten().double()
            for k in range(K)
        ]
    )
    reference = rows @ rows.T  # ~1e-54: zero in float32, exact-ish in float64
    assert reference.diagonal().max() < TINY
    wide = tb.gramian(losses, z, dtype=torch.float64)
    torch.testing.assert_close(wide, reference, rtol=1e-6, atol=0)
    narrow = tb.gramian(losses, z)
    assert narrow.dtype == torch.float32
    assert torch.equal(narrow, wide.float())
    # At ordinary scale the float32 Gramian is 2**180 times it (an exact power of two).
    z, losses = _losses(trunk, heads, x, 1.0)
    torch.testing.assert_close(
        tb.gramian(losses, z).double() * UNDERFLOW**2, wide, rtol=1e-5, atol=0
    )


def test_zero_task_gradients_give_a_zero_gramian_and_finite_weights():
    z = torch.randn(4, 3, requires_grad=True)
    losses = torch.stack([(z * 0).sum() + k for k in range(K)])  # reached, gradient 0
    assert torch.equal(tb.gramian(losses, z), torch.zeros(K, K))
    b = tb.create("mgda", num_tasks=K)
    b(losses, features=z).backward()
    assert torch.isfinite(b.weights).all()


@pytest.mark.parametrize("name", GRADIENT)
def test_float32_gramian_weights_match_float64_below_float32s_range(name):
    narrow = _weights(name, UNDERFLOW, torch.float32)
    wide = _weights(name, UNDERFLOW, torch.float64)
    assert torch.isfinite(narrow).all(), narrow
    torch.testing.assert_close(narrow, wide, rtol=1e-4, atol=1e-6 * float(wide.abs().max()))


@pytest.mark.parametrize("name", EQUIVARIANT)
def test_scale_equivariant_weights_do_not_change_below_float32s_range(name):
    # w(s²G) = w(G): with the gradients (not the loss values) × 2**-90, the ordinary weights.
    torch.testing.assert_close(
        _weights(name, UNDERFLOW, torch.float32, values_too=False),
        _weights(name, 1.0, torch.float32),
        rtol=1e-4,
        atol=1e-5,
    )


def test_per_group_gramian_widens_the_group_below_the_range():
    torch.manual_seed(0)
    near, far = nn.Linear(6, 4), nn.Linear(6, 4)
    x = torch.randn(16, 6)
    results = []
    for gram_dtype in (torch.float32, torch.float64):
        b = tb.create(
            "mgda",
            num_tasks=2,
            params={"near": near.parameters(), "far": far.parameters()},
            group_aggregation="per_group",
            heads="unweighted",
            gram_dtype=gram_dtype,
        )
        # far's gradients are 2**-90 times its ordinary ones: its Gramian underflows float32.
        z = near(x) + far(x) * UNDERFLOW
        losses = torch.stack([(z[:, 0] - z[:, 1]).pow(2).mean(), (z[:, 2] + z[:, 3]).pow(2).mean()])
        b(losses).backward()
        results.append(b.group_weights.double())
    narrow, wide = results
    assert not torch.allclose(wide[1], torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(narrow, wide, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["upgrad", "graddrop", "moco"])
def test_parameters_mode_widens_too(name):
    # GradDrop's shares are ratios of squared row norms, summed in the Gramian's dtype.
    parameter = shared_parameter()
    narrow_and_wide = []
    for gram_dtype in (torch.float32, torch.float64):
        torch.manual_seed(3)
        directions = torch.randn(K, *parameter.shape)
        b = tb.create(name, num_tasks=K, params=[parameter], gram_dtype=gram_dtype)
        losses = (directions * parameter).flatten(1).sum(1) * UNDERFLOW
        b(losses).backward()
        narrow_and_wide.append(b.weights.double())
    narrow, wide = narrow_and_wide
    assert wide.abs().min() > 1e-3  # no weight is an underflow's 0
    torch.testing.assert_close(narrow, wide, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gram_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["nash_mtl", "fairgrad"])
def test_weights_beyond_float32s_range_are_refused_without_a_state_change(name, gram_dtype):
    # Their weights grow as 1/‖g‖: with gradients of norm ~1e-41 (float32 subnormals), ~1e41,
    # which neither the float32 objective nor (gram_dtype float32) the kept weights can hold.
    trunk, heads, x = _problem()
    b = tb.create(name, num_tasks=K, gram_dtype=gram_dtype)
    z, losses = _losses(trunk, heads, x, 1.0)
    b(losses, features=z).backward()
    before = snapshot(b)
    z, losses = _losses(trunk, heads, x, 2.0**-135, values_too=False)
    with pytest.raises(ValueError, match=r"^losses: .*beyond torch\.float32's range"):
        b(losses, features=z)
    assert_same_state(before, snapshot(b))


# ---------------------------------------------------------------------------------------------
# DDP: the decision is taken on the reduced Gramian, so both ranks widen and agree.


def _ddp_worker(rank: int, store: str, out_dir: str) -> None:
    with gloo_group(rank, store):
        out = {}
        for mode in ("features", "params"):
            for gram_dtype in (torch.float32, torch.float64):
                trunk, heads, _ = _problem()
                torch.manual_seed(10 + rank)
                x = torch.randn(16, 6)
                params = list(trunk.parameters()) if mode == "params" else None
                b = tb.create("mgda", num_tasks=K, params=params, gram_dtype=gram_dtype)
                z, losses = _losses(trunk, heads, x, UNDERFLOW)
                b(losses, features=None if params else z).backward()
                out[f"{mode}-{gram_dtype}"] = b.weights.double()
        torch.save(out, f"{out_dir}/rank{rank}.pt")


def test_ddp_ranks_widen_alike(tmp_path):
    rank0, rank1 = run_ranks(_ddp_worker, tmp_path, 2)
    for mode in ("features", "params"):
        narrow, wide = rank0[f"{mode}-torch.float32"], rank0[f"{mode}-torch.float64"]
        assert torch.equal(narrow, rank1[f"{mode}-torch.float32"])
        assert not torch.allclose(narrow, torch.full((K,), 1 / K, dtype=torch.float64))
        torch.testing.assert_close(narrow, wide, rtol=1e-4, atol=1e-6)
