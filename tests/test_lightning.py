"""The Lightning recipe runs: 2-process CPU DDP training with a balancer, logging its weights,
and resuming from a Lightning checkpoint restores the balancer's state exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "lightning_module.py"),
            "--methods",
            ",".join(methods),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for method in methods:
        assert f"{method}: balancer steps 8 after epoch 1, 16 after epoch 2" in result.stdout
        assert f"{method}: resumed balancer state equals the uninterrupted run's: True" in (
            result.stdout
        )
        assert f"{method}: resumed model equals the uninterrupted run's: True" in result.stdout
        assert f"{method}: weights logged at 16 of 16 steps" in result.stdout
        assert f"{method}: steps trained after resuming: 8" in result.stdout
    # Both ranks ran: Lightning started the second process and both joined the process group.
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    checkpoint = tmp_path / "uw" / "interrupted" / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
