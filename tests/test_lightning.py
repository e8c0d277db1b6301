"""The Lightning recipe runs: 2-process CPU DDP training with a balancer, logging its weights,
and resuming from a Lightning checkpoint restores the balancer's state exactly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from test_packaging import run_checked

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_lightning_ddp_resume_restores_the_balancer_exactly(tmp_path: Path) -> None:
    # gradvac: a gradient method (features mode, Gramian reduced over the ranks) with an EMA
    # state and a generator; uw: learned log-scales in their own optimiser group.
    methods = ["gradvac", "uw"]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "TASKBALANCE_LIGHTNING_EXAMPLE_DIR": str(tmp_path),
    }
    command = [sys.executable, str(ROOT / "examples" / "lightning_module.py")]
    stdout = run_checked([*command, "--methods", ",".join(methods)], ROOT, env)
    for method in methods:
        assert f"{method}: trained on 2 processes (DDP)" in stdout
        assert f"{method}: balancer steps 8 after epoch 1, 16 after epoch 2" in stdout
        assert f"{method}: resumed balancer state equals the uninterrupted run's: True" in stdout
        assert f"{method}: resumed model equals the uninterrupted run's: True" in stdout
        assert f"{method}: weights logged at 16 of 16 steps" in stdout
        assert f"{method}: steps trained after resuming: 8" in stdout
    checkpoint = tmp_path / "uw" / "interrupted" / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
