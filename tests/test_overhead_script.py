"""benchmarks/overhead.py runs end to end (tiny settings) and pools its reference copies."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("overhead_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_every_section_with_pooled_references(overhead, tmp_path, capsys):
    table = tmp_path / "overhead.csv"
    steps = 2
    overhead.main(
        ["--ks", "2", "--methods", "mgda,uw", "--steps", str(steps), "--warmup", "1",
         "--torchjd", "none", "--csv", str(table)]
    )  # fmt: skip
    report = capsys.readouterr().out
    for heading in ("Loss-based methods", "features mode", "parameters mode"):
        assert heading in report
    rows = {row["variant"]: row for row in csv.DictReader(table.open())}
    assert not [key for key in rows if "#" in key]  # the copies are merged, not listed
    copies = overhead.REFERENCE_COPIES
    for reference in ("ew", "lower_bound_loop/features", "lower_bound/params"):
        assert int(rows[reference]["n"]) == copies * steps
    assert int(rows["mgda/features"]["n"]) == steps
    assert float(rows["mgda/features"]["median_ms"]) > 0
