"""The training-loop recipes in examples/loop_*.py run and do what they print."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    return capsys.readouterr().out


def test_accumulation_example(capsys):
    out = _run("loop_accumulation", capsys)
    assert "optimiser steps: 10, balancer calls: 40" in out
    assert "balancer steps: 10" in out
    assert "weights fixed within each window: True" in out


def test_amp_skip_example(capsys):
    out = _run("loop_amp_skip", capsys)
    assert "skipped steps: [5]" in out
    assert "balancer steps: 11 of 12 calls" in out
    assert "model unchanged by the skipped step: True" in out


def test_partial_labels_example(capsys):
    out = _run("loop_partial_labels", capsys)
    assert "every task improved: True" in out
    assert "batches with an absent task: 0 of" not in out
