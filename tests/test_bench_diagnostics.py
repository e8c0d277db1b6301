"""The harness's gradient-conflict record against cosines computed by hand from task gradients."""

from __future__ import annotations

import csv

import pytest
import torch

import taskbalance as tb
from taskbalance.bench import TrainConfig, load_benchmark, train_run
from taskbalance.bench.harness import GlobalBatchSampler
from taskbalance.bench.report import write_diagnostics_csv


def _by_hand(losses, features):
    gradients = [
        torch.autograd.grad(loss, features, retain_graph=True)[0].flatten().double()
        for loss in losses
    ]
    count = len(gradients)
    cosines = torch.empty(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(count):
            cosines[i, j] = torch.dot(gradients[i], gradients[j]) / (
                gradients[i].norm() * gradients[j].norm()
            )
    norms = torch.stack([gradient.norm() for gradient in gradients])
    return cosines, norms


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
    cosines, norms = _by_hand(losses, features)
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
