"""``tb.gradient_diagnostics`` and the harness's record of it, against cosines and norms computed
by hand from per-task gradients."""

from __future__ import annotations

import csv

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import taskbalance as tb
from taskbalance.bench import TrainConfig, load_benchmark, train_run
from taskbalance.bench.harness import GlobalBatchSampler
from taskbalance.bench.report import write_diagnostics_csv


def by_hand(gradients: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine matrix and norms of flat per-task gradients, one dot product at a time."""
    count = len(gradients)
    cosines = torch.empty(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(count):
            cosines[i, j] = torch.dot(gradients[i], gradients[j]) / (
                gradients[i].norm() * gradients[j].norm()
            )
    return cosines, torch.stack([gradient.norm() for gradient in gradients])


def test_exported_from_the_package():
    assert "gradient_diagnostics" in tb.__all__
    assert "GradientDiagnostics" in tb.__all__
    assert isinstance(tb.gradient_diagnostics(torch.eye(2)), tb.GradientDiagnostics)


def test_equal_cosines_of_per_task_gradients_of_a_network():
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh())
    heads = [torch.nn.Linear(7, 1) for _ in range(4)]
    features = trunk(torch.randn(16, 5))
    losses = torch.stack([(head(features) - k).pow(2).mean() for k, head in enumerate(heads)])
    found = tb.gradient_diagnostics(tb.gramian(losses, features, dtype=torch.float64))
    gradients = [
        torch.autograd.grad(loss, features, retain_graph=True)[0].flatten().double()
        for loss in losses
    ]
    cosines, norms = by_hand(gradients)
    torch.testing.assert_close(found.cosines, cosines, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(found.norms, norms, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(found.norm_ratios, norms / norms.mean(), rtol=1e-6, atol=1e-12)
    upper = [float(cosines[i, j]) for i in range(4) for j in range(i + 1, 4)]
    assert found.conflict_fraction == sum(value < 0 for value in upper) / 6


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda k: st.lists(
            st.lists(st.floats(-10, 10, allow_nan=False), min_size=3, max_size=3),
            min_size=k,
            max_size=k,
        )
    )
)
def test_any_jacobian_matches_the_hand_computation(rows):
    jacobian = torch.tensor(rows, dtype=torch.float64)
    norms = jacobian.norm(dim=1)
    if bool((norms < 1e-3).any()):
        return  # zero gradients: the next test pins their convention
    found = tb.gradient_diagnostics(jacobian @ jacobian.T)
    cosines, hand_norms = by_hand(list(jacobian))
    torch.testing.assert_close(found.cosines, cosines.clamp(-1, 1), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(found.norms, hand_norms, rtol=1e-7, atol=1e-9)
    assert found.norm_ratios.mean().item() == pytest.approx(1.0)
    count = len(rows)
    conflicting = sum(
        float(cosines[i, j]) < -1e-9 for i in range(count) for j in range(i + 1, count)
    )
    uncertain = sum(
        abs(float(cosines[i, j])) <= 1e-9 for i in range(count) for j in range(i + 1, count)
    )
    pairs = count * (count - 1) / 2
    assert conflicting / pairs <= found.conflict_fraction <= (conflicting + uncertain) / pairs


def test_opposite_zero_and_orthogonal_gradients_and_bad_input():
    gram = torch.tensor(
        [[1.0, -1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    )
    found = tb.gradient_diagnostics(gram)
    assert found.cosines.dtype == torch.float64
    assert found.cosines[0, 1] == -1.0
    assert found.cosines[0, 2] == 0.0
    assert found.cosines[3, 3] == 0.0  # a zero gradient has no direction
    assert found.norms.tolist() == [1.0, 1.0, 2.0, 0.0]
    assert found.norm_ratios.tolist() == [1.0, 1.0, 2.0, 0.0]
    assert found.conflict_fraction == pytest.approx(1 / 6)
    one = tb.gradient_diagnostics(torch.tensor([[9.0]]))
    assert one.norms.tolist() == [3.0]
    assert one.conflict_fraction == 0.0
    with pytest.raises(ValueError, match=r"gram: expected a \[K, K\] tensor, got shape \(2, 3\)"):
        tb.gradient_diagnostics(torch.ones(2, 3))
    with pytest.raises(ValueError, match="gram: expected finite"):
        tb.gradient_diagnostics(torch.tensor([[float("nan")]]))


def test_harness_records_the_first_steps_gramian(tmp_path):
    pytest.importorskip("sklearn")
    benchmark = load_benchmark("digits-mixed", small=True)
    config = TrainConfig(seed=3, epochs=2, diagnostics_every=2)
    run = train_run(benchmark, "pcgrad", config=config)
    assert run.diagnostic_steps == [0, 2, 4, 6]  # 256 examples in batches of 64: 8 steps
    # Step 0 by hand: same seed, same initial model, same first batch.
    torch.manual_seed(3)
    model = benchmark.build_model()
    batch = next(iter(GlobalBatchSampler(len(benchmark.train), 64, seed=3)))
    inputs, targets = benchmark.train.__getitems__(batch).batch
    features, outputs = model(inputs)
    losses = [
        task.loss(output, target)
        for task, output, target in zip(benchmark.tasks, outputs, targets, strict=True)
    ]
    gradients = [
        torch.autograd.grad(loss, features, retain_graph=True)[0].flatten().double()
        for loss in losses
    ]
    cosines, norms = by_hand(gradients)
    recorded = tb.gradient_diagnostics(torch.tensor(run.diagnostic_grams[0], dtype=torch.float64))
    torch.testing.assert_close(recorded.cosines, cosines, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recorded.norms, norms, rtol=1e-5, atol=1e-9)
    path = tmp_path / "diagnostics.csv"
    write_diagnostics_csv([run], path)
    with path.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["step"] == "0"]
    assert len(rows) == 6  # 4 tasks: 6 pairs
    first = rows[0]
    assert (first["task_i"], first["task_j"]) == ("digit", "parity")
    assert float(first["cosine"]) == pytest.approx(float(cosines[0, 1]), rel=1e-5, abs=1e-6)
    assert float(first["norm_ratio"]) == pytest.approx(float(norms[0] / norms[1]), rel=1e-5)
