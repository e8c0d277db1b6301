"""Methods whose shared direction is not ``Jᵀw`` (issue 12, item 3), against independent
re-implementations of each paper's formula on an explicit Jacobian.

Each check runs a tiny trunk + heads model, computes the task gradients with plain
``torch.autograd.grad`` and the paper's update by hand, and compares the gradient the
balancer's one ordinary backward leaves on the shared tensors and on the heads.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import taskbalance as tb
from conftest import gloo_group, run_ranks

K = 3


def _model(seed: int = 0) -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(K)])
    return trunk, heads


def _losses(trunk, heads, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 4, generator=generator)
    y = torch.randn(8, K, generator=generator)
    z = trunk(x)
    losses = torch.stack(
        [((head(z).squeeze(1) - y[:, k]) ** 2).mean() for k, head in enumerate(heads)]
    )
    return z, losses


def _flat_grads(loss: torch.Tensor, tensors) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(tensors), retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


def _grad_of(tensors) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in tensors])


# ---------------------------------------------------------------------------------------------
# DB-MTL in parameters mode: the paper's EMA of gradient vectors


def _db_mtl_reference(steps: int, beta: float, beta_sigma: float, heads_weighted: bool):
    """LibMTL's / the paper's update written out: returns per step (d, head grads, α/(L+ε))."""
    trunk, heads = _model()
    params = list(trunk.parameters())
    ema = torch.zeros(K, sum(p.numel() for p in params))
    out = []
    for t in range(1, steps + 1):
        _, losses = _losses(trunk, heads, t)
        log_losses = torch.log(losses + 1e-8)
        log_grads = torch.stack([_flat_grads(log_losses[k], params) for k in range(K)])
        rate = beta / t**beta_sigma
        ema = log_grads + rate * (ema - log_grads)
        norms = ema.norm(dim=1)
        alpha = norms.max() / norms
        d = (alpha[:, None] * ema).sum(0)
        weights = alpha / (losses.detach() + 1e-8)
        # LibMTL backpropagates each log-loss, so unweighted heads get ∇ log(L_k + ε)
        head_losses = weights * losses if heads_weighted else log_losses
        head_grads = [_flat_grads(head_losses[k], heads[k].parameters()) for k in range(K)]
        out.append((d, head_grads, weights))
        with torch.no_grad():  # move the trunk along d so the steps differ
            offset = 0
            for p in params:
                p -= 0.1 * d[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
    return out


@pytest.mark.parametrize(
    ("beta", "beta_sigma", "heads"),
    [(0.9, 0.0, "unweighted"), (0.5, 0.5, "unweighted"), (0.9, 0.0, "weighted")],
)
def test_db_mtl_parameters_mode_is_the_papers_vector_ema(beta, beta_sigma, heads):
    expected = _db_mtl_reference(4, beta, beta_sigma, heads == "weighted")
    trunk, task_heads = _model()
    params = list(trunk.parameters())
    b = tb.create(
        "db_mtl", num_tasks=K, params=params, beta=beta, beta_sigma=beta_sigma, heads=heads
    )
    for t, (d, head_grads, weights) in enumerate(expected, start=1):
        _, losses = _losses(trunk, task_heads, t)
        trunk.zero_grad()
        task_heads.zero_grad()
        b(losses).backward()
        torch.testing.assert_close(_grad_of(params), d, rtol=1e-4, atol=1e-7)
        for k in range(K):
            torch.testing.assert_close(_grad_of(task_heads[k].parameters()), head_grads[k])
        torch.testing.assert_close(b.weights, weights, rtol=1e-5, atol=0)
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad


def test_db_mtl_parameters_mode_with_beta_zero_is_jtw_of_its_weights():
    """β = 0: ĝ_k is the current log-loss gradient, so d = Jᵀw with w = b.weights."""
    trunk, heads = _model(1)
    params = list(trunk.parameters())
    b = tb.create("db_mtl", num_tasks=K, params=params, beta=0.0)
    _, losses = _losses(trunk, heads, 0)
    J = torch.stack([_flat_grads(losses[k], params) for k in range(K)])
    b(losses).backward()
    torch.testing.assert_close(_grad_of(params), J.T @ b.weights, rtol=1e-5, atol=1e-7)


def test_db_mtl_features_mode_is_unchanged_jtw():
    trunk, heads = _model(2)
    b = tb.create("db_mtl", num_tasks=K)
    z, losses = _losses(trunk, heads, 0)
    Jz = torch.stack([_flat_grads(losses[k], [z]) for k in range(K)])
    (z_grad,) = torch.autograd.grad(b(losses, features=z), z)
    torch.testing.assert_close(z_grad.reshape(-1), Jz.T @ b.weights, rtol=1e-5, atol=1e-7)
    assert b.grad_averages.shape == (K, 0)


@pytest.mark.parametrize(
    ("mode", "reuse_rows"), [("features", False), ("params", False), ("params", True)]
)
def test_db_mtl_heads_train_on_their_log_losses(mode, reuse_rows):
    """LibMTL's DB_MTL backpropagates log(L_k + 1e-8) for each task, so head k gets
    ∇L_k / (L_k + 1e-8); an absent task's head gets nothing; the objective's value is still
    Σ L_k over the present tasks, as every unweighted-heads method's."""
    trunk, heads = _model(3)
    params = list(trunk.parameters())
    options = {"params": params, "reuse_rows": reuse_rows} if mode == "params" else {}
    b = tb.create("db_mtl", num_tasks=K, **options)
    for t, present in enumerate([None, torch.tensor([True, False, True])]):
        trunk.zero_grad()
        heads.zero_grad(set_to_none=True)
        z, losses = _losses(trunk, heads, t)
        objective = b(losses, features=z, present=present)
        objective.backward()
        _, reference = _losses(trunk, heads, t)
        shown = [k for k in range(K) if present is None or present[k]]
        torch.testing.assert_close(objective.detach(), reference[shown].sum().detach())
        for k in range(K):
            got = [p.grad for p in heads[k].parameters()]
            if k not in shown:
                assert all(g is None or not g.any() for g in got)
                continue
            expected = _flat_grads(torch.log(reference[k] + 1e-8), heads[k].parameters())
            torch.testing.assert_close(torch.cat([g.reshape(-1) for g in got]), expected)


def test_db_mtl_parameters_mode_refuses_compute_weights_without_changing_state():
    trunk, _ = _model()
    b = tb.create("db_mtl", num_tasks=K, params=trunk.parameters())
    before = {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"gram: db_mtl in parameters mode keeps an EMA"):
        b.compute_weights(torch.ones(K), gram=torch.eye(K))
    for key, value in b.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[key]), key


def test_db_mtl_parameters_mode_state_round_trip():
    def run(b, trunk, heads, steps):
        out = []
        for t in steps:
            _, losses = _losses(trunk, heads, t)
            trunk.zero_grad()
            b(losses).backward()
            out.append(_grad_of(trunk.parameters()).clone())
        return out

    trunk, heads = _model()
    reference = tb.create("db_mtl", num_tasks=K, params=trunk.parameters())
    expected = run(reference, trunk, heads, range(6))
    first = tb.create("db_mtl", num_tasks=K, params=trunk.parameters())
    run(first, trunk, heads, range(3))
    resumed = tb.create("db_mtl", num_tasks=K, params=trunk.parameters())
    resumed.load_state_dict(first.state_dict())
    for have, want in zip(run(resumed, trunk, heads, range(3, 6)), expected[3:], strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# GradDrop: sign-purity dropout at the shared activations (features) or parameters


def _graddrop_reference(rows, signs, leak, generator, uniform_dtype=torch.float64):
    """Algorithm 1 written out with per-sample rows ``[K, B, C]`` and ``sign(A)`` ``[B, C]``;
    ``U`` drawn in ``uniform_dtype`` (features mode: float64; parameters mode: the rows')."""
    G = (rows * signs).sum(1).double()  # [K, C]
    P = 0.5 * (1 + G.sum(0) / G.abs().sum(0))
    P = torch.nan_to_num(P, nan=0.5)
    U = torch.rand(G.shape[1], generator=generator, dtype=uniform_dtype).double()
    M = ((P > U) & (G > 0)) | ((P < U) & (G < 0))
    keep = leak + (1 - leak) * M.double()
    d = (rows * keep[:, None, :].float()).sum(0)
    shares = (keep * G**2).sum(1) / (G**2).sum(1)
    return d, shares.float()


@pytest.mark.parametrize("heads_option", ["unweighted", "weighted"])
@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_features_mode_is_algorithm_1(leak, heads_option):
    """The shared features get d whatever the heads get: their own gradients (the default,
    where the masks give the shift d − Σ_k ∇L_k directly) or the kept shares times them."""
    trunk, heads = _model(3)
    b = tb.create("graddrop", num_tasks=K, leak=leak, seed=5, heads=heads_option)
    generator = torch.Generator().manual_seed(5)
    for step in range(4):
        z, losses = _losses(trunk, heads, step)
        rows = torch.stack(
            [torch.autograd.grad(losses[k], z, retain_graph=True)[0] for k in range(K)]
        )
        d, shares = _graddrop_reference(rows, torch.sign(z.detach()), leak, generator)
        head_grads = [_flat_grads(losses[k], heads[k].parameters()) for k in range(K)]
        trunk.zero_grad()
        heads.zero_grad()
        objective = b(losses, features=z)
        (z_grad,) = torch.autograd.grad(objective, z, retain_graph=True)
        objective.backward()
        torch.testing.assert_close(z_grad, d, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.weights, shares, rtol=1e-5, atol=0)
        for k in range(K):
            share = 1.0 if heads_option == "unweighted" else float(b.weights[k])
            torch.testing.assert_close(_grad_of(heads[k].parameters()), share * head_grads[k])
    assert torch.equal(b.generator.get_state(), generator.get_state())


def test_graddrop_parameters_mode_masks_the_parameter_entries():
    trunk, heads = _model(4)
    params = list(trunk.parameters())
    b = tb.create("graddrop", num_tasks=K, params=params, seed=2)
    generator = torch.Generator().manual_seed(2)
    _, losses = _losses(trunk, heads, 0)
    J = torch.stack([_flat_grads(losses[k], params) for k in range(K)])
    # one draw per listed parameter, in order, as the balancer draws them
    expected, offset = [], 0
    for p in params:
        block = J[:, offset : offset + p.numel()]
        d, _ = _graddrop_reference(
            block[:, None, :], torch.ones(1, p.numel()), 0.0, generator, torch.float32
        )
        expected.append(d.reshape(-1))
        offset += p.numel()
    b(losses).backward()
    torch.testing.assert_close(_grad_of(params), torch.cat(expected), rtol=1e-5, atol=1e-7)


# The balancer's generator lives on the host; on an accelerator the draw is moved to the rows.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row_scale", [1.0, 2.0**16])
@pytest.mark.parametrize("minus_sum", [False, True])
@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_parameters_direction_is_algorithm_1_zeros_and_ties_included(
    leak, minus_sum, row_scale, device
):
    """Parameters mode keeps, per entry, the gradients of one sign (``s·max(s·G_k, 0)``):
    that is Algorithm 1's masks, where no gradient, one task's, and an exact tie P = U
    included, with the kept shares, one float32 draw, and the rows' scale taken out."""
    from taskbalance.methods._graddrop import _parameters_direction

    num_tasks, entries = 3, 4000
    G = torch.randn(num_tasks, entries, generator=torch.Generator().manual_seed(4))
    G[:, :50] = 0.0  # no gradient at all: nothing passes
    G[1, 50:100] = 0.0  # one task without a gradient there
    G[:, 100:150] = torch.tensor([1.0, -1.0, 1.0])[:, None]  # P = 2/3
    U = torch.rand(entries, generator=torch.Generator().manual_seed(9))  # the rule's draw
    # P = U exactly: G = (U, U − 1, 0), exact in float32 (U is a multiple of 2**-24)
    G[0, 150:200], G[1, 150:200], G[2, 150:200] = U[150:200], U[150:200] - 1, 0.0
    generator = torch.Generator().manual_seed(9)
    passed, total, d = _parameters_direction(
        (G * row_scale).to(device), leak, generator, row_scale, minus_sum
    )
    passed, total, d = passed.cpu(), total.cpu(), d.cpu()

    wide = G.double()
    P = torch.nan_to_num(0.5 * (1 + wide.sum(0) / wide.abs().sum(0)), nan=0.5)
    uniform = U.double()
    M = ((uniform < P) & (wide > 0)) | ((uniform > P) & (wide < 0))
    assert not M[:, :50].any()
    assert not M[:, 150:200].any()
    keep = leak + (1 - leak) * M.double()
    expected = (keep * wide).sum(0) - (wide.sum(0) if minus_sum else 0.0)
    torch.testing.assert_close(d.double(), expected, rtol=1e-6, atol=1e-6)
    if not leak and not minus_sum:  # the dropped entries are exactly 0
        assert not d[:50].any()
        assert not d[150:200].any()
    shares = (M.double() * wide**2).sum(1) / (wide**2).sum(1)
    torch.testing.assert_close(passed / total, shares, rtol=1e-6, atol=0)
    assert passed.dtype == total.dtype == torch.float64
    reference = torch.Generator().manual_seed(9)
    torch.rand(entries, generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_graddrop_parameters_mode_shares_of_gradients_a_float64_gramian_admits():
    """Gradients of 1e29 overflow float32 squares; a float64 Gramian admits them, and their
    kept shares are then summed in float64: the shares do not depend on the losses' scale."""
    shares = []
    for scale in (1.0, 1e30):
        torch.manual_seed(0)
        trunk, heads = nn.Linear(5, 8), [nn.Linear(8, 1) for _ in range(3)]
        b = tb.create("graddrop", num_tasks=3, params=trunk.parameters(), gram_dtype=torch.float64)
        z = trunk(torch.randn(16, 5))
        b(torch.stack([(head(z) ** 2).mean() * scale for head in heads])).backward()
        assert torch.isfinite(trunk.weight.grad).all()
        shares.append(b.weights.clone())
    assert (shares[0] > 0).all()
    torch.testing.assert_close(shares[1], shares[0], rtol=1e-5, atol=0)


def test_graddrop_parameters_direction_decides_near_float32s_largest():
    """Sums near float32's largest (which a float64 Gramian admits) decide without overflow:
    P = 1 − 5e-42 keeps the positive gradient at every draw, P = ½ keeps either side whole."""
    from taskbalance.methods._graddrop import _parameters_direction

    G = torch.tensor([[2e38] * 300 + [3e38] * 300, [-1e-3] * 300 + [-3e38] * 300])
    _, _, d = _parameters_direction(G, 0.0, torch.Generator().manual_seed(1), 1.0, False)
    assert torch.equal(d[:300], G[0, :300])
    assert set(d[300:].tolist()) == set(G[:, 300].tolist())


_SMALL_DYADICS = st.sampled_from([-3.0, -1.5, -1.0, -0.25, 0.0, 0.0, 0.5, 1.0, 2.0])


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5).flatmap(
        lambda tasks: st.lists(
            st.lists(_SMALL_DYADICS, min_size=tasks, max_size=tasks), min_size=1, max_size=40
        )
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_graddrop_parameters_direction_keeps_one_sign_per_entry(rows, seed):
    """On small dyadic gradients (every sum exact), each entry of ``d`` is exactly the sum of
    the kept tasks' gradients under Algorithm 1's masks for the drawn U: all the positive
    ones, all the negative ones, or none (no gradient, or an exact tie)."""
    from taskbalance.methods._graddrop import _parameters_direction

    G = torch.tensor(rows).T.contiguous()  # [K, P]
    _, _, d = _parameters_direction(G, 0.0, torch.Generator().manual_seed(seed), 1.0, False)
    U = torch.rand(G.shape[1], generator=torch.Generator().manual_seed(seed)).double()
    wide = G.double()
    P = torch.nan_to_num(0.5 * (1 + wide.sum(0) / wide.abs().sum(0)), nan=0.5)
    M = ((U < P) & (wide > 0)) | ((U > P) & (wide < 0))
    assert torch.equal(d.double(), (M * wide).sum(0))


@pytest.mark.parametrize("coordinates", [300, 70_000])  # below and above _FEW_COORDINATES
def test_graddrop_masks_and_coefficients_are_the_formulas_for_few_and_many_coordinates(
    coordinates,
):
    """Both ways of computing the masks (fewest calls, fewest float temporaries) are
    Algorithm 1's ``[P > U]·[G_k > 0] + [P < U]·[G_k < 0]``, zeros and exact ties included."""
    from taskbalance.methods._graddrop import _coefficients, sign_dropout_mask

    generator = torch.Generator().manual_seed(7)
    signed = torch.randn(3, coordinates, generator=generator, dtype=torch.float64)
    signed[:, :50] = 0.0  # no gradient at all: nothing passes
    signed[1, 50:100] = 0.0  # one task without a gradient there
    signed[:, 100:150] = torch.tensor([1.0, -1.0, 1.0])[:, None]  # P = 2/3
    signed[:, 150:200] = torch.tensor([2.0, -1.0, -1.0])[:, None]  # P = 1/2
    U = torch.rand(coordinates, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # P = U exactly (G = (U, U − 1, 0): P = ½(1 + (2U − 1)/1)): neither sign passes
    signed[0, 200:250], signed[1, 200:250], signed[2, 200:250] = U[200:250], U[200:250] - 1, 0.0
    passes = sign_dropout_mask(signed, torch.Generator().manual_seed(3))
    P = torch.nan_to_num(0.5 * (1 + signed.sum(0) / signed.abs().sum(0)), nan=0.5)
    expected = ((P > U) & (signed > 0)) | ((P < U) & (signed < 0))
    assert torch.equal(passes, expected)
    assert not passes[:, :50].any()
    assert not passes[:, 200:250].any()
    cases = [(leak, minus_sum, scale) for leak in (0.0, 0.3, 0.7) for minus_sum in (True, False)
             for scale in (1.0, 2.0**16)]  # fmt: skip
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for leak, minus_sum, scale in cases:
            keep = leak + (1 - leak) * expected.double()
            wanted = ((keep - 1) if minus_sum else keep) / scale  # float64, then one rounding
            got = _coefficients(passes, dtype, leak, minus_sum, scale)
            assert got.dtype == dtype
            assert torch.equal(got, wanted.to(dtype)), (dtype, leak, minus_sum, scale)
            if minus_sum:  # a passing gradient's shift is exactly 0
                assert not got[passes].any()


def test_graddrop_hand_computed_cases():
    z = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    # task gradients at z: (1, 1, 2) and (3, -1, 0); sign(z) = (1, -1, 1)
    # G = (1, -1, 2) and (3, 1, 0): coordinate 0 pure positive (P = 1, both kept), coordinate
    # 2 only task 1 (P = 1, kept), coordinate 1 has P = 1/2 (one of the two survives).
    losses = torch.stack(
        [(z * torch.tensor([1.0, 1.0, 2.0])).sum(), (z * torch.tensor([3.0, -1.0, 0.0])).sum()]
    )
    seen = set()
    b = tb.create("graddrop", num_tasks=2)
    for _ in range(20):
        (grad,) = torch.autograd.grad(b(losses, features=z), z, retain_graph=True)
        assert grad[0, 0].item() == 4.0
        assert grad[0, 2].item() == 2.0
        seen.add(grad[0, 1].item())
    assert seen == {1.0, -1.0}  # the sign of the kept gradient is drawn, never both
    everything = tb.create("graddrop", num_tasks=2, leak=1.0)
    (grad,) = torch.autograd.grad(everything(losses, features=z), z)
    torch.testing.assert_close(grad, torch.tensor([[4.0, 0.0, 2.0]]))
    torch.testing.assert_close(everything.weights, torch.ones(2))


def test_graddrop_keeps_the_positive_sign_with_probability_p():
    z = torch.ones(1, 4000, requires_grad=True)
    # per coordinate, task gradients +3 and -1: P = 3/4
    losses = torch.stack([3 * z.sum(), -z.sum()])
    b = tb.create("graddrop", num_tasks=2, seed=11)
    (grad,) = torch.autograd.grad(b(losses, features=z), z)
    positive = float((grad == 3.0).double().mean())
    assert set(grad.unique().tolist()) <= {3.0, -1.0}
    assert abs(positive - 0.75) < 0.03  # 4000 Bernoulli(3/4) draws: sd 0.007


def test_graddrop_refuses_compute_weights_and_draws_nothing():
    b = tb.create("graddrop", num_tasks=2)
    state = b.generator.get_state()
    with pytest.raises(ValueError, match=r"gram: graddrop drops gradient coordinates"):
        b.compute_weights(torch.ones(2), gram=torch.eye(2))
    assert torch.equal(b.generator.get_state(), state)
    assert int(b.num_steps) == 0


# ---------------------------------------------------------------------------------------------
# DDP: the direction is the global one (the rows of parameters mode are local on each rank)

DDP_CASES = [
    ("db_mtl", "params"),
    ("db_mtl", "features"),
    ("graddrop", "params"),
    ("graddrop", "features"),
    ("moco", "params"),
]
DDP_STEPS = 3
BATCH = 6


def _ddp_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(BATCH, 4, generator=generator), torch.randn(BATCH, K, generator=generator)


def _ddp_run(name: str, mode: str, batches) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Trunk gradients per step (this rank's, and averaged over ranks as DDP would: identity
    in one process), and the heads' gradients averaged over ranks."""
    from taskbalance._distributed import all_reduce_mean

    trunk, heads = _model(7)
    params = list(trunk.parameters())
    b = tb.create(name, num_tasks=K, **({"params": params} if mode == "params" else {}))
    grads = []
    head_grads = []
    for step in range(DDP_STEPS):
        x, y = batches(step)
        z = trunk(x)
        losses = torch.stack(
            [((head(z).squeeze(1) - y[:, k]) ** 2).mean() for k, head in enumerate(heads)]
        )
        trunk.zero_grad()
        heads.zero_grad()
        b(losses, features=z).backward()
        local = _grad_of(params)
        grads.append(torch.stack([local, all_reduce_mean(local)]))
        head_grads.append(all_reduce_mean(_grad_of(heads.parameters())))
        with torch.no_grad():  # the same step on every rank, from the averaged gradient
            offset = 0
            for p in params:
                p -= 0.1 * grads[-1][1][offset : offset + p.numel()].view_as(p)
                offset += p.numel()
    return grads, head_grads


def _ddp_worker(rank: int, store: str, out_dir: str) -> None:
    with gloo_group(rank, store):
        results = {
            f"{name}-{mode}": _ddp_run(name, mode, lambda step: _ddp_batch(step, rank))
            for name, mode in DDP_CASES
        }
        torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory):
    return run_ranks(_ddp_worker, tmp_path_factory.mktemp("directions_ddp"), 2)


def _whole_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_ddp_batch(step, rank) for rank in range(2)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


@pytest.mark.parametrize(("name", "mode"), DDP_CASES)
def test_ddp_direction_is_the_global_batchs(ddp_results, name, mode):
    """Two ranks with different batches apply the direction of one process that sees both
    batches (equal sizes: the mean loss over the union is the mean of the ranks' losses), and
    the heads get that process's gradients too (DB-MTL's: of the union's log-loss)."""
    key = f"{name}-{mode}"
    reference, reference_heads = _ddp_run(name, mode, _whole_batch)
    (rank0, heads0), (rank1, heads1) = (results[key] for results in ddp_results)
    for step in range(DDP_STEPS):
        torch.testing.assert_close(heads0[step], heads1[step], rtol=0, atol=0)
        torch.testing.assert_close(heads0[step], reference_heads[step], rtol=1e-5, atol=1e-7)
        averaged = rank0[step][1]
        torch.testing.assert_close(rank1[step][1], averaged, rtol=0, atol=0)
        torch.testing.assert_close(averaged, reference[step][0], rtol=1e-4, atol=1e-6)
        if mode == "params":  # every rank's own gradient is already the global direction
            torch.testing.assert_close(rank0[step][0], averaged, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(rank1[step][0], averaged, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# MoCo: tracked gradients and a projected-gradient step on λ


def _project_simplex_by_bisection(v: torch.Tensor) -> torch.Tensor:
    """Π_Δ(v) = max(v − τ, 0) with Σ = 1, τ found by bisection (independent of the sort)."""
    low, high = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        tau = (low + high) / 2
        if float((v - tau).clamp_min(0).sum()) > 1:
            low = tau
        else:
            high = tau
    return (v - (low + high) / 2).clamp_min(0)


def _moco_reference(steps: int, beta, beta_sigma, gamma, gamma_sigma, rho):
    trunk, heads = _model(5)
    params = list(trunk.parameters())
    Y = torch.zeros(K, sum(p.numel() for p in params), dtype=torch.float64)
    lam = torch.full((K,), 1 / K, dtype=torch.float64)
    out = []
    for t in range(1, steps + 1):
        _, losses = _losses(trunk, heads, t)
        H = torch.stack([_flat_grads(losses[k], params) for k in range(K)]).double()
        Y = Y - beta / t**beta_sigma * (Y - H)
        step = gamma / t**gamma_sigma
        lam = _project_simplex_by_bisection(lam - step * (Y @ Y.T + rho * torch.eye(K)) @ lam)
        d = Y.T @ lam
        out.append((d.float(), lam.float()))
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= 0.1 * d[offset : offset + p.numel()].view_as(p).float()
                offset += p.numel()
    return out


@pytest.mark.parametrize("python_max_k", [40, 0])  # λ's step in Python floats, or tensors
@pytest.mark.parametrize(
    "hparams",
    [{}, {"beta": 0.9, "beta_sigma": 0.0, "gamma": 2.0, "gamma_sigma": 0.0, "rho": 0.5}],
)
def test_moco_is_algorithm_1(hparams, python_max_k, monkeypatch):
    from taskbalance.methods import _moco

    monkeypatch.setattr(_moco, "_PYTHON_MAX_K", python_max_k)
    settings = {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.0}
    settings.update(hparams)
    expected = _moco_reference(5, **settings)
    trunk, heads = _model(5)
    params = list(trunk.parameters())
    b = tb.create("moco", num_tasks=K, params=params, **hparams)
    for t, (d, lam) in enumerate(expected, start=1):
        _, losses = _losses(trunk, heads, t)
        head_grads = [_flat_grads(losses[k], heads[k].parameters()) for k in range(K)]
        trunk.zero_grad()
        heads.zero_grad()
        b(losses).backward()
        torch.testing.assert_close(b.weights, lam, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_grad_of(params), d, rtol=1e-4, atol=1e-7)
        for k in range(K):
            torch.testing.assert_close(_grad_of(heads[k].parameters()), head_grads[k])
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad


def test_moco_refuses_features_mode_and_compute_weights():
    with pytest.raises(ValueError, match=r"params: moco tracks each task's gradient"):
        tb.create("moco", num_tasks=2)
    trunk, _ = _model()
    b = tb.create("moco", num_tasks=2, params=trunk.parameters())
    with pytest.raises(ValueError, match=r"gram: moco tracks the task gradients"):
        b.compute_weights(torch.ones(2), gram=torch.eye(2))
    assert int(b.moco_steps) == 0
    assert torch.equal(b.tracked, torch.zeros_like(b.tracked))


def test_moco_skips_non_finite_gradients_and_reuses_weights_for_an_absent_task():
    import math

    shared = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    b = tb.create("moco", num_tasks=2, params=shared, on_nonfinite="skip")
    b(torch.stack([(shared**2).sum(), shared.sum()])).backward()
    state = {k: v.clone() for k, v in b.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        shared.zero_()
    objective = b(torch.stack([torch.sqrt(shared).sum() + 1.0, shared.sum() + 1.0]))
    assert math.isnan(objective.item())
    for key, value in b.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[key]), key
    # an absent task: the last λ for the present one, Jᵀw of the current gradients
    with torch.no_grad():
        shared.fill_(1.0)
    shared.grad = None
    last = b.weights
    losses = torch.stack([(shared**2).sum(), torch.tensor(math.nan)])
    b(losses, present=torch.tensor([True, False])).backward()
    torch.testing.assert_close(b.weights, torch.tensor([float(last[0]), 0.0]))
    torch.testing.assert_close(shared.grad, last[0] * 2 * shared.detach())


def test_moco_changes_a_hyperparameter_on_resume():
    trunk, heads = _model()
    old = tb.create("moco", num_tasks=K, params=trunk.parameters(), gamma=0.1)
    _, losses = _losses(trunk, heads, 0)
    old(losses).backward()
    new = tb.create("moco", num_tasks=K, params=trunk.parameters(), gamma=0.5)
    new.allow_changed_hyperparameters("gamma").load_state_dict(old.state_dict())
    assert new.gamma == 0.5
    assert torch.equal(new.tracked, old.tracked)
    assert torch.equal(new.lambdas, old.lambdas)
