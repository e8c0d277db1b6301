"""DDP(find_unused_parameters=True) (issue 8, item 1) on two gloo CPU processes.

``examples/ddp_unused_parameters.py`` checks that ``z`` taken from the DDP model's outputs is
refused on both ranks (DDP routes outputs through a new autograd node), and that ``z`` caught
inside the forward trains with the weights and model of a single-process run on the
concatenated shards.
"""

from __future__ import annotations

import pytest

from test_compile import run_example


# heads="weighted" and heads="unweighted"; each run spawns two processes (~10 s on 2 cores)
@pytest.mark.parametrize("method", ["mgda", pytest.param("upgrad", marks=pytest.mark.slow)])
def test_ddp_find_unused_parameters_pattern_and_pitfall(method):
    stdout = run_example("ddp_unused_parameters.py", method)
    assert "z from the DDP outputs refused on every rank: True" in stdout
    assert "identical weights on both ranks at every step: True" in stdout
    assert "weights and model equal the single-process run: True" in stdout
    line = next(r for r in stdout.splitlines() if r.startswith("largest difference"))
    assert float(line.rsplit(" ", 1)[1]) <= 1e-5
