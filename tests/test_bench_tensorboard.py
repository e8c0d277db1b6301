"""`taskbalance train --tensorboard DIR`: the run's weights, losses and metrics as scalars."""

from __future__ import annotations

import csv

import pytest

from taskbalance.bench.cli import main

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tensorboard package (the [tensorboard] extra, part of [dev]) is not installed",
)


def test_train_writes_the_recorded_weights_and_metrics(tmp_path, capsys):
    out, board = tmp_path / "run", tmp_path / "board"
    code = main(
        [
            "train",
            "--bench",
            "noisy-regression",
            "--method",
            "uw",
            "--epochs",
            "2",
            "--small",
            "--quiet",
            "--out",
            str(out),
            "--tensorboard",
            str(board),
        ]
    )
    assert code == 0
    assert f"wrote TensorBoard scalars to {board}" in capsys.readouterr().out
    events = event_accumulator.EventAccumulator(str(board))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    with (out / "weights.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    tasks = [name.removeprefix("w_") for name in rows[0] if name.startswith("w_")]
    assert tasks == ["y0", "y1", "y2"]
    for task in tasks:
        logged = {event.step: event.value for event in events.Scalars(f"weights/{task}")}
        assert logged == {
            int(row["step"]): pytest.approx(float(row[f"w_{task}"]), rel=1e-6) for row in rows
        }
    assert {f"train_loss/{task}" for task in tasks} <= tags
    assert any(tag.startswith("test/") for tag in tags)
    assert [event.step for event in events.Scalars(f"train_loss/{tasks[0]}")] == [1, 2]
