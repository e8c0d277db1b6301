"""The examples run: DDP + bf16 autocast with a gradient method keeps both ranks identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["pcgrad", "uw"])
def test_ddp_amp_example_keeps_ranks_identical(method):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ddp_amp.py"), method],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical weights on both ranks at every step: True" in result.stdout
    assert "identical models on both ranks after 20 steps: True" in result.stdout
