"""`taskbalance train` under torchrun: 2 CPU processes (DDP, gloo) equal one process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _train(out: Path, processes: int, method: str) -> dict[tuple[str, str, str], float]:
    arguments = ["-m", "taskbalance.bench.cli", "train", "--bench", "multidigits", "--small"]
    arguments += ["--method", method, "--epochs", "2", "--quiet", "--out", str(out)]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    result = subprocess.run(
        [*launcher, *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("test metrics") == 1  # only rank 0 reports
    with (out / "metrics.csv").open() as handle:
        return {
            (row["epoch"], row["split"], row["name"]): float(row["value"])
            for row in csv.DictReader(handle)
        }


@pytest.mark.slow
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    # MGDA in features mode: the Gramian is all-reduced, so both ranks compute the same weights.
    method = "mgda"
    single = _train(tmp_path / "one", 1, method)
    distributed = _train(tmp_path / "two", 2, method)
    assert single.keys() == distributed.keys()
    for key, value in single.items():
        assert distributed[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
